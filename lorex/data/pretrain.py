"""The pretraining set: 36 rendered characters (0-9, A-Z) over textured, tinted backgrounds.

It is broader than any evaluation domain and shares no images with their test splits, so a base
pretrained on it plays the role of a foundation model.
"""

from __future__ import annotations

import string

import numpy as np

from lorex.data import render, sources
from lorex.data.dataset import ImageDataset

SIZE = 32
CHARS = list(string.digits + string.ascii_uppercase)
PER_CLASS = {"train": 500, "test": 50}
CLEAN_FRACTION = 0.3

#: Bold glyphs that fill most of the frame (docs/architecture.md, "Pretraining set").
CHARS_STYLE = render.GlyphStyle(
    font_px=(22, 30), stroke=(2, 5), max_rotation=12, blurs=(0.0, 0.0, 0.6), max_noise=6
)


def chars_size(split: str) -> int:
    return PER_CLASS[split] * len(CHARS)


def make_chars(split: str) -> ImageDataset:
    n = chars_size(split)
    rng = np.random.default_rng([77, split == "train"])
    fonts = sources.font_paths()
    pool = sources.textures()
    labels = np.arange(n, dtype=np.int64) % len(CHARS)
    rng.shuffle(labels)
    out = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        if rng.random() < CLEAN_FRACTION:  # plain glyphs: a strong, early learning signal
            fg, image = np.full(3, 255.0), np.zeros((SIZE, SIZE, 3))
        else:
            fg, bg = render.contrasting_colours(rng, min_gap=120.0)
            if fg.mean() < bg.mean():  # light glyphs on darker ground, the polarity of MNIST
                fg, bg = bg, fg
            texture = render.random_crop(
                rng, pool[int(rng.integers(len(pool)))], SIZE, (SIZE, 3 * SIZE)
            )
            texture = (texture - texture.mean()) * rng.uniform(0.05, 0.35)
            image = render.gradient_background(rng, SIZE, bg) + texture[..., None]
        out[i] = render.paint_glyph(rng, image, CHARS[label], fonts, fg, CHARS_STYLE)
    return ImageDataset(out, labels, CHARS, "pretrain/chars")
