"""Pseudo-labels for the unlabelled target: k-reciprocal Jaccard distance, then DBSCAN.

Why: SAGE (brief, Part A, A.4) re-labels the target set every epoch this way and resets the
classifier to the cluster centroids. The rules kept from the authors' code:

* Jaccard distance with k1 = 20, k2 = 6, lambda = 0 (:mod:`lorex.adaptation.jaccard`);
* DBSCAN with ``metric="precomputed"`` and ``min_samples=4``; label -1 marks outliers, which the
  training step drops;
* eps is set ONCE, on the first clustering (epoch 0), as the mean of the smallest rho = 1.6e-3
  fraction of the sorted non-zero upper-triangular distances, then kept (:class:`PseudoLabeler`);
* centroids: the mean of each cluster's L2-normalised features, L2-normalised again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp

from lorex.adaptation.jaccard import (
    as_features,
    check_k,
    k_reciprocal_jaccard,
    l2_normalise,
    rows_per_chunk,
)
from lorex.errors import LorexError

__all__ = [
    "PseudoLabeler",
    "PseudoLabels",
    "centroids",
    "cluster",
    "dbscan_eps",
    "k_reciprocal_jaccard",
]


def _check_dist(dist: Any) -> np.ndarray | sp.csr_matrix:
    if sp.issparse(dist):
        dist = sp.csr_matrix(dist)
    elif not isinstance(dist, np.ndarray):
        dist = np.asarray(dist)
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1] or dist.shape[0] == 0:
        raise LorexError(f"dist: expected a square (N, N) distance matrix, got {dist.shape}")
    return dist


def _upper_mask(dist: np.ndarray, a: int, b: int) -> np.ndarray:
    """Mask of the non-zero strict upper triangle in rows a .. b - 1."""
    return (np.arange(dist.shape[1])[None, :] > np.arange(a, b)[:, None]) & (dist[a:b] != 0)


def dbscan_eps(dist: Any, rho: float = 1.6e-3) -> float:
    """The brief's eps: mean of the smallest round(rho * M) of the M non-zero upper distances.

    Why: it ties eps to the density of the target set without labels. Dense input is scanned in
    row chunks (two passes: count, then keep the smallest), so the N^2/2 values are never sorted
    or copied at once. For sparse input (from ``k_reciprocal_jaccard(..., sparse=True)``) the
    missing entries count as distance 1. At least one value is used (N < ~25 would round to 0).
    """
    if isinstance(rho, bool) or not isinstance(rho, float | int) or not 0 < rho <= 1:
        raise LorexError(f"rho: expected a fraction in (0, 1], got {rho!r}")
    dist = _check_dist(dist)
    n = dist.shape[0]
    if n < 2:
        raise LorexError(f"dist: eps needs at least 2 samples, got N={n}")
    if sp.issparse(dist):
        upper = sp.triu(dist, k=1).tocoo()
        values = upper.data[upper.data != 0].astype(np.float64)
        total = n * (n - 1) // 2 - int((upper.data == 0).sum())
        count = max(1, int(np.round(rho * total)))
        if count <= len(values):
            return float(np.partition(values, count - 1)[:count].mean())
        return float((values.sum() + (count - len(values))) / count)
    step = rows_per_chunk(n)
    chunks = [(a, min(n, a + step)) for a in range(0, n, step)]
    total = sum(int(np.count_nonzero(_upper_mask(dist, a, b))) for a, b in chunks)
    if total == 0:
        raise LorexError("dist: all upper-triangular distances are zero, eps is undefined")
    count = max(1, int(np.round(rho * total)))
    kept = np.zeros(0, np.float64)
    for a, b in chunks:
        values = dist[a:b][_upper_mask(dist, a, b)].astype(np.float64)
        if len(kept) == count:
            values = values[values < kept.max()]
        kept = np.concatenate((kept, values))
        if len(kept) > count:
            kept = np.partition(kept, count - 1)[:count]
    return float(kept.mean())


def cluster(dist: Any, eps: float, min_samples: int = 4) -> np.ndarray:
    """DBSCAN labels (N,) on a precomputed distance: clusters 0 .. C - 1, outliers -1.

    Sparse input treats missing entries as beyond reach, which is what distance 1 is when
    eps < 1. DBSCAN visits samples in order, so the labels are deterministic.
    """
    # Imported here: scikit-learn (and pandas, which it loads when installed) took ~3 s of every
    # lorex command's start-up, `lorex merge` included, for this one function of SAGE's.
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import sort_graph_by_row_values

    if isinstance(eps, bool) or not isinstance(eps, float | int) or not 0 < eps < np.inf:
        raise LorexError(f"eps: expected a positive distance, got {eps!r}")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
        raise LorexError(f"min_samples: expected a positive integer, got {min_samples!r}")
    dist = _check_dist(dist)
    if sp.issparse(dist):
        if eps >= 1:
            raise LorexError(f"eps: sparse Jaccard distances need eps < 1, got {eps}")
        dist = sort_graph_by_row_values(dist, copy=True, warn_when_not_sorted=False)
    labels = DBSCAN(eps=float(eps), min_samples=min_samples, metric="precomputed").fit_predict(dist)
    return labels.astype(np.int64)


def centroids(features: Any, labels: Any) -> np.ndarray:
    """(C, D) unit rows: the mean of each cluster's L2-normalised features, re-normalised.

    Why: SAGE copies them into the classifier, a fixed prototype per pseudo-identity. Row c is
    cluster c; outliers (-1) are left out. Float64 features give float64, others float32.
    """
    x = l2_normalise(as_features(features))
    labels = np.asarray(labels)
    if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
        raise LorexError(f"labels: expected {len(x)} integers, got {labels.dtype} {labels.shape}")
    keep = labels >= 0
    num = int(labels.max()) + 1 if keep.any() else 0
    if (labels < -1).any():
        raise LorexError("labels: expected clusters 0 .. C - 1 and -1 for outliers")
    sizes = np.bincount(labels[keep], minlength=num)
    if (sizes == 0).any():
        raise LorexError(f"labels: cluster {int(np.argmin(sizes))} has no member")
    members = sp.csr_matrix(
        (np.ones(int(keep.sum()), x.dtype), (labels[keep], np.flatnonzero(keep))),
        shape=(num, len(x)),
    )
    means = np.asarray(members @ x) / sizes[:, None].astype(x.dtype)
    return l2_normalise(means).astype(x.dtype)


class PseudoLabels(NamedTuple):
    """Labels (N,) with -1 for outliers, and the number of clusters C."""

    labels: np.ndarray
    num_clusters: int


@dataclass
class PseudoLabeler:
    """Features -> pseudo-labels, with eps fixed on the first call and reused afterwards.

    Why: the brief's rule (eps from epoch 0's distances, then constant) keeps later epochs from
    re-tuning the density threshold to the drifting features. Pass ``eps`` to fix it up front.
    ``sparse=True`` never builds the N x N matrix (same labels).
    """

    k1: int = 20
    k2: int = 6
    rho: float = 1.6e-3
    min_samples: int = 4
    eps: float | None = None
    sparse: bool = False

    def __call__(self, features: Any) -> PseudoLabels:
        x = as_features(features)
        check_k(len(x), self.k1, self.k2)
        dist = k_reciprocal_jaccard(x, self.k1, self.k2, sparse=self.sparse)
        if self.eps is None:
            self.eps = dbscan_eps(dist, self.rho)
        labels = cluster(dist, self.eps, self.min_samples)
        return PseudoLabels(labels, int(labels.max()) + 1 if (labels >= 0).any() else 0)
