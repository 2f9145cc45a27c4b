"""argparse the lorex way: a usage error is one line with exit status 2, and each number is
checked as it is read ("must be at least 1"), so no command sees a value out of range."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


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


def _number(text: str, kind: type, ok: Callable[[Any], bool], rule: str) -> Any:
    """``text`` as an int or float that passes ``ok``; else argparse's one-line error."""
    what = "a whole number" if kind is int else "a number"
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{rule}, got {value if kind is int else text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "must be at least 1")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < math.inf, "must be a positive number")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < math.inf, "must be a number >= 0")


def seed(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v < 2**63, "must be a whole number in [0, 2**63)")


def positive_or_auto(text: str) -> float | str:
    return text if text == "auto" else positive_float(text)


#: How a config field's ``check`` (in its metadata) parses its flag, by the field's own type.
CHECKS: dict[str, dict[type, Callable[[str], object]]] = {
    "positive": {int: positive_int, float: positive_float},
    "non_negative": {float: non_negative_float},
    "seed": {int: seed},
    "positive_or_auto": {float: positive_or_auto},
}
