"""The LoSA side network: refines a frozen backbone's per-block tokens, in parallel to it.

The backbone runs under ``torch.no_grad()``: none of its activations are kept for backward, and
the only gradients are the side network's. Its per-block outputs ``b_i`` are all the side network
reads, so with no augmentation they can be computed once and cached (``taps``, then ``refine``).

Recurrence (docs/losa.md): ``a_0 = 0``, ``a_i = a_{i-1} + g_i(a_{i-1} + b_i)`` over the tapped
blocks, features ``= pool(b_L + a_L)``. Zero up-projections make ``a_L = 0`` at the start, so the
model starts exactly at the linear probe of the frozen backbone. With a narrow side stream
(``width`` w < D) the mixers see ``P b_i`` and the features are ``pool(b_L + U a_L)``, with one
learned ``P: D -> w`` and ``U: w -> D`` shared by all taps; ``a_L`` is still zero at the start.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorex.adapters.losa.config import LosaConfig
from lorex.adapters.losa.mixer import LowRankMixer
from lorex.errors import LorexError


def _block_tokens(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    if not hasattr(backbone, "forward_tokens"):
        raise LorexError(
            f"LoSA needs per-block tokens: {type(backbone).__name__} has no forward_tokens()"
        )
    return backbone.forward_tokens(x)


class LosaSideNetwork(nn.Module):
    """Low-rank mixers over the tokens of a frozen backbone's tapped blocks."""

    def __init__(self, config: LosaConfig, depth: int, tokens: int, dim: int):
        super().__init__()
        self.config = config
        self.depth, self.tokens, self.dim = depth, tokens, dim
        if config.width > dim:
            raise LorexError(f"width: {config.width} is wider than the backbone's {dim} channels")
        self.width = config.width if 0 < config.width < dim else dim
        layers = config.tapped(depth)
        # The stacked taps hold the tapped blocks plus the last block, whose tokens are refined.
        self.sources = sorted(set(layers) | {depth - 1})
        self.mix_at = [self.sources.index(i) for i in layers]
        self.mixers = nn.ModuleList(
            LowRankMixer(
                self.width,
                tokens,
                config.rank_channel,
                config.rank_token,
                config.rank_temporal,
                config.frames,
            )
            for _ in layers
        )
        if self.width < dim:
            self.project_down = nn.Linear(dim, self.width, bias=False)
            self.project_up = nn.Linear(self.width, dim, bias=False)

    @classmethod
    def for_backbone(cls, backbone: nn.Module, config: LosaConfig, image_size: int):
        """Size the side network from one dry run of the backbone (any backbone with
        ``forward_tokens``: the built-in ViT or a Hugging Face one)."""
        param = next(backbone.parameters())
        probe = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            tokens = _block_tokens(backbone, probe)
        _, n, d = tokens[-1].shape
        return cls(config, len(tokens), n, d).to(param.device)

    def describe(self) -> dict[str, Any]:
        """What ``config.json`` records to rebuild this network."""
        return {
            "method": "losa",
            "config": self.config.to_dict(),
            "depth": self.depth,
            "tokens": self.tokens,
            "dim": self.dim,
        }

    @classmethod
    def from_description(cls, info: dict[str, Any], source: str) -> LosaSideNetwork:
        if not isinstance(info, dict) or info.get("method") != "losa":
            raise LorexError(f"{source}: field 'side' must describe a 'losa' side network")
        missing = [k for k in ("config", "depth", "tokens", "dim") if k not in info]
        if missing:
            raise LorexError(f"{source}: field 'side' lacks '{missing[0]}'")
        config = LosaConfig.from_dict(dict(info["config"]), f"{source}: side.config")
        return cls(config, int(info["depth"]), int(info["tokens"]), int(info["dim"]))

    @torch.no_grad()
    def taps(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The frozen part: stacked block outputs, ``(B, S, N, D)`` or ``(B, S, T, N, D)`` for
        clips ``(B, T, 3, H, W)``. Computed without autograd; this is what the cache stores."""
        frames = self.config.frames
        if x.ndim == 5:
            if x.shape[1] != frames:
                raise LorexError(
                    f"input has {x.shape[1]} frames per clip, this side network takes {frames}"
                )
            tokens = _block_tokens(backbone, x.flatten(0, 1))
            return torch.stack([tokens[i] for i in self.sources], 1).unflatten(0, (-1, frames))
        if frames != 1:
            raise LorexError(f"this side network takes {frames}-frame clips, got single images")
        tokens = _block_tokens(backbone, x)
        return torch.stack([tokens[i] for i in self.sources], 1)

    def refine(self, taps: torch.Tensor) -> torch.Tensor:
        """Refined last-block tokens, ``(B, N, D)`` or ``(B, T, N, D)``, from stacked taps."""
        if self.config.frames > 1:
            taps = taps.transpose(1, 2)  # (B, T, S, N, D) -> (B, S, T, N, D)
        last = taps[:, -1]
        if self.width < self.dim:
            # One product projects every tap; unbind's backward is one stack, not S zero-filled
            # full-size gradients as indexing would give.
            picked = taps if len(self.mix_at) == taps.shape[1] else taps[:, self.mix_at]
            sources = self.project_down(picked).unbind(1)
        else:
            sources = [taps[:, index] for index in self.mix_at]
        # a_1 = g_1(b_1) since a_0 = 0: skipping the zero state saves two full-size passes.
        state = self.mixers[0](sources[0])
        for source, mixer in zip(sources[1:], self.mixers[1:], strict=True):
            state = state + mixer(state + source)
        return last + (self.project_up(state) if self.width < self.dim else state)

    def pool(self, backbone: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Features ``(B, D)``; clips are pooled per frame and then averaged over time."""
        clip = tokens.ndim == 4
        flat = tokens.flatten(0, 1) if clip else tokens
        if self.config.pool == "backbone":
            if not hasattr(backbone, "pool"):
                raise LorexError(f"{type(backbone).__name__} has no pool(); use --losa-pool")
            feats = backbone.pool(flat)
        else:
            norm = getattr(backbone, "norm", None)
            if norm is None:
                raise LorexError(f"pool '{self.config.pool}' needs a backbone with a final norm")
            normed = norm(flat)
            feats = normed[:, 0] if self.config.pool == "token" else normed[:, 1:].mean(1)
        return feats.unflatten(0, (tokens.shape[0], -1)).mean(1) if clip else feats

    def features_from_taps(self, backbone: nn.Module, taps: torch.Tensor) -> torch.Tensor:
        return self.pool(backbone, self.refine(taps))

    def forward(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.features_from_taps(backbone, self.taps(backbone, x))
