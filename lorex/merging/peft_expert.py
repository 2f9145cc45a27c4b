"""LoRA adapter files as dense updates of a base's weights, and a PEFT adapter folder as an expert.

PEFT names an adapted module ``M`` in ``adapter_model.safetensors`` as
``base_model.model.M.lora_A.weight`` / ``.lora_B.weight`` (an ``nn.Embedding``:
``M.lora_embedding_A`` / ``_B``); every other tensor it writes (trained biases, ``modules_to_save``,
an embedding's saved base weight) is a base tensor, ``base_layer.`` dropped from its name, that
replaces the base's. The update of ``M.weight`` is exactly ``scaling * B @ A`` (an embedding's
transposed), added in float32; A and B are small, so they are read whole, and the base is read a
tensor at a time, so an expert never holds a dense model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorex.adapters.lora import LoraConfig
from lorex.adapters.lora.model import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME
from lorex.errors import LorexError
from lorex.io import load_tensors, read_json
from lorex.models.layout import CONFIG, file_sha256

#: PEFT options whose adapters are not a fixed ``B @ A`` on the base weights.
UNMERGEABLE_FIELDS = (
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "layer_replication",
)
_PAIRS = {  # key suffix of A -> (suffix of B, whether it is an embedding's)
    ".lora_A.weight": (".lora_B.weight", False),
    ".lora_embedding_A": (".lora_embedding_B", True),
}


@dataclass
class LowRankUpdate:
    """``scaling * B @ A`` for one weight (``(B @ A).T`` for an embedding)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    embedding: bool

    def dense(self, shape: torch.Size) -> torch.Tensor:
        a, b = self.a.float().flatten(1), self.b.float().flatten(1)
        product = (b @ a).T if self.embedding else b @ a
        return self.scaling * product.reshape(shape)

    def fits(self, shape: tuple[int, ...]) -> bool:
        a, b = self.a.flatten(1), self.b.flatten(1)
        if len(shape) < 2 or a.shape[0] != b.shape[1]:
            return False
        rows, cols = (a.shape[1], b.shape[0]) if self.embedding else (b.shape[0], a.shape[1])
        return rows == shape[0] and cols == int(torch.Size(shape[1:]).numel())


class LoraUpdates:
    """The updates of any number of LoRA files, in a base's key names: ``apply(key, tensor)``
    gives the expert's tensor from the base's."""

    def __init__(self) -> None:
        self.updates: dict[str, list[LowRankUpdate]] = {}
        self.replaced: dict[str, torch.Tensor] = {}

    def add_file(
        self,
        file: Path,
        config: LoraConfig,
        weight: float,
        base_keys: dict[str, tuple[str, tuple[int, ...]]],
        prefixes: tuple[str, ...],
    ) -> None:
        """Add one ``adapter_model.safetensors`` (scaled by ``weight``). ``base_keys`` maps each
        name a module's tensor may have (its key, or the name the model gives it) to the base's
        key and shape; module ``M`` is ``P + M`` for the first of ``prefixes`` that is a name. A
        module or tensor the base lacks, or a shape that does not fit, is an error naming
        ``file``."""
        tensors = load_tensors(file)
        for key, tensor in tensors.items():
            if not key.startswith(PEFT_PREFIX):
                raise LorexError(f"{file}: key '{key}' is not under '{PEFT_PREFIX}'")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise LorexError(f"{file}: tensor '{key}' contains NaN or Inf")
        for key in sorted(tensors):
            name = key[len(PEFT_PREFIX) :]
            pair = next(((s, *p) for s, p in _PAIRS.items() if name.endswith(s)), None)
            if pair is not None:
                self._add_pair(file, tensors, key, pair, config, weight, base_keys, prefixes)
            elif ".lora_" in name:
                if not any(name.endswith(b) for b, _ in _PAIRS.values()):
                    raise LorexError(f"{file}: '{key}' is not a LoRA A or B matrix lorex merges")
                a_key = _partner(key)
                if a_key not in tensors:
                    raise LorexError(f"{file}: '{key}' has no '{a_key}'")
            else:
                self._add_replacement(file, key, tensors[key], base_keys, prefixes)

    def _add_pair(self, file, tensors, key, pair, config, weight, base_keys, prefixes) -> None:
        a_suffix, b_suffix, embedding = pair
        module = key[len(PEFT_PREFIX) : -len(a_suffix)]
        b_key = key[: -len(a_suffix)] + b_suffix
        if b_key not in tensors:
            raise LorexError(f"{file}: '{key}' has no '{b_key}'")
        a, b = tensors[key], tensors[b_key]
        if a.shape[0] != config.r:
            raise LorexError(
                f"{file}: '{key}' has rank {a.shape[0]}, but adapter_config.json says r={config.r}"
            )
        found = _resolve(f"{module}.weight", base_keys, prefixes)
        if found is None:
            raise LorexError(f"{file}: adapts '{module}', which the base does not have")
        target, shape = found
        update = LowRankUpdate(a, b, config.scaling * weight, embedding)
        if not update.fits(shape):
            raise LorexError(
                f"{file}: '{module}' has A {tuple(a.shape)} and B {tuple(b.shape)}, which do not "
                f"fit the base's '{target}' {tuple(shape)}"
            )
        self.updates.setdefault(target, []).append(update)

    def _add_replacement(self, file, key, tensor, base_keys, prefixes) -> None:
        name = key[len(PEFT_PREFIX) :].replace(".base_layer.", ".")
        found = _resolve(name, base_keys, prefixes)
        if found is None:
            raise LorexError(
                f"{file}: saved module tensor '{key}' (modules_to_save or a trained bias) is "
                "not in the base"
            )
        target, shape = found
        if tuple(tensor.shape) != tuple(shape):
            raise LorexError(
                f"{file}: saved module tensor '{key}' is {tuple(tensor.shape)}, the base's "
                f"'{target}' is {tuple(shape)}"
            )
        self.replaced[target] = tensor

    def targets(self) -> dict[str, bool]:
        """Each base key a LoRA pair updates -> whether it is an embedding's (PEFT stores those
        transposed, as ``lora_embedding_A``/``_B``)."""
        return {k: any(u.embedding for u in ups) for k, ups in self.updates.items()}

    def apply(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The expert's ``key`` from the base's ``tensor`` (replaced, then every update added)."""
        if key in self.replaced:
            tensor = self.replaced[key].to(tensor.dtype, copy=True)
        updates = self.updates.get(key)
        if not updates:
            return tensor
        total = tensor.float()
        for update in updates:
            total = total + update.dense(tensor.shape)
        return total.to(tensor.dtype)


def _partner(b_key: str) -> str:
    for a_suffix, (b_suffix, _) in _PAIRS.items():
        if b_key.endswith(b_suffix):
            return b_key[: -len(b_suffix)] + a_suffix
    return b_key


def _resolve(name: str, base_keys: dict, prefixes: tuple[str, ...]) -> tuple | None:
    return next((base_keys[p + name] for p in prefixes if p + name in base_keys), None)


def is_peft_folder(path: Path) -> bool:
    """A PEFT adapter folder: ``adapter_config.json``, and no model ``config.json``."""
    return (path / CONFIG_NAME).is_file() and not (path / CONFIG).is_file()


def read_peft_config(folder: Path) -> LoraConfig:
    """Its LoRA settings; an adapter that is no fixed low-rank update of the weights is refused."""
    source = folder / CONFIG_NAME
    data = read_json(source)
    if not isinstance(data, dict):
        raise LorexError(f"{source}: expected a JSON object")
    for field in UNMERGEABLE_FIELDS:
        if data.get(field):
            raise LorexError(f"{source}: '{field}' adapters are not a LoRA update lorex merges")
    return LoraConfig.from_peft(data, str(source))


class PeftExpert:
    """A PEFT LoRA folder as an expert of ``base``: the base's tensors, names, kind and config
    (it is the base with an update; no heads of its own), the folder's updates added."""

    def __init__(
        self, path: str | Path, base: Any, names: dict[str, str], prefixes: tuple[str, ...]
    ):
        self.path = Path(path)
        self.peft_config = read_peft_config(self.path)
        self.weights_file = self.path / WEIGHTS_NAME
        if not self.weights_file.is_file():
            raise LorexError(f"{self.weights_file}: file not found")
        self.base = base
        self.kind = base.kind
        self.config = {**base.config, "heads": {}} if base.kind == "lorex" else base.config
        self.lora = LoraUpdates()
        # A module's tensors by their key and by the name the model gives them (``names``).
        specs = {k: (k, tuple(base.spec(k)[1])) for k in base.keys()}
        specs = {**{names.get(k, k): v for k, v in specs.items()}, **specs}
        self.lora.add_file(self.weights_file, self.peft_config, 1.0, specs, prefixes)
        self._sha256: str | None = None

    def keys(self) -> list[str]:
        return self.base.keys()

    def own_keys(self) -> list[str]:
        return []

    def lora_keys(self) -> dict[str, bool]:
        """The base keys its LoRA pairs change (not the tensors it replaces whole) -> whether
        each is an embedding's."""
        return self.lora.targets()

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.base.spec(key)

    def get(self, key: str) -> torch.Tensor:
        tensor = self.lora.apply(key, self.base.get(key))
        if key in self.lora.updates and not torch.isfinite(tensor).all():
            raise LorexError(f"{self.weights_file}: the update of '{key}' overflows to Inf/NaN")
        return tensor

    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.weights_file)
        return self._sha256

    def close(self) -> None:
        """Nothing of its own is open (the base is the merge's, closed there)."""
