"""Vectorised NumPy drawing of synthetic pedestrians for the built-in re-ID domains.

A person is a set of filled boxes and ellipses in body coordinates (``v`` down from the top of
the head, ``u`` across, both in body heights), so a whole batch is drawn with broadcast
coordinate masks and no per-image Python loop. Asymmetric features (a chest logo, a shoulder bag,
diagonal stripes) live in body coordinates, so a back view shows them mirrored or hidden.
"""

from __future__ import annotations

import numpy as np

H, W = 64, 32  # output image size
FRONT, BACK, SIDE = 0, 1, 2
UPPER_PATTERNS = ("solid", "hstripes", "vstripes", "checks", "diagonal")
LOWER_KINDS = ("trousers", "shorts", "skirt")
BAGS = ("none", "backpack", "shoulder")


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in 0..255 from hue, saturation and value in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
    rgb = v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (255.0 * rgb).astype(np.float32)


def clothing_colours(rng: np.random.Generator, n: int, dark: float) -> np.ndarray:
    """Clothes: a third neutral greys, the rest coloured; a ``dark`` fraction dimmed (season)."""
    s = np.where(rng.random(n) < 0.35, rng.uniform(0.0, 0.1, n), rng.uniform(0.35, 0.95, n))
    v = rng.uniform(0.25, 0.95, n) * np.where(rng.random(n) < dark, 0.45, 1.0)
    return hsv_to_rgb(rng.random(n), s, v)


def sample_people(rng: np.random.Generator, n: int, dark: float) -> dict[str, np.ndarray]:
    """``n`` fixed appearances: clothing colours and patterns, body shape, hair, accessories."""
    skin_light = np.array([236.0, 201.0, 172.0], dtype=np.float32)
    skin_dark = np.array([105.0, 72.0, 52.0], dtype=np.float32)
    hair = np.array([[25, 20, 18], [80, 50, 30], [150, 110, 60], [200, 170, 110], [140, 140, 140]])
    return {
        "upper": clothing_colours(rng, n, dark),
        "upper2": clothing_colours(rng, n, dark),
        "pattern": rng.choice(len(UPPER_PATTERNS), n, p=[0.4, 0.17, 0.13, 0.15, 0.15]),
        "period": rng.uniform(0.05, 0.1, n),  # stripe period, body heights
        "sleeves": rng.random(n) < 0.6,
        "logo": rng.random(n) < 0.35,
        "logo_colour": clothing_colours(rng, n, 0.0),
        "lower": clothing_colours(rng, n, dark * 1.5),
        "lower_kind": rng.choice(len(LOWER_KINDS), n, p=[0.6, 0.25, 0.15]),
        "skin": skin_light + (skin_dark - skin_light) * rng.random((n, 1)).astype(np.float32),
        "hair": hair[rng.choice(len(hair), n, p=[0.45, 0.25, 0.1, 0.1, 0.1])].astype(np.float32),
        "long_hair": rng.random(n) < 0.35,
        "shoes": np.repeat(rng.choice([25.0, 60.0, 120.0, 230.0], (n, 1)), 3, 1).astype(np.float32),
        "height": rng.uniform(0.84, 1.0, n),
        "width": rng.uniform(0.8, 1.25, n),
        "hat": rng.random(n) < 0.15,
        "hat_colour": clothing_colours(rng, n, 0.0),
        "bag": rng.choice(len(BAGS), n, p=[0.5, 0.3, 0.2]),
        "bag_colour": clothing_colours(rng, n, 0.3),
        "bag_side": rng.choice([-1.0, 1.0], n),
    }


def draw_people(
    canvas: np.ndarray, p: dict[str, np.ndarray], pose: dict[str, np.ndarray]
) -> np.ndarray:
    """Paint one person per image onto ``canvas`` (float32 (N, Hr, Wr, 3), 0..255), in place.

    ``p`` holds one appearance per image (rows of :func:`sample_people`); ``pose`` holds per-image
    ``view`` (FRONT/BACK/SIDE), ``facing`` (+-1 for side views), ``scale``, ``dx``, ``dy`` (pixels
    at 64x32) and ``swing`` (leg and arm angle).
    """
    n, hr, wr = canvas.shape[:3]
    f = hr / H

    def col(a):  # per-image parameter -> broadcastable over (N, Hr, Wr)
        return np.asarray(a, dtype=np.float32).reshape(n, 1, 1)

    view = pose["view"].reshape(n, 1, 1)
    front, back, side = view == FRONT, view == BACK, view == SIDE
    hp = 58.0 * col(pose["scale"] * p["height"])
    top = (H - hp) / 2 + col(pose["dy"])
    # body u: + is the person's left (a front view shows it on the image right), or forward
    sign = np.where(back, -1.0, np.where(side, col(pose["facing"]), 1.0)).astype(np.float32)
    y = (np.arange(hr, dtype=np.float32) + 0.5) / f
    x = (np.arange(wr, dtype=np.float32) + 0.5) / f
    v = (y.reshape(1, hr, 1) - top) / hp  # (N, Hr, 1)
    u = sign * (x.reshape(1, 1, wr) - (W / 2 + col(pose["dx"]))) / hp  # (N, 1, Wr)
    wf = col(p["width"])
    swing = col(pose["swing"])

    def box(v0, v1, u0, u1):
        return (v >= v0) & (v < v1) & (u >= u0) & (u < u1)

    # parts are painted as indices into a per-image palette (one byte a pixel), coloured at the end
    label = np.zeros((n, hr, wr), np.int8)
    palette = [np.zeros((n, 3), np.float32)]

    def paint(mask, colour):
        palette.append(np.asarray(colour, dtype=np.float32))
        np.copyto(label, len(palette) - 1, where=mask)

    skin, lower = p["skin"], p["lower"]
    tw = np.where(side, 0.075, 0.115) * wf  # torso half-width
    # legs: two columns that swing apart (front/back) or scissor (side)
    sep = np.where(side, 0.0, 0.05) * wf
    lw = 0.045 * wf
    legs = np.zeros((n, hr, wr), bool)
    shoes = np.zeros((n, hr, wr), bool)
    for s in (-1.0, 1.0):
        c = s * sep + s * swing * np.clip(v - 0.52, 0.0, None) * np.where(side, 1.0, 0.3)
        legs |= box(0.52, 0.94, c - lw, c + lw)
        shoes |= box(0.94, 0.985, c - lw * 1.1, c + lw * 1.3)
    kind = p["lower_kind"].reshape(n, 1, 1)
    bare = np.where(kind == 1, 0.68, np.where(kind == 2, 0.52, 0.94))
    paint(legs, skin)
    paint(legs & (v < bare), lower)
    flare = tw * (1.0 + 0.8 * np.clip(v - 0.5, 0.0, None) / 0.22)
    paint(box(0.5, 0.58, -tw, tw) | ((kind == 2) & box(0.5, 0.72, -flare, flare)), lower)
    paint(shoes, p["shoes"])

    bag = p["bag"].reshape(n, 1, 1)
    pack = 0.085 * wf
    paint((bag == 1) & side & box(0.18, 0.42, -tw - 0.07, -tw + 0.01), p["bag_colour"])
    # upper body: patterned torso, arms (sleeves or skin), a chest logo seen from the front only
    per = col(p["period"])
    pattern = p["pattern"].reshape(n, 1, 1)
    hs, vs = (v / per) % 1.0 < 0.5, (u / per) % 1.0 < 0.5
    second = (
        ((pattern == 1) & hs)
        | ((pattern == 2) & vs)
        | ((pattern == 3) & (hs ^ vs))
        | ((pattern == 4) & (((v + u) / per) % 1.0 < 0.5))
    )
    torso = box(0.155, 0.52, -tw, tw)
    paint(torso, p["upper"])
    paint(torso & second, p["upper2"])
    logo = col(p["logo"]) > 0
    paint(logo & front & box(0.2, 0.28, 0.01, 0.07), p["logo_colour"])
    paint((bag == 1) & back & box(0.18, 0.42, -pack, pack), p["bag_colour"])
    straps = box(0.155, 0.32, -pack, pack) & (np.abs(u) > pack - 0.022)
    paint((bag == 1) & front & straps, p["bag_colour"] * 0.8)
    aw = 0.045 * wf
    ac = np.where(side, swing * 0.5 * np.clip(v - 0.16, 0.0, None), tw + aw)
    arms = box(0.16, 0.47, ac - aw, ac + aw) | box(0.16, 0.47, -ac - aw, -ac + aw)
    sleeve = (col(p["sleeves"]) > 0) | (v < 0.27)
    paint(arms, skin)
    paint(arms & sleeve, p["upper"] * 0.85)
    paint(box(0.47, 0.51, ac - aw, ac + aw) | box(0.47, 0.51, -ac - aw, -ac + aw), skin)
    # a shoulder bag hangs at one side: seen from front and back, from the side only on its side
    side_bag = col(p["bag_side"])
    out = side_bag * u
    hang = (v >= 0.42) & (v < 0.56) & (out >= tw + 0.02) & (out < tw + 0.11)
    hang = np.where(side, box(0.42, 0.56, -0.05, 0.05) & (side_bag == col(pose["facing"])), hang)
    paint((bag == 2) & hang, p["bag_colour"])
    # head, hair, hat
    paint(box(0.13, 0.16, -0.025, 0.025), skin)
    head = ((v - 0.085) / 0.068) ** 2 + (u / 0.05) ** 2 < 1.0
    paint(head, skin)
    long_hair = col(p["long_hair"]) > 0
    hair = head & (back | (v < 0.065) | (side & (u < 0.01)))
    hair |= long_hair & box(0.06, 0.22, -0.06, 0.06) & (back | (side & (u < 0.0)))
    hair |= long_hair & front & box(0.06, 0.2, -0.06, 0.06) & (np.abs(u) > 0.035)
    paint(hair, p["hair"])
    paint((col(p["hat"]) > 0) & box(0.005, 0.055, -0.058, 0.058), p["hat_colour"])
    index = label + (np.arange(n) * len(palette)).reshape(n, 1, 1)
    colours = np.stack(palette, 1).reshape(-1, 3)[index]
    np.copyto(canvas, colours, where=(label > 0)[..., None])
    return canvas


def backgrounds(
    shape: tuple[int, int, int], cams: np.ndarray, cam: dict, pose: dict, textures: tuple
) -> np.ndarray:
    """Each camera watches one scene: a tinted texture crop (moving with the pedestrian's place in
    it) or a wall-and-floor gradient with panels; float32 (N, Hr, Wr, 3)."""
    n, hr, wr = shape
    canvas = np.empty((n, hr, wr, 3), np.float32)
    y = (np.arange(hr, dtype=np.float32) + 0.5) * H / hr
    x = (np.arange(wr, dtype=np.float32) + 0.5) * W / wr
    for c in np.unique(cams):
        idx = np.flatnonzero(cams == c)
        dark, light = cam["dark"][c], cam["light"][c]
        if cam["texture"][c] >= 0:
            tex = textures[cam["texture"][c]]
            iy = cam["oy"][c] + pose["by"][idx, None] + (y * cam["zoom"][c]).astype(np.int64)
            ix = cam["ox"][c] + pose["bx"][idx, None] + (x * cam["zoom"][c]).astype(np.int64)
            g = tex[(iy % tex.shape[0])[:, :, None], (ix % tex.shape[1])[:, None, :]]
            lut = dark + (light - dark) * (np.arange(256, dtype=np.float32)[:, None] / 255.0)
            canvas[idx] = lut[g]
        else:
            t = (y / H)[None, :, None] + pose["horizon"][idx, None, None]  # (m, Hr, 1)
            wall = light + (dark - light) * 0.5 * t[..., None]
            floor = cam["floor"][c] * (0.8 + 0.4 * t[..., None])
            panel = ((x[None, None, :] + pose["bx"][idx, None, None]) % cam["panel"][c]) < 1.5
            wall = wall * np.where(panel, 0.85, 1.0)[..., None]
            canvas[idx] = np.where((t > cam["horizon"][c])[..., None], floor, wall)
    return canvas


def resample_matrix(n_out: int, n_low: int, n_render: int, sigma: float) -> np.ndarray:
    """(n_out, n_render): area-average down to the camera's resolution ``n_low``, bilinear back
    up to ``n_out``, then a Gaussian blur of ``sigma`` output pixels (optics, compression)."""

    def linear(n_to: int, n_from: int) -> np.ndarray:
        scale = n_from / n_to
        d = (np.arange(n_from) + 0.5)[None, :] - (np.arange(n_to) + 0.5)[:, None] * scale
        k = np.clip(1.0 - np.abs(d) / max(1.0, scale), 0.0, None)
        return k / k.sum(1, keepdims=True)

    m = linear(n_out, n_low) @ linear(n_low, n_render)
    if sigma > 0:
        d = np.arange(n_out)[None, :] - np.arange(n_out)[:, None]
        g = np.exp(-0.5 * (d / sigma) ** 2)
        m = (g / g.sum(1, keepdims=True)) @ m
    return m.astype(np.float32)


def finish(canvas: np.ndarray, ry: np.ndarray, rx: np.ndarray) -> np.ndarray:
    """(N, Hr, Wr, 3) -> (N, H, W, 3) through the separable resampling matrices."""
    out = np.tensordot(ry, canvas, axes=([1], [1]))  # (H, N, Wr, 3), one BLAS call
    out = np.tensordot(out, rx, axes=([2], [1]))  # (H, N, 3, W)
    return np.ascontiguousarray(out.transpose(1, 0, 3, 2))
