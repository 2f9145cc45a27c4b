"""``iso-cts`` (Marczak et al., ICML 2025, "No Task Left Behind"): Iso-C in a common and
task-specific subspace.

Iso-C flattens the spectrum of ``sum_i tau_i``, whose top directions belong to the tasks that
agree; a task whose update points elsewhere is left with the sum's weak tail. Iso-CTS keeps room
for every task. Per 2-D tensor with rank r (below) and N tasks:

1. the common subspace: the top ``k_c`` singular triplets of ``sum_i tau_i``, with
   ``k_c = r - N * round((r - int(common * r)) / N)`` (the official allocation: the rest divides
   evenly among the tasks);
2. each task's own directions: the top ``(r - k_c) / N`` singular triplets of ``tau_i`` with the
   common left subspace projected out, ``tau_i - U_c U_c^T tau_i``;
3. the left vectors side by side, ``[U_c, U_1, ..., U_N]``, and the right ones likewise, replaced
   by their nearest orthogonal matrices (as in TSV-M); every singular value set to the mean of
   the ones kept;
4. ``theta = theta_0 + scale * U s_mean V^T``.

Every other floating tensor gets ``scale * mean_i tau_i``. Lorex's one change, as for Iso-C: r is
the sum's numerical rank rather than ``min(shape)`` (the same for full-rank sums), and a task's
residual contributes only directions above the sum's round-off level, so a sum of LoRA updates
is not filled up with round-off directions.
Per-expert weights are refused: every kept singular value is set to their mean, so a weight on
one task would change only which directions rank first, not their share of the update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorex.errors import LorexError
from lorex.merging.base import MatrixMethod
from lorex.merging.ops import nearest_orthogonal, numerical_rank, roundoff
from lorex.merging.option_fields import scale_field
from lorex.settings_field import setting


@dataclass(frozen=True)
class IsoCtsOptions:
    scale: float = scale_field(1.0)  # alpha, as for iso-c
    common: float = setting(0.8, "fraction of the rank kept as common subspace")

    def __post_init__(self) -> None:
        if not 0 <= self.common <= 1:
            raise LorexError(f"common: must be in [0, 1], got {self.common}")


def subspace_split(rank: int, n_tasks: int, common: float) -> tuple[int, int]:
    """``(k_c, k_task)`` with ``k_c + n_tasks * k_task == rank``: the official allocation."""
    per_task = min(rank // n_tasks, round((rank - int(rank * common)) / n_tasks))
    return rank - n_tasks * per_task, per_task


def common_and_task_specific(taus: torch.Tensor, common: float) -> torch.Tensor:
    """The merged update of one 2-D tensor from its task vectors ``(N, m, n)``."""
    n_tasks, m, n = taus.shape
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    rank = numerical_rank(s, (m, n))
    if rank == 0:
        return taus.new_zeros(m, n)
    k_c, k_task = subspace_split(rank, n_tasks, common)
    us, ss, vs = [u[:, :k_c]], [s[:k_c]], [vh[:k_c]]
    u_c = u[:, :k_c]
    tol = roundoff(s, (m, n))  # the sum's round-off level, as in its rank
    for tau in taus:
        residual = tau - u_c @ (u_c.T @ tau)
        ut, st, vth = torch.linalg.svd(residual, full_matrices=False)
        kept = min(k_task, int((st > tol).sum()))
        us.append(ut[:, :kept])
        ss.append(st[:kept])
        vs.append(vth[:kept])
    u_all, v_all = torch.cat(us, 1), torch.cat(vs, 0)
    s_mean = torch.cat(ss).mean()
    return (nearest_orthogonal(u_all) * s_mean) @ nearest_orthogonal(v_all)


class IsoCts(MatrixMethod):
    name = "iso-cts"
    Options = IsoCtsOptions

    def merge_matrix(self, taus: torch.Tensor) -> torch.Tensor:
        return common_and_task_specific(taus, self.options.common)
