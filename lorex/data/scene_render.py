"""A vectorised NumPy ray caster for small 3-D scenes: planes plus one signed-distance object.

Paired RGB / depth / NIR data need images that agree pixel for pixel on geometry, so every
modality is shaded from one render: per pixel the hit mask, the z-depth along the camera's
optical axis, the surface normal, which surface was hit and texture coordinates. Planes are
intersected exactly (a wall at distance d renders to d at every pixel); the object is sphere
traced in its own frame, only along rays that cross its bounding sphere, so a batch of a few
hundred scenes renders in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MISS, OBJECT = 0, 1  # surface ids; plane k of a scene is surface 2 + k
EPS = 1e-4  # sphere-tracing hit threshold, in object units (the object fits in radius ~1)
MAX_STEPS = 96


@dataclass(frozen=True)
class Shape:
    """An SDF in object units; ``bottom``: centre to lowest point; ``radius``: bounding sphere.

    The SDF may underestimate the true distance (max of plane distances for polytopes); it never
    overestimates, so sphere tracing stays correct.
    """

    sdf: Callable[[np.ndarray], np.ndarray]
    bottom: float
    radius: float


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot products over the last axis (explicit: much faster than einsum for 3-vectors)."""
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _length(p: np.ndarray) -> np.ndarray:
    return np.sqrt(_dot(p, p))


def _to_local(rot: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``rot^T v`` per row: world vectors into object frames (rot: object to world)."""
    return v[:, 0, None] * rot[:, 0] + v[:, 1, None] * rot[:, 1] + v[:, 2, None] * rot[:, 2]


def _to_world(rot: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (
        v[:, 0, None] * rot[:, :, 0] + v[:, 1, None] * rot[:, :, 1] + v[:, 2, None] * rot[:, :, 2]
    )


def _planes(p: np.ndarray, normals: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Convex polytope: the largest signed distance to its face planes (unit normals)."""
    return (p @ normals.T - offsets).max(-1)


def _unit(v: list[list[float]]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / _length(a)[:, None]


_CUBE_N = _unit([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
_PYR_H, _PYR_B = 1.1, 0.62  # height, half base
_PYR_N = _unit(
    [[_PYR_H, _PYR_B, 0], [-_PYR_H, _PYR_B, 0], [0, _PYR_B, _PYR_H], [0, _PYR_B, -_PYR_H]]
)
_PYR_O = np.full(4, _PYR_B * _PYR_H / 2 / np.hypot(_PYR_H, _PYR_B))  # through the apex
_OCT_N = _unit([[x, y, z] for x in (1, -1) for y in (1, -1) for z in (1, -1)])
_CONE_H, _CONE_R = 1.3, 0.62
_CONE_S = np.array([_CONE_H, _CONE_R]) / np.hypot(_CONE_H, _CONE_R)  # lateral face normal


def _sphere(p: np.ndarray) -> np.ndarray:
    return _length(p) - 0.8


def _cube(p: np.ndarray) -> np.ndarray:
    return _planes(p, _CUBE_N, np.full(6, 0.55))


def _cylinder(p: np.ndarray) -> np.ndarray:
    return np.maximum(np.hypot(p[:, 0], p[:, 2]) - 0.5, np.abs(p[:, 1]) - 0.62)


def _cone(p: np.ndarray) -> np.ndarray:
    r, y = np.hypot(p[:, 0], p[:, 2]), p[:, 1] + _CONE_H / 2  # y from the base up
    side = r * _CONE_S[0] + (y - _CONE_H) * _CONE_S[1]
    return np.maximum(side, -y)


def _torus(p: np.ndarray) -> np.ndarray:  # lying flat on the floor
    return np.hypot(np.hypot(p[:, 0], p[:, 2]) - 0.56, p[:, 1]) - 0.22


def _pyramid(p: np.ndarray) -> np.ndarray:
    return np.maximum(_planes(p, _PYR_N, _PYR_O), -p[:, 1] - _PYR_H / 2)


def _capsule(p: np.ndarray) -> np.ndarray:  # lying along x
    x = np.clip(p[:, 0], -0.52, 0.52)
    return np.sqrt((p[:, 0] - x) ** 2 + p[:, 1] ** 2 + p[:, 2] ** 2) - 0.34


def _octahedron(p: np.ndarray) -> np.ndarray:  # standing on a vertex
    return _planes(p, _OCT_N, np.full(8, 0.85 / np.sqrt(3.0)))


def _arch(p: np.ndarray) -> np.ndarray:  # an upright half ring, both feet on the floor
    y = p[:, 1] + 0.38
    ring = np.hypot(np.hypot(p[:, 0], y) - 0.56, p[:, 2]) - 0.19
    return np.maximum(ring, -y)


def _dumbbell(p: np.ndarray) -> np.ndarray:  # two balls on a bar, lying along x
    yz = p[:, 1] ** 2 + p[:, 2] ** 2
    balls = np.sqrt((np.abs(p[:, 0]) - 0.56) ** 2 + yz) - 0.32
    bar = np.maximum(np.sqrt(yz) - 0.1, np.abs(p[:, 0]) - 0.56)
    return np.minimum(balls, bar)


SHAPES: dict[str, Shape] = {
    "sphere": Shape(_sphere, 0.8, 0.82),
    "cube": Shape(_cube, 0.55, 0.97),
    "cylinder": Shape(_cylinder, 0.62, 0.81),
    "cone": Shape(_cone, _CONE_H / 2, 0.92),
    "torus": Shape(_torus, 0.22, 0.8),
    "pyramid": Shape(_pyramid, _PYR_H / 2, 1.0),
    "capsule": Shape(_capsule, 0.34, 0.88),
    "octahedron": Shape(_octahedron, 0.85, 0.87),
    "arch": Shape(_arch, 0.38, 0.96),
    "dumbbell": Shape(_dumbbell, 0.32, 0.9),
}
SHAPE_NAMES = list(SHAPES)
_RADII = np.asarray([spec.radius for spec in SHAPES.values()] + [0.0])  # index -1: no object


@dataclass
class Camera:
    """Pinhole cameras, one per scene: position and orthonormal axes (B, 3), field of view."""

    position: np.ndarray
    forward: np.ndarray  # the optical axis
    right: np.ndarray
    up: np.ndarray
    fov: np.ndarray  # (B,) full field of view in radians (square images)


def look_at(position: np.ndarray, target: np.ndarray, fov_deg: float | np.ndarray) -> Camera:
    """Cameras at ``position`` looking at ``target`` with +y up (both (B, 3))."""
    position = np.asarray(position, np.float64)
    forward = np.asarray(target, np.float64) - position
    forward /= _length(forward)[:, None]
    right = np.cross([0.0, 1.0, 0.0], forward)  # looking along +z, image right is +x
    right /= _length(right)[:, None]
    up = np.cross(forward, right)
    fov = np.broadcast_to(np.radians(np.asarray(fov_deg, np.float64)), (len(position),))
    return Camera(position, forward, right, up, fov.copy())


@dataclass
class Scene:
    """A batch of B scenes: planes (B, K, 4) as unit normal and offset h (points with n.x = h;
    a zero normal is no plane) and one object each: ``shape`` indexes SHAPE_NAMES (-1: none),
    placed by ``rotation`` (B, 3, 3, object to world), ``center`` (B, 3) and ``scale`` (B,)."""

    camera: Camera
    planes: np.ndarray
    shape: np.ndarray
    rotation: np.ndarray
    center: np.ndarray
    scale: np.ndarray


@dataclass
class Hits:
    """Per pixel (B, H, W): hit mask, z-depth (0 where missed), normal (..., 3), surface id
    (MISS, OBJECT, 2 + plane index), texture coordinates (..., 3): the hit point in the
    object's frame for the object and in the world for planes; ray directions (..., 3); and
    ``lit``: False where the object shadows a plane from the light (all True without one)."""

    hit: np.ndarray
    depth: np.ndarray
    normal: np.ndarray
    surface: np.ndarray
    coords: np.ndarray
    dirs: np.ndarray
    lit: np.ndarray


def ray_directions(camera: Camera, size: tuple[int, int]) -> np.ndarray:
    """Unit world directions through the pixel centres, (B, H, W, 3)."""
    h, w = size
    half = np.tan(camera.fov / 2)[:, None, None]
    ys = (1.0 - 2.0 * (np.arange(h) + 0.5) / h)[None, :, None] * half * (h / max(h, w))
    xs = (2.0 * (np.arange(w) + 0.5) / w - 1.0)[None, None, :] * half * (w / max(h, w))
    d = (
        camera.forward[:, None, None, :]
        + xs[..., None] * camera.right[:, None, None, :]
        + ys[..., None] * camera.up[:, None, None, :]
    )
    return d / _length(d)[..., None]


def _sphere_span(
    oc: np.ndarray, dirs: np.ndarray, radius: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit distances of rays (origin - centre ``oc``) through spheres; NaN: missed."""
    b = _dot(oc, dirs)
    with np.errstate(invalid="ignore"):
        root = np.sqrt(b * b - (_dot(oc, oc) - radius**2))
    return -b - root, -b + root


def _trace_object(
    scene: Scene, rows: np.ndarray, origin: np.ndarray, dirs: np.ndarray, t_max: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sphere-trace the object of scene ``rows`` along world rays; (hit, world t) per ray.

    Only rays through the object's bounding sphere (before ``t_max``) are marched, in the
    object's frame and units.
    """
    hit = np.zeros(len(rows), bool)
    t = np.full(len(rows), np.inf)
    s = scene.scale[rows]
    near, far = _sphere_span(origin - scene.center[rows], dirs, _RADII[scene.shape[rows]] * s)
    keep = np.flatnonzero((far > 0) & (near < t_max))
    rows, s = rows[keep], s[keep]
    rot = scene.rotation[rows]
    o = _to_local(rot, origin[keep] - scene.center[rows]) / s[:, None]
    d = _to_local(rot, dirs[keep])  # unit: rotations keep length
    t0 = np.maximum(near[keep] / s, 0.0)
    t_end = np.minimum(far[keep], t_max[keep]) / s
    shape = scene.shape[rows]
    for k, spec in enumerate(SHAPES.values()):
        sel = np.flatnonzero(shape == k)
        oo, dd, tt, end = o[sel], d[sel], t0[sel], t_end[sel]
        active = np.arange(len(sel))
        for _ in range(MAX_STEPS):
            if not len(active):
                break
            dist = spec.sdf(oo[active] + tt[active, None] * dd[active])
            done = dist < EPS
            found = keep[sel[active[done]]]
            hit[found] = True
            t[found] = tt[active[done]] * s[sel[active[done]]]
            tt[active] += np.maximum(dist, EPS)
            active = active[~done & (tt[active] < end[active])]
    return hit, t


def _object_normals(scene: Scene, rows: np.ndarray, local: np.ndarray) -> np.ndarray:
    """World normals from central differences of the SDF at object-frame points."""
    n = np.zeros_like(local)
    shape = scene.shape[rows]
    e = 1e-3
    for k, spec in enumerate(SHAPES.values()):
        sel = np.flatnonzero(shape == k)
        if not len(sel):
            continue
        p = local[sel]
        for axis in range(3):
            step = np.zeros(3)
            step[axis] = e
            n[sel, axis] = spec.sdf(p + step) - spec.sdf(p - step)
    n /= np.maximum(_length(n), 1e-12)[:, None]
    return _to_world(scene.rotation[rows], n)


def render(scene: Scene, size: tuple[int, int] = (32, 32), light: np.ndarray | None = None) -> Hits:
    """Cast one ray per pixel; ``light`` (B, 3): direction towards a distant light, for shadows."""
    cam = scene.camera
    b = len(cam.position)
    h, w = size
    dirs = ray_directions(cam, size).reshape(b, h * w, 3)
    origin = np.broadcast_to(cam.position[:, None, :], dirs.shape)
    t = np.full((b, h * w), np.inf)
    surface = np.zeros((b, h * w), np.uint8)
    for k in range(scene.planes.shape[1]):
        n, off = scene.planes[:, k, :3], scene.planes[:, k, 3]
        denom = _dot(dirs, n[:, None, :])
        with np.errstate(divide="ignore", invalid="ignore"):
            tk = (off - _dot(cam.position, n))[:, None] / denom
        closer = (denom < -1e-9) & (tk > 0) & (tk < t)  # front faces only
        t = np.where(closer, tk, t)
        surface[closer] = 2 + k
    oc = cam.position - scene.center
    near, far = _sphere_span(oc[:, None, :], dirs, (_RADII[scene.shape] * scene.scale)[:, None])
    rows, pix = np.nonzero((far > 0) & (near < t))  # rays that may meet the object
    ohit, ot = _trace_object(scene, rows, origin[rows, pix], dirs[rows, pix], t[rows, pix])
    rows, pix, ot = rows[ohit], pix[ohit], ot[ohit]
    t[rows, pix] = ot
    surface[rows, pix] = OBJECT

    hit = surface != MISS
    point = origin + np.where(hit, t, 0.0)[..., None] * dirs
    normal = np.zeros_like(dirs)
    for k in range(scene.planes.shape[1]):
        on = surface == 2 + k
        normal[on] = np.broadcast_to(scene.planes[:, None, k, :3], dirs.shape)[on]
    coords = np.where(hit[..., None], point, 0.0)
    local = (
        _to_local(scene.rotation[rows], point[rows, pix] - scene.center[rows])
        / scene.scale[rows, None]
    )
    coords[rows, pix] = local
    normal[rows, pix] = _object_normals(scene, rows, local)

    lit = np.ones((b, h * w), bool)
    if light is not None:  # shadow rays from plane points towards the light, object only
        light = light / _length(light)[:, None]
        pr, pp = np.nonzero(hit & (surface != OBJECT) & (scene.shape[:, None] >= 0))
        start = point[pr, pp] + 1e-3 * normal[pr, pp]
        blocked, _ = _trace_object(
            scene, pr, start, np.ascontiguousarray(light[pr]), np.full(len(pr), np.inf)
        )
        lit[pr[blocked], pp[blocked]] = False

    depth = np.where(hit, t * _dot(dirs, cam.forward[:, None, :]), 0.0)
    shape3 = (b, h, w, 3)
    return Hits(
        hit.reshape(b, h, w),
        depth.reshape(b, h, w),
        normal.reshape(shape3),
        surface.reshape(b, h, w),
        coords.reshape(shape3),
        dirs.reshape(shape3),
        lit.reshape(b, h, w),
    )
