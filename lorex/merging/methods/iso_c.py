"""``iso-c`` (Marczak et al., ICML 2025, "No Task Left Behind"): an isotropic task-vector sum.

Per 2-D tensor: ``sum_i tau_i = U S V^T``; every singular value is replaced by their mean, so no
direction of one task drowns the others: ``theta = theta_0 + scale * U mean(S) V^T``. Every other
floating tensor (biases, norms, embeddings that are not 2-D) gets ``scale * mean_i tau_i``. As the
official code, which treats every 2-D tensor this way; FusionBench's default ``scale`` is 1.0.
Lorex's one change: the mean is over the sum's numerical rank only, the same thing for full-rank
sums, but a sum of low-rank (LoRA) updates is not filled up with arbitrary null-space directions.
Per-expert weights are refused: flattening the spectrum to its mean undoes what a weight on one
task would do to its directions' singular values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorex.merging.base import MatrixMethod
from lorex.merging.ops import numerical_rank
from lorex.merging.option_fields import scale_field


@dataclass(frozen=True)
class IsoCOptions:
    scale: float = scale_field(1.0)  # alpha; FusionBench's default (its CLIP docs: 1.5)


def isotropic(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` with its spectrum flattened to the mean singular value, over its numerical rank:
    a low-rank sum (LoRA experts) keeps its rank rather than gaining round-off directions."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = numerical_rank(s, tuple(matrix.shape))
    return (u[:, :k] * s[:k].mean()) @ vh[:k] if k else torch.zeros_like(matrix)


class IsoC(MatrixMethod):
    name = "iso-c"
    Options = IsoCOptions

    def merge_matrix(self, taus: torch.Tensor) -> torch.Tensor:
        return isotropic(taus.sum(0))
