"""``dare`` (Yu et al., ICML 2024): drop each task-vector entry with probability ``p`` and rescale
the kept ones by ``1 / (1 - p)``, then add as task arithmetic; ``dare-ties`` elects signs and
merges disjointly as TIES does (the random drop replaces TIES' magnitude trim, as in mergekit).

Per-expert densities give expert i its own ``p_i = 1 - density_i``; per-expert weights multiply
task vector i after the drop (mergekit's generalized task arithmetic): ``dare`` is
``theta_0 + scale * sum_i w_i drop(tau_i)``. mergekit rescales the kept entries to the task
vector's L1 norm rather than by ``1 / (1 - p)``: the two agree at density 1 (no drop), and a
random drop never reproduces mergekit's random numbers anyway.

The drop masks come from an explicit generator seeded by (seed, expert, tensor name), so a merge
is reproducible and does not depend on the order tensors are visited in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from lorex.errors import LorexError
from lorex.merging.base import MergeContext, MergeMethod
from lorex.merging.ops import (
    ZERO_SIGNS,
    check_choice,
    check_merge_func,
    disjoint_merge,
    elect_sign,
    weigh_,
    weighted_sum,
    zero_sign_value,
)
from lorex.merging.option_fields import (
    drop_field,
    merge_func_field,
    scale_field,
    seed_field,
    zero_sign_field,
)


def _check_drop(drop: float) -> None:
    if not 0 <= drop < 1:
        raise LorexError(f"drop: must be in [0, 1), got {drop}")


def drop_and_rescale_(tau: torch.Tensor, drop: float, seed: int, expert: int, key: str) -> None:
    """In place: zero each entry with probability ``drop``, scale the rest by ``1/(1-drop)``."""
    if drop == 0:
        return
    digest = hashlib.sha256(f"{seed}/{expert}/{key}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    keep = (torch.rand(tau.shape, generator=g) >= drop).to(tau.device)  # CPU draws: same masks
    tau.mul_(keep).div_(1 - drop)


@dataclass(frozen=True)
class DareOptions:
    drop: float = drop_field()
    scale: float = scale_field(0.3)
    seed: int = seed_field()

    def __post_init__(self) -> None:
        _check_drop(self.drop)


class Dare(MergeMethod):
    name = "dare"
    Options = DareOptions
    takes_weights = True
    takes_densities = True

    def drop_of(self, task: int) -> float:
        """Expert ``task``'s drop probability: ``1 - density`` where densities are given."""
        if self.densities is None:
            return self.options.drop
        return 1 - self.densities[task]

    def _sparsify(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        for i, row in enumerate(taus):
            drop_and_rescale_(row, self.drop_of(i), self.options.seed, i, key)
        return taus

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        weights = self.task_weights(len(taus), taus.device)
        return base + self.options.scale * weighted_sum(self._sparsify(key, taus), weights)


@dataclass(frozen=True)
class DareTiesOptions:
    drop: float = drop_field()
    scale: float = scale_field(1.0)
    merge_func: str = merge_func_field()
    seed: int = seed_field()
    zero_sign: str = zero_sign_field()

    def __post_init__(self) -> None:
        _check_drop(self.drop)
        check_merge_func(self.merge_func)
        check_choice("zero-sign", self.zero_sign, ZERO_SIGNS)


class DareTies(Dare):
    name = "dare-ties"
    Options = DareTiesOptions

    def prepare(self, ctx: MergeContext) -> None:
        self.majority = zero_sign_value(ctx, self.options.zero_sign, self._weighted)

    def _weighted(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        """Drop, then weigh, in place: what the sign election sees."""
        return weigh_(self._sparsify(key, taus), self.task_weights(len(taus), taus.device))

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        dropped = self._weighted(key, taus)
        sign = elect_sign(dropped, self.majority)
        weights = self.task_weights(len(taus), taus.device)
        merged = disjoint_merge(dropped, sign, self.options.merge_func, weights)
        return base + self.options.scale * merged
