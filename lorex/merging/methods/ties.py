"""``ties`` (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

1. Trim: keep each task vector's top ``density`` fraction by magnitude (per expert where
   per-expert densities are given). ``trim="global"`` (default): over the *whole* task vector,
   one threshold per task, as FusionBench's ``topk_values_mask``; ``"per-tensor"``: exactly the
   ``int(density * numel)`` largest entries of each tensor, as mergekit's ``ties``.
2. Weigh: task vector i times the expert's weight ``w_i`` (1 unless given), after the trim.
3. Elect: each entry's sign is the sign of the sum of the weighted, trimmed values; where that
   sum is 0, ``zero_sign="majority"`` (default) uses the sign of the whole model's majority
   (FusionBench's ``resolve_sign``, one more pass over the experts) and ``"positive"`` uses +1
   (mergekit).
4. Disjoint merge: the mean (divided by the agreeing entries' summed weights, mergekit's
   ``normalize``) or the sum of the entries that agree with the elected sign.

``theta = theta_0 + scale * merged``. With ``trim="per-tensor"`` and ``zero_sign="positive"``
each expert is read once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorex.errors import LorexError
from lorex.merging.base import MergeContext, MergeMethod
from lorex.merging.ops import (
    TRIMS,
    ZERO_SIGNS,
    FoldedMajority,
    check_choice,
    check_merge_func,
    disjoint_merge,
    elect_sign,
    global_thresholds,
    keep_top_,
    weigh_,
    zero_sign_value,
)
from lorex.merging.option_fields import merge_func_field, scale_field, zero_sign_field
from lorex.settings_field import setting


@dataclass(frozen=True)
class TiesOptions:
    density: float = setting(0.2, "fraction kept per task vector")
    scale: float = scale_field(1.0)
    merge_func: str = merge_func_field()
    trim: str = setting(
        "global",
        "where the magnitude trim ranks entries: the whole task vector (global) or each tensor "
        "on its own (per-tensor, mergekit's)",
        choices=TRIMS,
    )
    zero_sign: str = zero_sign_field()

    def __post_init__(self) -> None:
        if not 0 < self.density <= 1:
            raise LorexError(f"density: must be in (0, 1], got {self.density}")
        check_merge_func(self.merge_func)
        check_choice("trim", self.trim, TRIMS)
        check_choice("zero-sign", self.zero_sign, ZERO_SIGNS)


class Ties(MergeMethod):
    name = "ties"
    Options = TiesOptions
    takes_weights = True
    takes_densities = True

    def prepare(self, ctx: MergeContext) -> None:
        densities = [self.density_of(i, self.options.density) for i in range(len(ctx.experts))]
        majority = None
        if self.options.trim == "global":
            weights = self.task_weights(len(ctx.experts), ctx.device)
            largest = max(int(torch.Size(ctx.base.spec(k)[1]).numel()) for k in ctx.keys)
            limit = 4 * largest  # the bytes of one expert's largest float32 tensor
            folded = (
                FoldedMajority(weights, limit) if self.options.zero_sign == "majority" else None
            )
            observe = folded.observe if folded is not None else None
            self.thresholds = global_thresholds(ctx, densities, None, observe)
            majority = folded.result(self.thresholds) if folded is not None else None
        # positive: +1, no pass; majority not folded (per-tensor trim, nothing trimmed, or too
        # many entries held back): a pass of its own
        self.majority = (
            majority
            if majority is not None
            else zero_sign_value(ctx, self.options.zero_sign, self._trim)
        )

    def _trim(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        """Trim each task vector, then weigh it, in place."""
        if self.options.trim == "global":
            for row, threshold in zip(taus, self.thresholds, strict=True):
                row.mul_(row.abs() >= threshold)
        else:
            for i, row in enumerate(taus):
                keep_top_(row, self.density_of(i, self.options.density))
        return weigh_(taus, self.task_weights(len(taus), taus.device))

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        trimmed = self._trim(key, taus)
        sign = elect_sign(trimmed, self.majority)
        weights = self.task_weights(len(taus), taus.device)
        merged = disjoint_merge(trimmed, sign, self.options.merge_func, weights)
        return base + self.options.scale * merged
