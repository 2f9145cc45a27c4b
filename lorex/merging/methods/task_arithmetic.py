"""``task-arithmetic`` (Ilharco et al., ICLR 2023): ``theta_0 + lambda * sum_i tau_i``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorex.merging.base import MergeMethod, register_merge_method


@dataclass(frozen=True)
class TaskArithmeticOptions:
    scale: float = 0.3  # lambda; 0.3 is the value FusionBench and most tables use


@register_merge_method
class TaskArithmetic(MergeMethod):
    name = "task-arithmetic"
    Options = TaskArithmeticOptions

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        return base + self.options.scale * taus.sum(0)
