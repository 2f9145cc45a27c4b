"""What a merge writes beside the maths, so that the tools people load models with take it as it
is: the output dtype, shards with Hugging Face's index, the base's tokenizer and generation
config, and a model card.

Shards are planned from the tensors' specs before any data is read: a safetensors header must be
written before its data, so each shard's names and sizes are fixed first, and the tensors are
then streamed into the shards in the base's order.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lorex.errors import LorexError
from lorex.io import SafetensorsStreamWriter, write_json
from lorex.models.store import WEIGHTS

#: ``--out-dtype`` names (the same as mergekit's ``dtype`` and transformers' ``dtype``).
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_INDEX = "model.safetensors.index.json"
MODEL_CARD = "README.md"
#: Files of a Hugging Face base that a merge leaves as they are and tools expect beside the
#: weights (shell patterns, top level only).
BASE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.*",
    "merges.txt",
    "added_tokens.json",
    "chat_template.*",
    "generation_config.json",
    "preprocessor_config.json",
)
TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGTkmgt])(i?)B)?")


def resolve_out_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of an ``out_dtype`` name; None keeps each tensor's base dtype."""
    if name is None:
        return None
    if name not in OUT_DTYPES:
        raise LorexError(f"out_dtype: expected one of {', '.join(OUT_DTYPES)}, got {name!r}")
    return OUT_DTYPES[name]


def output_dtype(dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    """A floating tensor takes ``out_dtype`` when one is given; integer and bool tensors (ids,
    masks, counters) keep theirs, as casting them would change what they mean."""
    return out_dtype if out_dtype is not None and dtype.is_floating_point else dtype


def parse_size(size: int | str) -> int:
    """Bytes from ``2000000``, ``"500MB"``, ``"2GB"`` (powers of 1000) or ``"1.5GiB"`` (powers
    of 1024), as transformers' ``max_shard_size`` reads them. A lowercase ``b`` (transformers'
    bits) or mergekit's bare ``B`` for billions is refused rather than guessed."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        found = _SIZE.fullmatch(str(size).strip())
        if found is None:
            raise LorexError(
                f"max_shard_size: expected bytes or a size like 500MB, 2GB, 1.5GiB; got {size!r}"
            )
        number, prefix, binary = found.groups()
        unit = 1024 ** " KMGT".index(prefix.upper()) if binary else _UNITS[(prefix or "").upper()]
        value = int(float(number) * unit)
    if value < 1:
        raise LorexError(f"max_shard_size: must be at least 1 byte, got {size!r}")
    return value


def tensor_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    for dim in shape:
        size *= dim
    return size


def plan_shards(specs: list[TensorSpec], max_bytes: int | None) -> list[list[TensorSpec]]:
    """The tensors split in order into shards of at most ``max_bytes`` each (transformers' rule:
    a new shard starts when the next tensor would not fit; a tensor larger than the limit gets a
    shard of its own). ``None``: one shard."""
    if max_bytes is None:
        return [list(specs)]
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        size = tensor_bytes(spec[1], spec[2])
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    return shards


def shard_names(count: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-00001-of-0000N.safetensors`` ..."""
    if count == 1:
        return [WEIGHTS]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """Stream tensors, in the order of ``specs``, into one or more safetensors files in
    ``folder``; with several, ``close()`` writes Hugging Face's index beside them. Only the
    shard being written is open: each tensor is written (and can be freed) before the next."""

    def __init__(
        self,
        folder: Path,
        specs: list[TensorSpec],
        max_bytes: int | None = None,
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self._shards = plan_shards(specs, max_bytes)
        self.files = shard_names(len(self._shards))
        self._metadata = metadata
        self._shard = -1
        self._left = 0
        self._writer: SafetensorsStreamWriter | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._left == 0:
            self._next_shard()
        assert self._writer is not None
        self._writer.write(name, tensor)
        self._left -= 1
        if self._left == 0:
            self._writer.close()
            self._writer = None

    def _next_shard(self) -> None:
        self._shard += 1
        if self._shard >= len(self._shards):
            raise ValueError("more tensors written than planned")
        specs = self._shards[self._shard]
        path = self.folder / self.files[self._shard]
        self._writer = SafetensorsStreamWriter(path, specs, metadata=self._metadata)
        self._left = len(specs)

    def close(self) -> None:
        while self._shard + 1 < len(self._shards) and not self._shards[self._shard + 1]:
            self._next_shard()  # an empty model: one empty file
            self._writer.close()  # type: ignore[union-attr]
        if self._writer is not None or self._shard + 1 != len(self._shards):
            self.abort()
            raise ValueError(f"{self.folder}: not every planned tensor was written")
        if len(self._shards) > 1:
            weight_map = {
                name: file
                for file, shard in zip(self.files, self._shards, strict=True)
                for name, _, _ in shard
            }
            total = sum(tensor_bytes(d, s) for shard in self._shards for _, d, s in shard)
            write_json(
                self.folder / SHARD_INDEX,
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def check_out_path(out: Path, inputs: list[tuple[str, Path]]) -> None:
    """Refuse an ``out`` that is an input, lies inside one, or holds one: the output folder is
    swapped into place whole, so any of these would delete an input."""
    target = Path(out).resolve()
    for label, path in inputs:
        source = Path(path).resolve()
        if target == source:
            problem = "would replace"
        elif source in target.parents:
            problem = "would be inside"
        elif target in source.parents:
            problem = "would replace the folder holding"
        else:
            continue
        raise LorexError(f"{out}: the output {problem} {label} {path}; choose another --out")


def copy_base_files(base: Path, folder: Path) -> list[str]:
    """Copy the base's tokenizer, generation and preprocessor files (byte for byte) into
    ``folder``; the names copied, sorted."""
    copied = sorted(
        {p.name for pattern in BASE_FILES for p in Path(base).glob(pattern) if p.is_file()}
    )
    for name in copied:
        shutil.copy2(Path(base) / name, folder / name)
    return copied


def hf_config_with_dtype(config: dict[str, Any], out_dtype: str) -> dict[str, Any]:
    """The base's ``config.json`` with its dtype field(s) saying ``out_dtype``: ``dtype``
    (transformers 5) and ``torch_dtype`` (older) where present, else ``dtype``."""
    fields = [f for f in ("dtype", "torch_dtype") if f in config] or ["dtype"]
    return {**config, **dict.fromkeys(fields, out_dtype)}


def _yaml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a YAML scalar, whatever characters it holds


def model_card_text(
    record: dict[str, Any], library_name: str, recipe_text: str | None = None
) -> str:
    """``README.md``: front matter the Hugging Face Hub reads (the models merged, the library,
    tags), then how the model was made, from the merge's record."""
    method = record["method"]
    sources = [record["base"]["path"]] + [e["path"] for e in record["experts"]]
    lines = ["---", "base_model:"]
    lines += [f"- {_yaml(path)}" for path in sources]
    lines += ["base_model_relation: merge", f"library_name: {library_name}", "tags:"]
    lines += [f"- {tag}" for tag in ("merge", "lorex", _yaml(method))]
    lines += ["---", "", f"# A {method} merge", ""]
    lines += [
        f"Made by `lorex merge` (lorex {record['lorex_version']}) with the **{method}** method, "
        "without data, from the base and experts below.",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in record["settings"].items()]
    output = record.get("output") or {}
    lines += [f"| output dtype | `{output.get('dtype') or 'the base'}` |"]
    weights = record.get("weights")
    lines += ["", "## Models", "", "| role | path | sha256 | weight |", "|---|---|---|---|"]
    lines += [f"| base | `{record['base']['path']}` | `{record['base']['sha256']}` | |"]
    for i, expert in enumerate(record["experts"]):
        weight = "" if weights is None else f"{weights[i]:g}"
        lines += [f"| expert | `{expert['path']}` | `{expert['sha256']}` | {weight} |"]
    if recipe_text:
        lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"
