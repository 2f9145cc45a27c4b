"""``task-arithmetic`` (Ilharco et al., ICLR 2023): ``theta_0 + lambda * sum_i w_i tau_i``, the
experts' weights ``w_i`` 1 unless given (mergekit's ``task_arithmetic`` without ``normalize``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorex.merging.base import MergeMethod
from lorex.merging.ops import weighted_sum
from lorex.merging.option_fields import scale_field


@dataclass(frozen=True)
class TaskArithmeticOptions:
    scale: float = scale_field(0.3)  # 0.3 is the value FusionBench and most tables use


class TaskArithmetic(MergeMethod):
    name = "task-arithmetic"
    Options = TaskArithmeticOptions
    takes_weights = True

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        weights = self.task_weights(len(taus), taus.device)
        return base + self.options.scale * weighted_sum(taus, weights)
