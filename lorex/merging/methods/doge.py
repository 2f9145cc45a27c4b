"""``doge``: DOGE-TA (Wei et al., ICML 2025), as the official code does it (docs/merging.md).

Per weight matrix W (2-D weights inside the checkpoint's repeated blocks, found from its key
structure by ``lorex.merging.blocks``; everything else keeps theta_0; a checkpoint without such
matrices is refused):

- ``lambda_i = eta / ||tau_i||_F`` (task-aware, training-free coefficients); lorex's default
  ``eta="auto"`` is ``eta_relative`` (0.3) x the mean ``||tau_i||`` over tasks and matrices, so
  equal norms get task arithmetic's 0.3; the paper's ``--eta 0.07`` assumes CLIP-sized task
  vectors;
- a shared subspace: the top ``int(r / N)`` left singular vectors of each ``tau_i`` side by side,
  their own top ``int(r / subspace)`` left singular vectors ``U_c`` (r = min(W.shape));
- one modification ``Delta`` shared by the tasks, from zero, ``steps`` Adam steps (fewer where
  ``max_gflop`` binds, ``lorex.merging.steps``) on the
  data-free loss ``sum_j sum_rows <tau_j, tau_j - sum_i lambda_i (tau_i + Delta)>^2`` (row-wise
  inner products), its gradient projected off the shared subspace, ``g - U_c (U_c^T g)``, before
  each step; the step follows each matrix's task vectors (``lr="auto"``,
  ``lorex.merging.steps``), the paper's absolute 1e-4 is ``--lr 1e-4``;
- a global top-``mask`` magnitude mask per task, computed on ``tau_i`` over all merged matrices;
- ``theta = theta_0 + sum_i lambda_i (tau_i + Delta) * M_i``.

Per-expert weights are refused: ``lambda_i = eta / ||tau_i||`` already sets each task's
coefficient from its own norm, so a weight ``w_i`` on ``tau_i`` would be divided out again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lorex.errors import LorexError
from lorex.merging.base import KEPT, BlockwiseMethod, MergeContext, check_blocks_option
from lorex.merging.ops import global_thresholds
from lorex.merging.option_fields import (
    blocks_field,
    lr_field,
    lr_relative_field,
    max_gflop_field,
    steps_field,
)
from lorex.merging.steps import ADAM_FLOPS_PER_ENTRY, AUTO, check_budget, check_step
from lorex.settings_field import setting

#: ``eta="auto"`` sets eta to this times the mean ||tau_i|| over tasks and matrices, so a task whose
#: matrices all have the mean norm gets task arithmetic's default coefficient (0.3).
ETA_RELATIVE = 0.3

#: ``lr="auto"``'s Adam step as a fraction of the matrix's RMS task-vector entry; chosen on
#: validation data (docs/merging.md, benchmarks/results/merge/trials/relative_steps.py).
LR_RELATIVE = 0.003

#: Default solver budget: none, the paper's steps on any model. On two CPU cores a 110M Llama
#: wants ``--max-gflop 1000`` (about 30 steps; its 5 SVDs per matrix cost as much again).
MAX_GFLOP = 0.0


@dataclass(frozen=True)
class DogeOptions:
    eta: float | str = setting(
        AUTO,
        "lambda_i = eta / ||tau_i||; 'auto' (default): --eta-relative x the mean "
        "||tau_i||; the paper's 0.07 fits CLIP-sized task vectors",
    )
    eta_relative: float = setting(ETA_RELATIVE, "auto's eta relative to the mean ||tau_i||")
    subspace: int = setting(6, "shared directions = rank / this")
    mask: float = setting(0.3, "fraction kept by the global mask")
    steps: int = steps_field(400)
    lr: float | str = lr_field()
    lr_relative: float = lr_relative_field(LR_RELATIVE)
    blocks: str | None = blocks_field()
    max_gflop: float = max_gflop_field(MAX_GFLOP)

    def __post_init__(self) -> None:
        check_budget(self.max_gflop)
        if self.eta != AUTO and not (isinstance(self.eta, int | float) and self.eta > 0):
            raise LorexError(f"eta: must be a positive number or 'auto', got {self.eta!r}")
        if not self.eta_relative > 0:
            raise LorexError(f"eta-relative: must be positive, got {self.eta_relative}")
        if self.subspace < 1:
            raise LorexError(f"subspace: must be at least 1, got {self.subspace}")
        if not 0 < self.mask <= 1:
            raise LorexError(f"mask: must be in (0, 1], got {self.mask}")
        check_step(self.lr, self.lr_relative, self.steps)
        check_blocks_option(self.blocks)


def coefficients(taus: list[torch.Tensor], eta: float) -> torch.Tensor:
    """``eta / ||tau_i||``; a task that left this matrix unchanged (a LoRA expert that did not
    adapt it) gets 0 rather than infinity."""
    norms = torch.stack([t.norm() for t in taus])
    return torch.where(norms > 0, eta / norms.clamp(min=1e-30), torch.zeros_like(norms))


def shared_basis(taus: list[torch.Tensor], subspace: int) -> torch.Tensor:
    """``U_c``: (m, int(r / subspace)) orthonormal columns spanning the tasks' shared directions."""
    m, n = taus[0].shape
    r = min(m, n)
    per_task = r // len(taus)
    stacked = torch.zeros(m, r, dtype=torch.float32, device=taus[0].device)
    for i, tau in enumerate(taus):
        u = torch.linalg.svd(tau, full_matrices=False).U
        stacked[:, i * per_task : (i + 1) * per_task] = u[:, :per_task]
    u_c = torch.linalg.svd(stacked, full_matrices=False).U
    return u_c[:, : r // subspace]


def surrogate_loss(delta: torch.Tensor, taus: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """``sum_j sum_rows <tau_j[r], tau_j[r] - sum_i lambda_i (tau_i[r] + delta[r])>^2``."""
    merged = (lambdas[:, None, None] * taus).sum(0) + lambdas.sum() * delta
    gaps = (taus * (taus - merged)).sum(-1)
    return gaps.pow(2).sum()


def surrogate_grad(
    delta: torch.Tensor, taus: torch.Tensor, lambdas: torch.Tensor, fixed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and its closed-form gradient ``-2 (sum lambda) sum_j s_j[r] tau_j[r]``.

    ``fixed[j, r] = <tau_j[r], tau_j[r] - sum_i lambda_i tau_i[r]>`` does not depend on delta, so a
    step costs two passes over the task vectors instead of autograd's six.
    """
    total = lambdas.sum()
    gaps = fixed - total * torch.einsum("jrn,rn->jr", taus, delta)
    grad = (-2 * total) * torch.einsum("jr,jrn->rn", gaps, taus)
    return gaps.pow(2).sum(), grad


def optimise_delta(
    taus: torch.Tensor,
    lambdas: torch.Tensor,
    basis: torch.Tensor,
    steps: int,
    lr: float,
    on_grad: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Adam on the shared modification, gradients kept orthogonal to ``basis``; returns the
    modification and the loss before each step (and after the last). ``on_grad`` sees each
    projected gradient (diagnostics, tests)."""
    merged0 = (lambdas[:, None, None] * taus).sum(0)
    fixed = (taus * (taus - merged0)).sum(-1)
    delta = torch.zeros_like(taus[0], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    losses = []
    for _ in range(steps):
        with torch.no_grad():
            loss, grad = surrogate_grad(delta, taus, lambdas, fixed)
            grad -= basis @ (basis.T @ grad)
        losses.append(float(loss))
        if on_grad is not None:
            on_grad(grad.clone())
        delta.grad = grad
        opt.step()
    with torch.no_grad():
        losses.append(float(surrogate_grad(delta, taus, lambdas, fixed)[0]))
    return delta.detach(), losses


class Doge(BlockwiseMethod):
    name = "doge"
    Options = DogeOptions
    other_rule = KEPT

    def prepare(self, ctx: MergeContext) -> None:
        self.losses: dict[str, tuple[float, float]] = {}
        norms: list[float] = []

        def task_norms(key: str, taus: torch.Tensor) -> None:
            norms.extend(float(n) for n in taus.flatten(1).norm(dim=1))

        # eta="auto" needs every ||tau_i||: taken in the thresholds' first pass, not one more.
        observe = task_norms if self.options.eta == AUTO else None
        self.thresholds = global_thresholds(ctx, self.options.mask, observe)
        self.eta = self.options.eta
        if self.eta == AUTO:
            self.eta = self.options.eta_relative * sum(norms) / len(norms)

    def step_flops(self, shape: tuple[int, int], n_tasks: int) -> float:
        m, n = shape  # two passes over the task vectors, the projection, then Adam
        shared = min(m, n) // self.options.subspace
        return (4.0 * n_tasks + 4.0 * shared + ADAM_FLOPS_PER_ENTRY) * m * n

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        o = self.options
        lambdas = coefficients(list(taus), self.eta)
        basis = shared_basis(list(taus), o.subspace)
        unit, step = self.solver_units(key, taus)
        delta, losses = optimise_delta(taus / unit, lambdas, basis, self.steps_used, step)
        self.losses[key] = (losses[0] * unit**4, losses[-1] * unit**4)  # the loss is quartic
        masks = torch.stack([t.abs() >= th for t, th in zip(taus, self.thresholds, strict=True)])
        return base + (lambdas[:, None, None] * (taus + unit * delta) * masks).sum(0)

    def report(self) -> dict[str, Any]:
        return {
            **super().report(),
            "doge_eta": self.eta,
            "doge_loss": {k: {"before": a, "after": b} for k, (a, b) in self.losses.items()},
        }
