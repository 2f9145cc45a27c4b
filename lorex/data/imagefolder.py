"""Read and write the ImageFolder layout: ``ROOT/[train|test/]<class>/<image>.png``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lorex.data.dataset import ImageDataset
from lorex.data.images import decode_image
from lorex.errors import LorexError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def read_image(path: Path) -> np.ndarray:
    """Decode one image to uint8 RGB ``(H, W, 3)``; an unreadable file is a LorexError naming it,
    and so is one over ``lorex.data.images.MAX_IMAGE_PIXELS`` (checked before decoding)."""
    return decode_image(path, lambda img: np.asarray(img.convert("RGB"), dtype=np.uint8))


def same_size(path: Path, shape: tuple[int, ...], first: tuple[int, ...] | None) -> tuple:
    """The size every image of a folder must have (the first one's); another size is a
    one-line error naming the image."""
    if first is not None and shape[:2] != first[:2]:
        raise LorexError(
            f"{path}: image size {shape[1]}x{shape[0]} differs from "
            f"{first[1]}x{first[0]} of the other images (mixed sizes)"
        )
    return first if first is not None else shape


def split_root(root: Path, split: str) -> Path:
    """``root/split`` when the folder has train/test sub-folders, else ``root`` itself."""
    return root / split if (root / split).is_dir() else root


def read_imagefolder(root: str | Path, split: str = "train") -> ImageDataset:
    root = Path(root)
    if not root.is_dir():
        raise LorexError(f"{root}: directory not found")
    folder = split_root(root, split)
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if (root / "train").is_dir() and split != "train" and not (root / split).is_dir():
        raise LorexError(f"{root}: has no '{split}' split folder")
    files = [
        (f, c)
        for c, d in enumerate(class_dirs)
        for f in sorted(d.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise LorexError(f"{folder}: no images found (expected <class>/<image>.png sub-folders)")
    images, labels, size = [], [], None
    for path, label in files:
        img = read_image(path)
        size = same_size(path, img.shape, size)
        images.append(img)
        labels.append(label)
    return ImageDataset(
        np.stack(images), np.asarray(labels), [d.name for d in class_dirs], root.name
    )


def write_imagefolder(dataset: ImageDataset, folder: str | Path) -> None:
    """Write ``folder/<class>/<n>.png``; class folders keep the dataset's class names."""
    folder = Path(folder)
    if dataset.frames > 1:
        raise LorexError(
            f"{dataset.name}: clips have no ImageFolder layout; use the built-in name directly"
        )
    for c in dataset.classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
    for n, (img, label) in enumerate(zip(dataset.images, dataset.labels, strict=True)):
        Image.fromarray(img).save(folder / dataset.classes[label] / f"{n}.png")
