"""``ties`` (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

1. Trim: keep each task vector's top ``density`` fraction by magnitude, over the *whole* task
   vector (one threshold per task, as FusionBench's ``topk_values_mask``), not per tensor.
2. Elect: each entry's sign is the sign of the sum of the trimmed values; where that sum is 0 the
   sign of the whole model's majority is used (FusionBench's ``resolve_sign``).
3. Disjoint merge: the mean (or sum) of the trimmed entries that agree with the elected sign.

``theta = theta_0 + scale * merged``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorex.errors import LorexError
from lorex.merging.base import MergeContext, MergeMethod
from lorex.merging.ops import (
    FoldedMajority,
    check_merge_func,
    disjoint_merge,
    elect_sign,
    global_thresholds,
    majority_sign,
)
from lorex.merging.option_fields import merge_func_field, scale_field
from lorex.settings_field import setting


@dataclass(frozen=True)
class TiesOptions:
    density: float = setting(0.2, "fraction kept per task vector")
    scale: float = scale_field(1.0)
    merge_func: str = merge_func_field()

    def __post_init__(self) -> None:
        if not 0 < self.density <= 1:
            raise LorexError(f"density: must be in (0, 1], got {self.density}")
        check_merge_func(self.merge_func)


class Ties(MergeMethod):
    name = "ties"
    Options = TiesOptions

    def prepare(self, ctx: MergeContext) -> None:
        folded = FoldedMajority()  # the majority sign, in the thresholds' second pass
        self.thresholds = global_thresholds(ctx, self.options.density, None, folded.observe)
        majority = folded.result(self.thresholds)
        # no threshold pass (density 1) or too many entries held back: a pass of its own
        self.majority = majority_sign(ctx, self._trim) if majority is None else majority

    def _trim(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        """Zero what falls under each task's global threshold, in place."""
        for row, threshold in zip(taus, self.thresholds, strict=True):
            row.mul_(row.abs() >= threshold)
        return taus

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        trimmed = self._trim(key, taus)
        sign = elect_sign(trimmed, self.majority)
        return base + self.options.scale * disjoint_merge(trimmed, sign, self.options.merge_func)
