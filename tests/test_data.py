import numpy as np
import pytest

from lorex.data import (
    BUILTINS,
    ImageDataset,
    digits,
    load_dataset,
    pretrain,
    read_imagefolder,
    registry,
    sources,
    write_imagefolder,
)
from lorex.data.dataset import stratified_split
from lorex.errors import LorexError


@pytest.fixture
def small_generators(monkeypatch):
    monkeypatch.setattr(digits, "SYN_SIZES", {"train": 60, "test": 20})
    monkeypatch.setattr(pretrain, "PER_CLASS", {"train": 3, "test": 1})


@pytest.mark.parametrize(
    "make",
    [
        digits.make_mnist,
        digits.make_mnistm,
        digits.make_syn,
        digits.make_optdigits,
        pretrain.make_chars,
    ],
)
@pytest.mark.parametrize("split", ["train", "test"])
def test_generator_shapes_balance_and_determinism(make, split, small_generators):
    a, b = make(split), make(split)
    spec = BUILTINS[a.name]  # what `lorex data list` reports without generating
    assert spec.size(split) == len(a) and list(spec.classes) == a.classes
    assert a.images.dtype == np.uint8 and a.images.shape[1:] == (32, 32, 3)
    assert a.labels.min() >= 0 and a.labels.max() < len(a.classes)
    counts = a.class_counts()
    assert counts.min() > 0 and counts.max() - counts.min() <= max(2, 0.1 * counts.mean())
    np.testing.assert_array_equal(a.images, b.images)  # same seed, same pixels
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.images.std() > 10  # not blank


def test_mnist_split_is_fixed_disjoint_and_real():
    x, y = sources.mnist()
    train, test = stratified_split(y, digits.TEST_FRACTION, digits.SPLIT_SEED)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == len(y) == 5000
    data = digits.make_mnist("test")
    np.testing.assert_array_equal(data.images[:, 2:30, 2:30, 0], x[test])  # padded, unchanged
    np.testing.assert_array_equal(data.labels, y[test])
    assert np.all(data.images[:, :2] == 0)


def test_mnistm_follows_the_recipe():
    """|digit - patch| per channel, checked pixel by pixel against the seeded photo crops."""
    mnist, mnistm = digits.make_mnist("test"), digits.make_mnistm("test")
    np.testing.assert_array_equal(mnist.labels, mnistm.labels)
    patches = digits.mnistm_patches(len(mnist), "test")
    for i in range(0, len(mnist), 97):
        for y in range(0, 32, 3):
            for x in range(0, 32, 3):
                for c in range(3):
                    want = abs(float(patches[i, y, x, c]) - float(mnist.images[i, y, x, 0]))
                    assert mnistm.images[i, y, x, c] == min(255, max(0, round(want)))
    assert mnistm.images.std(axis=-1).mean() > 5  # colour, not grey
    assert len({p.tobytes() for p in patches[:50]}) == 50  # a different crop per image


def test_optdigits_matches_sklearn():
    x, y = sources.optdigits()
    train, test = stratified_split(y, digits.TEST_FRACTION, digits.SPLIT_SEED)
    data = digits.make_optdigits("train")
    np.testing.assert_array_equal(data.labels, y[train])
    # Downsampling the 28x28 image back to 8x8 must correlate strongly with the original.
    from PIL import Image

    back = np.stack(
        [
            np.asarray(Image.fromarray(im[2:30, 2:30, 0]).resize((8, 8), Image.BOX))
            for im in data.images[:50]
        ]
    ).astype(float)
    corr = np.corrcoef(back.ravel(), x[train[:50]].ravel())[0, 1]
    assert corr > 0.9


def test_syn_labels_are_the_centre_digit(small_generators):
    data = digits.make_syn("train")
    assert data.classes == [str(d) for d in range(10)]
    assert set(np.unique(data.labels)) == set(range(10))


def test_cache_is_reused(monkeypatch, lorex_cache):
    spec = BUILTINS["digits/optdigits"]
    first = load_dataset("digits/optdigits", "test")
    assert registry._cache_path(spec, "test").is_file()

    def boom(split):
        raise AssertionError("regenerated although cached")

    monkeypatch.setitem(BUILTINS, "digits/optdigits", registry.BuiltinDataset(spec.name, boom, ""))
    second = load_dataset("digits/optdigits", "test")
    np.testing.assert_array_equal(first.images, second.images)


def test_subset_is_balanced_and_seeded():
    data = load_dataset("digits/mnist", "train")
    a = data.subset(100, seed=3)
    assert len(a) == 100 and np.all(a.class_counts() == 10)
    np.testing.assert_array_equal(a.images, data.subset(100, seed=3).images)
    assert not np.array_equal(a.images, data.subset(100, seed=4).images)


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(LorexError, match="did you mean 'digits/mnist'"):
        load_dataset("digits/mnsit")


def _tiny(n=12, size=8, classes=("a", "b", "c")):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ImageDataset(images, np.arange(n) % len(classes), list(classes), "tiny")


def test_imagefolder_round_trip(tmp_path):
    data = _tiny()
    write_imagefolder(data, tmp_path / "train")
    back = read_imagefolder(tmp_path, "train")
    assert back.classes == data.classes
    order = np.lexsort((np.arange(len(data)), data.labels))
    # Files are read class by class; within a class they are sorted by name, not number.
    for c in range(3):
        got = {bytes(im) for im in back.images[back.labels == c]}
        assert got == {bytes(im) for im in data.images[data.labels == c]}
    assert len(order) == len(back)
    # A dataset given by path works wherever a name does.
    assert len(load_dataset(str(tmp_path), "train")) == len(data)


def test_imagefolder_bad_input(tmp_path):
    with pytest.raises(LorexError, match="directory not found"):
        read_imagefolder(tmp_path / "nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(LorexError, match="no images"):
        read_imagefolder(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    write_imagefolder(_tiny(size=8), mixed)
    from PIL import Image

    Image.new("RGB", (9, 9)).save(mixed / "a" / "zz.png")
    with pytest.raises(LorexError, match="mixed sizes"):
        read_imagefolder(mixed)
    broken = tmp_path / "broken"
    write_imagefolder(_tiny(), broken)
    (broken / "b" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(LorexError, match="bad.png: unreadable image"):
        read_imagefolder(broken)
