"""Build a gated mixture of LoRA experts on a backbone, train only its gate, read its weights.

The experts come from LoRA layers (``lorex.adapters.lora``) that share rank and scaling; their
A and B are stacked per layer into :class:`GatedLoraLinear`, which replaces the plain
``nn.Linear``. The settings live on the backbone (``gate_config``) so a model directory can
record them and rebuild the same modules before loading the tensors (``lorex.models.store``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from lorex.adapters.gated.config import GateConfig
from lorex.adapters.gated.layer import GatedLoraLinear
from lorex.errors import LorexError


def gated_layers(module: nn.Module) -> dict[str, GatedLoraLinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, GatedLoraLinear)}


def attach_gate(module: nn.Module, config: GateConfig) -> list[str]:
    """Replace each ``nn.Linear`` in ``config.target_modules`` with an empty gated layer (experts
    zero, gate at its initial uniform state); fill the experts with :func:`load_experts`."""
    if getattr(module, "gate_config", None) is not None:
        raise LorexError("this backbone already has a gate")
    if not config.target_modules:
        raise LorexError("gate: no target modules")
    for path in config.target_modules:
        try:
            base = module.get_submodule(path)
        except AttributeError:
            raise LorexError(f"gate: target '{path}' is not a module of this backbone") from None
        if not isinstance(base, nn.Linear):
            raise LorexError(f"gate: target '{path}' is a {type(base).__name__}, not nn.Linear")
        layer = GatedLoraLinear(
            base,
            config.num_experts,
            config.r,
            config.scaling,
            config.kind,
            config.tokens,
            config.eps,
        )
        parent, _, child = path.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer)
    module.gate_config = config
    return list(config.target_modules)


def load_experts(
    module: nn.Module, experts: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]]
) -> None:
    """``experts[name][path] = (A, B)`` for every expert of the gate and every gated layer."""
    config = gate_config(module)
    layers = gated_layers(module)
    if sorted(experts) != sorted(config.experts):
        raise LorexError(f"gate: experts {sorted(experts)} differ from {sorted(config.experts)}")
    for index, name in enumerate(config.experts):
        missing = sorted(set(layers) - set(experts[name]))
        if missing:
            raise LorexError(f"expert '{name}' has no LoRA weights for '{missing[0]}'")
        for path, layer in layers.items():
            a, b = experts[name][path]
            layer.set_expert(index, a, b)


def gate_config(module: nn.Module) -> GateConfig:
    config = getattr(module, "gate_config", None)
    if config is None:
        raise LorexError("this backbone has no gate")
    return config


def gate_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The gate vectors and temperatures: the only parameters stage 4 trains."""
    return [p for layer in gated_layers(module).values() for p in (layer.gate, layer.tau)]


def mark_gate_trainable(module: nn.Module) -> list[nn.Parameter]:
    """Freeze everything in ``module`` but the gates; return the trainable parameters."""
    module.requires_grad_(False)
    params = gate_parameters(module)
    for p in params:
        p.requires_grad_(True)
    return params


def reset_gate(module: nn.Module) -> None:
    """Back to the uniform mix: gate vectors 0, temperatures 1."""
    with torch.no_grad():
        for layer in gated_layers(module).values():
            layer.gate.zero_()
            layer.tau.fill_(1.0)


def expert_parameter_count(module: nn.Module) -> int:
    return sum(
        layer.lora_A.numel() + layer.lora_B.numel() for layer in gated_layers(module).values()
    )


@contextlib.contextmanager
def record_gate_weights(module: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect each gated layer's per-sample weights ``(B, K)`` of the forwards run inside the
    block (bounded by what the block runs; SAGE's code appended to a list forever)."""
    layers = gated_layers(module)
    records: dict[str, list[torch.Tensor]] = {path: [] for path in layers}
    for path, layer in layers.items():
        layer.recorder = records[path]
    try:
        yield records
    finally:
        for layer in layers.values():
            layer.recorder = None
