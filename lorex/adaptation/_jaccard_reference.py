"""The k-reciprocal Jaccard distance as plain dense loops, for tests on small N only.

Why: :func:`lorex.adaptation.jaccard.k_reciprocal_jaccard` is vectorised over sparse matrices;
this follows the definitions (see that module's docstring) one sample at a time, so that the two
can be compared. It is O(N^2 D) in memory-hungry float64 and O(N^3) in time.
"""

from __future__ import annotations

import numpy as np


def dense_reference_jaccard(features: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """Jaccard distance (N, N), float64, from a dense distance matrix and per-sample loops."""
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(x)
    dist = np.maximum(2 - 2 * (x @ x.T), 0)
    np.fill_diagonal(dist, 0)
    row_max = dist.max(axis=1, keepdims=True)
    dist = dist / np.where(row_max > 0, row_max, 1)
    ranking = dist.copy()
    np.fill_diagonal(ranking, -1)  # each sample ranks itself first
    rank = np.argsort(ranking, axis=1, kind="stable")

    def reciprocal_set(i: int, k: int) -> set[int]:
        return {int(j) for j in rank[i, : k + 1] if i in rank[j, : k + 1]}

    k_half = int(np.around(k1 / 2))
    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal_set(i, k1)
        members = set(r)
        for c in r:
            rc = reciprocal_set(c, k_half)
            if len(rc & r) > 2 / 3 * len(rc):
                members |= rc
        cols = sorted(members)
        w = np.exp(-dist[i, cols])
        v[i, cols] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jac = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            s = np.minimum(v[i], v[j]).sum()
            jac[i, j] = 1 - s / (2 - s)
    jac = np.clip(jac, 0, 1)
    jac[jac < 1e-9] = 0  # rounding noise of equal encodings, as in the sparse version
    np.fill_diagonal(jac, 0)
    return jac
