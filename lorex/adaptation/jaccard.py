"""k-reciprocal Jaccard distance (Zhong et al., CVPR 2017) built from sparse nearest neighbours.

Why: DBSCAN pseudo-labelling (MMT, SpCL, SAGE) clusters the target set on this distance every
epoch. The authors' code loops over samples in Python and keeps dense N x N matrices for the
ranking, for V and for the result. Here the neighbour sets, V and the min-sums are sparse (CSR)
and built with matrix products; the only N x N array is the dense float32 result, and
``sparse=True`` avoids even that.

Definitions, for L2-normalised features x (SAGE's ``compute_jaccard_dist`` with lambda = 0):

* d(i, j) = max(2 - 2 x_i.x_j, 0), the squared Euclidean distance, divided by the largest d(i, .)
  in row i. SAGE divides by the column max and transposes, which is the same since d is
  symmetric. SpCL's faiss version skips that division. We follow SAGE, the method reproduced.
* N(i, k): the k + 1 nearest samples of i, itself first (even if another sample has the same
  features). Other ties are broken by index.
* R(i, k) = {j in N(i, k) : i in N(j, k)}, the k-reciprocal neighbours.
* R*(i) = R(i, k1), plus R(c, round(k1 / 2)) for every c in R(i, k1) whose set has more than
  2/3 of its members in R(i, k1). The rounding is NumPy's (half to even), as in the authors' code.
* V_ij = exp(-d(i, j)) / sum of exp(-d(i, .)) over R*(i), for j in R*(i), else 0. Rows sum to 1.
* Query expansion (k2 > 1): V_i becomes the mean of V_j over the first k2 members of N(i, .).
* d_J(i, j) = 1 - s / (2 - s) with s = sum_t min(V_it, V_jt). Rows of V sum to 1, so 2 - s is
  sum_t max(V_it, V_jt): the weighted Jaccard distance. Diagonal 0, values clipped to [0, 1].
* Samples whose encodings are equal (after query expansion, neighbours sharing their k2 nearest
  often are) get s = 1 up to the order of summation, so a distance of ~1e-16. Anything below
  ZERO = 1e-9 is set to exactly 0: the result no longer depends on summation order, and such
  pairs count as duplicates (zeros) in the eps heuristic, whatever the rounding.

V is kept in float64 (the authors keep it in float16 or float32 only to fit the dense N x N).
:func:`lorex.adaptation._jaccard_reference.dense_reference_jaccard` is the plain loop this
matches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from lorex.errors import LorexError

CHUNK_BYTES = 64 << 20  # the largest temporary (rows x N) block
PAIR_BUDGET = 1 << 21  # (i, t, j) triples expanded at a time for the min-sums
ZERO = 1e-9  # distances below this are rounding noise of identical encodings: set to 0


def as_features(features: Any, name: str = "features") -> np.ndarray:
    """A finite (N, D) float array: float64 stays float64, anything else becomes float32."""
    if hasattr(features, "detach"):  # a torch tensor, on any device
        features = features.detach().cpu().numpy()
    try:
        x = np.asarray(features)
    except (TypeError, ValueError) as exc:
        raise LorexError(f"{name}: not an array ({exc})") from None
    if x.ndim != 2 or 0 in x.shape:
        raise LorexError(f"{name}: expected a non-empty (N, D) matrix, got shape {x.shape}")
    if x.dtype == bool or not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise LorexError(f"{name}: expected real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64 if x.dtype == np.float64 else np.float32)
    if not np.isfinite(x).all():
        raise LorexError(f"{name}: contains NaN or infinity")
    return x


def check_k(n: int, k1: Any, k2: Any) -> None:
    """One-line errors for k1 and k2, which the neighbour lists need to make sense."""
    for name, k in (("k1", k1), ("k2", k2)):
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise LorexError(f"{name}: expected a positive integer, got {k!r}")
    if k2 > k1:
        raise LorexError(f"k2: must be at most k1={k1}, got {k2}")
    if n < k1 + 1:
        raise LorexError(f"k1: {k1} neighbours need at least {k1 + 1} samples, got N={n}")


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows divided by their norm (a zero row stays zero), as torch's F.normalize does."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def rows_per_chunk(n: int, itemsize: int = 8) -> int:
    return max(1, CHUNK_BYTES // (itemsize * n))


def nearest(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranks (N, k + 1) of each row's k + 1 nearest samples, itself first, and each row's max d.

    Chunked matrix products: no N x N matrix is ever held. The ranking is the stable argsort of
    the row-normalised distance: within a row, ties are broken by sample index.
    """
    n = len(x)
    ranks = np.empty((n, k + 1), np.int64)
    scale = np.empty(n, x.dtype)
    step = rows_per_chunk(n)
    for a in range(0, n, step):
        b = min(n, a + step)
        r = np.arange(b - a)
        d = x[a:b] @ x.T
        d *= -2
        d += 2
        np.maximum(d, 0, out=d)
        d[r, a + r] = 0
        m = d.max(axis=1)
        m[m <= 0] = 1  # all samples identical: nothing to normalise
        scale[a:b] = m
        d /= m[:, None]
        d[r, a + r] = -1  # itself first
        tau = np.partition(d, k, axis=1)[:, k]  # the (k + 1)-th smallest value of each row
        below = d < tau[:, None]
        at = d == tau[:, None]
        need = k + 1 - below.sum(axis=1)
        take = below | (at & (np.cumsum(at, axis=1) <= need[:, None]))
        cols = np.nonzero(take)[1].reshape(b - a, k + 1)  # ascending index within each row
        order = np.argsort(np.take_along_axis(d, cols, axis=1), axis=1, kind="stable")
        ranks[a:b] = np.take_along_axis(cols, order, axis=1)
    return ranks, scale


def _members(cols: np.ndarray, n: int, dtype: type = np.int32) -> sp.csr_matrix:
    """A[i, j] = 1 when j is in cols[i]."""
    rows = np.repeat(np.arange(n), cols.shape[1])
    return sp.csr_matrix((np.ones(rows.size, dtype), (rows, cols.ravel())), shape=(n, n))


def reciprocal(ranks: np.ndarray, k: int) -> sp.csr_matrix:
    """R(i, k) as a 0/1 CSR matrix: j and i are each among the other's k + 1 nearest."""
    a = _members(ranks[:, : k + 1], len(ranks))
    r = a.multiply(a.T).tocsr()
    r.sort_indices()
    return r


def expanded(r1: sp.csr_matrix, rh: sp.csr_matrix) -> sp.csr_matrix:
    """R*(i): R(i, k1) plus each candidate's R(c, k1/2) that overlaps R(i, k1) by more than 2/3."""
    overlap = (r1 @ rh).multiply(r1).tocoo()  # |R(c, k1/2) & R(i, k1)| at each c in R(i, k1)
    size = np.diff(rh.indptr)[overlap.col]
    keep = overlap.data > 2 / 3 * size
    n = r1.shape[0]
    accepted = sp.csr_matrix(
        (np.ones(int(keep.sum()), np.int32), (overlap.row[keep], overlap.col[keep])), shape=(n, n)
    )
    out = (r1 + accepted @ rh).tocsr()
    out.data[:] = 1
    out.sort_indices()
    return out


def encode(x: np.ndarray, scale: np.ndarray, pattern: sp.csr_matrix) -> sp.csr_matrix:
    """V: Gaussian-kernel weights exp(-d) on the pattern R*, normalised per row."""
    n = len(x)
    rows = np.repeat(np.arange(n), np.diff(pattern.indptr))
    cols = pattern.indices
    dots = np.empty(len(cols), np.float64)
    step = max(1, CHUNK_BYTES // (8 * x.shape[1]))
    for a in range(0, len(cols), step):
        i, j = rows[a : a + step], cols[a : a + step]
        dots[a : a + step] = np.einsum("ij,ij->i", x[i], x[j])
    d = np.maximum(2 - 2 * dots, 0) / scale[rows]
    d[rows == cols] = 0
    w = np.exp(-d)
    w /= np.bincount(rows, weights=w, minlength=n)[rows]
    v = sp.csr_matrix((w, cols.copy(), pattern.indptr.copy()), shape=(n, n))
    v.sort_indices()
    return v


def expand_query(v: sp.csr_matrix, ranks: np.ndarray, k2: int) -> sp.csr_matrix:
    """Local query expansion: the mean of V over each sample's k2 nearest (itself included)."""
    if k2 == 1:
        return v
    out = (_members(ranks[:, :k2], len(ranks), np.float64) @ v).tocsr()
    out.data /= k2
    out.sort_indices()
    return out


def _row_chunks(v: sp.csr_matrix, col_len: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges whose min-sum expansion stays within PAIR_BUDGET triples and CHUNK_BYTES."""
    n = v.shape[0]
    per_entry = np.concatenate(([0], np.cumsum(col_len[v.indices])))
    work = per_entry[v.indptr]  # work[b] - work[a]: triples of rows a .. b - 1
    cap = rows_per_chunk(n)
    out, a = [], 0
    while a < n:
        b = int(np.searchsorted(work, work[a] + PAIR_BUDGET, side="right")) - 1
        b = min(max(b, a + 1), a + cap, n)
        out.append((a, b))
        a = b
    return out


def jaccard_from_v(v: sp.csr_matrix, sparse: bool = False) -> np.ndarray | sp.csr_matrix:
    """d_J from V through an inverted index (V by columns): only pairs sharing a column meet.

    For row i and each of its non-zero columns t, every j with V_jt != 0 gets min(V_it, V_jt).
    The terms for (i, j) and (j, i) are the same and are added in the same order (by t), so the
    result is exactly symmetric.
    """
    n = v.shape[0]
    vc = v.tocsc()
    vc.sort_indices()
    col_len = np.diff(vc.indptr)
    dense = None if sparse else np.empty((n, n), np.float32)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    counts = np.zeros(n, np.int64)
    for a, b in _row_chunks(v, col_len):
        lo, hi = v.indptr[a], v.indptr[b]
        cols, vals = v.indices[lo:hi], v.data[lo:hi]
        local = np.repeat(np.arange(b - a), np.diff(v.indptr[a : b + 1]))
        lens = col_len[cols]
        offs = np.arange(int(lens.sum())) + np.repeat(
            vc.indptr[cols] - np.cumsum(lens) + lens, lens
        )
        key = np.repeat(local, lens) * n + vc.indices[offs]
        mins = np.minimum(np.repeat(vals, lens), vc.data[offs])
        s = np.bincount(key, weights=mins, minlength=(b - a) * n).reshape(b - a, n)
        jac = np.clip(1 - s / (2 - s), 0, 1)
        jac[jac < ZERO] = 0
        r = np.arange(b - a)
        jac[r, a + r] = 0
        if dense is not None:
            dense[a:b] = jac
            continue
        shared = s > 0  # the diagonal always shares its own columns
        i, j = np.nonzero(shared)
        parts.append((j.astype(np.int32), jac[i, j].astype(np.float32)))
        counts[a:b] = shared.sum(axis=1)
    if dense is not None:
        return dense
    indptr = np.concatenate(([0], np.cumsum(counts)))
    indices = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
    data = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(n, n))


def k_reciprocal_jaccard(
    features: Any, k1: int = 20, k2: int = 6, sparse: bool = False
) -> np.ndarray | sp.csr_matrix:
    """k-reciprocal Jaccard distance (N, N) between the rows of ``features`` (lambda = 0).

    Returns a dense float32 matrix, or with ``sparse=True`` a float32 CSR matrix holding every
    pair that shares part of its encoding (distance < 1, the diagonal stored as explicit zeros);
    a missing entry means distance 1. DBSCAN with eps < 1 gives the same clusters on both.
    """
    x = as_features(features)
    check_k(len(x), k1, k2)
    x = l2_normalise(x)
    ranks, scale = nearest(x, int(k1))
    pattern = expanded(reciprocal(ranks, int(k1)), reciprocal(ranks, int(np.around(k1 / 2))))
    v = expand_query(encode(x, scale, pattern), ranks, int(k2))
    return jaccard_from_v(v, sparse=sparse)
