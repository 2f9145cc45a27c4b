"""``average``: the plain mean of the experts' weights (a model soup)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorex.merging.base import MergeMethod


@dataclass(frozen=True)
class AverageOptions:
    pass


class Average(MergeMethod):
    name = "average"
    Options = AverageOptions

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        # mean(theta_i) = theta_0 + mean(tau_i): the same numbers, from the task vectors we have.
        return base + taus.mean(0)
