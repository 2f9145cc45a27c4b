"""The maths several merge methods share, in one place (as mergekit keeps its ``sparsify``).

Method files import these rather than each other:

- sparsification: per-task magnitude thresholds over the whole model (TIES, DOGE);
- sign election and the disjoint merge of the entries that agree with it (TIES, DARE-TIES);
- spectra: float32 round-off, numerical rank (Iso-C, Iso-CTS, TSV-M) and the nearest orthogonal
  matrix (TSV-M, Iso-CTS).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorex.errors import LorexError
from lorex.merging.base import MergeContext
from lorex.merging.select import kth_for_density, kth_smallest_abs

#: How a disjoint merge combines the entries that agree with the elected sign.
MERGE_FUNCS = ("mean", "sum")


def check_merge_func(merge_func: str) -> None:
    if merge_func not in MERGE_FUNCS:
        raise LorexError(f"merge-func: must be mean or sum, got {merge_func!r}")


# --- magnitude thresholds ------------------------------------------------------------------------
def global_thresholds(
    ctx: MergeContext,
    density: float,
    observe: Callable[[str, torch.Tensor], None] | None = None,
) -> list[float]:
    """Per task, the magnitude at or above which an entry is kept (0: keep everything): two
    streamed passes over the experts, or none when everything is kept. ``observe(key, taus)``
    sees every tensor's task vectors once, in the first pass (a method's own whole-model
    statistic, so it costs no pass of its own), before the histogram reads them."""
    total = sum(int(torch.Size(ctx.base.spec(k)[1]).numel()) for k in ctx.keys)
    k = kth_for_density(total, density)
    if k == 0:
        if observe is not None:
            for key, taus in ctx.stream():
                observe(key, taus)
        return [0.0] * len(ctx.experts)
    passes = 0

    def chunks():
        nonlocal passes
        passes += 1
        for key, taus in ctx.stream():
            if passes == 1 and observe is not None:
                observe(key, taus)
            yield list(taus)

    return kth_smallest_abs(chunks, [k] * len(ctx.experts))


# --- sign election and disjoint merge ------------------------------------------------------------
def elect_sign(trimmed: torch.Tensor, majority: float) -> torch.Tensor:
    """Each entry's sign: that of the sum over tasks, ``majority`` where the sum is 0."""
    sign = torch.sign(trimmed.sum(0))
    return torch.where(sign == 0, torch.full_like(sign, majority), sign)


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, merge_func: str) -> torch.Tensor:
    """Sum or mean of the entries that agree with ``sign``; overwrites ``trimmed`` (memory)."""
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    total = trimmed.mul_(agree).sum(0)
    if merge_func == "sum":
        return total
    return total / agree.sum(0).clamp(min=1)


def majority_sign(
    ctx: MergeContext, sparsify: Callable[[str, torch.Tensor], torch.Tensor]
) -> float:
    """Sign of the sum, over every merged entry, of the per-entry signs (0 if they cancel)."""
    total = 0.0
    for key, taus in ctx.stream():
        total += float(torch.sign(sparsify(key, taus).sum(0)).sum())
    return float(torch.sign(torch.tensor(total)))


# --- spectra -------------------------------------------------------------------------------------
def roundoff(s: torch.Tensor, shape: tuple[int, ...]) -> float:
    """The float32 round-off level of a matrix with singular values ``s`` (descending): NumPy's
    ``matrix_rank`` tolerance."""
    return float(s[0]) * max(shape) * torch.finfo(torch.float32).eps


def numerical_rank(s: torch.Tensor, shape: tuple[int, ...]) -> int:
    """How many singular values ``s`` (descending) are above float32 round-off."""
    if len(s) == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > roundoff(s, shape)).sum())


def nearest_orthogonal(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P Q^T`` of ``matrix = P D Q^T``."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh
