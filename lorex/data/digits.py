"""The four digit domains: real MNIST, MNIST-M, synthetic font digits, and UCI optdigits.

All are 32x32 RGB with classes "0".."9" and fixed, seeded train/test splits.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from lorex.data import render, sources
from lorex.data.dataset import ImageDataset, stratified_split

SIZE = 32
DIGITS = [str(d) for d in range(10)]
SPLIT_SEED = 1234  # fixed: the test split never changes between runs or machines
TEST_FRACTION = 0.2


def _split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """The fixed, stratified split of a real source's images."""
    train, test = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    return train if split == "train" else test


def _mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST padded from 28x28 to 32x32 (as the digit-DA literature does), one fixed split."""
    x, y = sources.mnist()
    idx = _split_indices(y, split)
    padded = np.pad(x[idx], ((0, 0), (2, 2), (2, 2)))
    return padded, y[idx]


def mnist_size(split: str) -> int:
    """The split's size without generating it (``lorex data list``): labels only."""
    return len(_split_indices(sources.mnist()[1], split))


def optdigits_size(split: str) -> int:
    return len(_split_indices(sources.optdigits()[1], split))


def syn_size(split: str) -> int:
    return SYN_SIZES[split]


def make_mnist(split: str) -> ImageDataset:
    grey, labels = _mnist_split(split)
    return ImageDataset(np.repeat(grey[..., None], 3, axis=-1), labels, DIGITS, "digits/mnist")


def mnistm_patches(n: int, split: str) -> np.ndarray:
    """The seeded random photo crops, float32 ``(n, 32, 32, 3)``, that MNIST-M blends with."""
    rng = np.random.default_rng([SPLIT_SEED, 1, split == "train"])
    pool = sources.photos()
    return np.stack(
        [
            render.random_crop(rng, pool[int(rng.integers(len(pool)))], SIZE, (SIZE, 4 * SIZE))
            for _ in range(n)
        ]
    )


def make_mnistm(split: str) -> ImageDataset:
    """MNIST-M recipe: ``|digit - patch|`` per channel with a random crop of a real colour photo."""
    grey, labels = _mnist_split(split)
    patches = mnistm_patches(len(grey), split)
    out = render.to_uint8(np.abs(patches - grey[..., None].astype(np.float32)))
    return ImageDataset(out, labels, DIGITS, "digits/mnistm")


SYN_SIZES = {"train": 5000, "test": 1000}
SYN_STYLE = render.GlyphStyle(
    font_px=(18, 30), stroke=(0, 2), max_rotation=15, blurs=(0.0, 0.0, 0.5, 0.8), max_noise=8
)


def make_syn(split: str) -> ImageDataset:
    """SynDigits style: 1-3 font digits (the centre one is the label) on cluttered backgrounds."""
    n = syn_size(split)
    rng = np.random.default_rng([SPLIT_SEED, 2, split == "train"])
    fonts = sources.font_paths()
    labels = np.arange(n, dtype=np.int64) % 10
    rng.shuffle(labels)
    out = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        fg, bg = render.contrasting_colours(rng)
        image = render.gradient_background(rng, SIZE, bg)
        image = render.clutter(rng, SIZE, image, int(rng.integers(0, 4)))
        n_side = int(rng.integers(0, 2))  # neighbours left and right, partly cut off by the frame
        text = "".join(str(d) for d in rng.integers(0, 10, n_side)) + str(label)
        text += "".join(str(d) for d in rng.integers(0, 10, n_side))
        out[i] = render.paint_glyph(rng, image, text, fonts, fg, SYN_STYLE)
    return ImageDataset(out, labels, DIGITS, "digits/syn")


def make_optdigits(split: str) -> ImageDataset:
    """UCI 8x8 digits (values 0..16) upsampled to 28x28 and padded to 32x32, like USPS for MNIST."""
    x, y = sources.optdigits()
    idx = _split_indices(y, split)
    out = np.empty((len(idx), SIZE, SIZE, 3), dtype=np.uint8)
    for j, i in enumerate(idx):
        grey = Image.fromarray((x[i] * (255.0 / 16.0)).astype(np.uint8)).resize(
            (28, 28), Image.BICUBIC
        )
        out[j] = np.pad(np.asarray(grey), 2)[..., None]
    return ImageDataset(out, y[idx], DIGITS, "digits/optdigits")
