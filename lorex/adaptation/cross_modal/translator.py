"""TGMB's networks: the translator from a one-channel modality to source-like RGB, and the
critic of its adversarial loss.

The paper's translator is "an FC layer, a BN layer and a Conv layer"; ``TinyTranslator`` reads
that as a per-pixel linear layer (a 1x1 convolution), BatchNorm, ReLU and a 3x3 convolution.
``UNetTranslator`` is a two-level U-Net behind ``--translator unet``, for modalities whose
mapping to RGB needs context. Both end in a sigmoid: lorex models take images in [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn


class TinyTranslator(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.pixel = nn.Conv2d(1, width, 1)
        self.bn = nn.BatchNorm2d(width)
        self.out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(torch.relu(self.bn(self.pixel(x)))))


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class UNetTranslator(nn.Module):
    """Two resolutions, one skip connection: sees a 10-pixel neighbourhood at 32x32."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.enc = _block(1, width)
        self.down = nn.Sequential(nn.MaxPool2d(2), _block(width, 2 * width))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = _block(3 * width, width)
        self.out = nn.Conv2d(width, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        deep = self.up(self.down(skip))
        return torch.sigmoid(self.out(self.dec(torch.cat([skip, deep], 1))))


class PatchCritic(nn.Module):
    """A small PatchGAN critic: a score per overlapping patch of an RGB image."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_translator(arch: str, width: int) -> nn.Module:
    return TinyTranslator(width) if arch == "tiny" else UNetTranslator(width)
