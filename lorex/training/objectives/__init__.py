"""Training objectives: each says what one batch's loss is; :mod:`lorex.training.engine` runs it."""
