"""Moving digits: short clips of one MNIST digit sliding in one of four directions.

The label is the direction. Each frame alone, and the average of the frames, carry no direction:
the positions a digit visits moving right are the ones it visits moving left, in reverse. Only a
model that compares frames in order can tell them apart, which is what temporal mixing is for.
"""

from __future__ import annotations

import numpy as np

from lorex.data import digits
from lorex.data.dataset import ImageDataset

FRAMES = 4
DIRECTIONS = ["right", "left", "down", "up"]
CANVAS = digits.SIZE
GLYPH = 20  # MNIST digits fill the central 20x20 of their 28x28 frame
TRAVEL = CANVAS - GLYPH  # the largest offset that keeps the digit inside the canvas


def _path(rng: np.random.Generator, direction: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (rows, cols) for each frame of a clip moving in ``direction``."""
    step = int(rng.integers(3, TRAVEL // (FRAMES - 1) + 1))
    span = step * (FRAMES - 1)
    start = int(rng.integers(0, TRAVEL - span + 1))
    other = np.full(FRAMES, int(rng.integers(0, TRAVEL + 1)))
    forward = start + step * np.arange(FRAMES)
    moving = forward if direction in (0, 2) else forward[::-1]  # left/up: the same cells reversed
    return (other, moving) if direction < 2 else (moving, other)


def make_moving_digits(split: str) -> ImageDataset:
    """One clip ``(T, 32, 32, 3)`` per MNIST image of the split, with a seeded random direction."""
    grey, _ = digits._mnist_split(split)
    glyphs = grey[:, 6:26, 6:26].astype(np.float32) / 255.0
    rng = np.random.default_rng([digits.SPLIT_SEED, 7, split == "train"])
    labels = np.arange(len(glyphs), dtype=np.int64) % len(DIRECTIONS)
    rng.shuffle(labels)
    clips = np.empty((len(glyphs), FRAMES, CANVAS, CANVAS, 3), dtype=np.uint8)
    for i, (glyph, label) in enumerate(zip(glyphs, labels, strict=True)):
        rows, cols = _path(rng, int(label))
        colour = rng.uniform(120, 255, size=3)
        background = rng.uniform(0, 60, size=3)
        for t in range(FRAMES):
            frame = np.zeros((CANVAS, CANVAS), dtype=np.float32)
            frame[rows[t] : rows[t] + GLYPH, cols[t] : cols[t] + GLYPH] = glyph
            image = background + frame[..., None] * (colour - background)
            image += rng.normal(0, 4, size=image.shape)
            clips[i, t] = np.clip(image, 0, 255).astype(np.uint8)
    return ImageDataset(clips, labels, DIRECTIONS, "video/moving-digits")
