"""The usual per-query Python loop for re-ID metrics: the reference for tests and benchmarks.

It walks the ranked gallery of one query at a time, the way torchreid's Python
``eval_market1501`` does (argsort of the whole matrix, then per query: drop the same-id
same-camera entries, cumulative hits, precision at each rank). Same protocol as
:func:`lorex.metrics.reid.reid_scores`, which is the one to use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lorex.errors import LorexError
from lorex.metrics.reid import check_inputs


def reference_evaluate_loop(
    distmat: Any,
    query_ids: Any,
    gallery_ids: Any,
    query_cams: Any,
    gallery_cams: Any,
    max_rank: int = 50,
    sort_kind: str = "stable",
    python_precision: bool = True,
) -> dict[str, Any]:
    """Per-query loop over the full ranked gallery; returns what ``reid_scores`` returns.

    ``sort_kind="stable"`` breaks distance ties by gallery order, as ``reid_scores`` does;
    ``"quicksort"`` is torchreid's (same result without ties). ``python_precision`` builds the
    precision at each rank as a Python list, as torchreid does; ``False`` divides in NumPy.
    """
    dist, q_ids, g_ids, q_cams, g_cams = check_inputs(
        distmat, query_ids, gallery_ids, query_cams, gallery_cams, max_rank
    )
    order = np.argsort(dist, axis=1, kind=sort_kind)
    matches = (g_ids[order] == q_ids[:, None]).astype(np.int32)
    all_ap, all_inp, all_cmc = [], [], []
    for q in range(len(q_ids)):
        ranked = order[q]
        removed = (g_ids[ranked] == q_ids[q]) & (g_cams[ranked] == q_cams[q])
        keep = ~removed & (g_ids[ranked] >= 0)
        hits = matches[q][keep]
        if not hits.any():
            continue  # no positive left for this query
        found = hits.cumsum()
        hardest = np.flatnonzero(hits)[-1]
        all_inp.append(found[hardest] / (hardest + 1.0))
        cmc = np.minimum(found, 1)[:max_rank].astype(np.float64)
        all_cmc.append(np.pad(cmc, (0, max_rank - len(cmc)), constant_values=1.0))
        if python_precision:
            precision = np.asarray([n / (i + 1.0) for i, n in enumerate(found)])
        else:
            precision = found / np.arange(1.0, len(found) + 1.0)
        all_ap.append((precision * hits).sum() / hits.sum())
    if not all_ap:
        raise LorexError("no query has a valid match in the gallery")
    return {
        "mAP": float(np.mean(all_ap)),
        "cmc": np.sum(all_cmc, axis=0) / len(all_ap),
        "mINP": float(np.mean(all_inp)),
        "num_valid_queries": len(all_ap),
    }
