"""Using a TGMB translator: one-channel target images to source-like RGB.

The translator's training is :class:`lorex.adaptation.cross_modal.objectives.Translator`.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.inference_mode()
def translate(
    translator: nn.Module, images: torch.Tensor, device: torch.device, batch: int = 256
) -> torch.Tensor:
    """Translated RGB ``(N, 3, H, W)`` of one-channel images ``(N, 1, H, W)``, on the CPU."""
    translator.eval()
    return torch.cat(
        [translator(images[i : i + batch].to(device)).cpu() for i in range(0, len(images), batch)]
    )
