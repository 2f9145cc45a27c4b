"""A gated mixture of K LoRA experts (SAGE-reID): soft per-sample weights per layer."""

from lorex.adapters.gated.config import GATE_KINDS, GateConfig
from lorex.adapters.gated.layer import GatedLoraLinear
from lorex.adapters.gated.model import (
    attach_gate,
    expert_parameter_count,
    gate_config,
    gate_parameters,
    gated_layers,
    load_experts,
    mark_gate_trainable,
    record_gate_weights,
    reset_gate,
)

__all__ = [
    "GATE_KINDS",
    "GateConfig",
    "GatedLoraLinear",
    "attach_gate",
    "expert_parameter_count",
    "gate_config",
    "gate_parameters",
    "gated_layers",
    "load_experts",
    "mark_gate_trainable",
    "record_gate_weights",
    "reset_gate",
]
