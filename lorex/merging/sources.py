"""Lazy, tensor-at-a-time views of the models a merge reads: nothing is loaded until asked for.

A ``ModelSource`` answers ``keys()``, ``spec(key)`` and ``get(key)`` for one model's weights in the
base's key names. Full lorex models and Hugging Face ``save_pretrained`` folders read their
safetensors file(s) one tensor at a time (``SafetensorsReader``: plain reads, no memory map). A
LoRA expert reads its base lazily and adds the exact ``s * B @ A`` of its applied adapters to the
layers they adapt (A and B are small and loaded whole).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorex.errors import LorexError
from lorex.io import SafetensorsReader, read_json
from lorex.models.store import CONFIG, WEIGHTS, base_path, check_config_fields, file_sha256

HF_INDEX = "model.safetensors.index.json"
Spec = tuple[torch.dtype, tuple[int, ...]]


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no entry is NaN or +-Inf, at the cost of one sum rather than an elementwise mask.

    A NaN or infinite entry makes the sum non-finite (inf + finite = inf, inf - inf = NaN), so a
    finite sum proves every entry finite; only a non-finite sum (a real NaN/Inf, or finite values
    whose sum overflows, e.g. float16 beyond 65504) pays for the exact elementwise check. The sum
    keeps the tensor's dtype: bfloat16 and float16 accumulate in float32 inside the kernel anyway,
    and asking for a float32 result makes torch convert the whole tensor first (10x slower).
    Every read of every expert goes through here: ``isfinite(t).all()`` was the largest single
    cost of a task-arithmetic merge.
    """
    if not tensor.is_floating_point():
        return True
    if torch.isfinite(tensor.sum()):
        return True
    return bool(torch.isfinite(tensor).all())


class ModelSource:
    """One model's tensors, opened lazily. ``kind`` is ``"lorex"`` or ``"hf"``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / CONFIG).is_file():
            raise LorexError(f"{self.path}: not a model directory (no {CONFIG})")
        self.config = read_json(self.path / CONFIG)
        self.kind = "lorex" if "lorex_version" in self.config else "hf"
        if self.kind == "hf" and "model_type" not in self.config:
            raise LorexError(f"{self.path / CONFIG}: neither a lorex nor a Hugging Face config")
        if self.kind == "lorex":
            check_config_fields(self.config, self.path / CONFIG)
        self._files = self._weight_files()
        self._handles: dict[Path, SafetensorsReader] = {}
        self._where: dict[str, Path] = {}
        for file in self._files:
            for key in self._open(file).keys():
                self._where[key] = file
        self.base: ModelSource | None = None
        # weight key -> (adapter name, key prefix up to "lora_", scaling x weight) per update
        self._lora: dict[str, list[tuple[str, str, float]]] = {}
        self._adapter_tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._biases: dict[str, torch.Tensor] = {}
        self._sha256: str | None = None
        if self.kind == "lorex" and self.config.get("weights") == "delta":
            base_info = self.config.get("base") or {}
            if "path" not in base_info:
                raise LorexError(f"{self.path / CONFIG}: a delta model must name its base")
            self.base = ModelSource(base_path(self.path, base_info))
            sha = base_info.get("sha256")
            if sha and self.base.kind == "lorex" and self.base.sha256() != sha:
                raise LorexError(
                    f"{self.base.path}: base weights changed since {self.path} was made "
                    "(hash mismatch)"
                )
            self._index_adapters()

    # --- files --------------------------------------------------------------------------------
    def _weight_files(self) -> list[Path]:
        """The safetensors file(s) holding the weights, in name order."""
        if self.kind == "lorex":
            if not (self.path / WEIGHTS).is_file():
                raise LorexError(f"{self.path / WEIGHTS}: file not found")
            return [self.path / WEIGHTS]
        if (self.path / WEIGHTS).is_file():
            return [self.path / WEIGHTS]
        if (self.path / HF_INDEX).is_file():
            index = read_json(self.path / HF_INDEX).get("weight_map")
            if not isinstance(index, dict):
                raise LorexError(f"{self.path / HF_INDEX}: no 'weight_map'")
            return sorted({self.path / v for v in index.values()})
        if any(self.path.glob("*.bin")):
            raise LorexError(
                f"{self.path}: only pickled .bin weights; lorex reads safetensors only "
                "(save_pretrained(..., safe_serialization=True))"
            )
        raise LorexError(f"{self.path}: no {WEIGHTS} or {HF_INDEX}")

    def _open(self, file: Path) -> SafetensorsReader:
        if file not in self._handles:
            self._handles[file] = SafetensorsReader(file)
        return self._handles[file]

    def sha256(self) -> str:
        """Content hash of the weights (all shards, in name order), computed once."""
        if self._sha256 is None:
            self._sha256 = "+".join(file_sha256(f) for f in self._files)
        return self._sha256

    # --- LoRA experts -------------------------------------------------------------------------
    def _index_adapters(self) -> None:
        from lorex.adapters.lora import LoraConfig
        from lorex.adapters.lora.model import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME
        from lorex.io import load_tensors

        for entry in self.config.get("adapters") or []:
            if entry.get("state") not in ("active", "merged"):
                continue
            weight = 1.0 if entry["state"] == "merged" else float(entry.get("weight") or 1.0)
            folder = self.path / entry["path"]
            config = LoraConfig.from_peft(read_json(folder / CONFIG_NAME), str(folder))
            if entry.get("sha256") and file_sha256(folder / WEIGHTS_NAME) != entry["sha256"]:
                raise LorexError(f"{folder / WEIGHTS_NAME}: adapter changed (hash mismatch)")
            tensors = load_tensors(folder / WEIGHTS_NAME)
            self._adapter_tensors[entry["name"]] = tensors
            for key in tensors:
                if key.startswith(PEFT_PREFIX) and key.endswith(".lora_A.weight"):
                    module = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
                    self._lora.setdefault(f"backbone.{module}.weight", []).append(
                        (entry["name"], key[: -len("A.weight")], config.scaling * weight)
                    )
                elif key.startswith(PEFT_PREFIX) and key.endswith(".bias"):
                    # A bias the adapter trained (bias="all"/"lora_only") replaces the base's.
                    name = key[len(PEFT_PREFIX) :].replace(".base_layer.", ".")
                    self._biases[f"backbone.{name}"] = tensors[key]

    # --- the interface ------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every tensor name: the file's own, and for a delta model its base's too."""
        own = set(self._where)
        return sorted(own | set(self.base.keys()) if self.base is not None else own)

    def own_keys(self) -> list[str]:
        """The names stored in this model's own file (a delta model: its heads)."""
        return sorted(self._where)

    def spec(self, key: str) -> Spec:
        if key in self._where:
            return self._open(self._where[key]).spec(key)
        if self.base is not None:
            return self.base.spec(key)
        raise KeyError(key)

    def get(self, key: str) -> torch.Tensor:
        """The tensor, with any applied LoRA update added (exact ``s * B @ A``, in float32)."""
        if key in self._biases:
            return self._biases[key].clone()
        if key in self._where:
            tensor = self._open(self._where[key]).get(key)
        elif self.base is not None:
            tensor = self.base.get(key)
        else:
            raise KeyError(key)
        updates = self._lora.get(key)
        if updates:
            total = tensor.float()
            for name, prefix, scaling in updates:
                a = self._adapter_tensors[name][prefix + "A.weight"].float().flatten(1)
                b = self._adapter_tensors[name][prefix + "B.weight"].float().flatten(1)
                total = total + scaling * (b @ a).view(tensor.shape)
            tensor = total.to(tensor.dtype)
        if not all_finite(tensor):
            where = self._where.get(key, self.path / WEIGHTS)
            raise LorexError(f"{where}: tensor '{key}' contains NaN or Inf")
        return tensor

    def close(self) -> None:
        self._handles.clear()
        if self.base is not None:
            self.base.close()
