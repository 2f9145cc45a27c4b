"""``ties`` (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

1. Trim: keep each task vector's top ``density`` fraction by magnitude, over the *whole* task
   vector (one threshold per task, as FusionBench's ``topk_values_mask``), not per tensor.
2. Elect: each entry's sign is the sign of the sum of the trimmed values; where that sum is 0 the
   sign of the whole model's majority is used (FusionBench's ``resolve_sign``).
3. Disjoint merge: the mean (or sum) of the trimmed entries that agree with the elected sign.

``theta = theta_0 + scale * merged``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorex.errors import LorexError
from lorex.merging.base import MergeContext, MergeMethod, register_merge_method
from lorex.merging.select import kth_for_density, kth_smallest_abs

MERGE_FUNCS = ("mean", "sum")


@dataclass(frozen=True)
class TiesOptions:
    density: float = 0.2
    scale: float = 1.0
    merge_func: str = "mean"

    def __post_init__(self) -> None:
        if not 0 < self.density <= 1:
            raise LorexError(f"density: must be in (0, 1], got {self.density}")
        if self.merge_func not in MERGE_FUNCS:
            raise LorexError(f"merge-func: must be mean or sum, got {self.merge_func!r}")


def global_thresholds(ctx: MergeContext, density: float) -> list[float]:
    """Per task, the magnitude at or above which an entry is kept (0: keep everything)."""
    total = sum(int(torch.Size(ctx.base.spec(k)[1]).numel()) for k in ctx.keys)
    k = kth_for_density(total, density)
    if k == 0:
        return [0.0] * len(ctx.experts)

    def chunks():
        for _, taus in ctx.stream():
            yield list(taus)

    return kth_smallest_abs(chunks, [k] * len(ctx.experts))


def elect_sign(trimmed: torch.Tensor, majority: float) -> torch.Tensor:
    sign = torch.sign(trimmed.sum(0))
    return torch.where(sign == 0, torch.full_like(sign, majority), sign)


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, merge_func: str) -> torch.Tensor:
    """Sum or mean of the entries that agree with ``sign``; overwrites ``trimmed`` (memory)."""
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    total = trimmed.mul_(agree).sum(0)
    if merge_func == "sum":
        return total
    return total / agree.sum(0).clamp(min=1)


def majority_sign(
    ctx: MergeContext, sparsify: Callable[[str, torch.Tensor], torch.Tensor]
) -> float:
    """Sign of the sum, over every merged entry, of the per-entry signs (0 if they cancel)."""
    total = 0.0
    for key, taus in ctx.stream():
        total += float(torch.sign(sparsify(key, taus).sum(0)).sum())
    return float(torch.sign(torch.tensor(total)))


@register_merge_method
class Ties(MergeMethod):
    name = "ties"
    Options = TiesOptions

    def prepare(self, ctx: MergeContext) -> None:
        self.thresholds = global_thresholds(ctx, self.options.density)
        self.majority = majority_sign(ctx, self._trim)

    def _trim(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        """Zero what falls under each task's global threshold, in place."""
        for row, threshold in zip(taus, self.thresholds, strict=True):
            row.mul_(row.abs() >= threshold)
        return taus

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        trimmed = self._trim(key, taus)
        sign = elect_sign(trimmed, self.majority)
        return base + self.options.scale * disjoint_merge(trimmed, sign, self.options.merge_func)
