"""Reading target images through a model: one-channel images as RGB input, features and logits.

The training that adapts a model to the target is
:class:`lorex.adaptation.cross_modal.objectives.TargetTransfer`.
"""

from __future__ import annotations

import torch

from lorex.models import LorexModel
from lorex.training.batches import features_and_head


def replicate(one_channel: torch.Tensor) -> torch.Tensor:
    """A one-channel image as the 3-channel input of an RGB model (SOCKET's loader does this)."""
    return one_channel.expand(-1, 3, -1, -1)


def features_and_logits(
    model: LorexModel, images: torch.Tensor, device: torch.device, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and logits of float images ``(N, C, H, W)`` (1 channel: replicated)."""

    def read(part: torch.Tensor) -> torch.Tensor:
        x = part.to(device)
        return replicate(x) if x.shape[1] == 1 else x

    return features_and_head(model, images, read, batch)
