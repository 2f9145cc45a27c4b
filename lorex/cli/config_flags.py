"""Command-line flags generated from config dataclasses, so a setting is written once.

A field carries its own help, as PEFT's configs do: ``field(default=..., metadata={"help": ...})``.
Other metadata keys, all optional: ``flag`` (its name; default ``--field-name``), ``choices``,
``check`` (a stricter parse: positive, non_negative, seed, positive_or_auto; ``parsing.CHECKS``)
and ``cli: False`` (no flag). The field's type gives the rest: a bool is ``--x/--no-x``, a list
takes one or more values.

Every generated flag defaults to None, "not given": the config's own default then applies, and
``--help`` shows it, read from the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, Field, dataclass
from typing import Any

from lorex.cli.parsing import CHECKS


@dataclass(frozen=True)
class FlagSpec:
    """One field as a flag: its name, where argparse stores it, how it parses, its help."""

    name: str
    default: Any
    meta: dict[str, Any]
    flag: str
    dest: str
    kwargs: dict[str, Any]


def flag_specs(cls: type, metadata: dict[str, dict[str, Any]] | None = None) -> list[FlagSpec]:
    """The flags of ``cls``'s fields, in field order. ``metadata`` adds keys a field's own
    metadata does not have (the field's win)."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        meta = {**(metadata or {}).get(f.name, {}), **f.metadata}
        if meta.get("cli", True) is False:
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        kwargs = _parse_kwargs(cls, f.name, hints[f.name], meta)
        specs.append(FlagSpec(f.name, _default(f), meta, flag, flag[2:].replace("-", "_"), kwargs))
    return specs


def _default(f: Field) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None if f.default is MISSING else f.default


def _parse_kwargs(cls: type, name: str, hint: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """argparse's ``type``/``action``/``nargs``/``choices`` for a field of type ``hint``."""
    kinds = [t for t in (typing.get_args(hint) if _is_union(hint) else (hint,)) if t is not None]
    kinds = [t for t in kinds if t is not type(None)]
    kwargs: dict[str, Any] = {}
    lists = [t for t in kinds if typing.get_origin(t) is list]
    if lists:
        kwargs["nargs"] = "+"
        kinds = list(typing.get_args(lists[0]))
    base = next((t for t in kinds if t is not str), str)
    if "choices" in meta:
        kwargs["choices"] = meta["choices"]
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    if base is bool:
        return {**kwargs, "action": argparse.BooleanOptionalAction}
    if "check" in meta:
        parsers = CHECKS[meta["check"]]
        if base not in parsers:
            raise TypeError(f"{cls.__name__}.{name}: check {meta['check']!r} is not for {base}")
        return {**kwargs, "type": parsers[base]}
    if base not in (int, float, str):
        raise TypeError(f"{cls.__name__}.{name}: no flag for type {hint!r}; set 'cli': False")
    return kwargs if base is str else {**kwargs, "type": base}


def _is_union(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union


def help_text(spec: FlagSpec) -> str:
    """The field's help with its default, unless the help already says it; '%' escaped."""
    text = spec.meta.get("help", "")
    default = spec.default
    if default is not None and "default" not in text:
        text = f"{text} ({_shown(default)})"
    return text.replace("%", "%%")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    metadata: dict[str, dict[str, Any]] | None = None,
) -> None:
    """One flag per field of the config dataclass ``cls``."""
    for spec in flag_specs(cls, metadata):
        parser.add_argument(spec.flag, dest=spec.dest, help=help_text(spec), **spec.kwargs)


def given_settings(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line, by field name."""
    values = {s.name: getattr(args, s.dest, None) for s in flag_specs(cls)}
    return {name: value for name, value in values.items() if value is not None}


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The config: the flags given, the dataclass's defaults for the rest."""
    return cls(**given_settings(cls, args))


def add_union_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    configs: dict[str, type],
    metadata: dict[str, dict[str, Any]] | None = None,
) -> None:
    """One flag per field name over several configs (``{owner: dataclass}``, e.g. every merge
    method's options): its help names each owner with that owner's default."""
    owners: dict[str, list[tuple[str, FlagSpec]]] = {}
    for owner, cls in configs.items():
        for spec in flag_specs(cls, metadata):
            owners.setdefault(spec.name, []).append((owner, spec))
    for specs in owners.values():
        helps: dict[str, list[str]] = {}  # help text -> the owners that give it
        for owner, spec in specs:
            if "help" in spec.meta:
                helps.setdefault(spec.meta["help"], []).append(owner)
        text = "; ".join(
            h if len(helps) == 1 else f"{', '.join(who)}: {h}" for h, who in helps.items()
        )
        defaults = ", ".join(
            o if s.default is None else f"{o} {_shown(s.default)}" for o, s in specs
        )
        text = f"{text} ({defaults})" if text else defaults
        first = specs[0][1]
        parser.add_argument(
            first.flag, dest=first.dest, help=text.replace("%", "%%"), **first.kwargs
        )
