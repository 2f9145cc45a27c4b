"""A built-in ViT made to take another image size (a 32x32 base on 64x32 person crops)."""

from __future__ import annotations

import logging

from lorex.adapters import lora
from lorex.backbones.vit import VisionTransformer, ViTConfig, resample_pos_embed
from lorex.errors import LorexError
from lorex.models.model import LorexModel

log = logging.getLogger("lorex")


def fit_image_size(model: LorexModel, hw: tuple[int, int]) -> bool:
    """Make the built-in ViT take ``(height, width)`` images: same weights, the position table
    bicubically resampled to the new token grid (the class slot kept). True if it changed.

    Patches keep their size and shape, so a 32x32 base sees a 64x32 person crop at full
    resolution and undistorted, on an 8x4 grid instead of 4x4 (patch 8), like SAGE's
    14x14 -> 16x8 resampling of its ImageNet ViT.
    """
    hw = (int(hw[0]), int(hw[1]))
    if model.image_hw == hw:
        return False
    h, w = model.image_hw
    if model.backbone_config.get("type") != "vit":
        raise LorexError(
            f"the model takes {h}x{w} images and the data is {hw[0]}x{hw[1]}: only the built-in "
            "ViT can change its input size"
        )
    if lora.lora_layers(model.backbone) or model.side is not None:
        raise LorexError(
            f"the model takes {h}x{w} images and the data is {hw[0]}x{hw[1]}: its input size "
            "cannot change under adapters or a side network"
        )
    config = {**model.backbone_config, "img_size": list(hw)}
    old = model.backbone
    new = VisionTransformer(ViTConfig.from_dict(config))
    state = dict(old.state_dict())
    state["pos_embed"] = resample_pos_embed(
        state["pos_embed"], new.patch_embed.grid_size, old.patch_embed.grid_size
    )
    new.load_state_dict(state)
    new.to(next(old.parameters()).device).train(old.training)
    model.backbone, model.backbone_config = new, config
    log.info("input size %dx%d -> %dx%d: position table resampled", h, w, *hw)
    return True
