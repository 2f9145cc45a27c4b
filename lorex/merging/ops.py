"""The maths several merge methods share, in one place (as mergekit keeps its ``sparsify``).

Method files import these rather than each other:

- sparsification: per-task magnitude thresholds over the whole model (TIES, DOGE), or the top
  fraction of each tensor (TIES ``trim="per-tensor"``, mergekit's ``magnitude``);
- per-expert weights (mergekit's generalized task arithmetic: applied after sparsification);
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
#: The sign an entry gets where the elected sum is 0: the whole model's majority (lorex,
#: FusionBench) or +1 (mergekit's ``(sum >= 0) * 2 - 1``, which needs no whole-model pass).
ZERO_SIGNS = ("majority", "positive")
#: Where TIES' magnitude trim ranks entries: over the whole task vector (lorex, FusionBench) or
#: within each tensor (mergekit).
TRIMS = ("global", "per-tensor")


def check_merge_func(merge_func: str) -> None:
    if merge_func not in MERGE_FUNCS:
        raise LorexError(f"merge-func: must be mean or sum, got {merge_func!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise LorexError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")


# --- per-expert weights --------------------------------------------------------------------------
def weigh_(taus: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """In place: row i times ``weights[i]`` (a no-op for weights of 1)."""
    if bool((weights != 1).any()):
        taus.mul_(weights.to(taus.device).reshape(-1, *[1] * (taus.dim() - 1)))
    return taus


def weighted_sum(taus: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i tau_i``; overwrites ``taus``."""
    return weigh_(taus, weights).sum(0)


# --- per-tensor magnitude trim -------------------------------------------------------------------
def keep_top_(tau: torch.Tensor, density: float) -> torch.Tensor:
    """In place: keep the ``max(1, int(density * numel))`` largest ``|x|`` of one tensor, zero the
    rest (mergekit's ``magnitude``; ``density >= 1`` keeps everything)."""
    if density >= 1 or tau.numel() == 0:
        return tau
    k = max(1, int(density * tau.numel()))
    flat = tau.view(-1)
    # The k-th largest magnitude, then a mask, rather than topk's k values and k int64 indices:
    # at LLM size (an embedding of 25M entries) this is the merge's peak memory.
    magnitude = flat.abs()
    threshold = magnitude.kthvalue(flat.numel() - k + 1).values
    keep = magnitude >= threshold
    del magnitude
    surplus = int(keep.sum()) - k
    if surplus > 0:  # ties at the threshold: keep the first of them (mergekit's order is arbitrary)
        tied = (flat.abs() == threshold).nonzero().flatten()
        keep[tied[len(tied) - surplus :]] = False
    flat.mul_(keep)
    return tau


# --- magnitude thresholds ------------------------------------------------------------------------
def global_thresholds(
    ctx: MergeContext,
    density: float | list[float],
    observe: Callable[[str, torch.Tensor], None] | None = None,
    observe_second: Callable[[list[int], torch.Tensor], None] | None = None,
) -> list[float]:
    """Per task, the magnitude at or above which an entry is kept (0: keep everything): two
    streamed passes over the experts, or none when everything is kept. ``density`` is one for
    every task or one per task. ``observe(key, taus)`` sees every tensor's task vectors once, in
    the first pass (a method's own whole-model statistic, so it costs no pass of its own);
    ``observe_second(buckets, taus)`` sees them in the second, with each task's threshold bin
    (``lorex.merging.select.high_bits``; -1 for a task that keeps everything)."""
    total = sum(int(torch.Size(ctx.base.spec(k)[1]).numel()) for k in ctx.keys)
    densities = density if isinstance(density, list) else [density] * len(ctx.experts)
    ks = [kth_for_density(total, d) for d in densities]
    if not any(ks):
        if observe is not None:
            for key, taus in ctx.stream():
                observe(key, taus)
        return [0.0] * len(ctx.experts)
    wanted = [i for i, k in enumerate(ks) if k]
    passes = 0
    buckets: list[int] = []

    def chunks():
        nonlocal passes
        passes += 1
        every = [-1] * len(ctx.experts)  # a task that keeps everything: every bin is above -1
        for j, i in enumerate(wanted[: len(buckets)]):
            every[i] = buckets[j]
        for key, taus in ctx.stream():
            if passes == 1 and observe is not None:
                observe(key, taus)
            if passes == 2 and observe_second is not None:
                observe_second(every, taus)
            yield [taus[i] for i in wanted]

    found = kth_smallest_abs(chunks, [ks[i] for i in wanted], buckets.extend)
    thresholds = dict(zip(wanted, found, strict=True))
    return [thresholds.get(i, 0.0) for i in range(len(ctx.experts))]


#: Task-vector bytes the folded majority sign may hold back before it takes a pass of its own.
DEFERRED_BYTES = 64 << 20


class FoldedMajority:
    """TIES' whole-model majority sign, taken in the thresholds' second pass instead of a pass of
    its own. There, an entry whose bin is above (below) its task's threshold bin is kept
    (trimmed) for sure; only entries that share a task's threshold bin wait, their values held,
    until the thresholds are known. If those outgrow ``DEFERRED_BYTES`` (e.g. many equal
    magnitudes) it gives up, and :meth:`result` is None: take :func:`majority_sign`'s pass."""

    def __init__(self, weights: torch.Tensor | None = None, limit: int | None = None) -> None:
        self.weights = weights  # the experts' weights: signs are elected on weighted vectors
        # Never more than one expert's largest tensor either, so the fold does not make memory
        # grow with the number of experts on small models.
        self.limit = DEFERRED_BYTES if limit is None else min(limit, DEFERRED_BYTES)
        self.total = 0
        self.deferred: list[torch.Tensor] = []
        self.held = 0
        self.gave_up = False
        self.seen = False

    def observe(self, buckets: list[int], taus: torch.Tensor) -> None:
        self.seen = True
        if self.gave_up:
            return
        # Row by row, so the transients are one task's (M,) tensors, not (N, M) ones: the fold
        # must not make a merge's memory grow with the number of experts.
        kept = torch.empty_like(taus)  # the weighted, kept values of the decided entries
        waiting = torch.zeros(taus.shape[1:], dtype=torch.bool, device=taus.device)
        for i, row in enumerate(taus):
            bins = high_bits(row)
            waiting |= bins == buckets[i]
            torch.mul(row, bins > buckets[i], out=kept[i])
            if self.weights is not None:
                kept[i].mul_(float(self.weights[i]))
        decided = torch.sign(kept.sum(0))[~waiting]
        del kept
        self.total += int(decided.sum(dtype=torch.int64))
        held = taus[:, waiting]  # as read: trimmed against the thresholds, then weighed
        self.held += held.numel() * held.element_size()
        if self.held > self.limit:
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
            if self.weights is not None:
                kept = weigh_(kept, self.weights)
            total += int(torch.sign(kept.sum(0)).sum(dtype=torch.int64))
        self.deferred = []
        self.signs = total  # sum over entries of the elected signs (+1, -1, 0)
        return float((total > 0) - (total < 0))


# --- sign election and disjoint merge ------------------------------------------------------------
def elect_sign(trimmed: torch.Tensor, majority: float) -> torch.Tensor:
    """Each entry's sign: that of the sum over tasks, ``majority`` where the sum is 0."""
    sign = torch.sign(trimmed.sum(0))
    return sign.masked_fill_(sign == 0, majority)


def disjoint_merge(
    trimmed: torch.Tensor,
    sign: torch.Tensor,
    merge_func: str,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum or mean of the entries that agree with ``sign``; overwrites ``trimmed`` (memory).

    ``trimmed`` holds the weighted task vectors ``w_i tau_i``; the mean divides by the sum of the
    agreeing entries' weights (mergekit's ``normalize``; the count when the weights are 1), and
    where that is 0 by 1."""
    # Row by row: one task's agreement mask at a time, not (N, ...) masks and products, which at
    # LLM size are the merge's peak memory.
    positive = sign > 0
    total = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign) if merge_func == "mean" else None
    for i, row in enumerate(trimmed):
        agree = torch.where(positive, row > 0, row < 0)
        total += row.mul_(agree)
        if divisor is not None:
            divisor += agree if weights is None else agree * float(weights[i])
    if divisor is None:
        return total
    if weights is None:
        return total / divisor.clamp_(min=1)
    return total / divisor.masked_fill_(divisor == 0, 1.0)


def zero_sign_value(
    ctx: MergeContext,
    zero_sign: str,
    sparsify: Callable[[str, torch.Tensor], torch.Tensor],
) -> float:
    """The sign of entries whose elected sum is 0: +1 for ``positive`` (no pass over the
    experts), else the whole model's :func:`majority_sign` (one more pass)."""
    if zero_sign == "positive":
        return 1.0
    return majority_sign(ctx, sparsify)


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
