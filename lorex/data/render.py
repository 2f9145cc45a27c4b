"""Glyph rendering and background synthesis with Pillow, shared by the font-based datasets."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SUPERSAMPLE = 2  # draw at twice the size, then downsample: smooth edges at 32x32


@dataclass(frozen=True)
class GlyphStyle:
    """How a set draws its glyphs: ranges are ``[low, high)`` as ``rng.integers`` takes them."""

    font_px: tuple[int, int]
    stroke: tuple[int, int]
    max_rotation: float  # degrees, either way
    blurs: tuple[float, ...]  # radii drawn uniformly (repeat one to weight it)
    max_noise: float  # Gaussian noise std drawn from [0, max_noise)


@functools.cache
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def glyph_mask(
    text: str,
    font_path: str,
    size: int,
    *,
    out: int,
    stroke: int,
    rotation: float,
    offset: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Render ``text`` centred on an ``out x out`` canvas; returns coverage in [0, 1] as float32."""
    big = out * SUPERSAMPLE
    canvas = Image.new("L", (big * 2, big * 2), 0)
    draw = ImageDraw.Draw(canvas)
    font = _font(font_path, size * SUPERSAMPLE)
    cx = big + offset[0] * SUPERSAMPLE
    cy = big + offset[1] * SUPERSAMPLE
    draw.text(
        (cx, cy), text, fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    canvas = canvas.rotate(rotation, resample=Image.BILINEAR, center=(big, big))
    canvas = canvas.crop((big // 2, big // 2, big // 2 + big, big // 2 + big))
    canvas = canvas.resize((out, out), Image.LANCZOS)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def contrasting_colours(
    rng: np.random.Generator, min_gap: float = 90.0
) -> tuple[np.ndarray, np.ndarray]:
    """A foreground and background colour whose mean brightness differs by at least ``min_gap``."""
    while True:
        fg, bg = random_colour(rng), random_colour(rng)
        if abs(fg.mean() - bg.mean()) >= min_gap:
            return fg, bg


def gradient_background(rng: np.random.Generator, size: int, base: np.ndarray) -> np.ndarray:
    """A linear colour gradient around ``base`` in a random direction."""
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    other = np.clip(base + rng.normal(0, 50, size=3), 0, 255)
    return base + (other - base) * (ramp[..., None] + 0.5)


def clutter(rng: np.random.Generator, size: int, image: np.ndarray, count: int) -> np.ndarray:
    """Draw random lines and ellipses in random colours: the distractors of street-number crops."""
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(-size // 4, size + size // 4, size=4))
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        if rng.random() < 0.5:
            draw.line(box, fill=colour, width=int(rng.integers(1, 3)))
        else:
            draw.ellipse(box, outline=colour, width=1)
    return np.asarray(pil, dtype=np.float32)


def random_crop(
    rng: np.random.Generator, photo: np.ndarray, size: int, scale: tuple[int, int]
) -> np.ndarray:
    """A random square crop (side in ``scale``) resized to ``size``, as float32."""
    h, w = photo.shape[:2]
    side = int(rng.integers(scale[0], min(scale[1], h, w) + 1))
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    crop = photo[y : y + side, x : x + side]
    if side != size:
        crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
    return crop.astype(np.float32)


def blur(image: np.ndarray, radius: float) -> np.ndarray:
    if radius <= 0:
        return image
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def paint_glyph(
    rng: np.random.Generator,
    image: np.ndarray,
    text: str,
    fonts: list[str],
    fg: np.ndarray,
    style: GlyphStyle,
) -> np.ndarray:
    """``text`` painted in ``fg`` over ``image`` (float ``(S, S, 3)``), then blurred and noised:
    the last steps every rendered-glyph set shares. The draws come in one fixed order (font,
    size, stroke, rotation, offset, blur, noise), so a set stays the same bytes."""
    size = image.shape[0]
    mask = glyph_mask(
        text,
        fonts[int(rng.integers(len(fonts)))],
        int(rng.integers(*style.font_px)),
        out=size,
        stroke=int(rng.integers(*style.stroke)),
        rotation=float(rng.uniform(-style.max_rotation, style.max_rotation)),
        offset=(float(rng.uniform(-2, 2)), float(rng.uniform(-2, 2))),
    )
    image = image * (1 - mask[..., None]) + fg * mask[..., None]
    image = blur(image, float(rng.choice(style.blurs)))
    image += rng.normal(0, rng.uniform(0, style.max_noise), size=image.shape)
    return to_uint8(image)
