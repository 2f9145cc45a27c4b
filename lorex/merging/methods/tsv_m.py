"""``tsv-m`` (Gargiulo et al., CVPR 2025, "Task Singular Vectors"): low-rank, decorrelated merging.

Per 2-D tensor with ``r = min(shape)`` and N tasks:

1. each ``tau_i = U_i S_i V_i^T`` keeps its top ``k = r // N`` singular triplets (lorex: at most
   its numerical rank, so a LoRA expert's round-off directions do not enter step 3; the same as
   the official code for full-rank task vectors);
2. they are placed side by side: ``U_hat = [U_1k ... U_Nk]`` (m x r, unused columns zero), the
   singular values on one diagonal ``S_hat``, ``V_hat`` likewise;
3. ``U_hat`` and ``V_hat`` are replaced by their nearest orthogonal matrices (the polar factor
   ``P Q^T`` of ``P D Q^T = svd``), so the tasks' directions stop interfering;
4. ``theta = theta_0 + scale * U_perp S_hat V_perp^T``.

Every other floating tensor gets ``scale * mean_i tau_i``, as the official code does; so does a
2-D tensor with fewer rows or columns than tasks (``k`` would be 0: the official code zeroes it).
Per-expert weights are refused: the method gives every task the same ``k`` directions and
orthogonalises them jointly, and the paper defines no weighting of that split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorex.merging.base import MatrixMethod
from lorex.merging.ops import nearest_orthogonal, numerical_rank
from lorex.merging.option_fields import scale_field


@dataclass(frozen=True)
class TsvMOptions:
    scale: float = scale_field(1.0)  # alpha; the paper's and FusionBench's default


def task_singular_vectors(taus: torch.Tensor) -> torch.Tensor:
    """The merged update of one 2-D tensor from its task vectors ``(N, m, n)``."""
    n_tasks, m, n = taus.shape
    r = min(m, n)
    k = r // n_tasks
    u_hat = taus.new_zeros(m, r)
    s_hat = taus.new_zeros(r)
    v_hat = taus.new_zeros(r, n)
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        kept = min(k, numerical_rank(s, (m, n)))  # round-off directions would skew step 3
        u_hat[:, i * k : i * k + kept] = u[:, :kept]
        s_hat[i * k : i * k + kept] = s[:kept]
        v_hat[i * k : i * k + kept] = vh[:kept]
    return (nearest_orthogonal(u_hat) * s_hat) @ nearest_orthogonal(v_hat)


class TsvM(MatrixMethod):
    name = "tsv-m"
    Options = TsvMOptions

    def is_own_matrix(self, shape: tuple[int, ...], n_tasks: int) -> bool:
        # a matrix thinner than the task count leaves no singular vector per task: the mean
        return len(shape) == 2 and min(shape) >= n_tasks

    def looks_for(self) -> str:
        return "2-D tensors with at least as many rows and columns as tasks"

    def merge_matrix(self, taus: torch.Tensor) -> torch.Tensor:
        return task_singular_vectors(taus)
