"""Model directories on disk: ``config.json`` plus ``model.safetensors``, nothing pickled.

``model.safetensors`` holds either every tensor (``"weights": "full"``) or only what differs from a
base model (``"weights": "delta"``, e.g. the heads of a linear probe); a delta model names its base
in ``config.json`` with the base's content hash, so a changed base is detected, not silently used.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch

from lorex import __version__
from lorex.backbones import build_backbone
from lorex.errors import LorexError
from lorex.io import (
    atomic_directory,
    check_tensors_match,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from lorex.models.model import LorexModel

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
REQUIRED_FIELDS = {"lorex_version", "format_version", "backbone", "heads", "active_head", "weights"}
OPTIONAL_FIELDS = {"base", "made_by", "seed", "metrics", "adapters", "side", "gate"}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_fields(config: dict, path: Path) -> None:
    import difflib

    unknown = sorted(set(config) - REQUIRED_FIELDS - OPTIONAL_FIELDS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], REQUIRED_FIELDS | OPTIONAL_FIELDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise LorexError(f"{path}: unknown field '{unknown[0]}'{hint}")
    missing = sorted(REQUIRED_FIELDS - set(config))
    if missing:
        raise LorexError(f"{path}: missing field '{missing[0]}'")
    heads = config["heads"]
    if not isinstance(heads, dict) or not all(
        isinstance(h, dict)
        and isinstance(h.get("task"), str)
        and isinstance(h.get("classes"), list)
        for h in heads.values()
    ):
        raise LorexError(f"{path}: field 'heads' must map keys to {{'task': str, 'classes': list}}")
    if not isinstance(config["backbone"], dict):
        raise LorexError(f"{path}: field 'backbone' must be an object")
    if config["weights"] not in ("full", "delta"):
        raise LorexError(f"{path}: field 'weights' must be 'full' or 'delta'")
    if config["weights"] == "delta" and not config.get("base"):
        raise LorexError(f"{path}: a 'delta' model needs a 'base' field")
    base = config.get("base")
    if base is not None and not (
        isinstance(base, dict)
        and isinstance(base.get("path"), str)
        and isinstance(base.get("sha256"), str | None)
    ):
        raise LorexError(f"{path}: field 'base' must be {{'path': str, 'sha256': str}}")
    _check_adapter_entries(config.get("adapters"), path)


ADAPTER_STATES = ("active", "inactive", "merged")


def _check_adapter_entries(entries: object, path: Path) -> None:
    """``adapters``: a list of {name, path, state[, weight, sha256, config]} objects."""
    if entries is None:
        return
    if not isinstance(entries, list):
        raise LorexError(f"{path}: field 'adapters' must be a list")
    names = set()
    for entry in entries:
        if not isinstance(entry, dict) or not {"name", "path", "state"} <= set(entry):
            raise LorexError(f"{path}: field 'adapters' must list {{name, path, state}} objects")
        name, where, weight = entry["name"], entry["path"], entry.get("weight")
        if not isinstance(name, str) or not name or "." in name or name in names:
            raise LorexError(f"{path}: adapter name {name!r}: must be unique, non-empty, no '.'")
        names.add(name)
        if not isinstance(where, str) or not where or Path(where).is_absolute():
            raise LorexError(f"{path}: adapter '{name}': 'path' must be a relative folder")
        if entry["state"] not in ADAPTER_STATES:
            raise LorexError(
                f"{path}: adapter '{name}': 'state' must be one of {', '.join(ADAPTER_STATES)}"
            )
        if weight is not None and not (
            isinstance(weight, int | float)
            and not isinstance(weight, bool)
            and math.isfinite(weight)
        ):
            raise LorexError(f"{path}: adapter '{name}': 'weight' must be a number")
        if not isinstance(entry.get("sha256"), str | None):
            raise LorexError(f"{path}: adapter '{name}': 'sha256' must be a string")
        if not isinstance(entry.get("config", {}), dict):
            raise LorexError(f"{path}: adapter '{name}': 'config' must be an object")


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()


def _base_path(model_dir: Path, base: dict) -> Path:
    p = Path(base["path"])
    return p if p.is_absolute() else (model_dir / p)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LorexModel:
    """Load a model directory (or a transformers ``save_pretrained`` directory) in eval mode."""
    path = Path(path)
    if not path.is_dir():
        raise LorexError(f"{path}: model directory not found")
    if not (path / CONFIG).is_file():
        raise LorexError(f"{path}: not a model directory (no {CONFIG})")
    config = read_json(path / CONFIG)
    if "lorex_version" not in config and "model_type" in config:
        return _load_hf_directory(path, device)
    _check_fields(config, path / CONFIG)
    # First without memory (the meta device): a config whose shapes do not fit its weights
    # (a typo in embed_dim, say) is an error naming both, before anything is allocated.
    with torch.device("meta"):
        skeleton = _build(config, path / CONFIG)
    own = load_tensors(path / WEIGHTS)
    state: dict[str, torch.Tensor] = {}
    if config["weights"] == "delta":
        base = config["base"]
        base_dir = _base_path(path, base)
        if not is_model_dir(base_dir) and not (base_dir / CONFIG).is_file():
            raise LorexError(f"{path / CONFIG}: base model {base_dir} not found")
        if (
            base.get("sha256")
            and is_model_dir(base_dir)
            and file_sha256(base_dir / WEIGHTS) != base["sha256"]
        ):
            raise LorexError(
                f"{base_dir}: base weights changed since {path} was made (hash mismatch)"
            )
        state.update(
            {
                k: v
                for k, v in load_model(base_dir).state_dict().items()
                if k.startswith("backbone.")
            }
        )
    state.update(own)
    check_tensors_match(skeleton.state_dict(), state, path / WEIGHTS)
    model = _build(config, path / CONFIG)
    _load_state(model, state, path / WEIGHTS)
    _load_adapters(model, path, config.get("adapters") or [])
    return model.to(device).eval()


def _build(config: dict, source: Path) -> LorexModel:
    """The untrained model ``config`` describes: backbone, heads, side network, gate."""
    try:
        backbone = build_backbone(config["backbone"])
    except LorexError as exc:
        raise LorexError(f"{source}: backbone: {exc}") from None
    model = LorexModel(backbone, config["backbone"])
    for key, info in config["heads"].items():
        kind = info.get("kind", "linear")  # configs before re-ID heads have no "kind"
        try:
            added = model.add_head(info["task"], info["classes"], activate=False, kind=kind)
        except LorexError as exc:
            raise LorexError(f"{source}: head '{key}': {exc}") from None
        if added != key:
            raise LorexError(f"{source}: head key '{key}' does not match task '{info['task']}'")
    active = config["active_head"]
    if active is not None and (not isinstance(active, str) or active not in model.heads):
        raise LorexError(f"{source}: active_head {active!r} is not a head")
    model.active_head = active
    if config.get("side") is not None:
        from lorex.adapters.losa import LosaSideNetwork

        model.side = LosaSideNetwork.from_description(config["side"], str(source))
    if config.get("gate") is not None:
        from lorex.adapters.gated import GateConfig, attach_gate

        attach_gate(model.backbone, GateConfig.from_description(config["gate"], str(source)))
    return model


def _load_adapters(model: LorexModel, path: Path, entries: list) -> None:
    """Re-apply the adapters a model directory records, in their recorded state."""
    from lorex.adapters import lora

    if not entries:
        return
    for entry in entries:  # checked by _check_fields
        folder = path / entry["path"]
        weights_file = folder / lora.model.WEIGHTS_NAME
        if not weights_file.is_file():
            raise LorexError(f"{weights_file}: file not found")
        if entry.get("sha256") and file_sha256(weights_file) != entry["sha256"]:
            raise LorexError(
                f"{weights_file}: adapter changed since {path} was made (hash mismatch)"
            )
        lora.load_adapter(model.backbone, folder, entry["name"])
    lora.set_weighted_adapters(
        model.backbone,
        {e["name"]: float(e.get("weight") or 1.0) for e in entries if e["state"] == "active"},
    )
    for entry in entries:
        if entry["state"] == "merged":
            lora.merge_adapter(model.backbone, entry["name"])


def _load_state(model: LorexModel, state: dict[str, torch.Tensor], source: Path) -> None:
    check_tensors_match(model.state_dict(), state, source)
    model.load_state_dict(state)


def _load_hf_directory(path: Path, device: str | torch.device) -> LorexModel:
    from lorex.backbones.hf import HFBackbone

    backbone = HFBackbone.from_pretrained(path)
    model = LorexModel(backbone, backbone.to_config())
    return model.to(device).eval()


def _save_adapters(model: LorexModel, folder: Path, base: str | None) -> list[dict[str, Any]]:
    """Each adapter in PEFT's format (``adapter/`` for "default"), with its state and hash."""
    from lorex.adapters import lora

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


def save_model(
    model: LorexModel,
    out: str | Path,
    *,
    weights: str = "full",
    base_dir: str | Path | None = None,
    made_by: dict[str, Any] | None = None,
    seed: int | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write a model directory atomically.

    ``weights="delta"`` stores only the heads and names ``base_dir``, which holds the backbone.
    ``extra_files`` maps file names to JSON-able dicts or raw bytes (a PNG) to write beside it.
    """
    from lorex.adapters import lora

    out = Path(out)
    if weights not in ("full", "delta"):
        raise ValueError(f"weights must be 'full' or 'delta', got {weights!r}")
    adapters = lora.adapter_configs(model.backbone)
    if weights == "full" and lora.lora_layers(model.backbone):
        raise LorexError(
            "a model with LoRA adapters saves as a delta, or merged (lorex merge-adapter)"
        )
    state = {
        k: v
        for k, v in model.state_dict().items()
        if weights == "full" or not k.startswith("backbone.")
    }
    config: dict[str, Any] = {
        "lorex_version": __version__,
        "format_version": FORMAT_VERSION,
        "backbone": model.backbone_config,
        "heads": model.head_info,
        "active_head": model.active_head,
        "weights": weights,
    }
    if base_dir is not None:
        base_dir = Path(base_dir)
        # Relative to the model directory, so a tree of base + experts can be moved as a whole.
        base: dict[str, Any] = {"path": os.path.relpath(base_dir.resolve(), out.resolve())}
        if is_model_dir(base_dir):
            base["sha256"] = file_sha256(base_dir / WEIGHTS)
        config["base"] = base
    if model.side is not None:
        config["side"] = model.side.describe()
    if getattr(model.backbone, "gate_config", None) is not None:
        config["gate"] = model.backbone.gate_config.describe()
    if made_by is not None:
        config["made_by"] = made_by
    if seed is not None:
        config["seed"] = seed
    with atomic_directory(out) as tmp:
        save_tensors(tmp / WEIGHTS, state, metadata={"format": "pt", "lorex_version": __version__})
        if adapters:
            config["adapters"] = _save_adapters(model, tmp, config.get("base", {}).get("path"))
        write_json(tmp / CONFIG, config)
        for name, payload in (extra_files or {}).items():
            if isinstance(payload, bytes):
                (tmp / name).write_bytes(payload)
            else:
                write_json(tmp / name, payload)
    return out
