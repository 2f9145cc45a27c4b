"""A lorex model on a Hugging Face base written back as that base's ``save_pretrained`` folder.

``lorex merge-adapter`` folds LoRA into the backbone; when the base is an HF folder, users load
the result with ``from_pretrained``, so it is written in the base's own format: its
``config.json`` and preprocessor config, and one ``model.safetensors`` holding every tensor of
the base's file(s) under the base's names and dtype, the folded ones replacing theirs (a pooler or
text tower lorex does not use is copied as it is, so nothing is missing when transformers loads
it). lorex's heads have no place in that format; they go to a sidecar (``lorex_heads.json`` and
``lorex_heads.safetensors``) that ``load_model`` re-attaches and transformers ignores.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from lorex.backbones.hf import module_names
from lorex.errors import LorexError
from lorex.io import (
    SafetensorsReader,
    SafetensorsStreamWriter,
    atomic_directory,
    check_tensors_match,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from lorex.models.layout import CONFIG, WEIGHTS
from lorex.models.model import LorexModel
from lorex.version import __version__

HEADS_CONFIG = "lorex_heads.json"
HEADS_WEIGHTS = "lorex_heads.safetensors"
#: The provenance of a folder written here (its config.json stays the base's).
RECORD = "merge.json"
HF_INDEX = "model.safetensors.index.json"
COPIED_FILES = ("preprocessor_config.json",)


def hf_weight_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a ``save_pretrained`` folder, in name order."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / HF_INDEX).is_file():
        weight_map = read_json(folder / HF_INDEX).get("weight_map")
        if isinstance(weight_map, dict):
            return sorted({folder / name for name in weight_map.values()})
        raise LorexError(f"{folder / HF_INDEX}: no 'weight_map'")
    raise LorexError(f"{folder}: no {WEIGHTS} or {HF_INDEX}")


def save_hf_folder(
    model: LorexModel, base_dir: Path, out: str | Path, made_by: dict[str, Any]
) -> list[str]:
    """Write ``model`` (an HF backbone, adapters folded) as ``base_dir``'s format into ``out``,
    atomically; returns the heads written to the sidecar."""
    if model.side is not None or getattr(model.backbone, "gate_config", None) is not None:
        raise LorexError("a model with a side network or a gate cannot be a Hugging Face folder")
    folded = {k: v.detach().cpu() for k, v in model.backbone.model.state_dict().items()}
    readers = [SafetensorsReader(f) for f in hf_weight_files(base_dir)]
    where = {key: reader for reader in readers for key in reader.keys()}
    # The file's keys may not be the model's names (transformers 5 renames some on load).
    name_of = module_names(read_json(base_dir / CONFIG), sorted(where))
    specs = [(key, *reader.spec(key)) for key, reader in sorted(where.items())]
    covered = set(name_of.values())
    specs += [(k, v.dtype, tuple(v.shape)) for k, v in sorted(folded.items()) if k not in covered]
    values = {key: folded.get(name_of.get(key, key)) for key, _, _ in specs}
    for key, _, shape in specs:
        if values[key] is not None and tuple(values[key].shape) != tuple(shape):
            raise LorexError(
                f"{base_dir}: tensor '{key}' is {tuple(shape)}, the model's is "
                f"{tuple(values[key].shape)}"
            )
    with atomic_directory(out) as tmp:
        with SafetensorsStreamWriter(tmp / WEIGHTS, specs, metadata={"format": "pt"}) as writer:
            for key, dtype, _ in specs:
                value = values[key] if values[key] is not None else where[key].get(key)
                writer.write(key, value.to(dtype))
        shutil.copy2(base_dir / CONFIG, tmp / CONFIG)
        for name in COPIED_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp / name)
        if model.head_info:
            heads = {k: v.detach().cpu() for k, v in model.state_dict().items() if _is_head(k)}
            save_tensors(tmp / HEADS_WEIGHTS, heads, metadata={"lorex_version": __version__})
            write_json(
                tmp / HEADS_CONFIG, {"heads": model.head_info, "active_head": model.active_head}
            )
        write_json(tmp / RECORD, made_by)
    return list(model.head_info)


def _is_head_info(head: object) -> bool:
    return (
        isinstance(head, dict)
        and isinstance(head.get("task"), str)
        and isinstance(head.get("classes"), list)
    )


def _is_head(key: str) -> bool:
    return key.startswith("heads.")


def attach_heads(model: LorexModel, folder: Path) -> None:
    """Re-attach the heads a folder's sidecar holds (nothing when it has none)."""
    if not (folder / HEADS_CONFIG).is_file():
        return
    source = folder / HEADS_CONFIG
    info = read_json(source)
    heads, active = info.get("heads"), info.get("active_head")
    if not isinstance(heads, dict) or not all(_is_head_info(h) for h in heads.values()):
        raise LorexError(f"{source}: 'heads' must map keys to {{'task': str, 'classes': list}}")
    for key, head in heads.items():
        added = model.add_head(
            head["task"], head["classes"], activate=False, kind=head.get("kind", "linear")
        )
        if added != key:
            raise LorexError(f"{source}: head key '{key}' does not match task '{head['task']}'")
    if active is not None and active not in model.heads:
        raise LorexError(f"{source}: active_head {active!r} is not a head")
    model.active_head = active
    tensors = load_tensors(folder / HEADS_WEIGHTS)
    expected = {k: v for k, v in model.state_dict().items() if _is_head(k)}
    check_tensors_match(expected, tensors, folder / HEADS_WEIGHTS)
    with torch.no_grad():
        for key, value in tensors.items():
            expected[key].copy_(value)
