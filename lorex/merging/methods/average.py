"""``average``: the mean of the experts' weights (a model soup), weighted where weights are given:
``sum_i w_i theta_i / sum_i w_i`` (mergekit's ``linear``). ``normalize=False`` leaves the
weighted sum ``sum_i w_i theta_i`` undivided, as mergekit's ``linear`` with ``normalize: false``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorex.errors import LorexError
from lorex.merging.base import MergeMethod
from lorex.merging.ops import weighted_sum
from lorex.settings_field import setting


@dataclass(frozen=True)
class AverageOptions:
    normalize: bool = setting(
        True, "divide the weighted sum of the experts by the sum of their weights"
    )


class Average(MergeMethod):
    name = "average"
    Options = AverageOptions
    takes_weights = True

    def check_weights(self, weights: list[float] | None, densities: list[float] | None) -> None:
        super().check_weights(weights, densities)
        if self.options.normalize and weights is not None and sum(weights) == 0:
            raise LorexError("weights: sum to 0, so their mean is undefined")

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        # sum w_i theta_i = (sum w_i) theta_0 + sum w_i tau_i: the same numbers, from the task
        # vectors we have.
        weights = self.task_weights(len(taus), taus.device)
        total = weights.sum()
        merged = weighted_sum(taus, weights)
        if self.options.normalize:
            return base + merged / total
        return base * total + merged
