"""Backbones map ``[0, 1]`` images ``(B, 3, H, W)`` to features ``(B, D)``, built from a config."""

from __future__ import annotations

from torch import nn

from lorex.backbones.vit import PRESETS, VisionTransformer, ViTConfig
from lorex.errors import LorexError


def build_backbone(config: dict) -> nn.Module:
    """Build an untrained backbone from the ``backbone`` section of a model's config.json."""
    kind = config.get("type")
    if kind == "vit":
        return VisionTransformer(ViTConfig.from_dict(config))
    if kind == "hf":
        from lorex.backbones.hf import HFBackbone

        return HFBackbone.from_config(config)
    raise LorexError(f"unknown backbone type {kind!r} (expected 'vit' or 'hf')")


def preset_config(name: str) -> dict:
    if name not in PRESETS:
        raise LorexError(f"unknown preset '{name}'; choose from {', '.join(PRESETS)}")
    return PRESETS[name].to_dict()


__all__ = ["PRESETS", "ViTConfig", "VisionTransformer", "build_backbone", "preset_config"]
