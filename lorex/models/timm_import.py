"""Import a timm ViT checkpoint as a lorex base model directory.

It lives in ``models`` because it builds and saves a :class:`LorexModel`; reading and checking the
checkpoint's tensors stays with the backbone (``backbones/timm_checkpoint.py``)."""

from __future__ import annotations

from pathlib import Path

from lorex.backbones.timm_checkpoint import read_checkpoint, split_timm_state
from lorex.backbones.vit import VisionTransformer, ViTConfig
from lorex.io import check_tensors_match
from lorex.models.model import LorexModel
from lorex.models.store import save_model


def import_timm(checkpoint: str | Path, backbone_config: dict, out: str | Path) -> Path:
    """Write a lorex base model directory from a timm ViT checkpoint.

    A classifier ``head`` in the checkpoint becomes the model's ``timm`` head (classes "0".."C-1").
    """
    model = LorexModel(VisionTransformer(ViTConfig.from_dict(backbone_config)), backbone_config)
    body, head = split_timm_state(model.backbone, read_checkpoint(checkpoint), str(checkpoint))
    model.backbone.load_state_dict(body)
    if "weight" in head:
        key = model.add_head("timm", [str(i) for i in range(head["weight"].shape[0])])
        expected = {f"head.{k}": v for k, v in model.heads[key].state_dict().items()}
        check_tensors_match(expected, {f"head.{k}": v for k, v in head.items()}, checkpoint)
        model.heads[key].load_state_dict(head)
    return save_model(model, out, made_by={"command": "import-timm", "checkpoint": str(checkpoint)})
