"""``task-arithmetic`` (Ilharco et al., ICLR 2023): ``theta_0 + lambda * sum_i tau_i``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorex.merging.base import MergeMethod
from lorex.merging.option_fields import scale_field


@dataclass(frozen=True)
class TaskArithmeticOptions:
    scale: float = scale_field(0.3)  # 0.3 is the value FusionBench and most tables use


class TaskArithmetic(MergeMethod):
    name = "task-arithmetic"
    Options = TaskArithmeticOptions

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        return base + self.options.scale * taus.sum(0)
