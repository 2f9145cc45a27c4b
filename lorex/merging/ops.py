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
from lorex.merging.select import high_bits, kth_for_density, kth_smallest_abs

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
    observe_second: Callable[[list[int], torch.Tensor], None] | None = None,
) -> list[float]:
    """Per task, the magnitude at or above which an entry is kept (0: keep everything): two
    streamed passes over the experts, or none when everything is kept. ``observe(key, taus)``
    sees every tensor's task vectors once, in the first pass (a method's own whole-model
    statistic, so it costs no pass of its own); ``observe_second(buckets, taus)`` sees them in
    the second, with each task's threshold bin (``lorex.merging.select.high_bits``)."""
    total = sum(int(torch.Size(ctx.base.spec(k)[1]).numel()) for k in ctx.keys)
    k = kth_for_density(total, density)
    if k == 0:
        if observe is not None:
            for key, taus in ctx.stream():
                observe(key, taus)
        return [0.0] * len(ctx.experts)
    passes = 0
    buckets: list[int] = []

    def chunks():
        nonlocal passes
        passes += 1
        for key, taus in ctx.stream():
            if passes == 1 and observe is not None:
                observe(key, taus)
            if passes == 2 and observe_second is not None:
                observe_second(buckets, taus)
            yield list(taus)

    return kth_smallest_abs(chunks, [k] * len(ctx.experts), buckets.extend)


#: Task-vector bytes the folded majority sign may hold back before it takes a pass of its own.
DEFERRED_BYTES = 64 << 20


class FoldedMajority:
    """TIES' whole-model majority sign, taken in the thresholds' second pass instead of a pass of
    its own. There, an entry whose bin is above (below) its task's threshold bin is kept
    (trimmed) for sure; only entries that share a task's threshold bin wait, their values held,
    until the thresholds are known. If those outgrow ``DEFERRED_BYTES`` (e.g. many equal
    magnitudes) it gives up, and :meth:`result` is None: take :func:`majority_sign`'s pass."""

    def __init__(self) -> None:
        self.total = 0
        self.deferred: list[torch.Tensor] = []
        self.held = 0
        self.gave_up = False
        self.seen = False

    def observe(self, buckets: list[int], taus: torch.Tensor) -> None:
        self.seen = True
        if self.gave_up:
            return
        bins = high_bits(taus)
        bucket = torch.tensor(buckets, dtype=bins.dtype, device=bins.device)
        bucket = bucket.view(-1, *[1] * (taus.ndim - 1))
        waiting = (bins == bucket).any(0)
        decided = torch.sign((taus * (bins > bucket)).sum(0))[~waiting]
        self.total += int(decided.sum(dtype=torch.int64))
        held = taus[:, waiting]
        self.held += held.numel() * held.element_size()
        if self.held > DEFERRED_BYTES:
            self.gave_up, self.deferred = True, []
        else:
            self.deferred.append(held)

    def result(self, thresholds: list[float]) -> float | None:
        """The majority sign (as :func:`majority_sign`), or None when it gave up or saw no second
        pass (nothing trimmed: the thresholds took none)."""
        if self.gave_up or not self.seen:
            return None
        limit = torch.tensor(thresholds).view(-1, 1)
        total = self.total
        for held in self.deferred:
            kept = held * (held.abs() >= limit.to(held.device))
            total += int(torch.sign(kept.sum(0)).sum(dtype=torch.int64))
        self.deferred = []
        self.signs = total  # sum over entries of the elected signs (+1, -1, 0)
        return float((total > 0) - (total < 0))


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
    total = 0
    for key, taus in ctx.stream():
        total += int(torch.sign(sparsify(key, taus).sum(0)).sum(dtype=torch.int64))
    return float((total > 0) - (total < 0))


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
