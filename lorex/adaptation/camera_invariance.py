"""How much of a re-ID feature's spread is camera: a label-free signal of target quality.

A re-ID model that reads a new domain badly groups its images by camera (viewpoint, background,
light) instead of by person. On the synthetic benchmark the between-camera share of the
normalised features' variance ranks the models of each target nearly as their test mAP does
(``benchmarks/results/sage/trials/camera-spread.json``). Camera ids are metadata that target
re-ID data carries (Market-1501's file names), not identity labels, so an unlabelled target may
be adapted on them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def camera_share(features: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
    """``sum_c p_c ||mu_c - mu||^2 / mean_i ||x_i - mu||^2`` over the L2-normalised rows ``x_i``
    of ``features`` (N, D), with ``mu_c`` the mean of camera ``c``'s rows and ``p_c`` its share
    of the rows. 0 when every camera has the same mean feature; 1 when each camera's images
    coincide. Differentiable; invariant to the features' scale."""
    if features.ndim != 2 or cameras.shape != features.shape[:1]:
        raise ValueError(
            f"camera_share takes (N, D) features and (N,) cameras, got "
            f"{tuple(features.shape)} and {tuple(cameras.shape)}"
        )
    x = F.normalize(features, dim=1)
    mu = x.mean(0)
    total = (x - mu).square().sum(1).mean()
    _, index, counts = torch.unique(cameras, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), x.shape[1], dtype=x.dtype, device=x.device)
    means = sums.index_add(0, index.to(x.device), x) / counts.to(x)[:, None]
    between = ((counts.to(x) / len(x)) * (means - mu).square().sum(1)).sum()
    return between / total.clamp_min(1e-12)
