"""Built-in paired RGB-depth and RGB-NIR scene sets for source-free cross-modal transfer.

Each sample is one object on a floor before a wall, rendered once (:mod:`scene_render`) and
shaded into an RGB image and a depth or near-infrared image of the same pixels. The class is the
object's geometry only; colour, texture, pose, camera and lighting are random per instance, and
a material's NIR reflectance is drawn independently of its visible colour (foliage is dark green
but bright in NIR), so RGB appearance does not transfer to NIR for free. Sensor styles imitate
SUN RGB-D's cameras (Kinect v1 structured light, Kinect v2 time of flight) and two NIR set-ups
(an active illuminator at the camera, passive sunlight); each also has its own RGB camera.
Every set is seeded and cached like the other built-ins.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorex.data import scene_render as sr
from lorex.data.cache import cache_dir
from lorex.data.reid_render import hsv_to_rgb, resample_matrix
from lorex.errors import LorexError
from lorex.io import atomic_write_bytes

VERSION = 3  # bump when the generator changes, so stale caches are not reused
SIZE = 32
SUPERSAMPLE = 2  # geometry is cast at 64x64; images are area-averaged down to 32x32
CHUNK = 128  # scenes rendered at once: bounded memory, the same arrays whatever the machine
DEPTH_RANGE_MM = 10000  # the float view of depth is mm / DEPTH_RANGE_MM, clipped to [0, 1]
SPLITS = ("train", "test")
TR_CLASSES = ("cone", "cube", "cylinder", "pyramid", "sphere", "torus")  # alphabetical: folder
TI_CLASSES = ("arch", "capsule", "dumbbell", "octahedron")  # order equals class index order


@dataclass(frozen=True)
class Material:
    name: str
    hue: tuple[float, float]
    sat: tuple[float, float]
    val: tuple[float, float]
    nir: tuple[float, float]  # NIR reflectance, drawn independently of the visible colour
    nir_texture: float  # how much of the visible pattern shows in NIR (dyes are often NIR-clear)
    shine: float  # specular strength


MATERIALS = (
    Material("fabric", (0.0, 1.0), (0.3, 0.85), (0.3, 0.85), (0.45, 0.85), 0.15, 0.0),
    Material("plastic", (0.0, 1.0), (0.55, 1.0), (0.45, 1.0), (0.2, 0.9), 0.6, 0.35),
    Material("wood", (0.05, 0.11), (0.4, 0.75), (0.3, 0.7), (0.45, 0.65), 0.5, 0.05),
    Material("paint", (0.0, 1.0), (0.15, 0.9), (0.4, 0.95), (0.2, 0.85), 0.4, 0.1),
    Material("metal", (0.0, 1.0), (0.0, 0.1), (0.4, 0.8), (0.5, 0.7), 0.8, 0.7),
    Material("foliage", (0.2, 0.36), (0.5, 0.9), (0.15, 0.5), (0.7, 0.95), 0.3, 0.0),
    Material("stone", (0.05, 0.13), (0.03, 0.25), (0.35, 0.7), (0.3, 0.5), 0.8, 0.02),
    Material("rubber", (0.0, 1.0), (0.0, 0.3), (0.04, 0.15), (0.02, 0.08), 0.2, 0.15),
)
_M = {m.name: i for i, m in enumerate(MATERIALS)}
SURFACE_MATERIALS = (  # object, floor, wall
    list(range(len(MATERIALS))),
    [_M[n] for n in ("wood", "stone", "fabric", "paint", "foliage", "rubber")],
    [_M[n] for n in ("paint", "stone", "wood", "fabric", "plastic")],
)


@dataclass(frozen=True)
class Sensor:
    name: str
    modality: str  # "depth" or "nir"
    fov: float  # degrees
    rgb_res: int  # the RGB camera's resolution (upsampled back to 32x32)
    rgb_blur: float  # Gaussian sigma at 32x32, pixels
    cast: tuple[float, float, float]  # RGB multipliers
    saturation: float
    gamma: float
    noise: float  # RGB sensor noise sigma, 0..255
    description: str


SENSORS = {
    s.name: s
    for s in [
        Sensor("k1", "depth", 50.0, 24, 0.4, (1.1, 1.0, 0.84), 0.9, 1.0, 3.0,
               "Kinect-v1-like structured light: 0.5-4.5 m, disparity-quantised, edge holes"),
        Sensor("k2", "depth", 60.0, 32, 0.2, (0.92, 1.0, 1.1), 1.0, 0.9, 1.5,
               "Kinect-v2-like time of flight: 0.5-8 m, noise grows with z, flying pixels"),
        Sensor("a", "nir", 55.0, 26, 0.4, (1.0, 1.0, 1.0), 0.7, 1.05, 2.5,
               "active NIR illuminator at the camera: reflectance * cos / z^2"),
        Sensor("b", "nir", 55.0, 32, 0.25, (1.08, 1.02, 0.9), 1.15, 0.85, 2.0,
               "passive sunlight-like NIR: directional light, gamma, noisier"),
    ]
}  # fmt: skip


@dataclass(frozen=True)
class PairedSpec:
    name: str
    modality: str
    sensors: tuple[str, ...]  # pooled in this order
    classes: tuple[str, ...]
    seed: int
    per_class: dict[str, int]  # samples per class, per sensor, per split
    description: str

    @property
    def sensor(self) -> str:
        return "+".join(self.sensors)

    def size(self, split: str) -> int:
        return self.per_class[split] * len(self.classes) * len(self.sensors)


_TR = {"train": 400, "test": 50}
_TI = {"train": 100, "test": 25}
PAIRED: dict[str, PairedSpec] = {
    s.name: s
    for s in [
        PairedSpec("rgbd/k1", "depth", ("k1",), TR_CLASSES, 7101, _TR,
                   "RGB + Kinect-v1-like depth, 6 task-relevant shapes"),
        PairedSpec("rgbd/k2", "depth", ("k2",), TR_CLASSES, 7202, _TR,
                   "RGB + Kinect-v2-like depth, 6 task-relevant shapes"),
        PairedSpec("rgbnir/a", "nir", ("a",), TR_CLASSES, 7303, _TR,
                   "RGB + active-illumination NIR, 6 task-relevant shapes"),
        PairedSpec("rgbnir/b", "nir", ("b",), TR_CLASSES, 7404, _TR,
                   "RGB + passive sunlit NIR, 6 task-relevant shapes"),
        PairedSpec("rgbd/ti", "depth", ("k1", "k2"), TI_CLASSES, 7505, _TI,
                   "RGB + depth pairs of 4 task-irrelevant shapes, both depth sensors"),
        PairedSpec("rgbnir/ti", "nir", ("a", "b"), TI_CLASSES, 7606, _TI,
                   "RGB + NIR pairs of 4 task-irrelevant shapes, both NIR sensors"),
    ]
}  # fmt: skip
PAIRED_SETS = list(PAIRED)


def sample_scenes(rng: np.random.Generator, labels: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Geometry, pose, camera, lighting and per-surface materials for each label."""
    n = len(labels)
    shape = np.asarray([sr.SHAPE_NAMES.index(classes[c]) for c in labels], np.int64)
    bottom = np.asarray([sr.SHAPES[sr.SHAPE_NAMES[k]].bottom for k in shape])
    scale = rng.uniform(0.2, 0.45, n)
    yaw = rng.uniform(0.0, 2 * np.pi, n)
    center = np.stack([rng.uniform(-0.25, 0.25, n), scale * bottom, rng.uniform(-0.25, 0.25, n)], 1)
    dist = scale * rng.uniform(2.2, 3.8, n)
    el, az = np.radians(rng.uniform(10.0, 40.0, n)), np.radians(rng.uniform(-40.0, 40.0, n))
    jitter = rng.normal(0.0, 0.15, (n, 2)) * scale[:, None]  # the object is not always centred
    target = center + np.concatenate([jitter, np.zeros((n, 1))], 1)
    offset = np.stack([np.sin(az) * np.cos(el), np.sin(el), -np.cos(az) * np.cos(el)], 1)
    lel, laz = np.radians(rng.uniform(25.0, 70.0, n)), np.radians(rng.uniform(-70.0, 70.0, n))
    c, s = np.cos(yaw), np.sin(yaw)
    rot = np.zeros((n, 3, 3))
    rot[:, 0, 0], rot[:, 0, 2], rot[:, 1, 1], rot[:, 2, 0], rot[:, 2, 2] = c, s, 1.0, -s, c
    scene = {
        "shape": shape,
        "scale": scale,
        "rotation": rot,
        "center": center,
        "camera": center + dist[:, None] * offset,
        "target": target,
        "wall": center[:, 2] + scale + rng.uniform(0.3, 4.0, n),
        "light": np.stack([np.sin(laz) * np.cos(lel), np.sin(lel), -np.cos(laz) * np.cos(lel)], 1),
        "ambient": rng.uniform(0.25, 0.45, n),
    }
    scene.update(_sample_materials(rng, n))
    return scene


def _sample_materials(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Per scene and surface (object, floor, wall): two colours, two NIR reflectances, pattern."""
    mat = np.stack([rng.choice(options, n) for options in SURFACE_MATERIALS], 1)  # (n, 3)

    def draw(field: str, shape: tuple[int, ...]) -> np.ndarray:
        lo = np.asarray([getattr(MATERIALS[i], field)[0] for i in range(len(MATERIALS))])
        hi = np.asarray([getattr(MATERIALS[i], field)[1] for i in range(len(MATERIALS))])
        u = rng.random(shape)
        m = mat.reshape(mat.shape + (1,) * (len(shape) - 2))
        return lo[m] + (hi[m] - lo[m]) * u

    hue, sat, val = draw("hue", (n, 3, 2)), draw("sat", (n, 3, 2)), draw("val", (n, 3, 2))
    same_hue = rng.random((n, 3)) < 0.6  # most patterns are shades of one colour
    hue[..., 1] = np.where(same_hue, hue[..., 0], hue[..., 1])
    colours = hsv_to_rgb(hue % 1.0, sat, val) / 255.0  # (n, 3, 2, 3)
    kind = rng.integers(0, 4, (n, 3))  # plain, stripes, checker, noise
    freq = rng.uniform(1.0, 4.0, (n, 3))[..., None] * np.where(
        (kind == 3)[..., None], rng.uniform(0.6, 1.6, (n, 3, 3)), 1.0
    )
    axes = np.linalg.qr(rng.normal(size=(n, 3, 3, 3)))[0]  # random texture orientation
    return {
        "material": mat,
        "colours": colours.astype(np.float64),
        "nir": draw("nir", (n, 3, 2)),
        "kind": kind,
        "freq": freq,
        "axes": axes,
        "phase": rng.uniform(0.0, 1.0, (n, 3, 3)),
    }


def _per_pixel(scene: dict, rows: np.ndarray, key: str, flat: np.ndarray) -> np.ndarray:
    """A per-surface parameter at every pixel (one flat gather, float32 for speed)."""
    table = scene[key][rows]
    table = table.reshape((-1,) + table.shape[2:])
    return table[flat].astype(np.float32) if table.dtype.kind == "f" else table[flat]


def _texture(scene: dict, rows: np.ndarray, hits: sr.Hits, flat: np.ndarray) -> np.ndarray:
    """Per pixel the pattern value in [0, 1]: plain, stripes, checker or smooth noise."""
    axes, c = _per_pixel(scene, rows, "axes", flat), hits.coords.astype(np.float32)
    proj = c[..., 0, None] * axes[..., 0, :] + c[..., 1, None] * axes[..., 1, :]
    proj += c[..., 2, None] * axes[..., 2, :]
    proj *= _per_pixel(scene, rows, "freq", flat)
    proj += _per_pixel(scene, rows, "phase", flat)
    u = np.sin(np.float32(2 * np.pi) * proj)
    kind = _per_pixel(scene, rows, "kind", flat)
    stripes = np.clip(0.5 + 2.0 * u[..., 0], 0.0, 1.0)
    checker = np.clip(0.5 + 4.0 * u[..., 0] * u[..., 1] * u[..., 2], 0.0, 1.0)
    noise = 0.5 + u.sum(-1) / 6.0
    return np.select([kind == 1, kind == 2, kind == 3], [stripes, checker, noise], 0.0)


def _downsample(img: np.ndarray, res: int, blur: float) -> np.ndarray:
    """(B, 2S, 2S, C) -> (B, S, S, C) through a camera of resolution ``res`` and optics blur."""
    m = resample_matrix(SIZE, res, SIZE * SUPERSAMPLE, blur).astype(np.float64)
    out = m @ np.ascontiguousarray(img.transpose(0, 3, 1, 2)) @ m.T
    return out.transpose(0, 2, 3, 1)


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``a[y + dy, x + dx]`` with edge padding, over the last two axes."""
    h, w = a.shape[-2:]
    ys = np.clip(np.arange(h) + dy, 0, h - 1)
    xs = np.clip(np.arange(w) + dx, 0, w - 1)
    return a[..., ys, :][..., :, xs]


def _k1_depth(z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Structured light: edge-aware blur, projector-shadow and edge holes, range, disparity
    quantisation (Kinect v1: f*b = 43.5 px m, 1/8-pixel steps, so the step grows with z^2)."""
    valid = z > 0
    acc, wsum = z.copy(), np.ones_like(z)
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        nb = _shift(z, dy, dx)
        ok = valid & (np.abs(nb - z) < 0.05)
        acc += 0.5 * np.where(ok, nb, 0.0)
        wsum += 0.5 * ok
    out = np.where(valid, acc / wsum, 0.0)
    d = 1.0 / np.where(valid, z, np.inf)  # disparity is affine across a plane: edges stand out
    near_left = np.maximum(_shift(d, 0, -1), _shift(d, 0, -2))
    shadow = near_left - d > 0.12 * d  # background just right of a nearer edge: the projector
    bend = np.zeros_like(valid)  # sits to the right of the camera and cannot light it
    for dy, dx in ((0, 1), (1, 0)):
        bend |= np.abs(_shift(d, dy, dx) + _shift(d, -dy, -dx) - 2 * d) > 0.03 * d + 0.01
    holes = shadow | (bend & (rng.random(z.shape) < 0.6)) | (rng.random(z.shape) < 0.005)
    disparity = np.round(8.0 * 43.5 / np.maximum(out, 1e-3)) / 8.0
    out = 43.5 / np.maximum(disparity, 1e-6)
    holes |= (out < 0.5) | (out > 4.5)  # out of range, judged on the quantised depth
    return np.where(holes | ~valid, 0.0, out)


def _k2_depth(
    zs: np.ndarray, reflect: np.ndarray, cos: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Time of flight: each pixel averages its sub-pixel returns (flying pixels at edges), noise
    grows with z, dark (low NIR reflectance) and grazing surfaces return too little light."""
    valid = (zs > 0).all(-1)
    z = zs.mean(-1)
    z = z + rng.standard_normal(z.shape) * (0.002 + 0.0012 * z**2)
    weak = rng.random(z.shape) < np.clip((0.12 - reflect) / 0.06, 0.0, 1.0)
    holes = weak | (cos < 0.12) | (z < 0.5) | (z > 8.0) | (rng.random(z.shape) < 0.003)
    return np.where(valid & ~holes, z, 0.0)


def _pool(a: np.ndarray) -> np.ndarray:
    """(B, 2S, 2S) -> (B, S, S, 4): the sub-samples of each output pixel."""
    b, h, w = a.shape
    f = SUPERSAMPLE
    return (
        a.reshape(b, h // f, f, w // f, f).transpose(0, 1, 3, 2, 4).reshape(b, h // f, w // f, -1)
    )


def render_chunk(
    scene: dict, rows: np.ndarray, sensor: Sensor, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 (B, 32, 32, 3) and the sensor's target: depth uint16 mm or NIR uint8."""
    n = len(rows)
    cam = sr.look_at(scene["camera"][rows], scene["target"][rows], sensor.fov)
    planes = np.zeros((n, 2, 4))
    planes[:, 0, :3] = [0.0, 1.0, 0.0]  # floor y = 0
    planes[:, 1, :3] = [0.0, 0.0, -1.0]  # wall, facing the camera
    planes[:, 1, 3] = -scene["wall"][rows]
    geo = sr.Scene(
        cam,
        planes,
        scene["shape"][rows],
        scene["rotation"][rows],
        scene["center"][rows],
        scene["scale"][rows],
    )
    hits = sr.render(geo, (SIZE * SUPERSAMPLE,) * 2, light=scene["light"][rows])
    light = scene["light"][rows].astype(np.float32)
    normal, dirs = hits.normal.astype(np.float32), hits.dirs.astype(np.float32)
    surf = np.clip(hits.surface.astype(np.int64) - 1, 0, 2)  # object, floor, wall
    flat = 3 * np.arange(n)[:, None, None] + surf
    tex = _texture(scene, rows, hits, flat)
    colours = _per_pixel(scene, rows, "colours", flat)  # (B, H, W, 2, 3)
    albedo = colours[..., 0, :] + (colours[..., 1, :] - colours[..., 0, :]) * tex[..., None]
    mats = _per_pixel(scene, rows, "material", flat)
    nir_tex = np.asarray([m.nir_texture for m in MATERIALS], np.float32)[mats]
    shine = np.asarray([m.shine for m in MATERIALS], np.float32)[mats]
    nir = _per_pixel(scene, rows, "nir", flat)
    reflect = nir[..., 0] + (nir[..., 1] - nir[..., 0]) * tex * nir_tex
    n_dot_l = sr._dot(normal, light[:, None, None, :]).clip(0.0) * hits.lit
    half = light[:, None, None, :] - dirs
    half /= np.sqrt(sr._dot(half, half))[..., None]
    spec = shine * sr._dot(normal, half).clip(0.0) ** 24 * hits.lit
    amb = scene["ambient"][rows][:, None, None].astype(np.float32)
    shade = amb + (1 - amb) * n_dot_l
    view_cos = (-sr._dot(normal, dirs)).clip(0.0)

    rgb = albedo * shade[..., None] + spec[..., None]
    rgb = _downsample(rgb, sensor.rgb_res, sensor.rgb_blur) * np.asarray(sensor.cast)
    grey = rgb.mean(-1, keepdims=True)
    rgb = np.clip(grey + (rgb - grey) * sensor.saturation, 0.0, 1.0) ** sensor.gamma
    rgb = 255.0 * rgb + rng.standard_normal(rgb.shape) * sensor.noise
    rgb8 = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    if sensor.modality == "depth":
        zs = _pool(hits.depth)
        if sensor.name == "k1":
            z = _k1_depth(zs[..., 0], rng)
        else:
            z = _k2_depth(zs, _pool(reflect).mean(-1), _pool(view_cos).mean(-1), rng)
        return rgb8, np.clip(np.rint(z * 1000.0), 0, 65535).astype(np.uint16)
    if sensor.name == "a":  # the illuminator sits at the camera: no visible shadows
        dist = np.maximum(hits.depth, 0.3)
        img = reflect * view_cos / dist**2
        img = _downsample(img[..., None], SIZE, 0.3)[..., 0]
        img = 0.85 * img / np.maximum(np.percentile(img, 97, axis=(1, 2), keepdims=True), 1e-6)
        img = img + rng.standard_normal(img.shape) * 0.01
    else:  # sunlight: the RGB light direction, weaker ambient, gamma, more noise
        img = reflect * (0.15 + 0.85 * n_dot_l)
        img = _downsample(img[..., None], 24, 0.4)[..., 0]
        img = np.clip(img, 0.0, 1.0) ** (1 / 1.6)
        img = img + rng.standard_normal(img.shape) * (0.02 + 0.02 * np.sqrt(img))
    return rgb8, np.clip(np.rint(255.0 * img), 0, 255).astype(np.uint8)


def _spec(name: str) -> PairedSpec:
    if name not in PAIRED:
        raise LorexError(f"unknown paired set '{name}'; built-in: {', '.join(PAIRED_SETS)}")
    return PAIRED[name]


def generate(name: str, split: str, per_class: int | None = None) -> dict[str, np.ndarray]:
    """Render a paired set's split (uncached): ``rgb``, ``target`` (uint16 mm or uint8 NIR),
    ``labels``, ``sensor`` (index into the spec's sensors), class-major order. A smaller
    ``per_class`` (tests) keeps the sensors and style."""
    spec = _spec(name)
    if split not in SPLITS:
        raise LorexError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    k = spec.per_class[split] if per_class is None else per_class
    parts = []
    for si, sensor_name in enumerate(spec.sensors):
        key = [spec.seed, SPLITS.index(split), si, k]
        labels = np.repeat(np.arange(len(spec.classes)), k)
        scene = sample_scenes(np.random.default_rng(key), labels, spec.classes)
        noise = np.random.default_rng(key + [1])
        chunks = [
            render_chunk(
                scene, np.arange(lo, min(lo + CHUNK, len(labels))), SENSORS[sensor_name], noise
            )
            for lo in range(0, len(labels), CHUNK)
        ]
        parts.append((*map(np.concatenate, zip(*chunks, strict=True)), labels, si))
    labels = np.concatenate([p[2] for p in parts])
    order = np.argsort(labels, kind="stable")
    return {
        "rgb": np.concatenate([p[0] for p in parts])[order],
        "target": np.concatenate([p[1] for p in parts])[order],
        "labels": labels[order].astype(np.int64),
        "sensor": np.concatenate([np.full(len(p[2]), p[3], np.uint8) for p in parts])[order],
        "classes": np.asarray(spec.classes),
    }


def cache_path(name: str, split: str) -> Path:

    return cache_dir() / "datasets" / f"paired__{name.replace('/', '__')}-v{VERSION}-{split}.npz"


def write_cache(name: str, split: str) -> Path:
    """Generate a split and store it atomically (uncompressed npz: keys load one at a time)."""
    arrays = generate(name, split)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = cache_path(name, split)
    atomic_write_bytes(path, buf.getvalue())
    return path
