"""Person re-ID retrieval metrics (mAP, CMC, mINP) under the Market-1501 protocol.

Protocol, per query:

* the gallery is ranked by ascending distance; ties are broken by gallery order (a stable sort);
* gallery entries with the query's id AND camera are removed: finding the same person in the
  same camera is too easy to count;
* gallery entries with a negative id (Market-1501's junk, ``-1``) are removed, as the official
  Market-1501 code does (the loader in :mod:`lorex.data.market1501` already drops them);
* distractors (id 0, or any id no query has) stay in the gallery as negatives;
* a query with no positive left is skipped; the metrics average over the remaining queries.

AP is the non-interpolated average precision over the remaining ranking, CMC rank-k the fraction
of queries with a positive in the top k, and mINP (Ye et al., 2021) the mean over queries of
(number of positives) / (rank of the hardest positive).

Only the ranks of the positives matter, so nothing is argsorted: each chunk of query rows is
sorted by value (several times faster than an argsort) and every same-id entry is located in its
sorted row by a batched binary search. :func:`lorex.metrics._reid_reference.reference_evaluate_loop`
is the plain per-query loop this matches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lorex.errors import LorexError

CHUNK_ELEMENTS = 1 << 23  # distances sorted at a time: 32 MiB of float32 per chunk


def _as_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise LorexError(f"{name}: not an array ({exc})") from None


def check_inputs(
    distmat: Any,
    query_ids: Any,
    gallery_ids: Any,
    query_cams: Any,
    gallery_cams: Any,
    max_rank: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """NumPy copies of the inputs, or a one-line LorexError naming the offending field."""
    dist = _as_array(distmat, "distmat")
    if dist.ndim != 2 or 0 in dist.shape:
        raise LorexError(
            f"distmat: expected a non-empty (queries, gallery) matrix, got {dist.shape}"
        )
    if dist.dtype == bool or not np.issubdtype(dist.dtype, np.number):
        raise LorexError(f"distmat: expected real distances, got dtype {dist.dtype}")
    if np.iscomplexobj(dist):
        raise LorexError("distmat: expected real distances, got complex numbers")
    if np.issubdtype(dist.dtype, np.floating) and np.isnan(dist).any():
        raise LorexError("distmat: contains NaN")
    num_q, num_g = dist.shape
    out = [dist]
    for name, value, n in (
        ("query_ids", query_ids, num_q),
        ("gallery_ids", gallery_ids, num_g),
        ("query_cams", query_cams, num_q),
        ("gallery_cams", gallery_cams, num_g),
    ):
        arr = _as_array(value, name)
        if arr.ndim != 1 or len(arr) != n:
            raise LorexError(f"{name}: expected shape ({n},) to match distmat, got {arr.shape}")
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise LorexError(f"{name}: expected integers, got dtype {arr.dtype}")
        out.append(arr.astype(np.int64))
    if isinstance(max_rank, bool) or not isinstance(max_rank, int | np.integer) or max_rank < 1:
        raise LorexError(f"max_rank: expected a positive integer, got {max_rank!r}")
    return out[0], out[1], out[2], out[3], out[4]


def _count_before(rows_sorted: np.ndarray, rows: np.ndarray, values: np.ndarray, strict: bool):
    """Per entry, how many values of its sorted row are < (strict) or <= its value."""
    lo = np.zeros(len(values), dtype=np.int64)
    hi = np.full(len(values), rows_sorted.shape[1], dtype=np.int64)
    while True:
        todo = np.flatnonzero(lo < hi)
        if not len(todo):
            return lo
        mid = (lo[todo] + hi[todo]) // 2
        probe = rows_sorted[rows[todo], mid]
        right = probe < values[todo] if strict else probe <= values[todo]
        lo[todo] = np.where(right, mid + 1, lo[todo])
        hi[todo] = np.where(right, hi[todo], mid)


def _stable_ranks(chunk: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """0-based position of ``chunk[rows, cols]`` in its row's stable ascending order."""
    values = chunk[rows, cols]
    rows_sorted = np.sort(chunk, axis=1)
    rank = _count_before(rows_sorted, rows, values, strict=True)
    tied = np.flatnonzero(_count_before(rows_sorted, rows, values, strict=False) - rank > 1)
    # An exact tie is ordered by gallery index: count the equal values to the left (rare).
    step = max(1, CHUNK_ELEMENTS // chunk.shape[1])
    for start in range(0, len(tied), step):
        t = tied[start : start + step]
        left = np.arange(chunk.shape[1]) < cols[t, None]
        rank[t] += np.count_nonzero((chunk[rows[t]] == values[t, None]) & left, axis=1)
    return rank


def _segments(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For row numbers sorted ascending: where each run starts, and each entry's run index."""
    new = np.r_[True, rows[1:] != rows[:-1]]
    return np.flatnonzero(new), np.cumsum(new) - 1


def _segment_cumsum(x: np.ndarray, starts: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum of ``x`` restarted at each segment start."""
    total = np.cumsum(x)
    return total - (total[starts] - x[starts])[seg]


def _chunk_positive_ranks(dist, q_ids, q_cams, g_ids, g_cams):
    """Per query row of the chunk: kept ranks (1-based) of its positives, in ranking order."""
    same_id = g_ids[None, :] == q_ids[:, None]
    rows, cols = np.nonzero(same_id)
    if not len(rows):
        return rows, rows
    rank = _stable_ranks(dist, rows, cols)
    removed = g_cams[cols] == q_cams[rows]
    order = np.lexsort((rank, rows))
    rows, rank, removed = rows[order], rank[order], removed[order]
    starts, seg = _segments(rows)
    removed_before = _segment_cumsum(removed.astype(np.int64), starts, seg) - removed
    keep = ~removed
    return rows[keep], (rank - removed_before + 1)[keep]


def reid_scores(
    distmat: Any,
    query_ids: Any,
    gallery_ids: Any,
    query_cams: Any,
    gallery_cams: Any,
    max_rank: int = 50,
) -> dict[str, Any]:
    """mAP, CMC and mINP of a (queries, gallery) distance matrix, Market-1501 protocol.

    Accepts NumPy arrays or torch tensors. Returns ``{"mAP", "cmc", "mINP",
    "num_valid_queries", "ap"}``; ``cmc`` has ``max_rank`` entries, rank-k is ``cmc[k - 1]``;
    ``ap`` is each valid query's average precision (its spread gives mAP's standard error). Raises
    LorexError when no query has a valid match.
    """
    dist, q_ids, g_ids, q_cams, g_cams = check_inputs(
        distmat, query_ids, gallery_ids, query_cams, gallery_cams, max_rank
    )
    if (g_ids < 0).any():  # junk: ranked by no query, so drop its columns once
        real = g_ids >= 0
        dist, g_ids, g_cams = dist[:, real], g_ids[real], g_cams[real]
    aps, firsts, inps = [], [], []
    step = max(1, CHUNK_ELEMENTS // max(1, dist.shape[1]))
    for start in range(0, len(q_ids) if dist.shape[1] else 0, step):
        sl = slice(start, start + step)
        rows, ranks = _chunk_positive_ranks(dist[sl], q_ids[sl], q_cams[sl], g_ids, g_cams)
        if not len(rows):
            continue
        starts, seg = _segments(rows)
        hits = _segment_cumsum(np.ones(len(rows), dtype=np.int64), starts, seg)
        ends = np.r_[starts[1:], len(rows)] - 1
        num_pos = hits[ends]
        aps.append(np.bincount(seg, weights=hits / ranks) / num_pos)
        firsts.append(ranks[starts])
        inps.append(num_pos / ranks[ends])
    if not aps:
        raise LorexError(
            "no query has a valid match in the gallery (same-id same-camera entries are removed)"
        )
    ap, first, inp = np.concatenate(aps), np.concatenate(firsts), np.concatenate(inps)
    found = np.bincount(np.minimum(first, max_rank + 1), minlength=max_rank + 2)[1 : max_rank + 1]
    return {
        "mAP": float(np.mean(ap)),
        "cmc": np.cumsum(found) / len(ap),
        "mINP": float(np.mean(inp)),
        "num_valid_queries": int(len(ap)),
        "ap": ap,
    }


def random_ranking_map(
    query_ids: Any,
    gallery_ids: Any,
    query_cams: Any,
    gallery_cams: Any,
    draws: int = 20,
    seed: int = 0,
) -> float:
    """Chance level of mAP: the mean mAP of ``draws`` uniformly random rankings of the gallery
    under the same protocol (it depends on how many true matches each query has)."""
    rng = np.random.default_rng(seed)
    shape = (len(np.asarray(query_ids)), len(np.asarray(gallery_ids)))
    return float(
        np.mean(
            [
                reid_scores(rng.random(shape), query_ids, gallery_ids, query_cams, gallery_cams)[
                    "mAP"
                ]
                for _ in range(draws)
            ]
        )
    )
