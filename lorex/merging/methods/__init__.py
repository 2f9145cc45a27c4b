"""Every merge method, listed once, in order; ``method_from_name`` builds one by its name.

One module per method; the maths several share lives in ``lorex.merging.ops`` and the option
fields several share in ``lorex.merging.option_fields``, so method modules never import each
other. The registry (``MERGE_METHODS``, in ``lorex.merging.base``) is filled here and nowhere
else; the order is the one ``lorex`` has always listed them in (e.g. in the unknown-name error).
"""

from __future__ import annotations

from typing import Any

from lorex.errors import LorexError
from lorex.merging.base import MERGE_METHODS, MergeMethod, register_merge_method
from lorex.merging.methods.average import Average
from lorex.merging.methods.dare import Dare, DareTies
from lorex.merging.methods.doge import Doge
from lorex.merging.methods.iso_c import IsoC
from lorex.merging.methods.iso_cts import IsoCts
from lorex.merging.methods.task_arithmetic import TaskArithmetic
from lorex.merging.methods.ties import Ties
from lorex.merging.methods.tsv_m import TsvM
from lorex.merging.methods.wudi import Wudi

METHOD_CLASSES: tuple[type[MergeMethod], ...] = (
    Average,
    Ties,
    Dare,
    DareTies,
    Doge,
    IsoC,
    TsvM,
    IsoCts,
    TaskArithmetic,
    Wudi,
)

for _method in METHOD_CLASSES:
    register_merge_method(_method)


def method_from_name(name: str, **options: Any) -> MergeMethod:
    """The method ``name`` with ``options`` (its ``Options`` fields) over its defaults."""
    if name not in MERGE_METHODS:
        raise LorexError(f"unknown merge method '{name}' (known: {', '.join(MERGE_METHODS)})")
    cls = MERGE_METHODS[name]
    return cls(cls.Options(**options))


__all__ = [
    "METHOD_CLASSES",
    "Average",
    "Dare",
    "DareTies",
    "Doge",
    "IsoC",
    "IsoCts",
    "TaskArithmetic",
    "Ties",
    "TsvM",
    "Wudi",
    "method_from_name",
]
