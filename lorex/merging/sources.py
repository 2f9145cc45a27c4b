"""Lazy, tensor-at-a-time views of the models a merge reads: nothing is loaded until asked for.

A ``ModelSource`` answers ``keys()``, ``spec(key)`` and ``get(key)`` for one model's weights in the
base's key names. Full lorex models and Hugging Face ``save_pretrained`` folders read their
safetensors file(s) one tensor at a time (``SafetensorsReader``: plain reads, no memory map). A
LoRA expert reads its base lazily and adds the exact ``s * B @ A`` of its applied adapters to the
layers they adapt (A and B are small and loaded whole).

``open_expert`` also opens what else can be an expert of a base: a PEFT LoRA adapter folder
(``lorex.merging.peft_expert``), and a lorex model whose backbone is a Hugging Face model, seen
under the HF folder's own key names when the base is that folder (``backbone.model.X`` -> ``X``;
its heads have no place in an HF folder and are listed in ``heads_not_written``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorex.backbones.hf import HFBackbone, module_names
from lorex.errors import LorexError
from lorex.io import SafetensorsReader, read_json
from lorex.merging.peft_expert import LoraUpdates, PeftExpert, is_peft_folder
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
        self.base: ModelSource | RenamedSource | None = None
        self._lora = LoraUpdates()
        self._sha256: str | None = None
        self._module_names: dict[str, str] | None = None
        if self.kind == "lorex" and self.config.get("weights") == "delta":
            base_info = self.config.get("base") or {}
            if "path" not in base_info:
                raise LorexError(f"{self.path / CONFIG}: a delta model must name its base")
            self.base = ModelSource(base_path(self.path, base_info))
            if self.base.kind == "hf":  # its keys as this model's backbone holds them
                hf, prefix = self.base, hf_backbone_prefix()
                names = {prefix + m: k for k, m in hf.module_names().items()}
                self.base = RenamedSource(hf, names, kind="lorex")
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
            if not isinstance(index, dict) or not index:
                raise LorexError(f"{self.path / HF_INDEX}: no 'weight_map'")
            for key, name in index.items():
                if not isinstance(name, str) or not (self.path / name).is_file():
                    raise LorexError(
                        f"{self.path / HF_INDEX}: tensor '{key}' is in {name!r}, which is missing"
                    )
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

    def module_names(self) -> dict[str, str]:
        """Each key -> the name the model built from it gives the tensor (a Hugging Face
        folder's keys may be renamed by transformers on load; a lorex model's are its own)."""
        if self._module_names is None:
            keys = self.keys()
            self._module_names = (
                module_names(self.config, keys) if self.kind == "hf" else {k: k for k in keys}
            )
        return self._module_names

    # --- LoRA experts -------------------------------------------------------------------------
    def _index_adapters(self) -> None:
        from lorex.adapters.lora import LoraConfig
        from lorex.adapters.lora.model import CONFIG_NAME, WEIGHTS_NAME

        specs = {k: (k, tuple(self.spec(k)[1])) for k in self.keys()}
        for entry in self.config.get("adapters") or []:
            if entry.get("state") not in ("active", "merged"):
                continue
            weight = 1.0 if entry["state"] == "merged" else float(entry.get("weight") or 1.0)
            folder = self.path / entry["path"]
            config = LoraConfig.from_peft(read_json(folder / CONFIG_NAME), str(folder))
            if entry.get("sha256") and file_sha256(folder / WEIGHTS_NAME) != entry["sha256"]:
                raise LorexError(f"{folder / WEIGHTS_NAME}: adapter changed (hash mismatch)")
            prefixes = module_prefixes("lorex", self.config)
            self._lora.add_file(folder / WEIGHTS_NAME, config, weight, specs, prefixes)

    # --- the interface ------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every tensor name: the file's own, and for a delta model its base's too."""
        own = set(self._where)
        return sorted(own | set(self.base.keys()) if self.base is not None else own)

    def lora_keys(self) -> dict[str, bool] | None:
        """The base keys this expert's applied LoRA adapters change -> whether each is an
        embedding's; None for a full model, whose every tensor may differ from the base."""
        if self.base is None:
            return None
        return self._lora.targets()

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
        if key in self._where:
            tensor = self._open(self._where[key]).get(key)
        elif self.base is not None:
            tensor = self.base.get(key)
        else:
            raise KeyError(key)
        tensor = self._lora.apply(key, tensor)
        if not all_finite(tensor):
            where = self._where.get(key, self.path / WEIGHTS)
            raise LorexError(f"{where}: tensor '{key}' contains NaN or Inf")
        return tensor

    def close(self) -> None:
        self._handles.clear()
        if self.base is not None:
            self.base.close()


def hf_backbone_prefix() -> str:
    """Where a lorex model keeps the weights of its Hugging Face backbone's model."""
    return f"backbone.{HFBackbone.peft_root}."


def module_prefixes(kind: str, config: dict) -> tuple[str, ...]:
    """Where a LoRA file's module ``M`` (named as PEFT names it) lies among a model's keys, in
    order of preference: an HF folder's ``M``; a lorex model's ``backbone.M``, or for an HF
    backbone ``backbone.model.M`` (files written before ``peft_root`` carry ``model.`` already)."""
    if kind == "hf":
        return ("",)
    if (config.get("backbone") or {}).get("type") == "hf":
        return (hf_backbone_prefix(), "backbone.")
    return ("backbone.",)


class RenamedSource:
    """Another source's tensors under other names: ``names`` maps each name shown to the inner
    source's key (inner keys it does not name are left out)."""

    def __init__(self, inner: Any, names: dict[str, str], kind: str, **info: Any):
        self.inner, self.names = inner, names
        self.path, self.kind = inner.path, kind
        self.config: dict = info.get("config", inner.config)
        self.base = info.get("base")
        self.heads_not_written: list[str] = info.get("heads_not_written", [])

    def keys(self) -> list[str]:
        return sorted(self.names)

    def own_keys(self) -> list[str]:
        return []

    def lora_keys(self) -> dict[str, bool] | None:
        inner = self.inner.lora_keys()
        if inner is None:
            return None
        return {shown: inner[key] for shown, key in self.names.items() if key in inner}

    def spec(self, key: str) -> Spec:
        return self.inner.spec(self.names[key])

    def get(self, key: str) -> torch.Tensor:
        return self.inner.get(self.names[key])

    def sha256(self) -> str:
        return self.inner.sha256()

    def close(self) -> None:
        self.inner.close()


def open_expert(path: str | Path, base: ModelSource) -> ModelSource | PeftExpert | RenamedSource:
    """An expert of ``base`` in the base's key names: a model folder as it is, a PEFT LoRA
    folder as the base plus its update, a lorex model with a Hugging Face backbone under the
    names of an HF base folder. Whether it fits the base is ``check_experts``' to say."""
    path = Path(path)
    if is_peft_folder(path):
        _check_named_base(path, base)
        return PeftExpert(path, base, base.module_names(), module_prefixes(base.kind, base.config))
    source = ModelSource(path)
    backbone = source.config.get("backbone") if source.kind == "lorex" else None
    if base.kind == "hf" and isinstance(backbone, dict) and backbone.get("type") == "hf":
        prefix = hf_backbone_prefix()
        file_key = {m: k for k, m in base.module_names().items()}
        names = {
            file_key.get(k[len(prefix) :], k[len(prefix) :]): k
            for k in source.keys()
            if k.startswith(prefix)
        }
        return RenamedSource(
            source,
            names,
            kind="hf",
            config=backbone.get("hf_config") or {},
            base=source.base.inner if isinstance(source.base, RenamedSource) else None,
            heads_not_written=[str(k) for k in source.config.get("heads", {})],
        )
    return source


def _check_named_base(folder: Path, base: ModelSource) -> None:
    """A PEFT folder's ``base_model_name_or_path``, when it is a local folder other than
    ``base``, must hold the same weights (a hub name or a path not here cannot be checked)."""
    from lorex.adapters.lora.model import CONFIG_NAME

    data = read_json(folder / CONFIG_NAME)
    named = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    if not isinstance(named, str) or not named or not Path(named).is_dir():
        return
    if Path(named).resolve() == base.path.resolve():
        return
    try:
        theirs = ModelSource(named)
    except LorexError:
        return  # not a model folder lorex reads: nothing to compare
    if theirs.sha256() != base.sha256():
        raise LorexError(
            f"{folder / CONFIG_NAME}: base_model_name_or_path {named} holds other weights than "
            f"the base {base.path}"
        )
