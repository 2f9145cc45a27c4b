import numpy as np
import pytest
from PIL import Image

from lorex.cli import main
from lorex.data import load_dataset, load_paired, paired
from lorex.data import scene_render as sr
from lorex.data.paired import PairedDataset, read_paired_folder
from lorex.data.rgbx_synth import DEPTH_RANGE_MM, PAIRED, TI_CLASSES, TR_CLASSES, generate
from lorex.errors import LorexError

TINY = 3  # scenes per class


@pytest.fixture(scope="module")
def tiny():
    return {name: generate(name, "test", TINY) for name in ("rgbd/k1", "rgbd/k2", "rgbnir/a")}


def _scene(shape: int, center: list[float], scale: float, wall: float | None) -> sr.Scene:
    cam = sr.look_at(np.zeros((1, 3)), np.array([[0.0, 0.0, 1.0]]), 50.0)
    planes = np.zeros((1, 1, 4))
    if wall is not None:
        planes[0, 0] = [0.0, 0.0, -1.0, -wall]
    return sr.Scene(cam, planes, np.array([shape]), np.eye(3)[None], np.array([center]),
                    np.array([scale]))  # fmt: skip


def test_fronto_parallel_plane_depth_is_exact():
    hits = sr.render(_scene(-1, [0, 0, 0], 1.0, 2.5), (32, 32))
    assert hits.hit.all() and (hits.surface == 2).all()
    np.testing.assert_allclose(hits.depth[0], 2.5, atol=1e-4)
    np.testing.assert_allclose(hits.normal[0], np.broadcast_to([0, 0, -1.0], (32, 32, 3)))


def test_sphere_nearest_depth_is_centre_minus_radius():
    sphere = sr.SHAPE_NAMES.index("sphere")  # radius 0.8 object units
    hits = sr.render(_scene(sphere, [0, 0, 3.0], 0.5, None), (33, 33))
    assert hits.depth[0][hits.surface[0] == sr.OBJECT].min() == pytest.approx(3.0 - 0.4, abs=2e-4)
    assert hits.surface[0, 16, 16] == sr.OBJECT and not hits.hit[0, 0, 0]
    np.testing.assert_allclose(hits.normal[0, 16, 16], [0, 0, -1.0], atol=1e-3)


def test_generation_is_deterministic_and_sensors_differ(tiny):
    again = generate("rgbd/k1", "test", TINY)
    for key in ("rgb", "target", "labels"):
        np.testing.assert_array_equal(tiny["rgbd/k1"][key], again[key])
    assert not np.array_equal(tiny["rgbd/k1"]["rgb"], tiny["rgbd/k2"]["rgb"])
    assert not np.array_equal(tiny["rgbd/k1"]["target"], tiny["rgbd/k2"]["target"])


def test_shapes_dtypes_and_classes(tiny):
    d = tiny["rgbd/k1"]
    assert d["rgb"].shape == (6 * TINY, 32, 32, 3) and d["rgb"].dtype == np.uint8
    assert d["target"].dtype == np.uint16 and tiny["rgbnir/a"]["target"].dtype == np.uint8
    assert list(d["classes"]) == list(TR_CLASSES) and (np.diff(d["labels"]) >= 0).all()
    ti = generate("rgbd/ti", "test", 1)
    assert list(ti["classes"]) == list(TI_CLASSES) and set(ti["sensor"].tolist()) == {0, 1}
    assert PAIRED["rgbd/k1"].size("train") == 2400 and PAIRED["rgbd/ti"].size("test") == 200


def test_depth_sensor_models(tiny):
    k1, k2 = tiny["rgbd/k1"]["target"], tiny["rgbd/k2"]["target"]
    valid1 = k1[k1 > 0]
    assert (k1 == 0).mean() > 0.02  # holes
    assert valid1.min() >= 500 and valid1.max() <= 4500
    steps = np.diff(np.unique(valid1[valid1 > 3000]))  # disparity steps grow with z^2: > 2 cm
    assert np.median(steps) > 15
    valid2 = k2[k2 > 0]
    assert valid2.min() >= 500 and valid2.max() <= 8000 and np.unique(valid2).size > 1000


def _save16(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, np.uint16)).save(path)


def _save_rgb(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)


def test_folder_16bit_depth_round_trips(tmp_path):
    mm = np.random.default_rng(0).integers(0, 12000, (2, 8, 8))
    for i, cls in enumerate(("a", "b")):
        _save16(tmp_path / "depth" / cls / "x.png", mm[i])
        _save_rgb(tmp_path / "rgb" / cls / "x.png", i)
    assert Image.open(tmp_path / "depth/a/x.png").mode.startswith("I")
    data = read_paired_folder(tmp_path)
    assert (
        data.modality == "depth" and data.classes == ["a", "b"] and data.rgb.shape == (2, 8, 8, 3)
    )
    expected = np.clip(mm / DEPTH_RANGE_MM, 0, 1)
    assert np.abs(data.target - expected).max() * DEPTH_RANGE_MM <= 1.0
    assert data.target_tensor().shape == (2, 1, 8, 8) and data.rgb_tensor().shape == (2, 3, 8, 8)


def test_folder_8bit_depth_and_nir(tmp_path):
    for modality in ("depth", "nir"):
        root = tmp_path / modality
        grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
        (root / modality / "c").mkdir(parents=True)
        Image.fromarray(grey).save(root / modality / "c" / "0.png")
        _save_rgb(root / "rgb" / "c" / "0.png")
        data = load_paired(root)
        np.testing.assert_allclose(data.target[0], grey / 255.0, atol=1e-6)
        assert data.modality == modality


def test_without_rgb_never_reads_rgb(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("RGB was read")

    for cls in ("a", "b"):
        _save16(tmp_path / "depth" / cls / "0.png", np.full((8, 8), 1000))
        _save_rgb(tmp_path / "rgb" / cls / "0.png")
    load_paired("rgbd/k2", "test", with_rgb=True)  # fills the cache
    monkeypatch.setattr(paired, "read_rgb", forbidden)
    data = load_paired(tmp_path, with_rgb=False)
    assert data.rgb is None and len(data) == 2
    built = load_paired("rgbd/k2", "test", with_rgb=False, max_samples=12)
    assert built.rgb is None and len(built) == 12 and np.bincount(built.labels).tolist() == [2] * 6
    with pytest.raises(LorexError, match="without RGB"):
        built.rgb_tensor()
    with pytest.raises(AssertionError, match="RGB was read"):
        load_paired(tmp_path, with_rgb=True)


def test_one_line_errors(tmp_path):
    _save16(tmp_path / "p" / "depth" / "a" / "0.png", np.full((8, 8), 1000))
    _save_rgb(tmp_path / "p" / "rgb" / "a" / "0.png")
    _save_rgb(tmp_path / "p" / "rgb" / "a" / "lonely.png")
    with pytest.raises(LorexError, match="lonely.png: no partner") as err:
        load_paired(tmp_path / "p")
    assert "\n" not in str(err.value)
    (tmp_path / "e" / "depth" / "a").mkdir(parents=True)
    with pytest.raises(LorexError, match="no images found"):
        load_paired(tmp_path / "e", with_rgb=False)
    (tmp_path / "n").mkdir()
    with pytest.raises(LorexError, match="no depth/ or nir/"):
        load_paired(tmp_path / "n")
    with pytest.raises(LorexError, match="not a built-in name"):
        load_paired(tmp_path / "missing")
    (tmp_path / "p" / "depth" / "a" / "1.png").write_bytes(b"not a png")
    _save_rgb(tmp_path / "p" / "rgb" / "a" / "1.png")
    (tmp_path / "p" / "rgb" / "a" / "lonely.png").unlink()
    with pytest.raises(LorexError, match="1.png: unreadable image"):
        load_paired(tmp_path / "p")
    _save16(tmp_path / "p" / "depth" / "a" / "1.png", np.full((8, 8), 1000))
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(tmp_path / "p" / "rgb" / "a" / "1.png")
    with pytest.raises(LorexError, match="1.png: image size 8x9 differs"):
        load_paired(tmp_path / "p")


def test_damaged_cache_is_regenerated():
    from lorex.data.rgbx_synth import cache_path

    first = load_paired("rgbnir/ti", "test")
    cache_path("rgbnir/ti", "test").write_bytes(b"PK\x03\x04 damaged")
    again = load_paired("rgbnir/ti", "test")
    np.testing.assert_array_equal(first.rgb, again.rgb)
    np.testing.assert_array_equal(first.target, again.target)


def test_data_make_round_trip(tmp_path, capsys, monkeypatch):
    out = tmp_path / "k1"
    assert main(["data", "make", "rgbd/k1", "--out", str(out), "--max-samples", "12"]) == 0
    assert (out / "train" / "rgb" / "cone").is_dir() and (out / "test" / "depth" / "torus").is_dir()
    for split in ("train", "test"):
        built = load_paired("rgbd/k1", split, max_samples=12)
        back = load_paired(out, split)
        np.testing.assert_array_equal(back.rgb, built.rgb)
        np.testing.assert_array_equal(back.labels, built.labels)
        assert np.abs(back.target - built.target).max() * DEPTH_RANGE_MM <= 0.5
    again = tmp_path / "again"
    assert main(["data", "make", str(out), "--out", str(again)]) == 0
    np.testing.assert_array_equal(load_paired(again, "test").rgb, load_paired(out, "test").rgb)
    monkeypatch.setattr("lorex.data.BUILTINS", {})  # list only the paired sets: no generation
    assert main(["data", "list"]) == 0
    assert "rgbnir/ti" in capsys.readouterr().out


def test_registered_views_load():
    rgb = load_dataset("rgbnir/a/rgb", "test", max_samples=12)
    nir = load_dataset("rgbnir/a/nir", "test", max_samples=12)
    assert rgb.classes == list(TR_CLASSES) and rgb.images.shape == (12, 32, 32, 3)
    np.testing.assert_array_equal(rgb.labels, nir.labels)
    assert (nir.images[..., 0] == nir.images[..., 2]).all()
    full = load_paired("rgbnir/a", "test", max_samples=12)
    np.testing.assert_array_equal(rgb.images, full.rgb)
    with pytest.raises(LorexError, match="paired set"):
        load_dataset("rgbd/k1")
    # what `lorex data list` prints without generating the data is what loading gives
    from lorex.data import BUILTINS

    spec = BUILTINS["rgbnir/a/nir"]
    whole = load_dataset("rgbnir/a/nir", "test")
    assert spec.size("test") == len(whole) and list(spec.classes) == whole.classes


def test_subset_keeps_pairs_balanced():
    data = PairedDataset(
        np.zeros((10, 2, 2, 3), np.uint8), np.arange(40, dtype=np.float32).reshape(10, 2, 2) / 40,
        np.array([0] * 5 + [1] * 5), ["a", "b"], "nir", "x",
    )  # fmt: skip
    sub = data.subset(4, seed=1)
    assert np.bincount(sub.labels).tolist() == [2, 2]
    np.testing.assert_array_equal(sub.labels, data.rgb_view().subset(4, seed=1).labels)


def test_depth_is_stretched_per_image_for_models():
    depth = np.array([[[0.0, 0.1], [0.2, 0.3]], [[0.0, 0.0], [0.0, 0.0]]], np.float32)
    out = paired.stretch_depth(depth)
    np.testing.assert_allclose(out[0], [[0.0, 0.1], [0.55, 1.0]], atol=1e-6)  # near 0.1, far 1
    assert (out[1] == 0).all()  # an image of holes only stays 0
    data = PairedDataset(None, depth, np.array([0, 1]), ["a", "b"], "depth", "x")
    np.testing.assert_allclose(data.target_tensor()[:, 0].numpy(), out)
    assert data.target_view().images[0, 1, 1, 0] == 255
    nir = PairedDataset(None, depth, np.array([0, 1]), ["a", "b"], "nir", "x")
    np.testing.assert_array_equal(nir.target_tensor()[:, 0].numpy(), depth)  # NIR as it is
