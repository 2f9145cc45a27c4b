"""A plain Vision Transformer whose parameter names follow timm's ``VisionTransformer``.

Matching names means a timm ViT checkpoint saved as safetensors loads with ``load_state_dict``
and LoRA target names (``qkv``, ``proj``, ``fc1``, ``fc2``) are the ones users know.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorex.errors import LorexError


def image_hw(img_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``(height, width)`` of an ``img_size``: one number (square) or a ``(height, width)`` pair."""
    if isinstance(img_size, int | float) and not isinstance(img_size, bool):
        return int(img_size), int(img_size)
    if (
        isinstance(img_size, tuple | list)
        and len(img_size) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in img_size)
    ):
        return int(img_size[0]), int(img_size[1])
    raise LorexError(f"img_size: expected a number or (height, width), got {img_size!r}")


#: A config.json asking for more is refused before anything is built (ViT-g/14 has about 1e9).
MAX_PARAMETERS = 4_000_000_000


@dataclass(frozen=True)
class ViTConfig:
    # One number for square images, or (height, width): re-ID crops are 64x32 (docs/reid.md).
    img_size: int | tuple[int, int] = 32
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

    def __post_init__(self) -> None:
        """Types and ranges, so a bad config.json is a one-line error, not a crash deep in torch."""

        def whole(name: str, least: int = 1) -> int:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise LorexError(f"{name}: must be a whole number >= {least}, got {value!r}")
            return value

        def number(value: object, name: str, positive: bool = True) -> float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or (positive and not value > 0):
                kind = "a positive number" if positive else "a finite number"
                raise LorexError(f"{name}: must be {kind}, got {value!r}")
            return float(value)

        size = self.img_size
        sides = size if isinstance(size, tuple | list) else (size,)
        if len(sides) not in (1, 2) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sides
        ):
            raise LorexError(f"img_size: must be a whole number or (height, width), got {size!r}")
        h, w = image_hw(size)
        patch = whole("patch_size")
        if h % patch or w % patch:
            raise LorexError(f"img_size {self.img_size} is not a multiple of patch_size {patch}")
        whole("in_chans")
        dim, heads = whole("embed_dim"), whole("num_heads")
        if dim % heads:
            raise LorexError(f"embed_dim {dim} is not a multiple of num_heads {heads}")
        depth = whole("depth")
        if int(dim * number(self.mlp_ratio, "mlp_ratio")) < 1:
            raise LorexError(f"mlp_ratio: {self.mlp_ratio!r} leaves no MLP units")
        if not isinstance(self.qkv_bias, bool):
            raise LorexError(f"qkv_bias: must be true or false, got {self.qkv_bias!r}")
        if self.global_pool not in ("token", "avg"):
            raise LorexError(f"global_pool: must be 'token' or 'avg', got {self.global_pool!r}")
        number(self.eps, "eps")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not isinstance(values, tuple | list) or len(values) != 3:
                raise LorexError(f"{name}: must be 3 numbers, got {values!r}")
            for v in values:
                number(v, name, positive=name == "std")
        hidden = int(dim * self.mlp_ratio)
        per_block = 4 * dim * dim + 2 * dim * hidden + hidden + 9 * dim
        tokens = (h // patch) * (w // patch) + 1
        total = depth * per_block + self.in_chans * patch * patch * dim + (tokens + 2) * dim
        if total > MAX_PARAMETERS:
            raise LorexError(
                f"this ViT would have {total:,} parameters, more than lorex builds "
                f"({MAX_PARAMETERS:,}); check embed_dim, depth and mlp_ratio"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if isinstance(self.img_size, tuple | list):
            d["img_size"] = list(self.img_size)
        return {"type": "vit", **d}

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        known = {f for f in cls.__dataclass_fields__}
        extra = sorted(set(d) - known - {"type"})
        if extra:
            close = difflib.get_close_matches(extra[0], known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise LorexError(f"unknown ViT config field '{extra[0]}'{hint}")
        d = {k: v for k, v in d.items() if k != "type"}
        for key in ("mean", "std"):
            if isinstance(d.get(key), list):  # JSON gives a list; keep it hashable
                d[key] = tuple(d[key])
        if isinstance(d.get("img_size"), list):
            d["img_size"] = tuple(d["img_size"])
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
        self.img_hw = image_hw(cfg.img_size)
        self.in_chans = cfg.in_chans  # kept here: an adapter may wrap `proj` (PEFT's hides it)
        self.grid_size = (self.img_hw[0] // cfg.patch_size, self.img_hw[1] // cfg.patch_size)
        # Square images: the side of the token grid (as before); otherwise (rows, columns).
        gh, gw = self.grid_size
        self.grid: int | tuple[int, int] = gh if gh == gw else self.grid_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def check_input(self, x: torch.Tensor) -> None:
        h, w = self.img_hw
        if x.ndim != 4 or x.shape[1:] != (self.in_chans, h, w):
            raise LorexError(
                f"input of shape {tuple(x.shape)} does not fit this backbone: expected "
                f"(B, {self.in_chans}, {h}, {w})"
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
        self.config = cfg  # checked by ViTConfig itself
        self.num_features = self.embed_dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.num_patches = self.patch_embed.grid_size[0] * self.patch_embed.grid_size[1]
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
        if self.pos_embed.is_meta:  # shapes only (load_model's check); meta normal_ costs seconds
            return
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


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: int | tuple[int, int],
    old_grid: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Bicubically resize a ``(1, 1 + gh*gw, D)`` position table to a new grid; class slot kept.

    A grid is one number (square) or ``(rows, columns)``; ``old_grid`` defaults to the square
    grid the table's length implies (e.g. a 4x4 table of a 32x32 base to 8x4 for 64x32 re-ID
    crops with patch 8)."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    if old_grid is None:
        side = int(round(math.sqrt(grid.shape[1])))
        if side * side != grid.shape[1]:
            raise LorexError(f"pos_embed has {grid.shape[1]} patch positions, not a square grid")
        old_grid = side
    old, new = image_hw(old_grid), image_hw(new_grid)
    if old[0] * old[1] != grid.shape[1]:
        raise LorexError(
            f"pos_embed has {grid.shape[1]} patch positions, not a {old[0]}x{old[1]} grid"
        )
    if old == new:
        return pos_embed
    grid = grid.reshape(1, *old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)
