"""Read and write the Market-1501 re-ID layout.

``ROOT/bounding_box_train/``, ``ROOT/query/`` and ``ROOT/bounding_box_test/`` (the gallery) hold
images named ``<id>_c<camera>...``, e.g. ``0002_c1s1_000451_03.jpg`` (Market-1501) or
``0001_c2_f0046182.jpg`` (DukeMTMC-reID). Id ``-1`` is junk and is dropped everywhere; id ``0``
is a distractor, kept in the gallery only. Cameras are numbered from 1 in names, from 0 here.
Training ids are relabelled 0..K-1 for classification; the ids in the names are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lorex.data.imagefolder import IMAGE_SUFFIXES, read_image
from lorex.errors import LorexError
from lorex.io import atomic_directory

FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
# At most 18 digits: ids and cameras are int64 (and int() refuses thousands of digits).
NAME = re.compile(r"^(?P<id>-1|\d{1,18})_c(?P<cam>\d{1,18})(?:[s_].*)?$")


@dataclass
class ReidSplit:
    """One split: images, ids (0..K-1 for a relabelled train split), 0-based cameras."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    ids: np.ndarray  # int64 (N,)
    cams: np.ndarray  # int64 (N,), 0-based
    files: list[str] = field(default_factory=list)  # file names, when read from a folder
    raw_ids: np.ndarray | None = None  # the ids in the file names; ``ids`` when not relabelled

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.cams = np.asarray(self.cams, dtype=np.int64)
        self.raw_ids = self.ids.copy() if self.raw_ids is None else np.asarray(self.raw_ids)
        self.raw_ids = self.raw_ids.astype(np.int64)
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise LorexError(
                f"images: expected uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}"
            )
        for name in ("ids", "cams", "raw_ids"):
            if getattr(self, name).shape != (n,):
                raise LorexError(f"{name}: expected shape ({n},), got {getattr(self, name).shape}")
        if self.files and len(self.files) != n:
            raise LorexError(f"files: expected {n} names, got {len(self.files)}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def id_map(self) -> dict[int, int]:
        """Id in the file names -> id used here (the identity for query and gallery)."""
        return {int(r): int(i) for r, i in zip(self.raw_ids, self.ids, strict=True)}


@dataclass
class Market1501:
    """The three splits of one re-ID dataset: train (relabelled), query and gallery."""

    train: ReidSplit
    query: ReidSplit
    gallery: ReidSplit
    name: str = ""

    @property
    def num_train_ids(self) -> int:
        return len(np.unique(self.train.ids))


def parse_name(path: Path) -> tuple[int, int]:
    """(id, 0-based camera) from a file name; a name that does not fit is a LorexError."""
    match = NAME.match(path.stem)
    if match is None or int(match["cam"]) < 1:
        raise LorexError(
            f"{path}: not a re-ID image name like 0002_c1s1_000451_03.jpg (<id>_c<camera>...)"
        )
    return int(match["id"]), int(match["cam"]) - 1


def _load(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    img = read_image(path)
    if size is not None and img.shape[:2] != tuple(size):
        img = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR))
    return img


def read_split(
    folder: Path, keep_distractors: bool, size: tuple[int, int] | None = None
) -> ReidSplit:
    """Read one folder, dropping junk (id -1) and, unless ``keep_distractors``, id 0."""
    if not folder.is_dir():
        raise LorexError(f"{folder}: directory not found")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise LorexError(f"size: expected (height, width) of positive integers, got {size!r}")
    entries = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue  # e.g. the Thumbs.db shipped with Market-1501
        pid, cam = parse_name(path)
        if pid > 0 or (pid == 0 and keep_distractors):
            entries.append((path, pid, cam))
    if not entries:
        raise LorexError(f"{folder}: no usable images (named like 0002_c1s1_000451_03.jpg)")
    images = []
    for path, _, _ in entries:
        img = _load(path, size)
        if images and img.shape != images[0].shape:
            raise LorexError(
                f"{path}: image size {img.shape[1]}x{img.shape[0]} differs from "
                f"{images[0].shape[1]}x{images[0].shape[0]} of the other images (pass a size)"
            )
        images.append(img)
    return ReidSplit(
        np.stack(images),
        np.array([pid for _, pid, _ in entries]),
        np.array([cam for _, _, cam in entries]),
        [path.name for path, _, _ in entries],
    )


def relabel(split: ReidSplit) -> ReidSplit:
    """The split with ids 0..K-1 in order of the original ids, which stay in ``raw_ids``."""
    raw = split.raw_ids
    _, labels = np.unique(raw, return_inverse=True)
    return ReidSplit(split.images, labels, split.cams, split.files, raw)


def read_market1501(
    root: str | Path, size: tuple[int, int] | None = None, relabel_train: bool = True
) -> Market1501:
    """Read the three splits of a Market-1501-style folder; ``size`` is (height, width).

    With ``size=None`` images keep their size, which must then be the same within a split.
    """
    root = Path(root)
    if not root.is_dir():
        raise LorexError(f"{root}: directory not found")
    train = read_split(root / FOLDERS["train"], keep_distractors=False, size=size)
    return Market1501(
        relabel(train) if relabel_train else train,
        read_split(root / FOLDERS["query"], keep_distractors=False, size=size),
        read_split(root / FOLDERS["gallery"], keep_distractors=True, size=size),
        root.name,
    )


def write_market1501(
    root: str | Path, splits: Market1501 | dict[str, ReidSplit], fmt: str = "png"
) -> None:
    """Write splits (``train``, ``query``, ``gallery``) in the Market-1501 layout.

    Names are ``<id>_c<camera>s1_<n>_00.<fmt>`` from ``raw_ids`` and 1-based cameras; each folder
    is written beside its target and renamed into place. PNG keeps the pixels exactly.
    """
    if isinstance(splits, Market1501):
        splits = {"train": splits.train, "query": splits.query, "gallery": splits.gallery}
    if fmt.lower() not in ("png", "jpg", "jpeg"):
        raise LorexError(f"fmt: expected png or jpg, got {fmt!r}")
    unknown = sorted(set(splits) - set(FOLDERS))
    if unknown:
        raise LorexError(f"splits: unknown split '{unknown[0]}' (expected {', '.join(FOLDERS)})")
    root = Path(root)
    for name, split in splits.items():
        if (split.raw_ids < -1).any() or (split.cams < 0).any():
            raise LorexError(f"{name}: ids must be >= -1 and cameras >= 0")
        with atomic_directory(root / FOLDERS[name]) as tmp:
            for n, (img, pid, cam) in enumerate(
                zip(split.images, split.raw_ids, split.cams, strict=True)
            ):
                pid_text = "-1" if pid < 0 else f"{pid:04d}"
                Image.fromarray(img).save(tmp / f"{pid_text}_c{cam + 1}s1_{n:06d}_00.{fmt}")
