"""argparse the lorex way: a usage error is one line with exit status 2, and each number is
checked as it is read ("must be at least 1"), so no command sees a value out of range."""

from __future__ import annotations

import argparse
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not usage + error) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def one_line(message: str) -> str:
    """``message`` with control characters (a newline in a file or field name, say) escaped, so
    an error stays one line on the terminal."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be a whole number in [0, 2**63), got {value}")
    return value


def positive_or_auto(text: str) -> float | str:
    return text if text == "auto" else positive_float(text)


#: How a config field's ``check`` (in its metadata) parses its flag, by the field's own type.
CHECKS: dict[str, dict[type, Callable[[str], object]]] = {
    "positive": {int: positive_int, float: positive_float},
    "non_negative": {float: non_negative_float},
    "seed": {int: seed},
    "positive_or_auto": {float: positive_or_auto},
}
