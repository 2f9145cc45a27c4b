"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class LorexError(Exception):
    """A problem with the user's input (path, file, option), not a bug in lorex."""
