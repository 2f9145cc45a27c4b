"""Paired RGB + depth / NIR datasets: built-in sets by name or folders by path.

Folder layout: ``ROOT/[train|test/]rgb/<class>/<name>.png`` beside ``depth/<class>/<name>.png``
(or ``nir/``); pairs match by class folder and file stem. Source-free cross-modal transfer must
be able to prove that it never looked at task-relevant RGB, so every RGB pixel passes through
:func:`read_rgb`, and ``with_rgb=False`` never calls it (nor reads the RGB array of a cache).
"""

from __future__ import annotations

import difflib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lorex.data import rgbx_synth
from lorex.data.dataset import ImageDataset
from lorex.data.imagefolder import IMAGE_SUFFIXES, read_image, same_size, split_root
from lorex.data.images import decode_image
from lorex.data.rgbx_synth import DEPTH_RANGE_MM, PAIRED, PAIRED_SETS
from lorex.errors import LorexError

MODALITIES = ("depth", "nir")
SPLITS = ("train", "test")


@dataclass
class PairedDataset:
    rgb: np.ndarray | None  # uint8 (N, H, W, 3); None when loaded without RGB
    target: np.ndarray  # float32 (N, H, W) in [0, 1] (depth: mm / DEPTH_RANGE_MM, 0 = hole)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    modality: str  # "depth" or "nir"
    name: str = ""

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"{self.name}: modality must be depth or nir, got {self.modality!r}")
        if self.target.ndim != 3 or len(self.target) != len(self.labels):
            raise ValueError(f"{self.name}: target must be (N, H, W) with N = {len(self.labels)}")
        if self.rgb is not None and self.rgb.shape != (*self.target.shape, 3):
            raise ValueError(f"{self.name}: rgb {self.rgb.shape} does not pair with target")
        self.target = self.target.astype(np.float32, copy=False)
        self.labels = self.labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def model_input(self) -> np.ndarray:
        """What a model sees of the target modality, float ``(N, H, W)`` in [0, 1]: NIR as it is;
        depth stretched per image over its valid (non-zero) range, holes kept at 0.

        Why: raw depth over a 10 m scale puts a scene 0.5-3 m away into 5-30% of the range,
        where a network barely learns (a supervised vit-micro on rgbd/k2 depth reached 28% on six
        classes); per-image stretching, as RGB-D classifiers commonly do, keeps the geometry and
        drops the absolute scale, which differs between sensors anyway.
        """
        if self.modality != "depth":
            return self.target
        return stretch_depth(self.target)

    def target_tensor(self) -> torch.Tensor:
        """``model_input()`` as float ``(N, 1, H, W)`` in [0, 1]."""
        return torch.from_numpy(self.model_input()).unsqueeze(1).contiguous()

    def rgb_tensor(self) -> torch.Tensor:
        """RGB as float ``(N, 3, H, W)`` in [0, 1]."""
        return self.rgb_view().tensors()[0]

    def target_view(self) -> ImageDataset:
        """The target as an ordinary 3-channel uint8 dataset, for ``lorex train`` / ``eval``."""
        grey = np.clip(np.rint(self.model_input() * 255.0), 0, 255).astype(np.uint8)
        images = np.repeat(grey[..., None], 3, axis=-1)
        return ImageDataset(images, self.labels, self.classes, f"{self.name}/{self.modality}")

    def rgb_view(self) -> ImageDataset:
        if self.rgb is None:
            raise LorexError(f"{self.name}: loaded without RGB (with_rgb=False)")
        return ImageDataset(self.rgb, self.labels, self.classes, f"{self.name}/rgb")

    def subset(self, max_samples: int | None, seed: int = 0) -> PairedDataset:
        """A class-balanced, seeded subset (the same pairs ImageDataset.subset would pick)."""
        if max_samples is None or max_samples >= len(self):
            return self
        keep = balanced_indices(self.labels, len(self.classes), max_samples, seed)
        rgb = None if self.rgb is None else self.rgb[keep]
        return PairedDataset(
            rgb, self.target[keep], self.labels[keep], self.classes, self.modality, self.name
        )


def stretch_depth(depth: np.ndarray) -> np.ndarray:
    """Per image ``(N, H, W)``: valid depths mapped linearly from [min, max] to [0.1, 1] (near
    dark, far bright); holes (0) stay 0, darker than anything valid."""
    valid = depth > 0
    near = np.where(valid, depth, np.inf).min(axis=(1, 2), keepdims=True)
    top = np.where(valid, depth, -np.inf).max(axis=(1, 2), keepdims=True)
    lo = np.where(np.isfinite(near), near, 0.0)
    span = np.where(np.isfinite(top), top, 1.0) - lo
    out = 0.1 + 0.9 * (depth - lo) / np.maximum(span, 1e-6)
    return np.where(valid, out, 0.0).astype(np.float32)


def balanced_indices(labels: np.ndarray, num_classes: int, count: int, seed: int) -> np.ndarray:
    """Sorted indices of a round-robin, class-balanced random pick of ``count`` samples."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    picked: list[int] = []
    for rank in range(max((len(p) for p in per_class), default=0)):
        for idx in per_class:
            if rank < len(idx) and len(picked) < count:
                picked.append(int(idx[rank]))
    return np.sort(np.asarray(picked, dtype=np.int64))


def read_rgb(source: np.lib.npyio.NpzFile | Sequence[Path]) -> np.ndarray:
    """The one way RGB pixels of a paired set are read: a built-in cache or a folder's files.

    Loading with ``with_rgb=False`` never calls this, so tests can forbid it outright.
    """
    if isinstance(source, np.lib.npyio.NpzFile):
        return np.asarray(source["rgb"], dtype=np.uint8)
    images, size = [], None
    for path in source:
        images.append(read_image(path))
        size = same_size(path, images[-1].shape, size)
    return np.stack(images)


def _target_float(raw: np.ndarray, modality: str, bits: int) -> np.ndarray:
    """Raw sensor values to [0, 1]: 16-bit depth is millimetres, 8-bit anything is /255."""
    raw = raw.astype(np.float32)
    if bits == 8:
        return raw / 255.0
    if modality == "depth":
        return np.clip(raw / DEPTH_RANGE_MM, 0.0, 1.0)
    return np.clip(raw / 65535.0, 0.0, 1.0)


def _load_builtin(name: str, split: str, with_rgb: bool) -> PairedDataset:
    spec = PAIRED[name]
    bits = 16 if spec.modality == "depth" else 8
    for attempt in range(2):
        path = rgbx_synth.cache_path(name, split)
        if not path.is_file():
            path = rgbx_synth.write_cache(name, split)
        try:
            with np.load(path, allow_pickle=False) as z:  # each key is read only when asked
                labels, target = z["labels"], z["target"]
                classes = [str(c) for c in z["classes"]]
                rgb = read_rgb(z) if with_rgb else None
            return PairedDataset(
                rgb, _target_float(target, spec.modality, bits), labels, classes, spec.modality,
                name,
            )  # fmt: skip
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            if attempt:
                raise
            path.unlink(missing_ok=True)  # a damaged cache entry is regenerated
    raise AssertionError("unreachable")


def _decode_target(path: Path) -> tuple[np.ndarray, int]:
    """One depth/NIR image as raw values and its bit depth (8 or 16); size-capped like RGB."""

    def decode(img: Image.Image) -> tuple[np.ndarray, int]:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(img, dtype=np.int64).clip(0, 65535), 16
        return np.asarray(img.convert("L"), dtype=np.uint8), 8

    return decode_image(path, decode)


def _images(folder: Path) -> dict[str, Path]:
    return {
        f.stem: f
        for f in sorted(folder.iterdir())
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    }


def is_paired_folder(root: str | Path) -> bool:
    """True for a folder in the paired layout (has a depth/ or nir/ folder)."""
    folder = split_root(Path(root), "train")
    return folder.is_dir() and any((folder / m).is_dir() for m in MODALITIES)


def read_paired_folder(
    root: str | Path, split: str = "train", with_rgb: bool = True
) -> PairedDataset:
    """Read ``ROOT/[split/]rgb/<class>/`` and ``depth/<class>/`` (or ``nir/``) pairs."""
    root = Path(root)
    if not root.is_dir():
        raise LorexError(f"{root}: directory not found")
    if (root / "train").is_dir() and split != "train" and not (root / split).is_dir():
        raise LorexError(f"{root}: has no '{split}' split folder")
    folder = split_root(root, split)
    found = [m for m in MODALITIES if (folder / m).is_dir()]
    if not found:
        raise LorexError(
            f"{folder}: no depth/ or nir/ folder (expected rgb/<class>/ beside depth/<class>/ "
            "or nir/<class>/)"
        )
    if len(found) > 1:
        raise LorexError(f"{folder}: has both depth/ and nir/; keep one modality per folder")
    modality = found[0]
    tdir, rdir = folder / modality, folder / "rgb"
    classes = sorted(p.name for p in tdir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if with_rgb and not rdir.is_dir():
        raise LorexError(f"{rdir}: folder not found (load with with_rgb=False for {modality} only)")
    targets, rgb_files, labels = [], [], []
    for c, cls in enumerate(classes):
        tfiles = _images(tdir / cls)
        if with_rgb:
            rfiles = _images(rdir / cls) if (rdir / cls).is_dir() else {}
            for stem, path in rfiles.items():
                if stem not in tfiles:
                    raise LorexError(f"{path}: no partner {stem}.* in {tdir / cls}")
            for stem, path in tfiles.items():
                if stem not in rfiles:
                    raise LorexError(f"{path}: no partner {stem}.* in {rdir / cls}")
            rgb_files += [rfiles[s] for s in tfiles]
        targets += list(tfiles.values())
        labels += [c] * len(tfiles)
    if with_rgb:
        extra = sorted(
            p for p in rdir.iterdir() if p.is_dir() and p.name not in classes
        )  # an RGB class with no target class at all
        for d in extra:
            files = list(_images(d).values())
            if files:
                raise LorexError(f"{files[0]}: no partner in {tdir / d.name}")
    if not targets:
        raise LorexError(f"{tdir}: no images found (expected <class>/<image>.png sub-folders)")
    raw, bits, size = [], 16, None
    for path in targets:
        values, b = _decode_target(path)
        size = same_size(path, values.shape, size)
        raw.append(_target_float(values, modality, b))
        bits = min(bits, b)
    rgb = None
    if with_rgb:
        rgb = read_rgb(rgb_files)
        for path, img in zip(rgb_files, rgb, strict=True):
            if img.shape[:2] != size:
                raise LorexError(
                    f"{path}: image size {img.shape[1]}x{img.shape[0]} differs from its "
                    f"{modality} partner's {size[1]}x{size[0]} (mixed sizes)"
                )
    return PairedDataset(rgb, np.stack(raw), np.asarray(labels), classes, modality, root.name)


def write_paired_folder(data: PairedDataset, folder: str | Path) -> None:
    """Write ``folder/rgb/<class>/<n>.png`` and ``folder/<modality>/<class>/<n>.png``: depth as
    16-bit millimetres, NIR as 8-bit. Zero-padded names keep the order on reading back."""
    folder = Path(folder)
    if data.rgb is None:
        raise LorexError(f"{data.name}: loaded without RGB; cannot write RGB pairs")
    for sub in ("rgb", data.modality):
        for c in data.classes:
            (folder / sub / c).mkdir(parents=True, exist_ok=True)
    if data.modality == "depth":
        raw = np.clip(np.rint(data.target * DEPTH_RANGE_MM), 0, 65535).astype(np.uint16)
    else:
        raw = np.clip(np.rint(data.target * 255.0), 0, 255).astype(np.uint8)
    for n, (img, target, label) in enumerate(zip(data.rgb, raw, data.labels, strict=True)):
        cls = data.classes[label]
        Image.fromarray(img).save(folder / "rgb" / cls / f"{n:05d}.png")
        Image.fromarray(target).save(folder / data.modality / cls / f"{n:05d}.png")


def load_paired(
    name_or_dir: str | Path,
    split: str = "train",
    with_rgb: bool = True,
    max_samples: int | None = None,
    seed: int = 0,
) -> PairedDataset:
    """A built-in paired set by name (``rgbd/k1`` ...) or a paired folder by path."""
    if split not in SPLITS:
        raise LorexError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    name = str(name_or_dir)
    if name in PAIRED:
        data = _load_builtin(name, split, with_rgb)
    elif Path(name).exists():
        data = read_paired_folder(name, split, with_rgb)
    else:
        close = difflib.get_close_matches(name, PAIRED_SETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; built-in: {', '.join(PAIRED_SETS)}"
        raise LorexError(f"unknown paired set '{name}': not a built-in name nor a directory{hint}")
    return data.subset(max_samples, seed)
