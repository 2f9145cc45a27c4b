"""``setting``: a dataclass field that carries the help of its command-line flag.

Every config (LoRA, LoSA, SAGE, cross-modal, merge options) declares its fields this way, PEFT
style, and ``lorex.cli.config_flags`` builds the flags from them: the help is written once, next
to the default it explains. A leaf module, so configs in any layer can use it."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """``field(default=default, metadata={"help": help, **metadata})``. Other metadata keys the
    CLI reads: ``flag`` (its name when not ``--field-name``), ``choices``, ``check`` (positive,
    non_negative, seed, positive_or_auto), ``metavar`` and ``cli=False`` (no flag)."""
    return field(default=default, metadata={"help": help, **metadata})
