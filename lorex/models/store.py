"""Model directories on disk: ``config.json`` plus ``model.safetensors``, nothing pickled.

``model.safetensors`` holds either every tensor (``"weights": "full"``) or only what differs from a
base model (``"weights": "delta"``, e.g. the heads of a linear probe); a delta model names its base
in ``config.json`` with the base's content hash, so a changed base is detected, not silently used.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch

from lorex.backbones import build_backbone
from lorex.backbones.hf import HFBackbone
from lorex.errors import LorexError
from lorex.io import (
    atomic_directory,
    check_tensors_match,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from lorex.models.hf_folder import attach_heads
from lorex.models.kinds import ADAPTER_KINDS
from lorex.models.layout import (
    CONFIG,
    FORMAT_VERSION,
    WEIGHTS,
    base_path,
    file_sha256,
    is_model_dir,
)
from lorex.models.model import LorexModel
from lorex.version import __version__

REQUIRED_FIELDS = {"lorex_version", "format_version", "backbone", "heads", "active_head", "weights"}
OPTIONAL_FIELDS = {"base", "made_by", "seed", "metrics"} | {k.field for k in ADAPTER_KINDS}

__all__ = [
    "CONFIG",
    "FORMAT_VERSION",
    "OPTIONAL_FIELDS",
    "REQUIRED_FIELDS",
    "WEIGHTS",
    "base_path",
    "check_config_fields",
    "file_sha256",
    "is_model_dir",
    "load_model",
    "save_model",
]


def check_config_fields(config: dict, path: Path) -> None:
    """Refuse, in one line, a lorex ``config.json`` with unknown, missing or malformed fields."""
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
    for kind in ADAPTER_KINDS:
        if config.get(kind.field) is not None:
            kind.check(config[kind.field], path)


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
    check_config_fields(config, path / CONFIG)
    # First without memory (the meta device): a config whose shapes do not fit its weights
    # (a typo in embed_dim, say) is an error naming both, before anything is allocated.
    with torch.device("meta"):
        skeleton = _build(config, path / CONFIG)
    own = load_tensors(path / WEIGHTS)
    state: dict[str, torch.Tensor] = {}
    if config["weights"] == "delta":
        base = config["base"]
        base_dir = base_path(path, base)
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
    for kind in ADAPTER_KINDS:
        if config.get(kind.field) is not None:
            kind.load(model, path, config[kind.field])
    return model.to(device).eval()


def _build(config: dict, source: Path) -> LorexModel:
    """The untrained model ``config`` describes: backbone, heads and its adapter kinds'
    modules (a side network, a gate)."""
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
    for adapter in ADAPTER_KINDS:
        if config.get(adapter.field) is not None:
            adapter.rebuild(model, config[adapter.field], source)
    return model


def _load_state(model: LorexModel, state: dict[str, torch.Tensor], source: Path) -> None:
    check_tensors_match(model.state_dict(), state, source)
    model.load_state_dict(state)


def _load_hf_directory(path: Path, device: str | torch.device) -> LorexModel:
    backbone = HFBackbone.from_pretrained(path)
    model = LorexModel(backbone, backbone.to_config())
    attach_heads(model, path)  # written by ``lorex merge-adapter`` beside the HF weights
    return model.to(device).eval()


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
    out = Path(out)
    if weights not in ("full", "delta"):
        raise ValueError(f"weights must be 'full' or 'delta', got {weights!r}")
    for kind in ADAPTER_KINDS:
        kind.check_save(model, weights)
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
    # PEFT's ``base_model_name_or_path`` is the base as the caller named it (PEFT hands it to
    # ``from_pretrained``); lorex's own ``base`` entry is relative to the model directory.
    base_as_given = os.fspath(base_dir) if base_dir is not None else None
    if base_dir is not None:
        base_dir = Path(base_dir)
        # Relative to the model directory, so a tree of base + experts can be moved as a whole.
        base: dict[str, Any] = {"path": os.path.relpath(base_dir.resolve(), out.resolve())}
        if is_model_dir(base_dir):
            base["sha256"] = file_sha256(base_dir / WEIGHTS)
        config["base"] = base
    for kind in ADAPTER_KINDS:
        entry = kind.describe(model)
        if entry is not None:
            config[kind.field] = entry
    if made_by is not None:
        config["made_by"] = made_by
    if seed is not None:
        config["seed"] = seed
    with atomic_directory(out) as tmp:
        save_tensors(tmp / WEIGHTS, state, metadata={"format": "pt", "lorex_version": __version__})
        for kind in ADAPTER_KINDS:
            entry = kind.save(model, tmp, base_as_given)
            if entry is not None:
                config[kind.field] = entry
        write_json(tmp / CONFIG, config)
        for name, payload in (extra_files or {}).items():
            if isinstance(payload, bytes):
                (tmp / name).write_bytes(payload)
            else:
                write_json(tmp / name, payload)
    return out
