"""The source's feature statistics: what SOCKET's BN-statistics matching matches target batches to.

A ResNet keeps them for free in its BatchNorm buffers; a ViT has none, so lorex records the
per-block channel mean and variance of the tokens over the source's training set when the source
is trained with ``lorex train --feature-stats`` (file ``feature_stats.safetensors`` in the model
directory). A source without that file gets a stand-in computed on the TI RGB images through the
source model: RGB statistics of the same camera, but of other classes (docs/cross_modal.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorex.errors import LorexError
from lorex.io import load_tensors, tensors_bytes
from lorex.models import LorexModel

STATS_FILE = "feature_stats.safetensors"


@torch.inference_mode()
def feature_statistics(
    model: LorexModel, images: torch.Tensor, device: torch.device, batch: int = 256
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block, the channel mean and (biased) variance of the tokens over all ``images``
    (float ``(N, 3, H, W)`` in [0, 1], or uint8), accumulated in float64."""
    model.eval()
    sums: list[torch.Tensor] = []
    squares: list[torch.Tensor] = []
    count = 0
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        tokens = model.backbone.forward_tokens(x)
        flat = [t.reshape(-1, t.shape[-1]).double() for t in tokens]
        if not sums:
            sums = [f.sum(0) for f in flat]
            squares = [f.pow(2).sum(0) for f in flat]
        else:
            for k, f in enumerate(flat):
                sums[k] += f.sum(0)
                squares[k] += f.pow(2).sum(0)
        count += flat[0].shape[0]
    means = [s / count for s in sums]
    variances = [q / count - m.pow(2) for q, m in zip(squares, means, strict=True)]
    return [m.float() for m in means], [v.clamp_min(0).float() for v in variances]


def stats_bytes(means: list[torch.Tensor], variances: list[torch.Tensor]) -> bytes:
    """The statistics as a safetensors file (``blocks.{i}.mean`` / ``blocks.{i}.var``)."""
    tensors = {}
    for i, (m, v) in enumerate(zip(means, variances, strict=True)):
        tensors[f"blocks.{i}.mean"] = m.detach().cpu().contiguous()
        tensors[f"blocks.{i}.var"] = v.detach().cpu().contiguous()
    return tensors_bytes(tensors, metadata={"what": "per-block token channel statistics"})


def load_statistics(
    model_dir: str | Path, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """The recorded statistics of a source model directory, or None when it has none."""
    path = Path(model_dir) / STATS_FILE
    if not path.is_file():
        return None
    tensors = load_tensors(path, device)
    depth = len(tensors) // 2
    try:
        return (
            [tensors[f"blocks.{i}.mean"] for i in range(depth)],
            [tensors[f"blocks.{i}.var"] for i in range(depth)],
        )
    except KeyError as exc:
        raise LorexError(f"{path}: missing tensor {exc.args[0]!r}") from None
