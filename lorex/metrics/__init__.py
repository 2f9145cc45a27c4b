"""Metrics as plain functions on arrays, and resource measurement for training runs."""

from lorex.metrics.classification import accuracy, confusion_matrix

__all__ = ["accuracy", "confusion_matrix"]
