"""Low-rank MLP mixers: the side network's only trainable blocks.

Each mixes along one axis of the token tensor (channels, tokens of a frame, or frames of a clip)
through a rank-r bottleneck. The up-projection starts at zero, so a fresh mixer changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankMlp(nn.Module):
    """``x -> up(gelu(down(norm(x))))`` along the last axis, with ``up`` zero-initialised."""

    def __init__(self, dim: int, rank: int, norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(self.norm(x))))


class LowRankMixer(nn.Module):
    """One refinement step g: channel mixing, then token mixing (spatial, then temporal for clips).

    Input is ``(B, N, D)`` for images or ``(B, T, N, D)`` for clips; the output is the *change*
    to add to the side state, so zero up-projections give exactly zero.
    """

    def __init__(
        self,
        dim: int,
        tokens: int,
        rank_channel: int,
        rank_token: int,
        rank_temporal: int,
        frames: int = 1,
    ):
        super().__init__()
        self.frames = frames
        self.channel = LowRankMlp(dim, rank_channel)
        # Token mixing normalises over channels first (as MLP-Mixer does), then mixes positions.
        self.token_norm = nn.LayerNorm(dim)
        self.token = LowRankMlp(tokens, min(rank_token, tokens), norm=False)
        if frames > 1:
            self.temporal_norm = nn.LayerNorm(dim)
            self.temporal = LowRankMlp(frames, min(rank_temporal, frames), norm=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h + self.channel(h)
        # (..., N, D) -> mix over N: move N last, mix, move back.
        x = x + self.token(self.token_norm(x).transpose(-1, -2)).transpose(-1, -2)
        if self.frames > 1:  # (B, T, N, D): mix each token position across the T frames
            x = x + self.temporal(self.temporal_norm(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x - h
