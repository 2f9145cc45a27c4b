"""LoRA: config, layer, and the code that injects and saves it (in PEFT's file format)."""

from lorex.adapters.lora.config import VIT_TARGETS, LoraConfig, default_targets
from lorex.adapters.lora.layer import LoraConv2d, LoraLayer, LoraLinear
from lorex.adapters.lora.model import (
    active_adapters,
    adapter_configs,
    adapter_state_dict,
    add_adapter,
    delete_adapter,
    disable_adapters,
    load_adapter,
    lora_layers,
    mark_trainable,
    merge_adapter,
    merge_and_unload,
    save_adapter,
    set_adapter,
    set_weighted_adapters,
    unmerge_adapters,
)

__all__ = [
    "VIT_TARGETS",
    "LoraConfig",
    "LoraConv2d",
    "LoraLayer",
    "LoraLinear",
    "active_adapters",
    "adapter_configs",
    "adapter_state_dict",
    "add_adapter",
    "default_targets",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "lora_layers",
    "mark_trainable",
    "merge_adapter",
    "merge_and_unload",
    "save_adapter",
    "set_adapter",
    "set_weighted_adapters",
    "unmerge_adapters",
]
