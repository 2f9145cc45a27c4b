"""Built-in synthetic person re-ID domains ``reid/a`` .. ``reid/d``, in the Market-1501 split form.

Real re-ID benchmarks differ in lighting, colour cast, resolution, backgrounds and camera count;
these domains differ the same way, so multi-source adaptation has a real gap to close on the CPU.
Identities are fixed appearances (see :mod:`lorex.data.reid_render`); cameras set viewpoint,
scale, pose jitter, background and lighting. Everything is seeded per domain, so a domain is the
same arrays on every machine, and cached like the other built-in datasets.
"""

from __future__ import annotations

import difflib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lorex.data import reid_render as rr
from lorex.data import sources
from lorex.data.cache import cache_dir
from lorex.data.market1501 import Market1501, ReidSplit, read_market1501
from lorex.errors import LorexError
from lorex.io import atomic_write_bytes

VERSION = 1  # bump when the generator changes, so stale caches are not reused
CHUNK = 256  # images rendered at once: bounded memory, the same arrays whatever the machine


@dataclass(frozen=True)
class ReidDomain:
    name: str
    seed: int
    num_ids: int  # half train, half test (disjoint)
    cameras: int
    description: str
    res: float  # the camera's resolution relative to 64x32 (upsampled back to 64x32)
    blur: float  # Gaussian sigma at 64x32, pixels
    gain: float  # illumination level
    cast: tuple[float, float, float]  # colour cast, RGB multipliers
    gamma: float  # > 1 crushes shadows (night), < 1 lifts them
    noise: float  # sensor noise sigma, 0..255
    textures: tuple[str, ...]  # texture scenes (sources.TEXTURE_NAMES); empty: walls only
    walls: float  # fraction of cameras that watch a wall-and-floor scene
    dark_clothes: float  # fraction of dark clothing (the season)


DOMAINS: dict[str, ReidDomain] = {
    d.name: d
    for d in [
        ReidDomain(
            "reid/a", 1101, 400, 4, "sunny street: bright, warm, sharp, pavement and brick",
            1.0, 0.3, 1.1, (1.08, 1.0, 0.88), 0.9, 2.0, ("gravel", "brick", "grass"), 0.0, 0.15,
        ),
        ReidDomain(
            "reid/b", 2202, 500, 6, "overcast campus in winter: cool cast, 48x24, walls and yards",
            0.75, 0.6, 0.95, (0.88, 0.98, 1.12), 1.0, 3.0, ("brick", "gravel", "camera"), 0.5, 0.5,
        ),
        ReidDomain(
            "reid/c", 3303, 300, 3, "indoor mall: dim yellow light, 32x16, blurred, flat walls",
            0.5, 0.8, 0.75, (1.12, 1.0, 0.68), 1.1, 4.0, (), 1.0, 0.3,
        ),
        ReidDomain(
            "reid/d", 4404, 400, 5, "night CCTV: dark, green cast, 40x20, noisy, cluttered",
            0.625, 0.5, 0.6, (0.85, 1.12, 0.85), 1.3, 8.0, ("text", "page", "coins", "clock"),
            0.2, 0.35,
        ),
        # Not a domain of the benchmark: a generic person set, to pretrain a base the way an
        # ImageNet backbone is pretrained before any re-ID domain (docs/sage.md, "The base").
        ReidDomain(
            "reid/pretrain", 5505, 800, 6, "generic people for pretraining: neutral, mixed scenes",
            1.0, 0.4, 1.0, (1.0, 1.0, 1.0), 1.0, 3.0, ("gravel", "grass", "camera", "page"), 0.4,
            0.35,
        ),
    ]
}  # fmt: skip
PRETRAIN_DOMAIN = "reid/pretrain"
REID_DOMAINS = [d for d in DOMAINS if d != PRETRAIN_DOMAIN]
SPLITS = ("train", "query", "gallery")


def _cameras(spec: ReidDomain, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per camera: preferred viewpoint, scale, scene (texture or walls, tint, zoom), lighting."""
    c = spec.cameras
    view_p = np.full((c, 3), 0.2)
    view_p[np.arange(c), np.arange(c) % 3] = 0.6
    names = [sources.TEXTURE_NAMES.index(t) for t in spec.textures]
    walls = (rng.random(c) < spec.walls) | (not names)
    dark = rr.hsv_to_rgb(rng.random(c), rng.uniform(0.0, 0.4, c), rng.uniform(0.05, 0.3, c))
    light = rr.hsv_to_rgb(rng.random(c), rng.uniform(0.0, 0.4, c), rng.uniform(0.5, 0.95, c))
    return {
        "view_p": view_p,
        "scale": rng.uniform(0.86, 1.0, c),
        "texture": np.where(walls, -1, rng.choice(names or [0], c)),
        "zoom": rng.uniform(1.0, 3.0, c),
        "oy": rng.integers(0, 512, c),
        "ox": rng.integers(0, 512, c),
        "dark": dark,
        "light": light,
        "floor": rr.hsv_to_rgb(rng.random(c), rng.uniform(0.0, 0.3, c), rng.uniform(0.3, 0.7, c)),
        "horizon": rng.uniform(0.55, 0.85, c),
        "panel": rng.uniform(6.0, 14.0, c),
        "gain": rng.uniform(0.8, 1.2, c),
        "cast": (1.0 + rng.normal(0.0, 0.06, (c, 3))).astype(np.float32),
        "shade": rng.uniform(-0.25, 0.25, c),
    }


def _plan(spec: ReidDomain, num_ids: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Who appears where: per image the person row, raw id (0: distractor), camera and split.

    Ids 1..num_ids, half train and half test. Each is seen by 2+ cameras, 2-4 images per camera.
    Each test id is queried by one image from each of one or two of its cameras (never all), so
    every query has a match in another camera; the rest, plus num_ids // 2 distractors (one image
    each, id 0, a person of their own), form the gallery.
    """
    ids = rng.permutation(np.arange(1, num_ids + 1))
    test = set(ids[num_ids // 2 :].tolist())
    person, raw, cams, split = [], [], [], []
    for pid in range(1, num_ids + 1):
        k = int(rng.integers(2, spec.cameras + 1))
        seen = rng.choice(spec.cameras, k, replace=False)
        queried = set(seen[: int(rng.integers(1, min(k - 1, 2) + 1))].tolist())
        for cam in seen:
            for i in range(int(rng.integers(2, 5))):
                kind = 0 if pid not in test else 1 if (i == 0 and cam in queried) else 2
                person.append(pid - 1)
                raw.append(pid)
                cams.append(cam)
                split.append(kind)
    extra = num_ids // 2
    person += list(range(num_ids, num_ids + extra))
    raw += [0] * extra
    cams += rng.integers(0, spec.cameras, extra).tolist()
    split += [2] * extra
    return {
        k: np.asarray(a, np.int64) for k, a in zip("prcs", (person, raw, cams, split), strict=True)
    }


def split_sizes(name: str) -> dict[str, int]:
    """Images per split without rendering anything (for ``lorex data list``)."""
    spec = _spec(name)
    plan = _plan(spec, spec.num_ids, np.random.default_rng([spec.seed, 2]))
    return {s: int((plan["s"] == i).sum()) for i, s in enumerate(SPLITS)}


def generate(spec: ReidDomain, num_ids: int | None = None) -> Market1501:
    """Render a domain (uncached); a smaller ``num_ids`` (tests) keeps its cameras and style."""
    num_ids = spec.num_ids if num_ids is None else num_ids
    if num_ids < 2:
        raise LorexError(f"num_ids: expected at least 2, got {num_ids}")
    cam = _cameras(spec, np.random.default_rng([spec.seed, 0]))
    plan = _plan(spec, num_ids, np.random.default_rng([spec.seed, 2]))
    people = rr.sample_people(
        np.random.default_rng([spec.seed, 1]), num_ids + num_ids // 2, spec.dark_clothes
    )
    rng = np.random.default_rng([spec.seed, 3, num_ids])
    n, cams = len(plan["r"]), plan["c"]
    cum = np.cumsum(cam["view_p"][cams], 1)
    pose = {
        "view": (rng.random(n)[:, None] > cum[:, :2]).sum(1),
        "facing": rng.choice([-1.0, 1.0], n),
        "scale": cam["scale"][cams] * rng.uniform(0.95, 1.05, n),
        "dx": rng.uniform(-1.5, 1.5, n),
        "dy": rng.uniform(-1.5, 1.5, n),
        "swing": rng.uniform(-0.35, 0.35, n),
        "by": rng.integers(0, 120, n),
        "bx": rng.integers(0, 120, n),
        "horizon": rng.uniform(-0.04, 0.04, n),
        "gain": cam["gain"][cams] * rng.normal(1.0, 0.05, n),
    }
    low = (round(rr.H * spec.res), round(rr.W * spec.res))
    hr, wr = 2 * low[0], 2 * low[1]  # drawn at twice the camera's resolution: smooth edges
    ry = rr.resample_matrix(rr.H, low[0], hr, spec.blur)
    rx = rr.resample_matrix(rr.W, low[1], wr, spec.blur)
    shade = 1.0 + cam["shade"][:, None] * (np.linspace(-0.5, 0.5, hr)[None, :])
    textures = sources.textures()
    images = np.empty((n, rr.H, rr.W, 3), np.uint8)
    for lo in range(0, n, CHUNK):
        sl = slice(lo, min(lo + CHUNK, n))
        c, part = cams[sl], {k: a[sl] for k, a in pose.items()}
        canvas = rr.backgrounds((len(c), hr, wr), c, cam, part, textures)
        rr.draw_people(canvas, {k: a[plan["p"][sl]] for k, a in people.items()}, part)
        light = part["gain"][:, None, None, None] * shade[c][:, :, None, None]
        canvas *= (light * cam["cast"][c][:, None, None, :]).astype(np.float32)
        out = rr.finish(canvas, ry, rx) * spec.gain * np.asarray(spec.cast, np.float32)
        out = 255.0 * (np.clip(out, 0.0, 255.0) / 255.0) ** spec.gamma
        out += rng.standard_normal(out.shape, np.float32) * spec.noise
        images[sl] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    splits = []
    for i in range(3):
        keep = np.flatnonzero(plan["s"] == i)
        keep = keep[np.lexsort((plan["c"][keep], plan["r"][keep]))]  # the order of file names
        raw = plan["r"][keep]
        ids = np.unique(raw, return_inverse=True)[1] if i == 0 else raw
        splits.append(ReidSplit(images[keep], ids, plan["c"][keep], raw_ids=raw))
    return Market1501(*splits, name=spec.name)


def _spec(name: str) -> ReidDomain:
    if name not in DOMAINS:
        close = difflib.get_close_matches(name, REID_DOMAINS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"built-in: {', '.join(REID_DOMAINS)}"
        raise LorexError(
            f"unknown re-ID dataset '{name}': not a built-in name nor a directory; {hint}"
        )
    return DOMAINS[name]


def _cache_path(spec: ReidDomain, num_ids: int) -> Path:

    size = "" if num_ids == spec.num_ids else f"-ids{num_ids}"
    return cache_dir() / "datasets" / f"{spec.name.replace('/', '__')}-v{VERSION}{size}.npz"


def make_reid_domain(name: str, num_ids: int | None = None) -> Market1501:
    """A built-in re-ID domain's train (relabelled), query and gallery splits, cached on disk."""
    spec = _spec(name)
    num_ids = spec.num_ids if num_ids is None else num_ids
    path = _cache_path(spec, num_ids)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return Market1501(
                    *(
                        ReidSplit(
                            z[f"{s}_images"], z[f"{s}_ids"], z[f"{s}_cams"], [], z[f"{s}_raw"]
                        )
                        for s in SPLITS
                    ),
                    name=name,
                )
        except (OSError, ValueError, KeyError, LorexError):
            pass  # a damaged cache entry is regenerated
    data = generate(spec, num_ids)
    arrays = {}
    for s in SPLITS:
        split = getattr(data, s)
        arrays.update({f"{s}_images": split.images, f"{s}_ids": split.ids, f"{s}_cams": split.cams})
        arrays[f"{s}_raw"] = split.raw_ids
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return data


def _resize(split: ReidSplit, size: tuple[int, int]) -> ReidSplit:
    images = np.stack(
        [np.asarray(Image.fromarray(im).resize(size[::-1], Image.BILINEAR)) for im in split.images]
    )
    return ReidSplit(images, split.ids, split.cams, split.files, split.raw_ids)


def load_reid(name_or_path: str | Path, size: tuple[int, int] | None = None) -> Market1501:
    """A built-in re-ID domain by name, or a Market-1501-layout folder by path (``size`` is
    (height, width); built-in domains are 64x32)."""
    name = str(name_or_path)
    if name not in DOMAINS and Path(name).is_dir():
        return read_market1501(name, size=size)
    data = make_reid_domain(name)  # an unknown name raises with a close-match hint
    if size is None or tuple(size) == (rr.H, rr.W):
        return data
    if len(size) != 2 or min(size) < 1:
        raise LorexError(f"size: expected (height, width) of positive integers, got {size!r}")
    return Market1501(*(_resize(getattr(data, s), tuple(size)) for s in SPLITS), name=name)
