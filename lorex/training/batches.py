"""Images as tensors, batch by batch: uint8 storage, float batches, shifts, cached features."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lorex.data import ImageDataset
from lorex.models import LorexModel

log = logging.getLogger("lorex")
#: Above this size (MB) cached features go to a memory-mapped file instead of memory.
CACHE_MEMORY_MB = 2048.0


def images_to_tensor(data: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(N, 3, H, W)`` images (clips ``(N, T, 3, H, W)``), 4x smaller than float, and
    int64 labels."""
    return chw_tensor(data.images), torch.from_numpy(data.labels)


def chw_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(..., H, W, 3)`` images as a ``(..., 3, H, W)`` tensor, still uint8."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, -3)))


def as_float(batch_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    return batch_u8.to(device, non_blocking=True).float().div_(255.0)


def random_shift(
    x: torch.Tensor,
    max_shift: int,
    generator: torch.Generator,
    part: tuple[int, slice] | None = None,
) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the edge pixels.
    A clip ``(T, 3, H, W)`` moves as a whole, so the motion within it is kept.

    ``part=(n, rows)``: ``x`` is the rows ``rows`` of a batch of ``n`` (one rank's share under
    data parallelism); the shifts of all ``n`` are drawn, so each image moves as it would in
    one process."""
    if x.ndim == 5:
        flat = random_shift(x.flatten(1, 2), max_shift, generator, part)
        return flat.unflatten(1, x.shape[1:3])
    n, _, h, w = x.shape
    total, rows = part if part is not None else (n, slice(0, n))
    drawn = torch.randint(-max_shift, max_shift + 1, (total, 2), generator=generator)
    shifts = drawn[rows].tolist()
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    return torch.stack(
        [
            padded[i, :, max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]
            for i, (dy, dx) in enumerate(shifts)
        ]
    )


@torch.no_grad()
def extract_features(
    model: LorexModel,
    x_u8: torch.Tensor,
    batch_size: int,
    device: torch.device,
    memory_limit_mb: float | None = None,
) -> torch.Tensor:
    """``model.frozen_features`` of every sample, computed once: in memory, or in a memory-mapped
    temporary file when they would take more than ``memory_limit_mb`` (default
    ``CACHE_MEMORY_MB``; on the CPU)."""
    limit = CACHE_MEMORY_MB if memory_limit_mb is None else memory_limit_mb
    model.eval()
    first = model.frozen_features(as_float(x_u8[:1], device))
    shape = (len(x_u8), *first.shape[1:])
    size_mb = first.element_size() * first[0].numel() * len(x_u8) / 2**20
    if device.type == "cpu" and size_mb > limit:
        handle = tempfile.NamedTemporaryFile(prefix="lorex-features-", suffix=".f32")
        log.info("feature cache: %.0f MB in a memory-mapped file %s", size_mb, handle.name)
        store = torch.from_numpy(np.memmap(handle, np.float32, "w+", shape=shape))
        store._lorex_file = handle  # closed (and deleted) with the tensor
    else:
        store = torch.empty(shape, dtype=first.dtype, device=first.device)
    for i in range(0, len(x_u8), batch_size):
        store[i : i + batch_size] = model.frozen_features(
            as_float(x_u8[i : i + batch_size], device)
        )
    return store


@torch.inference_mode()
def features_and_head(
    model: LorexModel,
    images: torch.Tensor,
    read: Callable[[torch.Tensor], torch.Tensor],
    batch: int = 256,
    head_out: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and the active head's output (through ``head_out``, per batch) of every
    image, in eval mode, on the CPU. ``read`` turns a slice of ``images`` into the model's float
    input on its device: the one reading that pseudo-labelling and distillation both need."""
    model.eval()
    feats, outs = [], []
    for i in range(0, len(images), batch):
        f = model.features(read(images[i : i + batch]))
        out = model.heads[model.active_head](f)
        feats.append(f.float().cpu())
        outs.append((out if head_out is None else head_out(out)).float().cpu())
    return torch.cat(feats), torch.cat(outs)


@torch.inference_mode()
def predict(
    model: LorexModel, data: ImageDataset, batch_size: int = 256, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Predicted class indices for every image of ``data``."""
    device = torch.device(device)
    model.eval()
    x, _ = images_to_tensor(data)
    preds = [
        model(as_float(x[i : i + batch_size], device)).argmax(1).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(preds).numpy()
