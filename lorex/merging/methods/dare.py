"""``dare`` (Yu et al., ICML 2024): drop each task-vector entry with probability ``p`` and rescale
the kept ones by ``1 / (1 - p)``, then add as task arithmetic; ``dare-ties`` elects signs and
merges disjointly as TIES does (the random drop replaces TIES' magnitude trim, as in mergekit).

The drop masks come from an explicit generator seeded by (seed, expert, tensor name), so a merge
is reproducible and does not depend on the order tensors are visited in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from lorex.errors import LorexError
from lorex.merging.base import MergeContext, MergeMethod
from lorex.merging.ops import check_merge_func, disjoint_merge, elect_sign, majority_sign
from lorex.merging.option_fields import drop_field, merge_func_field, scale_field, seed_field


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

    def _sparsify(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        o = self.options
        for i, row in enumerate(taus):
            drop_and_rescale_(row, o.drop, o.seed, i, key)
        return taus

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        return base + self.options.scale * self._sparsify(key, taus).sum(0)


@dataclass(frozen=True)
class DareTiesOptions:
    drop: float = drop_field()
    scale: float = scale_field(1.0)
    merge_func: str = merge_func_field()
    seed: int = seed_field()

    def __post_init__(self) -> None:
        _check_drop(self.drop)
        check_merge_func(self.merge_func)


class DareTies(Dare):
    name = "dare-ties"
    Options = DareTiesOptions

    def prepare(self, ctx: MergeContext) -> None:
        self.majority = majority_sign(ctx, self._sparsify)

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        dropped = self._sparsify(key, taus)
        sign = elect_sign(dropped, self.majority)
        return base + self.options.scale * disjoint_merge(dropped, sign, self.options.merge_func)
