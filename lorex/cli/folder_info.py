"""``lorex info`` for folders lorex did not make: a Hugging Face ``save_pretrained`` folder or a
PEFT adapter. Everything comes from the JSON files and the safetensors headers; no weight is
read and no model is built, so any architecture is described, not only those lorex can run."""

from __future__ import annotations

from collections import Counter
from math import prod
from pathlib import Path

from lorex.errors import LorexError
from lorex.io import read_json, read_safetensors_header

CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def foreign_folder_lines(folder: Path) -> list[str] | None:
    """The lines describing a Hugging Face model or PEFT adapter folder; None for a lorex model
    directory (or anything else, left to ``load_model``'s own errors)."""
    config = read_json(folder / CONFIG) if (folder / CONFIG).is_file() else None
    if config is not None and "lorex_version" in config:
        return None
    if (folder / ADAPTER_CONFIG).is_file():
        return _adapter_lines(folder)
    if config is not None and "model_type" in config:
        return _model_lines(folder, config)
    return None


def weight_files(folder: Path) -> list[Path]:
    """A Hugging Face folder's safetensors files: ``model.safetensors`` or the index's shards."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if not (folder / INDEX).is_file():
        return []
    weight_map = read_json(folder / INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LorexError(f"{folder / INDEX}: no 'weight_map'")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not (folder / name).is_file():
            raise LorexError(f"{folder / INDEX}: tensor '{key}' is in {name!r}, which is missing")
    return sorted({folder / name for name in weight_map.values()})


def _tensor_lines(files: list[Path]) -> list[str]:
    """Parameters, shards, bytes and dtypes, from the headers alone."""
    tensors: Counter[str] = Counter()
    params: Counter[str] = Counter()
    for file in files:
        header, _ = read_safetensors_header(file)
        header.pop("__metadata__", None)
        for name, entry in header.items():
            if not isinstance(entry, dict) or "dtype" not in entry or "shape" not in entry:
                raise LorexError(f"{file}: bad header entry for '{name}'")
            tensors[entry["dtype"]] += 1
            params[entry["dtype"]] += prod(entry["shape"])
    size = sum(f.stat().st_size for f in files)
    shards = f"{len(files)} shard{'s' if len(files) != 1 else ''}"
    dtypes = ", ".join(
        f"{d} {tensors[d]} tensors ({params[d]:,} parameters)" for d in sorted(tensors)
    )
    return [
        f"parameters {sum(params.values()):,} in {sum(tensors.values())} tensors",
        f"files      {shards}, {size:,} bytes ({', '.join(f.name for f in files)})",
        f"dtypes     {dtypes}",
    ]


def _present(folder: Path, names: tuple[str, ...]) -> str:
    found = [name for name in names if (folder / name).is_file()]
    return ", ".join(found) if found else "none"


def _model_lines(folder: Path, config: dict) -> list[str]:
    lines = [
        f"model      {folder} (Hugging Face)",
        f"type       {config['model_type']} {config.get('architectures') or []}",
    ]
    if config.get("dtype") or config.get("torch_dtype"):
        lines.append(f"config     dtype {config.get('dtype') or config.get('torch_dtype')}")
    files = weight_files(folder)
    if files:
        lines += _tensor_lines(files)
    elif any(folder.glob("*.bin")):  # refused as everywhere else, though nothing reads it here
        raise LorexError(
            f"{folder}: only pickled .bin weights; lorex reads safetensors only "
            "(save_pretrained(..., safe_serialization=True))"
        )
    else:
        lines.append(f"weights    none ({WEIGHTS} or {INDEX} missing)")
    lines.append(f"tokenizer  {_present(folder, TOKENIZER_FILES)}")
    lines.append(f"generation {_present(folder, ('generation_config.json',))}")
    if (folder / "merge.json").is_file():
        lines += _merge_lines(read_json(folder / "merge.json"))
    return lines


def _merge_lines(record: dict) -> list[str]:
    """What a lorex merge into this folder recorded (``merge.json``)."""
    base = (record.get("base") or {}).get("path")
    experts = [e.get("path") for e in record.get("experts") or []]
    lines = [
        f"merged     {record.get('method')} {record.get('settings') or {}} from base {base}",
        f"experts    {', '.join(str(e) for e in experts)}",
    ]
    output = record.get("output")
    if output:  # merges written before lorex recorded its output options have none
        lines.append(f"output     dtype {output.get('dtype') or 'the base'}")
    return lines


def _adapter_lines(folder: Path) -> list[str]:
    config = read_json(folder / ADAPTER_CONFIG)
    targets = config.get("target_modules")
    extras = [
        name
        for name, on in (
            ("rsLoRA", config.get("use_rslora")),
            (f"modules_to_save={config.get('modules_to_save')}", config.get("modules_to_save")),
        )
        if on
    ]
    lines = [
        f"adapter    {folder} (PEFT {config.get('peft_type', '?')})",
        f"lora       r={config.get('r')} alpha={config.get('lora_alpha')} targets={targets}"
        + (f" {' '.join(extras)}" if extras else ""),
        f"base model {config.get('base_model_name_or_path')}",
    ]
    if (folder / ADAPTER_WEIGHTS).is_file():
        lines += _tensor_lines([folder / ADAPTER_WEIGHTS])
    else:
        lines.append(f"weights    none ({ADAPTER_WEIGHTS} missing)")
    return lines
