"""``wudi`` (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It").

A linear layer's inputs on task i lie close to the row space of ``tau_i``, so the task vector
itself stands in for task i's data: the merged update ``tau_m`` of a weight matrix minimises the
interference it causes on those inputs,

    L(tau_m) = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2,

with no data. Per 2-D weight inside a transformer block (the official code's attention and MLP
matrices); every other floating tensor gets the mean task vector; ``theta = theta_0 + scale *
merged``.

The solver is the paper's: ``tau_m`` starts at ``sum_i tau_i`` and takes ``steps`` Adam steps at
``lr`` (the official 300 at 1e-5). That early stop is part of the method, not a shortcut: the loss
only sees each task's row space, and its exact minimiser (least-norm, ``R M^+`` from the normal
equations) fits every task there at any cost elsewhere. On the full benchmark's frozen-head
experts it had 70x the sum's norm on an MLP matrix (413 against 5.9) and merged to chance (10%
average accuracy; docs/merging.md), so lorex offers no exact solver. The distance Adam moves from
the sum is ``lr * steps`` in absolute units, so ``lr`` should follow the task vectors' scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorex.errors import LorexError
from lorex.merging.base import MergeMethod, register_merge_method
from lorex.merging.methods.doge import is_block_matrix


@dataclass(frozen=True)
class WudiOptions:
    scale: float = 1.0  # the official code's scaling of the merged vector
    steps: int = 300  # the official code's Adam iterations
    lr: float = 1e-5  # the official code's Adam step

    def __post_init__(self) -> None:
        if self.steps < 0 or not self.lr > 0:
            raise LorexError("steps must be >= 0 and lr > 0")


def interference_loss(merged: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """``sum_i ||(merged - tau_i) tau_i^T||^2 / ||tau_i||^2``; an all-zero ``tau_i`` (a LoRA
    expert that left this matrix alone) adds nothing."""
    sq_norms = taus.flatten(1).square().sum(1)
    weights = torch.where(sq_norms > 0, 1.0 / sq_norms.clamp(min=1e-30), 0.0)
    residual = (merged.unsqueeze(0) - taus) @ taus.transpose(1, 2)
    return (weights * residual.square().flatten(1).sum(1)).sum()


def wudi_adam(taus: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """Adam on :func:`interference_loss` from the task vectors' sum."""
    merged = taus.sum(0).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([merged], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        interference_loss(merged, taus).backward()
        optimiser.step()
    return merged.detach()


@register_merge_method
class Wudi(MergeMethod):
    name = "wudi"
    Options = WudiOptions

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        if is_block_matrix(key, tuple(base.shape)):
            with torch.enable_grad():
                merged = wudi_adam(taus, self.options.steps, self.options.lr)
        else:
            merged = taus.mean(0)
        return base + self.options.scale * merged
