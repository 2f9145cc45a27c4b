"""A plain Vision Transformer whose parameter names follow timm's ``VisionTransformer``.

Matching names means a timm ViT checkpoint saved as safetensors loads with ``load_state_dict``
and LoRA target names (``qkv``, ``proj``, ``fc1``, ``fc2``) are the ones users know.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorex.errors import LorexError


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    global_pool: str = "token"  # "token" (class token) or "avg" (mean of patch tokens)
    eps: float = 1e-6
    # Input normalisation, applied inside the backbone so callers pass images in [0, 1].
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return {"type": "vit", **d}

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        known = {f for f in cls.__dataclass_fields__}
        extra = sorted(set(d) - known - {"type"})
        if extra:
            raise LorexError(f"unknown ViT config field(s): {', '.join(extra)}")
        d = {k: v for k, v in d.items() if k != "type"}
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


PRESETS: dict[str, ViTConfig] = {
    # Small enough to pretrain and fine-tune on two CPU cores in minutes.
    "vit-micro": ViTConfig(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4),
    "vit-tiny": ViTConfig(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),
    # vit-micro's token grid at twice the width: the smallest preset where rank-8 LoRA on every
    # block is under 5% of the model (4.2%), so LoRA-versus-full comparisons are fair on a CPU.
    "vit-mini": ViTConfig(img_size=32, patch_size=8, embed_dim=256, depth=4, num_heads=4),
    # timm's vit_tiny_patch16_224 and vit_base_patch16_224 shapes, for real checkpoints.
    "vit-tiny-patch16-224": ViTConfig(
        img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3
    ),
    "vit-base-patch16-224": ViTConfig(
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12
    ),
}


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.img_size = cfg.img_size
        self.in_chans = cfg.in_chans  # kept here: an adapter may wrap `proj` (PEFT's hides it)
        self.grid = cfg.img_size // cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1:] != (self.in_chans, self.img_size, self.img_size):
            raise LorexError(
                f"input of shape {tuple(x.shape)} does not fit this backbone: expected "
                f"(B, {self.in_chans}, {self.img_size}, {self.img_size})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Pre-norm ViT: pooled features from ``forward``, per-block tokens from ``forward_tokens``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise LorexError(
                f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}"
            )
        if cfg.embed_dim % cfg.num_heads:
            raise LorexError(
                f"embed_dim {cfg.embed_dim} is not a multiple of num_heads {cfg.num_heads}"
            )
        if cfg.global_pool not in ("token", "avg"):
            raise LorexError(f"global_pool must be 'token' or 'avg', got {cfg.global_pool!r}")
        self.config = cfg
        self.num_features = self.embed_dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.num_patches = self.patch_embed.grid**2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, cfg.embed_dim))
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.eps)
        # Not persistent: the state dict keeps exactly timm's keys.
        self.register_buffer(
            "input_mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("input_std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.patch_embed.proj.weight
        nn.init.uniform_(w, -1 / math.sqrt(w[0].numel()), 1 / math.sqrt(w[0].numel()))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise [0, 1] images, cut them into patch tokens, add class token and positions."""
        self.patch_embed.check_input(x)  # before normalising: broadcasting would hide a bad shape
        x = self.patch_embed((x - self.input_mean) / self.input_std)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def forward_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Tokens ``(B, 1 + N, D)`` after each block (before the final norm), for side networks."""
        x = self.embed(x)
        tokens = []
        for block in self.blocks:
            x = block(x)
            tokens.append(x)
        return tokens

    def pool(self, last_tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(last_tokens)
        return x[:, 0] if self.config.global_pool == "token" else x[:, 1:].mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.embed(x)))


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Bicubically resize a ``(1, 1 + g*g, D)`` position table to a new grid; class slot kept."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(round(math.sqrt(grid.shape[1])))
    if old * old != grid.shape[1]:
        raise LorexError(f"pos_embed has {grid.shape[1]} patch positions, not a square grid")
    if old == new_grid:
        return pos_embed
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)
