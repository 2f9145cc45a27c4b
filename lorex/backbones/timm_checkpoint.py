"""Load timm ViT checkpoints (safetensors, or ``.pth`` with ``weights_only=True``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lorex.backbones.vit import VisionTransformer, resample_pos_embed
from lorex.errors import LorexError
from lorex.io import check_tensors_match, load_tensors

# timm keys this ViT does not model; a checkpoint carrying them is a different architecture.
_UNSUPPORTED = ("fc_norm.", "norm_pre.", ".ls1.", ".ls2.", "reg_token", "attn_pool.")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_tensors(path)
    if not path.is_file():
        raise LorexError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code: report, never execute
        raise LorexError(f"{path}: not a plain tensor checkpoint ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LorexError(f"{path}: expected a dict of tensors")
    return state


def split_timm_state(
    model: VisionTransformer, state: dict[str, torch.Tensor], source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a timm ViT state dict into backbone tensors (position table resized) and ``head.*``."""
    bad = [k for k in state if any(u in k for u in _UNSUPPORTED)]
    if bad:
        raise LorexError(f"{source}: key '{bad[0]}' belongs to a ViT variant lorex does not build")
    head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    body = {k: v for k, v in state.items() if not k.startswith("head.")}
    if "pos_embed" in body:
        body["pos_embed"] = resample_pos_embed(body["pos_embed"], model.patch_embed.grid_size)
    check_tensors_match(model.state_dict(), body, source)
    return body, head
