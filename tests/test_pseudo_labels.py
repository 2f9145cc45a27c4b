"""Pseudo-labelling: the sparse k-reciprocal Jaccard distance, eps, DBSCAN and centroids."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from lorex.adaptation._jaccard_reference import dense_reference_jaccard
from lorex.adaptation.pseudo_labels import (
    PseudoLabeler,
    centroids,
    cluster,
    dbscan_eps,
    k_reciprocal_jaccard,
)
from lorex.errors import LorexError


def blobs(num_blobs=6, per_blob=10, dim=16, spread=0.6, seed=0):
    """Noisy Gaussian blobs: overlapping enough that the 2/3 expansion rule fires."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_blobs, dim))
    x = np.repeat(centres, per_blob, axis=0) + spread * rng.normal(size=(num_blobs * per_blob, dim))
    return x, np.repeat(np.arange(num_blobs), per_blob)


def to_dense(dist):
    """A sparse Jaccard result as a dense matrix: missing entries are distance 1."""
    out = np.ones(dist.shape, np.float32)
    coo = dist.tocoo()
    out[coo.row, coo.col] = coo.data
    return out


@pytest.mark.parametrize(("k1", "k2"), [(8, 3), (8, 1), (5, 5), (3, 2), (1, 1)])
def test_sparse_matches_dense_reference(k1, k2):
    x, _ = blobs()
    expected = dense_reference_jaccard(x, k1, k2)
    got = k_reciprocal_jaccard(x, k1, k2)
    assert got.dtype == np.float32 and got.shape == (60, 60)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    sparse = k_reciprocal_jaccard(x, k1, k2, sparse=True)
    assert sp.issparse(sparse)
    np.testing.assert_array_equal(to_dense(sparse), got)


def test_random_features_and_float32():
    x = np.random.default_rng(1).normal(size=(60, 8))
    expected = dense_reference_jaccard(x, 8, 3)
    np.testing.assert_allclose(k_reciprocal_jaccard(x, 8, 3), expected, atol=1e-6, rtol=0)
    got32 = k_reciprocal_jaccard(x.astype(np.float32), 8, 3)
    np.testing.assert_allclose(got32, expected, atol=1e-4, rtol=0)


def test_properties():
    x, _ = blobs(seed=2)
    dist = k_reciprocal_jaccard(x, 8, 3)
    np.testing.assert_array_equal(dist, dist.T)
    np.testing.assert_array_equal(np.diag(dist), 0)
    assert dist.min() >= 0 and dist.max() <= 1
    assert (dist < 1).any() and (dist == 1).any()
    # 2 - sum(min) is sum(max): the brief's form is the weighted Jaccard distance.
    sparse = k_reciprocal_jaccard(x, 8, 3, sparse=True)
    assert sparse.nnz < 60 * 60 and (sparse.diagonal() == 0).all()


def test_duplicate_features_rank_themselves_first():
    x, _ = blobs()
    x[1] = x[0]
    dist = k_reciprocal_jaccard(x, 8, 3)
    np.testing.assert_allclose(dist, dense_reference_jaccard(x, 8, 3), atol=1e-6, rtol=0)
    assert dist[0, 1] == 0


def test_deterministic():
    x, _ = blobs(seed=3)
    np.testing.assert_array_equal(k_reciprocal_jaccard(x, 8, 3), k_reciprocal_jaccard(x, 8, 3))
    a, b = PseudoLabeler(k1=8, k2=3)(x), PseudoLabeler(k1=8, k2=3)(x)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_dbscan_recovers_blobs():
    # rho is the fraction of pairs the heuristic averages: the brief's 1.6e-3 suits ~600+
    # identities (Market-1501 has 751), so 40 blobs take a rho near twice their 2.3% of
    # same-blob pairs.
    x, truth = blobs(num_blobs=40, per_blob=10, spread=0.05, seed=4)
    result = PseudoLabeler(k1=8, k2=3, rho=0.05)(x)
    assert result.num_clusters == 40
    assert (result.labels >= 0).all()
    assert adjusted_rand_score(truth, result.labels) > 0.99
    sparse = PseudoLabeler(k1=8, k2=3, rho=0.05, sparse=True)(x)
    np.testing.assert_array_equal(sparse.labels, result.labels)


def test_eps_is_fixed_after_first_call():
    x, _ = blobs(num_blobs=40, per_blob=10, spread=0.05, seed=4)
    labeler = PseudoLabeler(k1=8, k2=3, rho=0.05)
    assert labeler.eps is None
    labeler(x)
    eps = labeler.eps
    assert eps == dbscan_eps(k_reciprocal_jaccard(x, 8, 3), 0.05)
    moved, _ = blobs(num_blobs=40, per_blob=10, spread=0.5, seed=7)
    assert dbscan_eps(k_reciprocal_jaccard(moved, 8, 3), 0.05) != eps
    labeler(moved)
    assert labeler.eps == eps
    preset = PseudoLabeler(k1=8, k2=3, eps=0.3)
    preset(x)
    assert preset.eps == 0.3


def test_eps_heuristic_by_hand():
    dist = np.array(
        [
            [0.0, 0.2, 0.9, 0.0],
            [0.2, 0.0, 0.4, 0.7],
            [0.9, 0.4, 0.0, 1.0],
            [0.0, 0.7, 1.0, 0.0],
        ]
    )
    # Non-zero upper values: 0.2 0.9 0.4 0.7 1.0 (the 0 between samples 0 and 3 is left out).
    assert dbscan_eps(dist, rho=0.4) == pytest.approx((0.2 + 0.4) / 2)
    assert dbscan_eps(dist, rho=0.01) == pytest.approx(0.2)  # at least one value
    assert dbscan_eps(dist, rho=1.0) == pytest.approx(3.2 / 5)
    x, _ = blobs(seed=5)
    dense = k_reciprocal_jaccard(x, 8, 3)
    sparse = k_reciprocal_jaccard(x, 8, 3, sparse=True)
    for rho in (1.6e-3, 0.05, 0.5):
        assert dbscan_eps(sparse, rho) == pytest.approx(dbscan_eps(dense, rho), abs=1e-12)


def test_cluster_labels_outliers():
    dist = np.ones((6, 6))
    dist[:4, :4] = 0.1
    np.fill_diagonal(dist, 0)
    np.testing.assert_array_equal(cluster(dist, eps=0.2, min_samples=4), [0, 0, 0, 0, -1, -1])


def test_centroids_unit_norm_and_match_loop():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(20, 5))
    labels = rng.integers(-1, 3, size=20)
    got = centroids(x, labels)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-12)
    for c in range(3):
        members = [x[i] / np.linalg.norm(x[i]) for i in range(20) if labels[i] == c]
        mean = np.mean(members, axis=0)
        np.testing.assert_allclose(got[c], mean / np.linalg.norm(mean), atol=1e-12)
    assert centroids(x.astype(np.float32), labels).dtype == np.float32
    assert centroids(x, np.full(20, -1)).shape == (0, 5)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda x: k_reciprocal_jaccard(x[0], 8, 3), "features"),
        (lambda x: k_reciprocal_jaccard(x[None], 8, 3), "features"),
        (lambda x: k_reciprocal_jaccard(x, 0, 1), "k1"),
        (lambda x: k_reciprocal_jaccard(x, 8, 9), "k2"),
        (lambda x: k_reciprocal_jaccard(x, 8, 0), "k2"),
        (lambda x: k_reciprocal_jaccard(x[:5], 8, 3), "k1"),
        (lambda x: k_reciprocal_jaccard(np.full((10, 2), np.nan), 3, 1), "features"),
        (lambda x: dbscan_eps(np.ones((3, 4))), "dist"),
        (lambda x: dbscan_eps(np.ones((4, 4)), rho=0), "rho"),
        (lambda x: cluster(np.ones((4, 4)), eps=-1), "eps"),
        (lambda x: cluster(np.ones((4, 4)), eps=0.5, min_samples=0), "min_samples"),
        (lambda x: centroids(x, np.zeros(3, int)), "labels"),
        (lambda x: centroids(x, np.r_[np.zeros(59, int), 2]), "labels"),
        (lambda x: PseudoLabeler(k1=80)(x), "k1"),
    ],
)
def test_bad_input_one_line_error(call, name):
    x, _ = blobs()
    with pytest.raises(LorexError) as info:
        call(x)
    message = str(info.value)
    assert message.startswith(f"{name}:") and "\n" not in message
