"""``wudi`` (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It").

A linear layer's inputs on task i lie close to the row space of ``tau_i``, so the task vector
itself stands in for task i's data: the merged update ``tau_m`` of a weight matrix minimises the
interference it causes on those inputs,

    L(tau_m) = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2,

with no data. Per 2-D weight inside the checkpoint's repeated blocks (``lorex.merging.blocks``: the
official code's attention and MLP matrices); every other floating tensor gets the mean task
vector; ``theta = theta_0 + scale * merged``. A checkpoint without such matrices is refused.
Per-expert weights are refused: each task's loss term is normalised by ``||tau_i||^2``, so a
weight on ``tau_i`` changes only the start of the solver, not what it solves for.

The solver is the paper's: ``tau_m`` starts at ``sum_i tau_i`` and takes ``steps`` Adam steps
(the official 300; fewer where ``max_gflop`` binds, ``lorex.merging.steps``). That early stop is
part of the method, not a shortcut: the loss only sees each task's row space, and its exact
minimiser (least-norm, ``R M^+`` from the normal equations) fits every task there at any cost
elsewhere. On the full benchmark's frozen-head experts it had 70x the sum's norm on an MLP
matrix (413 against 5.9) and merged to chance (10% average accuracy; docs/merging.md), so lorex
offers no exact solver. The distance Adam moves from the sum is about ``lr * steps`` per entry,
so the step follows each matrix's task vectors (``lr="auto"``, ``lorex.merging.steps``); the
official absolute 1e-5 is ``--lr 1e-5``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorex.merging.base import MEAN, BlockwiseMethod, check_blocks_option
from lorex.merging.option_fields import (
    blocks_field,
    lr_field,
    lr_relative_field,
    max_gflop_field,
    scale_field,
    steps_field,
)
from lorex.merging.steps import ADAM_FLOPS_PER_ENTRY, check_budget, check_step

#: ``lr="auto"``'s Adam step as a fraction of the matrix's RMS task-vector entry; chosen on
#: validation data (docs/merging.md, benchmarks/results/merge/trials/relative_steps.py).
LR_RELATIVE = 0.01

#: Default solver budget: none, the official steps on any model. On two CPU cores a 110M Llama
#: wants ``--max-gflop 2000`` (about 15 steps: a 768-wide block costs ~15 GFLOP a step).
MAX_GFLOP = 0.0


@dataclass(frozen=True)
class WudiOptions:
    scale: float = scale_field(1.0)  # the official code's scaling of the merged vector
    steps: int = steps_field(300)  # the official code's Adam iterations
    lr: float | str = lr_field()
    lr_relative: float = lr_relative_field(LR_RELATIVE)
    blocks: str | None = blocks_field()
    max_gflop: float = max_gflop_field(MAX_GFLOP)

    def __post_init__(self) -> None:
        check_step(self.lr, self.lr_relative, self.steps)
        check_budget(self.max_gflop)
        check_blocks_option(self.blocks)


def inverse_square_norms(taus: torch.Tensor) -> torch.Tensor:
    """``1 / ||tau_i||^2`` per task; 0 for an all-zero ``tau_i`` (a LoRA expert that left this
    matrix alone adds nothing to the loss)."""
    sq_norms = taus.flatten(1).square().sum(1)
    return torch.where(sq_norms > 0, 1.0 / sq_norms.clamp(min=1e-30), 0.0)


def interference_loss(
    merged: torch.Tensor, taus: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_i ||(merged - tau_i) tau_i^T||^2 / ||tau_i||^2``; ``weights`` are the task vectors'
    :func:`inverse_square_norms`, computed here when not given."""
    weights = inverse_square_norms(taus) if weights is None else weights
    residual = (merged.unsqueeze(0) - taus) @ taus.transpose(1, 2)
    return (weights * residual.square().flatten(1).sum(1)).sum()


def gradient_terms(taus: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = sum_i w_i tau_i^T tau_i`` and ``B = sum_i w_i tau_i tau_i^T tau_i``.

    The loss's gradient is ``2 (merged A - B)``, so with these taken once each Adam step costs one
    ``(out, in) x (in, in)`` product instead of a forward and backward pass over every task."""
    gram = taus.transpose(1, 2) @ taus  # (K, in, in)
    w = weights[:, None, None]
    return (w * gram).sum(0), (w * (taus @ gram)).sum(0)


def wudi_adam(taus: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """Adam on :func:`interference_loss` from the task vectors' sum, with the loss's gradient in
    closed form (:func:`gradient_terms`; the norms taken once)."""
    a, b = gradient_terms(taus, inverse_square_norms(taus))
    merged = taus.sum(0).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([merged], lr=lr)
    for _ in range(steps):
        with torch.no_grad():
            merged.grad = 2.0 * (merged @ a - b)
        optimiser.step()
    return merged.detach()


class Wudi(BlockwiseMethod):
    name = "wudi"
    Options = WudiOptions
    other_rule = MEAN

    def step_flops(self, shape: tuple[int, int], n_tasks: int) -> float:
        out, inp = shape  # the gradient's (out, in) x (in, in) product, then Adam
        return 2.0 * out * inp * inp + ADAM_FLOPS_PER_ENTRY * out * inp

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        o = self.options
        if self.rule(key, base.dtype, tuple(base.shape), len(taus)) == self.name:
            unit, step = self.solver_units(key, taus)
            merged = wudi_adam(taus / unit, self.steps_used, step) * unit
        else:
            merged = taus.mean(0)
        return base + o.scale * merged
