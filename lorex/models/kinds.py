"""The adapter kinds a model directory can hold, each owning one field of ``config.json``.

``lorex.models.store`` knows no kind by name: it asks every kind in ``ADAPTER_KINDS`` (in order)
to describe itself when a model is saved, to rebuild itself on the untrained model when one is
loaded, and to write or re-apply any files of its own. A new kind subclasses ``AdapterKind``,
overrides the hooks it needs and joins the tuple; the field order in saved configs follows the
tuple (the ``describe`` fields come before ``made_by``, the ``save`` fields last).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

from lorex.adapters import gated, lora
from lorex.adapters.losa import LosaSideNetwork
from lorex.errors import LorexError
from lorex.models.layout import file_sha256
from lorex.models.model import LorexModel


class AdapterKind:
    """How one kind of adapter is stored. Every hook does nothing by default."""

    #: Its field in ``config.json``, absent when a model has none of this kind.
    field: ClassVar[str]

    def describe(self, model: LorexModel) -> Any:
        """Its config entry, enough to rebuild it with no weights (None: the model has none)."""
        return None

    def rebuild(self, model: LorexModel, entry: Any, source: Path) -> None:
        """Re-create it on an untrained model (possibly on the meta device) from ``entry``,
        before the weights are loaded."""

    def check(self, entry: Any, source: Path) -> None:
        """Refuse a malformed entry, in one line naming ``source``."""

    def check_save(self, model: LorexModel, weights: str) -> None:
        """Refuse a save (``weights`` "full" or "delta") this kind cannot be written as."""

    def save(self, model: LorexModel, folder: Path, base: str | None) -> Any:
        """Write its own files into the model directory ``folder``; their config entry (None:
        nothing written). ``base`` is the base model's path as the caller gave it."""
        return None

    def load(self, model: LorexModel, folder: Path, entry: Any) -> None:
        """Re-apply its own files from ``folder`` after the model's weights are loaded."""


class LosaSide(AdapterKind):
    """A LoSA side network: ``model.side``, its weights inside ``model.safetensors``."""

    field = "side"

    def describe(self, model: LorexModel) -> Any:
        return model.side.describe() if model.side is not None else None

    def rebuild(self, model: LorexModel, entry: Any, source: Path) -> None:
        model.side = LosaSideNetwork.from_description(entry, str(source))


class GatedExperts(AdapterKind):
    """SAGE's gated mixture of LoRA experts in the backbone; weights in ``model.safetensors``."""

    field = "gate"

    def describe(self, model: LorexModel) -> Any:
        config = getattr(model.backbone, "gate_config", None)
        return config.describe() if config is not None else None

    def rebuild(self, model: LorexModel, entry: Any, source: Path) -> None:
        gated.attach_gate(model.backbone, gated.GateConfig.from_description(entry, str(source)))


#: The states an adapter is recorded in; ``merged`` ones are folded in again on load.
ADAPTER_STATES = ("active", "inactive", "merged")


class LoraAdapters(AdapterKind):
    """Named LoRA adapters, each in its own folder in PEFT's format (``adapter/`` for "default"),
    listed in ``adapters`` with its state, weight, hash and config."""

    field = "adapters"

    def check_save(self, model: LorexModel, weights: str) -> None:
        if weights == "full" and lora.lora_layers(model.backbone):
            raise LorexError(
                "a model with LoRA adapters saves as a delta, or merged (lorex merge-adapter)"
            )

    def save(self, model: LorexModel, folder: Path, base: str | None) -> Any:
        if not lora.adapter_configs(model.backbone):
            return None
        active = lora.active_adapters(model.backbone)
        merged = {n for layer in lora.lora_layers(model.backbone).values() for n in layer.merged}
        entries = []
        for name, cfg in lora.adapter_configs(model.backbone).items():
            sub = "adapter" if name == "default" else f"adapters/{name}"
            lora.save_adapter(model.backbone, name, folder / sub, base)
            state = "merged" if name in merged else "active" if name in active else "inactive"
            entries.append(
                {
                    "name": name,
                    "path": sub,
                    "state": state,
                    "weight": active.get(name),
                    "sha256": file_sha256(folder / sub / lora.model.WEIGHTS_NAME),
                    "config": cfg.to_peft(base),
                }
            )
        return entries

    def load(self, model: LorexModel, folder: Path, entry: Any) -> None:
        if not entry:
            return
        for item in entry:  # checked by ``check``
            sub = folder / item["path"]
            weights_file = sub / lora.model.WEIGHTS_NAME
            if not weights_file.is_file():
                raise LorexError(f"{weights_file}: file not found")
            if item.get("sha256") and file_sha256(weights_file) != item["sha256"]:
                raise LorexError(
                    f"{weights_file}: adapter changed since {folder} was made (hash mismatch)"
                )
            lora.load_adapter(model.backbone, sub, item["name"])
        lora.set_weighted_adapters(
            model.backbone,
            {e["name"]: float(e.get("weight") or 1.0) for e in entry if e["state"] == "active"},
        )
        for item in entry:
            if item["state"] == "merged":
                lora.merge_adapter(model.backbone, item["name"])

    def check(self, entry: Any, source: Path) -> None:
        """A list of {name, path, state[, weight, sha256, config]} objects."""
        if not isinstance(entry, list):
            raise LorexError(f"{source}: field 'adapters' must be a list")
        names = set()
        for item in entry:
            if not isinstance(item, dict) or not {"name", "path", "state"} <= set(item):
                raise LorexError(
                    f"{source}: field 'adapters' must list {{name, path, state}} objects"
                )
            name = item["name"]
            if not isinstance(name, str) or not name or "." in name or name in names:
                raise LorexError(
                    f"{source}: adapter name {name!r}: must be unique, non-empty, no '.'"
                )
            names.add(name)
            _check_adapter_entry(item, f"{source}: adapter '{name}'")


def _check_adapter_entry(item: dict, where: str) -> None:
    path, weight = item["path"], item.get("weight")
    if not isinstance(path, str) or not path or Path(path).is_absolute():
        raise LorexError(f"{where}: 'path' must be a relative folder")
    if item["state"] not in ADAPTER_STATES:
        raise LorexError(f"{where}: 'state' must be one of {', '.join(ADAPTER_STATES)}")
    if weight is not None and not (
        isinstance(weight, int | float) and not isinstance(weight, bool) and math.isfinite(weight)
    ):
        raise LorexError(f"{where}: 'weight' must be a number")
    if not isinstance(item.get("sha256"), str | None):
        raise LorexError(f"{where}: 'sha256' must be a string")
    if not isinstance(item.get("config", {}), dict):
        raise LorexError(f"{where}: 'config' must be an object")


#: Every adapter kind, in the order they are described, rebuilt, saved and loaded.
ADAPTER_KINDS: tuple[AdapterKind, ...] = (LosaSide(), GatedExperts(), LoraAdapters())
