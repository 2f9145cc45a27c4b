"""Exact k-th smallest magnitude over a whole model, streamed: for global top-k masks.

TIES and DOGE keep each task vector's top fraction by magnitude *over the whole model*, not per
tensor. Sorting every magnitude needs the whole task vector in memory (N of them at once in a
merge). Instead: non-negative float32 values order like their int32 bit patterns, so a two-pass
radix select (a 65,536-bin histogram of the high 16 bits, then of the low 16 bits inside the
chosen bin) finds the exact value while holding one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

BINS = 1 << 16


def _bits(t: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of ``|t|`` (non-negative, so they sort like the values)."""
    return t.detach().float().abs().flatten().view(torch.int32)


def high_bits(t: torch.Tensor) -> torch.Tensor:
    """The high 16 bits of ``|t|``'s float32 pattern, ``t``'s shape: the first pass's bins. An
    entry whose bin is above a threshold's is above the threshold, one below is below it."""
    return t.detach().float().abs().view(torch.int32) >> 16


def kth_smallest_abs(
    stream: Callable[[], Iterable[list[torch.Tensor]]],
    ks: list[int],
    on_buckets: Callable[[list[int]], None] | None = None,
) -> list[float]:
    """The ``k``-th smallest ``|x|`` (1-based) of each of several value streams, exactly.

    ``stream()`` yields, in each pass, one list with a tensor per stream (a chunk of each task
    vector); it is called twice. Equals ``torch.cat(all chunks).abs().kthvalue(k)``.
    ``on_buckets`` learns each stream's :func:`high_bits` bin of its answer before the second
    pass starts.
    """
    n = len(ks)
    high = torch.zeros(n, BINS, dtype=torch.long)
    for chunks in stream():
        for i, t in enumerate(chunks):
            high[i] += torch.bincount(_bits(t) >> 16, minlength=BINS).cpu()
    buckets, remaining = [], []
    for i, k in enumerate(ks):
        total = int(high[i].sum())
        if not 1 <= k <= total:
            raise ValueError(f"k={k} is outside 1..{total}")
        cum = torch.cumsum(high[i], 0)
        b = int(torch.searchsorted(cum, torch.tensor(k)))
        buckets.append(b)
        remaining.append(k - (int(cum[b - 1]) if b > 0 else 0))
    if on_buckets is not None:
        on_buckets(buckets)
    low = torch.zeros(n, BINS, dtype=torch.long)
    for chunks in stream():
        for i, t in enumerate(chunks):
            bits = _bits(t)
            inside = bits[(bits >> 16) == buckets[i]]
            low[i] += torch.bincount(inside & 0xFFFF, minlength=BINS).cpu()
    values = []
    for i in range(n):
        cum = torch.cumsum(low[i], 0)
        lo = int(torch.searchsorted(cum, torch.tensor(remaining[i])))
        pattern = torch.tensor([(buckets[i] << 16) | lo], dtype=torch.int32)
        values.append(float(pattern.view(torch.float32)))
    return values


def kth_for_density(total: int, density: float) -> int:
    """The ``k`` of FusionBench's ``topk_values_mask``: keep ``|x| >= kthvalue(k)`` with
    ``k = total - int(total * density)``; ``k = 0`` keeps everything."""
    return total - int(total * density)
