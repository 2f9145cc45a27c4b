"""Inject, switch, combine, merge and save named LoRA adapters on any ``nn.Module``.

Adapters live in ``LoraLayer``s that replace the targeted ``nn.Linear``/``nn.Conv2d`` modules;
the settings of each adapter are kept on the root module (``lora_configs``). Files use PEFT's
format: keys ``base_model.model.<module path>.lora_{A,B}.weight`` in ``adapter_model.safetensors``
and an ``adapter_config.json``: ``peft.PeftModel.from_pretrained`` loads them, and PEFT's files
load here.

A wrapper module (the Hugging Face backbone holds the transformers model as ``self.model``) names
in ``peft_root`` the submodule PEFT sees as the model: module paths in files and the targets are
relative to it, so the files fit the plain model. Files written before that, with the wrapper's
own prefix in their keys (``base_model.model.model.*``), still load.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lorex.adapters.lora.config import LoraConfig
from lorex.adapters.lora.layer import LoraLayer, wrapper_for
from lorex.errors import LorexError
from lorex.io import load_tensors, read_json, save_tensors, write_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_root(module: nn.Module) -> str:
    """The path of the submodule PEFT sees as the model (``""``: ``module`` itself)."""
    return getattr(module, "peft_root", "")


def relative_path(module: nn.Module, path: str) -> str | None:
    """``path`` as PEFT names it on the root model; None for a module outside the root."""
    root = peft_root(module)
    if not root:
        return path
    return path[len(root) + 1 :] if path.startswith(root + ".") else None


def _targeted(module: nn.Module, config: LoraConfig, path: str) -> bool:
    rel = relative_path(module, path)
    return rel is not None and config.matches(rel)


def lora_layers(module: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def adapter_configs(module: nn.Module) -> dict[str, LoraConfig]:
    if not hasattr(module, "lora_configs"):
        module.lora_configs = {}
    return module.lora_configs


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def add_adapter(module: nn.Module, config: LoraConfig, name: str = "default") -> list[str]:
    """Wrap each ``nn.Linear`` or ``nn.Conv2d`` that ``config`` targets; give it adapter ``name``.

    Returns the wrapped module paths. The new adapter becomes the only active one.
    """
    configs = adapter_configs(module)
    if name in configs:
        raise LorexError(f"adapter '{name}' already exists")
    targets = []
    for path, sub in list(module.named_modules()):
        if isinstance(sub, LoraLayer) or path.endswith(("base_layer", "lora_A", "lora_B")):
            continue
        if not _targeted(module, config, path):
            continue
        if wrapper_for(sub) is not None:
            targets.append(path)
        elif not any(path.startswith(t + ".") for t in targets):
            raise LorexError(
                f"target '{path}' is a {type(sub).__name__}; LoRA wraps nn.Linear and nn.Conv2d"
            )
    wrapped = [
        p
        for p, m in module.named_modules()
        if isinstance(m, LoraLayer) and _targeted(module, config, p)
    ]
    if not targets and not wrapped:
        linear = [p for p, m in module.named_modules() if wrapper_for(m) is not None][:4]
        raise LorexError(
            f"targets {config.target_modules!r} match no nn.Linear or nn.Conv2d module "
            f"(some are: {', '.join(linear)})"
        )
    for path in targets:
        base = module.get_submodule(path)
        base.requires_grad_(False)
        _set_submodule(module, path, wrapper_for(base)(base))
    for path in sorted(set(targets) | set(wrapped)):
        module.get_submodule(path).add_adapter(name, config.r, config.scaling, config.lora_dropout)
    configs[name] = config
    set_adapter(module, name)
    return sorted(set(targets) | set(wrapped))


def _layers_with(module: nn.Module, name: str) -> dict[str, LoraLayer]:
    if name not in adapter_configs(module):
        known = ", ".join(adapter_configs(module)) or "none"
        raise LorexError(f"no adapter named '{name}' (adapters: {known})")
    return {p: m for p, m in lora_layers(module).items() if name in m.scaling}


def set_adapter(module: nn.Module, name: str) -> None:
    """Make ``name`` the only active adapter."""
    set_weighted_adapters(module, {name: 1.0})


def set_weighted_adapters(module: nn.Module, weights: dict[str, float]) -> None:
    """Activate several adapters at once: the output adds each one's delta times its weight.

    This is the exact weighted sum of the adapters' outputs, not a combination of their A and B.
    """
    for name in weights:
        _layers_with(module, name)
    for layer in lora_layers(module).values():
        layer.active = {n: float(w) for n, w in weights.items() if n in layer.scaling}


def active_adapters(module: nn.Module) -> dict[str, float]:
    merged: dict[str, float] = {}
    for layer in lora_layers(module).values():
        merged.update(layer.active)
    return merged


@contextlib.contextmanager
def disable_adapters(module: nn.Module) -> Iterator[nn.Module]:
    """Run the bare backbone inside the block; merged adapters are unmerged for its duration."""
    layers = lora_layers(module).values()
    remerge = {layer: list(layer.merged) for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield module
    finally:
        for layer in layers:
            layer.disabled = False
            layer.merge(remerge[layer])


def delete_adapter(module: nn.Module, name: str) -> None:
    """Remove adapter ``name``; a layer left without adapters becomes its plain base again."""
    for path, layer in _layers_with(module, name).items():
        layer.delete_adapter(name)
        if not layer.scaling:
            _set_submodule(module, path, layer.base_layer)
    del adapter_configs(module)[name]


def merge_adapter(module: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights (weight 1); unmerge restores them."""
    for layer in _layers_with(module, name).values():
        layer.merge([name])


def merge_and_unload(module: nn.Module) -> list[str]:
    """Fold the active adapters (with their weights) into the base weights and remove every LoRA
    layer: a plain module again, with no inference overhead. Returns the adapters folded in."""
    folded = sorted(active_adapters(module))
    with torch.no_grad():
        for path, layer in lora_layers(module).items():
            layer.unmerge()
            w = layer.base_layer.weight
            delta = sum(
                (wt * layer.delta_weight(n) for n, wt in layer.active.items()), torch.zeros(())
            )
            w.copy_((w.float() + delta).to(w.dtype))
            _set_submodule(module, path, layer.base_layer)
    adapter_configs(module).clear()
    return folded


def unmerge_adapters(module: nn.Module) -> None:
    for layer in lora_layers(module).values():
        layer.unmerge()


def mark_trainable(module: nn.Module, name: str) -> None:
    """Freeze everything, then unfreeze adapter ``name`` (and biases, per its ``bias`` setting)."""
    config = adapter_configs(module)[name]
    module.requires_grad_(False)
    for layer in _layers_with(module, name).values():
        layer.lora_A[name].requires_grad_(True)
        layer.lora_B[name].requires_grad_(True)
        if config.bias == "lora_only" and layer.base_layer.bias is not None:
            layer.base_layer.bias.requires_grad_(True)
    if config.bias == "all":
        for p in _plain_biases(module).values():
            p.requires_grad_(True)


def _plain_biases(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every bias under the PEFT root but the adapters' own, by its path relative to the root."""
    found = {}
    for pname, p in module.named_parameters():
        rel = relative_path(module, pname)
        if rel is not None and pname.endswith("bias") and ".lora_" not in pname:
            found[rel] = p
    return found


def adapter_state_dict(module: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT's on-disk keys (adapter name stripped)."""
    layers = _peft_named(module, _layers_with(module, name))
    state = {}
    for path, layer in layers.items():
        state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].weight
        state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].weight
    # Biases keep the wrapped layer's ``base_layer`` in their key, as PEFT writes them.
    bias = adapter_configs(module)[name].bias
    if bias == "lora_only":
        for path, layer in layers.items():
            if layer.base_layer.bias is not None:
                state[f"{PEFT_PREFIX}{path}.base_layer.bias"] = layer.base_layer.bias
    elif bias == "all":
        for rel, p in _plain_biases(module).items():
            state[PEFT_PREFIX + rel] = p
    return state


def _peft_named(module: nn.Module, layers: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
    """``layers`` keyed by their paths relative to the PEFT root (all lie under it)."""
    return {relative_path(module, p): m for p, m in layers.items()}


def save_adapter(module: nn.Module, name: str, out: str | Path, base: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's format."""
    out = Path(out)
    save_tensors(out / WEIGHTS_NAME, adapter_state_dict(module, name), metadata={"format": "pt"})
    write_json(out / CONFIG_NAME, adapter_configs(module)[name].to_peft(base))
    return out


def load_adapter(module: nn.Module, folder: str | Path, name: str = "default") -> list[str]:
    """Add adapter ``name`` from a PEFT-format folder (written by lorex or by PEFT)."""
    folder = Path(folder)
    config = LoraConfig.from_peft(read_json(folder / CONFIG_NAME), str(folder / CONFIG_NAME))
    tensors = load_tensors(folder / WEIGHTS_NAME)
    if _has_root_prefix(module, tensors):
        tensors, config = _from_rooted_file(module, tensors, config)
    paths = add_adapter(module, config, name)
    try:
        _load_adapter_tensors(module, name, tensors, folder / WEIGHTS_NAME)
    except LorexError:
        delete_adapter(module, name)
        raise
    return paths


def _has_root_prefix(module: nn.Module, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a file names its modules with the wrapper's own path to the root (written by
    lorex before ``peft_root``): every key under ``base_model.model.<root>.``, and its LoRA
    modules are there in the wrapper, not in the root model."""
    root = peft_root(module)
    if not root or not tensors:
        return False
    prefix = f"{PEFT_PREFIX}{root}."
    if not all(k.startswith(prefix) for k in tensors):
        return False
    paths = {p for p, _ in module.named_modules()}
    lora_modules = [k[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k]
    return all(m in paths for m in lora_modules)


def _from_rooted_file(
    module: nn.Module, tensors: dict[str, torch.Tensor], config: LoraConfig
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """An old file's keys relative to the root, and its targets as the exact modules they named
    (a regex may have spelt out the wrapper's prefix, which the root's paths lack)."""
    cut = len(peft_root(module)) + 1
    renamed = {PEFT_PREFIX + k[len(PEFT_PREFIX) + cut :]: v for k, v in tensors.items()}
    if isinstance(config.target_modules, str):
        targets = sorted(
            path[cut:]
            for path, sub in module.named_modules()
            if relative_path(module, path) is not None
            and not path.endswith(("base_layer", "lora_A", "lora_B"))
            and (isinstance(sub, LoraLayer) or wrapper_for(sub) is not None)
            and config.matches(path)
        )
        config = dataclasses.replace(config, target_modules=targets or config.target_modules)
    return renamed, config


def _load_adapter_tensors(module: nn.Module, name: str, tensors: dict, source: Path) -> None:
    layers = _peft_named(module, _layers_with(module, name))
    expected = {}
    for path, layer in layers.items():
        expected[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].weight
        expected[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].weight
    root = peft_root(module)
    params = {
        (p[len(root) + 1 :] if root else p): v
        for p, v in module.named_parameters()
        if relative_path(module, p) is not None
    }
    for key in sorted(tensors):
        if key in expected:
            target = expected[key]
        elif key.startswith(PEFT_PREFIX) and key.endswith("bias"):
            path = key[len(PEFT_PREFIX) :]
            owner = path.rsplit(".", 1)[0]
            target = params.get(f"{owner}.base_layer.bias", params.get(path))
        else:
            target = None
        if target is None:
            raise LorexError(f"{source}: key '{key}' does not fit this backbone")
        if tensors[key].shape != target.shape:
            raise LorexError(
                f"{source}: '{key}' has shape {tuple(tensors[key].shape)}, the backbone needs "
                f"{tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensors[key])
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise LorexError(f"{source}: missing tensor '{missing[0]}'")
