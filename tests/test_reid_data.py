import dataclasses

import numpy as np
import pytest

from lorex.cli import main
from lorex.data import reid_synth
from lorex.data.market1501 import Market1501, read_market1501
from lorex.data.reid_synth import DOMAINS, REID_DOMAINS, generate, load_reid, make_reid_domain
from lorex.errors import LorexError

TINY = 16  # identities per tiny domain: 8 train, 8 test, 8 distractors


@pytest.fixture(scope="module")
def tiny():
    """Every domain once, shrunk to TINY identities (same cameras and style)."""
    return {name: generate(DOMAINS[name], TINY) for name in REID_DOMAINS}


def splits(data: Market1501):
    return {"train": data.train, "query": data.query, "gallery": data.gallery}


def test_four_domains_with_their_camera_counts():
    assert REID_DOMAINS[:4] == ["reid/a", "reid/b", "reid/c", "reid/d"]
    assert [DOMAINS[n].cameras for n in REID_DOMAINS] == [4, 6, 3, 5]
    assert all(300 <= DOMAINS[n].num_ids <= 500 for n in REID_DOMAINS)


def test_deterministic(tiny):
    again = generate(DOMAINS["reid/b"], TINY)
    for name, split in splits(tiny["reid/b"]).items():
        other = getattr(again, name)
        for field in ("images", "ids", "cams", "raw_ids"):
            np.testing.assert_array_equal(getattr(split, field), getattr(other, field))


def test_shapes_ids_and_cameras(tiny):
    for name, data in tiny.items():
        for split in splits(data).values():
            assert split.images.dtype == np.uint8 and split.images.shape[1:] == (64, 32, 3)
            assert split.ids.dtype == np.int64 and split.cams.dtype == np.int64
            assert 0 <= split.cams.min() and split.cams.max() < DOMAINS[name].cameras
        train = data.train
        assert sorted(set(train.ids.tolist())) == list(range(TINY // 2))  # relabelled 0..K-1
        assert np.unique(train.raw_ids).size == TINY // 2 and train.raw_ids.min() > 0
        # every identity is seen by at least two cameras
        for pid in np.unique(train.raw_ids):
            assert np.unique(train.cams[train.raw_ids == pid]).size >= 2


def test_train_and_test_ids_disjoint_and_queries_matchable(tiny):
    for data in tiny.values():
        train, query, gallery = data.train, data.query, data.gallery
        test_ids = set(gallery.ids[gallery.ids > 0].tolist())
        assert not set(train.raw_ids.tolist()) & test_ids
        assert set(query.ids.tolist()) == test_ids and len(test_ids) == TINY // 2
        pairs = list(zip(query.ids.tolist(), query.cams.tolist(), strict=True))
        assert len(pairs) == len(set(pairs))  # one query per (id, camera)
        for pid, cam in pairs:
            match = gallery.ids == pid
            assert (match & (gallery.cams != cam)).any()  # a match in another camera
        for pid in test_ids:  # some camera of each id is never queried
            seen = set(gallery.cams[gallery.ids == pid].tolist())
            assert seen - set(query.cams[query.ids == pid].tolist())


def test_distractors_only_in_gallery(tiny):
    for data in tiny.values():
        assert (data.gallery.ids == 0).sum() == TINY // 2
        assert (data.query.ids > 0).all() and (data.train.raw_ids > 0).all()


def _hist(images):
    """Colour histograms (4 levels a channel) of the central, mostly-person region."""
    q = (images[:, 8:60, 6:26] // 64).astype(np.int64).reshape(len(images), -1, 3)
    code = q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]
    h = np.stack([np.bincount(c, minlength=64) for c in code]).astype(np.float64)
    return h / h.sum(1, keepdims=True)


def test_an_identity_looks_alike_across_its_images(tiny):
    for data in tiny.values():
        h, ids = _hist(data.train.images), data.train.ids
        dist = np.abs(h[:, None] - h[None]).sum(-1) / 2
        same = ids[:, None] == ids[None]
        within = dist[same & ~np.eye(len(ids), dtype=bool)].mean()
        assert within < 0.9 * dist[~same].mean()


def test_domains_differ_in_light_and_colour(tiny):
    means = {n: d.train.images.reshape(-1, 3).mean(0) for n, d in tiny.items()}
    for i, a in enumerate(REID_DOMAINS):
        for b in REID_DOMAINS[i + 1 :]:
            assert np.abs(means[a] - means[b]).max() > 10, (a, b, means[a], means[b])
    brightness = {n: m.mean() for n, m in means.items()}
    assert brightness["reid/a"] > brightness["reid/b"] > brightness["reid/d"]
    assert means["reid/c"][2] < means["reid/c"][0] - 20  # yellow cast
    # blur and low resolution: neighbouring pixels differ less in the low-res domains
    sharp = {n: np.abs(np.diff(d.train.images.astype(int), axis=2)).mean() for n, d in tiny.items()}
    assert sharp["reid/a"] > sharp["reid/c"]


def test_cache_and_damaged_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOREX_CACHE_DIR", str(tmp_path))
    first = make_reid_domain("reid/c", num_ids=4)
    (path,) = (tmp_path / "datasets").glob("reid__c-v*-ids4.npz")
    cached = make_reid_domain("reid/c", num_ids=4)
    np.testing.assert_array_equal(first.gallery.images, cached.gallery.images)
    np.testing.assert_array_equal(first.train.raw_ids, cached.train.raw_ids)
    path.write_bytes(b"damaged")
    again = make_reid_domain("reid/c", num_ids=4)
    np.testing.assert_array_equal(first.query.images, again.query.images)
    assert path.stat().st_size > 1000


def test_load_reid_names_paths_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("LOREX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(DOMAINS, "reid/a", dataclasses.replace(DOMAINS["reid/a"], num_ids=4))
    data = load_reid("reid/a", size=(32, 16))
    assert data.train.images.shape[1:] == (32, 16, 3)
    with pytest.raises(LorexError, match="did you mean 'reid/b'"):
        load_reid("reid/bb")
    with pytest.raises(LorexError, match="unknown re-ID dataset"):
        make_reid_domain("digits/mnist")


def test_cli_make_writes_market1501_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOREX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(DOMAINS, "reid/a", dataclasses.replace(DOMAINS["reid/a"], num_ids=6))
    out = tmp_path / "market"
    assert main(["data", "make", "reid/a", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    made, back = make_reid_domain("reid/a"), read_market1501(out)
    assert reid_synth.split_sizes("reid/a") == {s: len(getattr(made, s)) for s in splits(made)}
    for name, split in splits(made).items():
        other = getattr(back, name)
        np.testing.assert_array_equal(split.images, other.images)  # PNG is lossless
        for field in ("ids", "cams", "raw_ids"):
            np.testing.assert_array_equal(getattr(split, field), getattr(other, field))
    # the folder is also a re-ID dataset by path
    np.testing.assert_array_equal(load_reid(out).query.ids, made.query.ids)


def test_cli_unknown_reid_name(tmp_path, capsys):
    code = main(["data", "make", "reid/zz", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown re-ID dataset 'reid/zz'" in err
    assert not (tmp_path / "x").exists()
