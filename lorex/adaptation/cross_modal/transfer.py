"""Reading target images through a model: one-channel images as RGB input, features and logits.

The training that adapts a model to the target is
:class:`lorex.adaptation.cross_modal.objectives.TargetTransfer`.
"""

from __future__ import annotations

import torch

from lorex.models import LorexModel


def replicate(one_channel: torch.Tensor) -> torch.Tensor:
    """A one-channel image as the 3-channel input of an RGB model (SOCKET's loader does this)."""
    return one_channel.expand(-1, 3, -1, -1)


@torch.inference_mode()
def features_and_logits(
    model: LorexModel, images: torch.Tensor, device: torch.device, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and logits of float images ``(N, C, H, W)`` (1 channel: replicated)."""
    model.eval()
    feats, logits = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(device)
        f = model.features(replicate(x) if x.shape[1] == 1 else x)
        feats.append(f.cpu())
        logits.append(model.heads[model.active_head](f).cpu())
    return torch.cat(feats), torch.cat(logits)
