import numpy as np
import pytest
from PIL import Image

from lorex.data.market1501 import (
    FOLDERS,
    ReidSplit,
    parse_name,
    read_market1501,
    write_market1501,
)
from lorex.errors import LorexError

# Per folder: (file name, id) for a tiny hand-made dataset.
LAYOUT = {
    "bounding_box_train": [
        ("0002_c1s1_000451_03.jpg", 2),
        ("0002_c3s1_000551_01.jpg", 2),
        ("0007_c2s1_000101_01.png", 7),
        ("-1_c1s1_000001_00.jpg", -1),  # junk: dropped
        ("0000_c4s1_000002_00.jpg", 0),  # distractor: not a training identity
        ("1501_c6s4_001000_02.jpg", 1501),
    ],
    "query": [("0007_c1s1_000201_00.jpg", 7), ("0000_c1s1_000202_00.jpg", 0)],
    "bounding_box_test": [
        ("0007_c2s1_000301_00.jpg", 7),
        ("0000_c5s1_000302_00.jpg", 0),  # distractor: kept in the gallery
        ("-1_c1s1_000303_00.jpg", -1),  # junk: dropped
        ("0001_c2_f0046182.jpg", 1),  # a DukeMTMC-reID name
    ],
}


def make_layout(root, sizes=None):
    rng = np.random.default_rng(0)
    for folder, files in LAYOUT.items():
        (root / folder).mkdir(parents=True)
        for n, (name, _) in enumerate(files):
            h, w = (sizes or {}).get(name, (16, 8))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if n else np.zeros((h, w, 3))
            Image.fromarray(pixels.astype(np.uint8)).save(root / folder / name)
    (root / "bounding_box_train" / "Thumbs.db").write_bytes(b"not an image")
    (root / "query" / "readme.txt").write_text("ignored")
    return root


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("0002_c1s1_000451_03.jpg", (2, 0)),
        ("-1_c6s2_000001_00.png", (-1, 5)),
        ("0000_c3s1_000002_01.jpg", (0, 2)),
        ("0001_c2_f0046182.jpg", (1, 1)),
        ("0005_c12s1_000002_01.jpg", (5, 11)),
    ],
)
def test_parse_name(tmp_path, name, expected):
    assert parse_name(tmp_path / name) == expected


@pytest.mark.parametrize(
    "name", ["img_001.jpg", "0002_s1_000451.jpg", "0002_c0s1_000451_03.jpg", "-2_c1s1.jpg", "x.png"]
)
def test_bad_names_are_errors_naming_the_file(tmp_path, name):
    with pytest.raises(LorexError, match=name) as err:
        parse_name(tmp_path / name)
    assert "\n" not in str(err.value)
    make_layout(tmp_path / "root")
    Image.new("RGB", (8, 16)).save(tmp_path / "root" / "query" / name)
    with pytest.raises(LorexError, match=name):
        read_market1501(tmp_path / "root")


def test_parsing_rules(tmp_path):
    data = read_market1501(make_layout(tmp_path / "market"))
    assert data.name == "market"
    train, query, gallery = data.train, data.query, data.gallery
    # Junk and the distractor are dropped from train; ids are relabelled in id order.
    assert train.files == [
        "0002_c1s1_000451_03.jpg",
        "0002_c3s1_000551_01.jpg",
        "0007_c2s1_000101_01.png",
        "1501_c6s4_001000_02.jpg",
    ]
    assert train.raw_ids.tolist() == [2, 2, 7, 1501]
    assert train.ids.tolist() == [0, 0, 1, 2]
    assert train.id_map == {2: 0, 7: 1, 1501: 2}
    assert data.num_train_ids == 3
    assert train.cams.tolist() == [0, 2, 1, 5]
    # The query keeps real identities only; the gallery keeps the distractor, never junk.
    assert query.files == ["0007_c1s1_000201_00.jpg"] and query.ids.tolist() == [7]
    assert gallery.files == [
        "0000_c5s1_000302_00.jpg",
        "0001_c2_f0046182.jpg",
        "0007_c2s1_000301_00.jpg",
    ]
    assert gallery.ids.tolist() == [0, 1, 7] and gallery.cams.tolist() == [4, 1, 1]
    assert np.array_equal(gallery.raw_ids, gallery.ids)
    for split in (train, query, gallery):
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (16, 8, 3)
        assert len(split) == len(split.files) == len(split.cams)


def test_without_relabelling_train_keeps_file_ids(tmp_path):
    data = read_market1501(make_layout(tmp_path / "m"), relabel_train=False)
    assert data.train.ids.tolist() == [2, 2, 7, 1501]


def test_mixed_sizes_need_a_size(tmp_path):
    root = make_layout(tmp_path / "m", sizes={"0007_c2s1_000101_01.png": (20, 10)})
    with pytest.raises(LorexError, match="0007_c2s1_000101_01.png: image size 10x20") as err:
        read_market1501(root)
    assert "\n" not in str(err.value)
    data = read_market1501(root, size=(12, 6))
    for split in (data.train, data.query, data.gallery):
        assert split.images.shape[1:] == (12, 6, 3)


def test_missing_or_empty_folders(tmp_path):
    with pytest.raises(LorexError, match="directory not found"):
        read_market1501(tmp_path / "nothing")
    root = make_layout(tmp_path / "m")
    for f in (root / "query").iterdir():
        f.unlink()
    with pytest.raises(LorexError, match="query: no usable images"):
        read_market1501(root)
    (root / "query").rmdir()
    with pytest.raises(LorexError, match="query: directory not found"):
        read_market1501(root)


def random_split(rng, n, ids, cams, size=(16, 8)):
    # One flat colour per image: JPEG keeps it to within a few levels.
    colours = rng.integers(0, 256, (n, 1, 1, 3), dtype=np.uint8)
    images = np.broadcast_to(colours, (n, *size, 3)).copy()
    return ReidSplit(images, rng.choice(ids, n), rng.integers(0, cams, n))


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_round_trip_writer_to_loader(tmp_path, fmt):
    rng = np.random.default_rng(1)
    splits = {
        "train": random_split(rng, 12, [3, 5, 11, 12], 3),
        "query": random_split(rng, 5, [3, 5, -1], 3),  # junk is written, then dropped
        "gallery": random_split(rng, 9, [0, 3, 5, 12, -1], 6),
    }
    write_market1501(tmp_path / "out", splits, fmt=fmt)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FOLDERS.values())
    data = read_market1501(tmp_path / "out")
    for name, written in splits.items():
        read = getattr(data, name)
        # Read back in file-name order: match the images by the index written in each name.
        index = [int(f.split("_")[2]) for f in read.files]
        keep = written.raw_ids > 0 if name != "gallery" else written.raw_ids >= 0
        assert sorted(index) == np.flatnonzero(keep).tolist()
        assert read.raw_ids.tolist() == written.raw_ids[index].tolist()
        assert read.cams.tolist() == written.cams[index].tolist()
        assert all(f.endswith(f".{fmt}") for f in read.files)
        diff = np.abs(read.images.astype(int) - written.images[index].astype(int))
        assert diff.max() <= (0 if fmt == "png" else 8)
    assert data.train.ids.max() + 1 == len(set(data.train.raw_ids.tolist())) == data.num_train_ids
    # A dataset read back writes again (ids from raw_ids, not the relabelled ones).
    write_market1501(tmp_path / "again", data)
    again = read_market1501(tmp_path / "again")
    assert sorted(again.train.raw_ids.tolist()) == sorted(data.train.raw_ids.tolist())


def test_writer_replaces_a_folder_atomically(tmp_path):
    rng = np.random.default_rng(2)
    write_market1501(tmp_path, {"query": random_split(rng, 4, [1, 2], 2)})
    write_market1501(tmp_path, {"query": random_split(rng, 2, [1, 2], 2)})
    assert len(list((tmp_path / "query").iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["query"]  # no leftovers


def test_writer_and_split_errors(tmp_path):
    rng = np.random.default_rng(3)
    good = random_split(rng, 3, [1, 2], 2)
    with pytest.raises(LorexError, match="unknown split 'test'"):
        write_market1501(tmp_path, {"test": good})
    with pytest.raises(LorexError, match="fmt: "):
        write_market1501(tmp_path, {"query": good}, fmt="gif")
    with pytest.raises(LorexError, match="query: ids must be >= -1"):
        write_market1501(tmp_path, {"query": ReidSplit(good.images, [1, -2, 1], [0, 0, 0])})
    with pytest.raises(LorexError, match=r"^ids: expected shape \(3,\)"):
        ReidSplit(good.images, [1, 2], [0, 0, 0])
    with pytest.raises(LorexError, match="^images: expected uint8"):
        ReidSplit(good.images.astype(np.float32), [1, 2, 3], [0, 0, 0])
