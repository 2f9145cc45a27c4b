import numpy as np
import pytest
import torch

from lorex.errors import LorexError
from lorex.metrics import reid
from lorex.metrics._reid_reference import reference_evaluate_loop
from lorex.metrics.reid import reid_scores as evaluate

# Gallery: ids and cameras of six images.
G_IDS = np.array([1, 2, 1, 0, 1, 3])
G_CAMS = np.array([0, 1, 1, 2, 2, 0])


def hand_case():
    """Three queries; the metrics worked out by hand below.

    q0 (id 1, cam 0), distances ascend g0..g5. g0 has id 1 and cam 0: removed. The kept ranking
    g1 g2 g3 g4 g5 has hits 0 1 0 1 0 (g3 is an id-0 distractor, a plain negative).
    AP = (1/2 + 2/4) / 2 = 1/2; first hit at rank 2; INP = 2 positives / rank 4 = 1/2.
    q1 (id 2, cam 1): its only id-2 image, g1, is in cam 1 too, so it is removed: skipped.
    q2 (id 3, cam 1): nothing removed; g0 is farthest, so g5 (id 3, cam 0) is ranked fifth.
    AP = 1/5; first hit at rank 5; INP = 1 positive / rank 5 = 1/5.
    Valid queries 2: mAP = mINP = (1/2 + 1/5) / 2 = 0.35; CMC = [0, .5, .5, .5, 1, 1, 1, 1].
    """
    dist = np.array(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],
        ]
    )
    return dist, np.array([1, 2, 3]), G_IDS, np.array([0, 1, 1]), G_CAMS


EXPECTED_CMC = np.array([0, 0.5, 0.5, 0.5, 1, 1, 1, 1])


def random_case(rng, num_q=40, num_g=120, num_ids=12, num_cams=3, ties=False):
    q_ids = rng.integers(0, num_ids, num_q)
    g_ids = rng.integers(-1, num_ids, num_g)  # -1 junk and 0 distractors included
    q_cams = rng.integers(0, num_cams, num_q)
    g_cams = rng.integers(0, num_cams, num_g)
    if ties:
        dist = rng.integers(0, 6, (num_q, num_g)).astype(np.float32)
    else:
        dist = rng.random((num_q, num_g))
    return dist, q_ids, g_ids, q_cams, g_cams


def assert_same(a, b, tol=1e-12):
    assert a["num_valid_queries"] == b["num_valid_queries"]
    assert a["mAP"] == pytest.approx(b["mAP"], abs=tol)
    assert a["mINP"] == pytest.approx(b["mINP"], abs=tol)
    assert a["cmc"].shape == b["cmc"].shape
    np.testing.assert_allclose(a["cmc"], b["cmc"], rtol=0, atol=tol)


@pytest.mark.parametrize("fn", [evaluate, reference_evaluate_loop])
def test_hand_computed_case(fn):
    out = fn(*hand_case(), max_rank=8)
    assert out["num_valid_queries"] == 2
    assert out["mAP"] == pytest.approx(0.35, abs=1e-15)
    assert out["mINP"] == pytest.approx(0.35, abs=1e-15)
    np.testing.assert_allclose(out["cmc"], EXPECTED_CMC, atol=1e-15)
    assert isinstance(out["mAP"], float) and isinstance(out["num_valid_queries"], int)


@pytest.mark.parametrize("chunk", [1, 7, 1000, reid.CHUNK_ELEMENTS])
@pytest.mark.parametrize("ties", [False, True])
def test_random_cases_match_the_loop(monkeypatch, chunk, ties):
    monkeypatch.setattr(reid, "CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(chunk + ties)
    for _ in range(15):
        case = random_case(rng, num_q=int(rng.integers(1, 40)), ties=ties)
        max_rank = int(rng.integers(1, 150))  # also longer than the gallery
        try:
            expected = reference_evaluate_loop(*case, max_rank)
        except LorexError:  # no valid query at all: evaluate must say so too
            with pytest.raises(LorexError):
                evaluate(*case, max_rank)
            continue
        assert_same(evaluate(*case, max_rank), expected)


def test_torchreid_style_loop_options_agree_without_ties():
    case = random_case(np.random.default_rng(3))
    fast = reference_evaluate_loop(*case, sort_kind="quicksort", python_precision=False)
    assert_same(evaluate(*case), fast)
    assert_same(evaluate(*case), reference_evaluate_loop(*case, sort_kind="quicksort"))


def test_ties_are_broken_by_gallery_order():
    # All distances equal: the ranking is the gallery order g0..g5, as in the hand case.
    dist, q_ids, g_ids, q_cams, g_cams = hand_case()
    flat = np.zeros((2, 6))
    out = evaluate(flat, q_ids[[0, 2]], g_ids, q_cams[[0, 2]], g_cams, max_rank=8)
    ranked = evaluate(dist[[0, 1]], q_ids[[0, 2]], g_ids, q_cams[[0, 2]], g_cams, max_rank=8)
    assert_same(out, ranked)


def test_same_id_same_camera_is_removed():
    # One gallery image of the query's id in the query's camera, closest of all: not a match.
    dist = np.array([[0.0, 0.5, 1.0]])
    out = evaluate(dist, [7], [7, 3, 7], [2], [2, 2, 0], max_rank=3)
    assert out["mAP"] == pytest.approx(0.5)  # the cam-0 image is second after the removal
    np.testing.assert_allclose(out["cmc"], [0, 1, 1])
    # Same id in another camera counts; a different id in the same camera is a negative.
    out = evaluate(dist, [7], [7, 3, 7], [1], [2, 2, 0], max_rank=3)
    assert out["mAP"] == pytest.approx((1 + 2 / 3) / 2)


def test_queries_without_a_valid_match_are_skipped():
    dist, q_ids, g_ids, q_cams, g_cams = hand_case()
    alone = evaluate(dist[[0]], q_ids[[0]], g_ids, q_cams[[0]], g_cams)
    with_skipped = evaluate(dist[[0, 1]], q_ids[[0, 1]], g_ids, q_cams[[0, 1]], g_cams)
    assert with_skipped["num_valid_queries"] == 1
    assert_same(alone, with_skipped, tol=0)
    with pytest.raises(LorexError, match="no query has a valid match") as err:
        evaluate(dist[[1]], q_ids[[1]], g_ids, q_cams[[1]], g_cams)
    assert "\n" not in str(err.value)


def test_junk_gallery_entries_are_ignored_and_distractors_count_as_negatives():
    dist, q_ids, g_ids, q_cams, g_cams = hand_case()
    base = evaluate(dist, q_ids, g_ids, q_cams, g_cams)
    # A junk (-1) image closest to every query, and one of the query's camera: no effect.
    junk = evaluate(
        np.c_[np.full(3, -1.0), dist, np.zeros(3)],
        q_ids,
        np.r_[-1, g_ids, -1],
        q_cams,
        np.r_[1, g_cams, 0],
    )
    assert_same(base, junk, tol=0)
    # A distractor (id 0) closest to every query pushes each positive one rank down.
    extra = evaluate(
        np.c_[np.full(3, -1.0), dist], q_ids, np.r_[0, g_ids], q_cams, np.r_[1, g_cams]
    )
    assert extra["mAP"] == pytest.approx(((1 / 3 + 2 / 5) / 2 + 1 / 6) / 2)
    assert extra["cmc"][1] == 0 and extra["cmc"][2] == 0.5


def test_per_query_ap_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    dist, q_ids, g_ids, q_cams, g_cams = random_case(np.random.default_rng(5))
    checked = 0
    for q in range(len(q_ids)):
        keep = ~((g_ids == q_ids[q]) & (g_cams == q_cams[q])) & (g_ids >= 0)
        truth = g_ids[keep] == q_ids[q]
        if not truth.any():
            continue
        expected = sklearn_metrics.average_precision_score(truth, -dist[q, keep])
        got = evaluate(dist[[q]], q_ids[[q]], g_ids, q_cams[[q]], g_cams)["mAP"]
        assert got == pytest.approx(expected, abs=1e-12)
        checked += 1
    assert checked > 10


def test_torch_tensors_and_lists_are_accepted():
    case = random_case(np.random.default_rng(6))
    tensors = [torch.as_tensor(x) for x in case]
    assert_same(evaluate(*case), evaluate(*tensors), tol=0)
    assert_same(evaluate(*case), evaluate(*[x.tolist() for x in case]), tol=0)


@pytest.mark.parametrize(
    ("index", "bad", "field"),
    [
        (0, np.zeros(6), "distmat"),
        (0, np.zeros((3, 0)), "distmat"),
        (0, np.full((3, 6), np.nan), "distmat"),
        (0, np.full((3, 6), "a"), "distmat"),
        (1, np.array([1, 2]), "query_ids"),
        (1, np.array([1.0, 2.0, 3.0]), "query_ids"),
        (2, np.array([1, 2, 3]), "gallery_ids"),
        (3, np.zeros((3, 1), dtype=int), "query_cams"),
        (4, np.zeros(7, dtype=int), "gallery_cams"),
    ],
)
def test_bad_inputs_name_the_field(index, bad, field):
    args = list(hand_case())
    args[index] = bad
    with pytest.raises(LorexError, match=f"^{field}: ") as err:
        evaluate(*args)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("max_rank", [0, -1, 2.5, True])
def test_bad_max_rank(max_rank):
    with pytest.raises(LorexError, match="^max_rank: "):
        evaluate(*hand_case(), max_rank=max_rank)


def test_per_query_average_precisions_average_to_map():
    dist, q_ids, g_ids, q_cams, g_cams = random_case(np.random.default_rng(3), 40, 200, 8, 3)
    out = evaluate(dist, q_ids, g_ids, q_cams, g_cams)
    assert len(out["ap"]) == out["num_valid_queries"]
    assert float(np.mean(out["ap"])) == pytest.approx(out["mAP"], abs=1e-15)


def test_random_ranking_map_matches_the_closed_form():
    """One true match among G gallery images: a random ranking puts it at rank r with
    probability 1/G, so the expected AP is H_G / G (the harmonic number)."""
    g = 10
    q_ids, q_cams = np.zeros(2000, dtype=int), np.zeros(2000, dtype=int)
    g_ids = np.r_[0, np.arange(1, g)]  # one match (id 0), nine other identities
    g_cams = np.ones(g, dtype=int)
    expected = sum(1.0 / r for r in range(1, g + 1)) / g
    value = reid.random_ranking_map(q_ids, g_ids, q_cams, g_cams, draws=20)
    # 40,000 random rankings: the standard error is about 0.0015.
    assert value == pytest.approx(expected, abs=0.0075)
    assert value != pytest.approx(1.0 / g, abs=0.05)  # not the naive 1/G
