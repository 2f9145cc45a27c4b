"""Low-rank MLP mixers: the side network's only trainable blocks.

Each mixes along one axis of the token tensor (channels, tokens of a frame, or frames of a clip)
through a rank-r bottleneck. The up-projection starts at zero, so a fresh mixer changes nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LowRankMlp(nn.Module):
    """``x -> up(gelu(down(norm(x))))`` along one axis (``axis``; -1 is channels), with ``up``
    zero-initialised. Other axes are mixed as matrix products in place, without transposing
    the tensor: the side network's cost is mostly memory traffic on a CPU."""

    def __init__(self, dim: int, rank: int, norm: bool = True, axis: int = -1):
        super().__init__()
        self.axis = axis
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis == -1:
            return self.up(F.gelu(self.down(self.norm(x))))
        # Mix along `axis` (tokens: -2, frames: -3) with batched products of the weight and each
        # (axis, rest) slice: no transposed copy of the activations, forward or backward.
        shape = x.shape
        cols = x.reshape(-1, shape[self.axis], math.prod(shape[self.axis + 1 :]))
        down = self.down.weight.expand(len(cols), -1, -1)
        hidden = F.gelu(torch.baddbmm(self.down.bias.unsqueeze(-1), down, cols))
        up = self.up.weight.expand(len(cols), -1, -1)
        out = torch.baddbmm(self.up.bias.unsqueeze(-1), up, hidden)
        return out.view(shape)


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
        self.temporal_mixing = frames > 1 and rank_temporal > 0
        self.channel = LowRankMlp(dim, rank_channel)
        # Token mixing normalises over channels first (as MLP-Mixer does), then mixes positions.
        self.token_norm = nn.LayerNorm(dim)
        self.token = LowRankMlp(tokens, min(rank_token, tokens), norm=False, axis=-2)
        if self.temporal_mixing:
            self.temporal_norm = nn.LayerNorm(dim)
            self.temporal = LowRankMlp(frames, min(rank_temporal, frames), norm=False, axis=-3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        change = self.channel(h)
        x = h + change
        token = self.token(self.token_norm(x))
        change = change + token
        if self.temporal_mixing:  # (B, T, N, D): mix each token position across the T frames
            change = change + self.temporal(self.temporal_norm(x + token))
        return change
