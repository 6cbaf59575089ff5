"""Synthetic abdominal CT phantoms (2D slices and 3D volumes) with organ label maps.

The phantom is a small anatomical model written in millimetres, evaluated on a voxel grid:
body outline with subcutaneous fat and an abdominal-wall muscle layer, spine (vertebral bodies
with discs, posterior elements, spinal canal), ribs, paraspinal and psoas muscles, lung bases and
heart above the diaphragm, bowel loops and colon (with gas, fluid and sometimes oral contrast),
mesenteric fat, vessels (portal/hepatic branches in the liver, splenic vein, SMV), liver lesions,
and nine labelled organs (:data:`LABEL_NAMES`).

Subjects differ the way patients do: body size and fat thickness, organ sizes, shapes and
positions, a large random smooth deformation, bowel content, contrast phase (native, arterial,
portal-venous, delayed: organ enhancement differs), noise level and scan range.

Coordinates (model space, mm): ``x`` towards the patient's left, ``y`` towards posterior,
``z`` towards superior; the origin is the body centre at the reference axial level ``z = 0``
(about L1/L2, where all nine organs cross the plane).

Array layouts:

- **3D**: ``(X, Y, Z)`` = (right→left, anterior→posterior, inferior→superior), the axis order
  of Learn2Reg AbdomenCTCT volumes (192 × 160 × 256 at 2 mm). Default shape ``(96, 80, 128)``
  at 4 mm (field of view 384 × 320 × 512 mm).
- **2D**: ``(rows, cols)`` = (anterior→posterior, right→left): an axial slice as radiologists
  view it (anterior up, patient's right on the image left). Default ``(256, 320)`` at 1.25 mm.
  So ``volume[:, :, k].T`` is a 2D-layout slice.

The 2D phantom of a seed is the plane ``z = 0`` of the same subject's 3D anatomy; the
through-plane component of the random deformation is left out there (as in the lecture's 2D
data, whose slices were pre-registered through-plane), so a 2D subject equals the axial slice
of its 3D volume up to that component, texture noise and sampling.

Intensities are Hounsfield-like values mapped to ``[0, 1]`` with a soft-tissue window
(level 40, width 400: -160 HU -> 0, 240 HU -> 1).

Everything is deterministic per seed (``numpy.random.SeedSequence``; no global RNG).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import InputError

__all__ = [
    "DEFAULT_SHAPE_2D",
    "DEFAULT_SHAPE_3D",
    "LABEL_NAMES",
    "WINDOW",
    "make_phantom",
    "phantom_spacing",
]

#: Label names, indexed by label value (0 is background; organs 1..9 in this order).
LABEL_NAMES: tuple[str, ...] = (
    "background",
    "liver",
    "spleen",
    "left kidney",
    "right kidney",
    "pancreas",
    "gallbladder",
    "stomach",
    "aorta",
    "inferior vena cava",
)
_L = {name: k for k, name in enumerate(LABEL_NAMES)}

DEFAULT_SHAPE_2D: tuple[int, int] = (256, 320)
DEFAULT_SHAPE_3D: tuple[int, int, int] = (96, 80, 128)

#: Soft-tissue window (low, high) in HU mapped to [0, 1].
WINDOW: tuple[float, float] = (-160.0, 240.0)

# Nominal field of view (mm) along x (left-right), y (antero-posterior), z (cranio-caudal).
# In-plane pixels are square: spacing = max(FOV_x / n_x, FOV_y / n_y); the other axis then sees a
# little more. The z spacing is FOV_z / n_z. Same FOV as Learn2Reg AbdomenCTCT (192x160x256, 2 mm).
_FOV = (384.0, 320.0, 512.0)
# Half-extent (mm) of the lattice on which the random fields are drawn; larger than any FOV.
_BOX = (320.0, 280.0, 340.0)

# Contrast phases: enhancement (HU added to the native value) per tissue.
_PHASES = ("native", "arterial", "portal", "delayed")
_PHASE_P = (0.1, 0.25, 0.5, 0.15)
_ENHANCE = {
    #            native arterial portal delayed
    "liver": (0.0, 20.0, 60.0, 35.0),
    "spleen": (0.0, 70.0, 70.0, 40.0),
    "cortex": (0.0, 150.0, 120.0, 80.0),
    "medulla": (0.0, 30.0, 110.0, 120.0),
    "pancreas": (0.0, 75.0, 50.0, 25.0),
    "aorta": (0.0, 280.0, 120.0, 60.0),
    "ivc": (0.0, 15.0, 110.0, 70.0),
    "portal": (0.0, 40.0, 140.0, 70.0),
    "bowel_wall": (0.0, 40.0, 50.0, 25.0),
    "muscle": (0.0, 8.0, 15.0, 12.0),
    "heart": (0.0, 250.0, 120.0, 60.0),
}


def phantom_spacing(ndim: int = 2, shape: Sequence[int] | None = None) -> tuple[float, ...]:
    """Voxel spacing (mm) of a phantom of this shape, in array-axis order.

    2D: ``(row, col)`` spacing; 3D: ``(x, y, z)`` spacing. See the module docstring.
    """
    shape = _check_shape(ndim, shape)
    if ndim == 2:
        ny, nx = shape
        s = max(_FOV[0] / nx, _FOV[1] / ny)
        return (s, s)
    nx, ny, nz = shape
    s = max(_FOV[0] / nx, _FOV[1] / ny)
    return (s, s, _FOV[2] / nz)


def _check_shape(ndim: int, shape: Sequence[int] | None) -> tuple[int, ...]:
    if ndim not in (2, 3):
        raise InputError(f"ndim: must be 2 or 3, got {ndim!r}")
    if shape is None:
        return DEFAULT_SHAPE_2D if ndim == 2 else DEFAULT_SHAPE_3D
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise InputError(f"shape: expected {ndim} integers, got {shape!r}") from None
    if len(out) != ndim or min(out) < 8:
        raise InputError(f"shape: expected {ndim} sizes of at least 8, got {shape!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Random smooth fields on a fixed millimetre lattice, evaluated separably on rectilinear grids.
# ----------------------------------------------------------------------------------------------
_TRUNCATE = 3.5  # kernel support in units of its width: weights beyond are treated as 0


def _nodes(cell: float, half: float) -> np.ndarray:
    return np.arange(-half, half + 0.5 * cell, cell, dtype=np.float32)


def _axis_weights(coords: np.ndarray, nodes: np.ndarray, cell: float) -> np.ndarray:
    """(len(coords), len(nodes)) Gaussian interpolation weights, rows of unit L2 norm.

    Unit-norm rows give the field unit variance everywhere.
    """
    w = np.exp(-0.5 * ((coords[:, None] - nodes[None, :]) / (0.85 * cell)) ** 2)
    norm = np.sqrt((w**2).sum(1, keepdims=True))
    return (w / np.maximum(norm, 1e-12)).astype(np.float32)


@dataclass
class _Field:
    """A random smooth field: i.i.d. normal coefficients on a fixed mm lattice (spacing
    ``cell``), interpolated with a Gaussian kernel, evaluated separably on rectilinear grids.

    Each z-layer of coefficients has its own seed, so a plane only draws the layers it needs and
    still sees the same values as the volume.
    """

    seq: np.random.SeedSequence
    cell: float
    channels: int = 1

    def _layer(self, k: int, kx: int, ky: int) -> np.ndarray:
        key = np.random.SeedSequence(self.seq.entropy, spawn_key=(*self.seq.spawn_key, k))
        rng = np.random.default_rng(key)
        return rng.standard_normal((self.channels, kx, ky), dtype=np.float32)

    def evaluate(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
        """Values on the grid ``xs × ys × zs`` (mm): ``(C, len(xs), len(ys), len(zs))``."""
        nx_, ny_, nz_ = (_nodes(self.cell, h) for h in _BOX)
        wz = _axis_weights(zs, nz_, self.cell)
        reach = _TRUNCATE * 0.85 * self.cell
        used = np.nonzero((nz_ >= zs.min() - reach) & (nz_ <= zs.max() + reach))[0]
        coef = np.stack([self._layer(int(k), len(nx_), len(ny_)) for k in used], axis=-1)
        wx = _axis_weights(xs, nx_, self.cell)
        wy = _axis_weights(ys, ny_, self.cell)
        # Contract the smallest output axis first (z for a 2D plane) to keep the work small.
        c = np.einsum("ckln,zn->cklz", coef, wz[:, used], optimize=True)
        c = np.einsum("cklz,yl->ckyz", c, wy, optimize=True)
        return np.einsum("ckyz,xk->cxyz", c, wx, optimize=True)


# ----------------------------------------------------------------------------------------------
# Implicit shapes: f(p) < 1 inside. Points are (3, N) arrays (x, y, z) in mm.
# ----------------------------------------------------------------------------------------------
def _rot(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation matrix: ``yaw`` about z (in-plane), ``pitch`` about y, ``roll`` about x (rad)."""
    cz, sz = math.cos(yaw), math.sin(yaw)
    cy, sy = math.cos(pitch), math.sin(pitch)
    cx, sx = math.cos(roll), math.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return (rz @ ry @ rx).astype(np.float32)


_FAR = 16.0  # value given to points outside a shape's bounding box (well outside: f >> 1)
_MARGIN = 2.0  # bounding boxes hold f < _MARGIN**2 (room for the shape noise added later)


@dataclass
class _Grid:
    """Deformed sample points ``p`` (3, X, Y, Z) in mm of the rectilinear grid ``xs × ys × zs``.

    ``p`` differs from the grid by at most ``reach`` (mm, per axis), so a box in model space maps
    to a block of the array: shapes are evaluated on that block only.
    """

    p: np.ndarray
    axes: tuple[np.ndarray, np.ndarray, np.ndarray]
    reach: np.ndarray

    def block(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...]:
        out = []
        for ax, a, b, r in zip(self.axes, lo, hi, self.reach, strict=True):
            i0 = int(np.searchsorted(ax, a - r, side="left"))
            i1 = int(np.searchsorted(ax, b + r, side="right"))
            out.append(slice(i0, max(i0, i1)))
        return tuple(out)

    def shape_on_block(self, lo, hi, fn) -> np.ndarray:
        """``fn(q)`` on the block holding [lo, hi] (q: (3, *block)); ``_FAR`` elsewhere."""
        blk = self.block(np.asarray(lo), np.asarray(hi))
        out = np.full(self.p.shape[1:], _FAR, np.float32)
        q = self.p[(slice(None), *blk)]
        if q.size:
            out[blk] = np.minimum(fn(q), _FAR)
        return out


def _ellipsoid(g: _Grid, centre, radii, rot: np.ndarray | None = None) -> np.ndarray:
    """Squared normalised radius in an ellipsoid (``< 1`` inside; ``_FAR`` far away)."""
    c = np.asarray(centre, np.float32)
    r = np.asarray(radii, np.float32)
    reach = _MARGIN * float(r.max())

    def fn(q: np.ndarray) -> np.ndarray:
        d = q - c.reshape(3, 1, 1, 1)
        if rot is not None:
            d = np.einsum("ji,j...->i...", rot, d)
        return (d[0] / r[0]) ** 2 + (d[1] / r[1]) ** 2 + (d[2] / r[2]) ** 2

    return g.shape_on_block(c - reach, c + reach, fn)


def _tube(g: _Grid, points, radii) -> np.ndarray:
    """Squared normalised distance to a polyline with linearly varying radius (``< 1`` inside).

    Each segment is evaluated on its own block of the grid only.

    Args:
        g: the sample points. points: (K, 3) polyline vertices. radii: (K,) radius at each vertex.
    """
    pts = np.asarray(points, np.float32)
    rad = np.asarray(radii, np.float32)
    out = np.full(g.p.shape[1:], _FAR, np.float32)
    for a, b, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:], strict=True):
        reach = _MARGIN * float(max(ra, rb))
        blk = g.block(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
        q = g.p[(slice(None), *blk)]
        if not q.size:
            continue
        ab = b - a
        qa = q - a.reshape(3, 1, 1, 1)
        t = (qa[0] * ab[0] + qa[1] * ab[1] + qa[2] * ab[2]) / max(float(ab @ ab), 1e-6)
        np.clip(t, 0.0, 1.0, out=t)
        d = qa - t * ab.reshape(3, 1, 1, 1)
        r = ra + t * (rb - ra)
        np.minimum(out[blk], (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]) / (r * r), out=out[blk])
    return out


def _superellipse(x: np.ndarray, y: np.ndarray, a, b, power: float) -> np.ndarray:
    """In-plane superellipse level ``|x/a|^power + |y/b|^power`` (``< 1`` inside).

    ``a``, ``b`` may be arrays. Level ``t**power`` is the contour scaled by ``t``.
    """
    return np.abs(x / a) ** power + np.abs(y / b) ** power


# ----------------------------------------------------------------------------------------------
# Subject parameters.
# ----------------------------------------------------------------------------------------------
def _subject(seq: np.random.SeedSequence) -> dict:
    """Draw one subject's anatomy, contrast and acquisition parameters (fixed draw order)."""
    rng = np.random.default_rng(seq)
    n = rng.normal
    u = rng.uniform

    def jitter(base, sd):
        return np.asarray(base, np.float32) + n(0.0, sd, size=len(base)).astype(np.float32)

    def lognorm(sd: float, size: int = 3) -> np.ndarray:
        return np.exp(n(0.0, sd, size=size)).astype(np.float32)

    s = {}
    s["body_a"] = float(np.clip(n(158.0, 14.0), 120.0, 195.0))  # half width (mm)
    s["body_b"] = float(np.clip(s["body_a"] * n(0.74, 0.05), 90.0, 150.0))  # half depth
    s["body_power"] = float(u(2.1, 2.8))
    # subcutaneous fat thickness (mm)
    s["fat"] = float(np.clip(n(24.0, 10.0), 6.0, min(55.0, 0.25 * s["body_a"])))
    s["wall"] = float(u(8.0, 14.0))  # abdominal wall muscle thickness
    # Organs scale partly with the abdominal cavity (nominal half width 123 mm).
    size = 0.5 + 0.5 * max(s["body_a"] - s["fat"] - s["wall"], 70.0) / 123.0
    s["table_shift"] = n(0.0, 6.0, size=2).astype(np.float32)
    s["size"] = size

    # Spine and vessels (retroperitoneum: little variation).
    s["spine"] = jitter([0.0, 30.0 * size + 8.0, 0.0], [3.0, 4.0, 0.0])
    s["vert_r"] = float(u(17.0, 23.0))
    s["disc_phase"] = float(u(0.0, 34.0))
    # aorta and IVC lie just in front of the vertebral body (left and right of the midline)
    s["aorta_r"] = float(u(8.5, 13.0))
    front = float(s["spine"][1]) - 0.85 * s["vert_r"]
    s["aorta"] = jitter([14.0, front - s["aorta_r"] - 2.0], [4.0, 2.0])
    s["ivc_r"] = np.asarray([u(9.0, 15.0), u(6.0, 10.0)], np.float32)
    s["ivc"] = jitter([-26.0, front - s["ivc_r"][1] - 6.0], [4.0, 3.0])

    # Organs: centre (x, y, z) mm, radii, shape-noise amplitude.
    s["liver_c"] = jitter([-58.0 * size, -8.0, 52.0], [8.0, 7.0, 10.0])
    s["liver_r"] = np.asarray([92.0, 92.0, 82.0], np.float32) * size * lognorm(0.09)
    s["liver_left_c"] = jitter([18.0, -55.0 * size, 62.0], [10.0, 6.0, 10.0])
    s["liver_left_r"] = np.asarray([58.0, 34.0, 52.0], np.float32) * size * lognorm(0.15)
    s["liver_yaw"] = float(n(0.0, 0.12))

    s["spleen_c"] = jitter([92.0 * size, 42.0 * size, 28.0], [7.0, 7.0, 10.0])
    s["spleen_r"] = np.asarray([30.0, 55.0, 66.0], np.float32) * lognorm(0.14)
    s["spleen_yaw"] = float(n(0.5, 0.15))

    kr = np.asarray([27.0, 23.0, 55.0], np.float32)
    s["lkid_c"] = jitter([68.0 * size, 45.0 * size + 5.0, 8.0], [5.0, 5.0, 12.0])
    s["lkid_r"] = kr * lognorm(0.1)
    s["lkid_yaw"] = float(n(-0.5, 0.12))
    s["rkid_c"] = jitter([-68.0 * size, 45.0 * size + 5.0, -6.0], [5.0, 5.0, 12.0])
    s["rkid_r"] = kr * lognorm(0.1)
    s["rkid_yaw"] = float(n(0.5, 0.12))

    # Pancreas: head (near duodenum) -> neck -> body (over the aorta) -> tail (splenic hilum).
    s["panc_pts"] = np.stack(
        [
            jitter([-32.0, -14.0, -14.0], [7.0, 6.0, 8.0]),
            jitter([-8.0, -30.0, -4.0], [6.0, 6.0, 6.0]),
            jitter([25.0, -24.0, 4.0], [6.0, 6.0, 6.0]),
            jitter([58.0 * size, -8.0, 10.0], [8.0, 7.0, 7.0]),
            jitter([82.0 * size, 12.0, 16.0], [8.0, 7.0, 8.0]),
        ]
    )
    s["panc_r"] = np.asarray([15.0, 10.0, 10.0, 9.0, 7.5], np.float32) * lognorm(0.2, 1)
    s["panc_r"] = s["panc_r"] * lognorm(0.1, 5)

    s["gb_c"] = jitter([-42.0 * size, -52.0 * size, 4.0], [9.0, 9.0, 9.0])
    s["gb_r"] = np.asarray([14.0, 16.0, 36.0], np.float32) * lognorm(0.25, 1) * lognorm(0.1)
    s["gb_rot"] = (float(n(0.3, 0.3)), float(n(-0.4, 0.2)))

    # Stomach: fundus (high, left, posterior) -> body -> antrum -> pylorus.
    s["stom_pts"] = np.stack(
        [
            jitter([62.0 * size, 20.0, 105.0], [8.0, 8.0, 10.0]),
            jitter([68.0 * size, -22.0, 60.0], [8.0, 8.0, 10.0]),
            jitter([42.0 * size, -52.0 * size, 18.0], [10.0, 8.0, 10.0]),
            jitter([10.0, -62.0 * size, 0.0], [8.0, 6.0, 8.0]),
            jitter([-14.0, -48.0 * size, 4.0], [6.0, 6.0, 6.0]),
        ]
    )
    s["stom_r"] = np.asarray([42.0, 38.0, 26.0, 20.0, 11.0], np.float32) * lognorm(0.18, 1)
    s["stom_gas"] = float(u(-1.0, 0.6))  # air-fluid level (x 30 mm from the front)
    s["stom_food"] = float(u(0.0, 1.0))

    # Colon: ascending (right), transverse (anterior), descending (left).
    s["colon_pts"] = np.stack(
        [
            jitter([-100.0 * size, 0.0, -130.0], [8.0, 8.0, 10.0]),
            jitter([-105.0 * size, -5.0, -20.0], [8.0, 8.0, 10.0]),
            jitter([-80.0 * size, -40.0, 20.0], [8.0, 8.0, 10.0]),
            jitter([-20.0, -80.0 * size, -35.0], [10.0, 6.0, 12.0]),
            jitter([60.0 * size, -60.0 * size, 15.0], [10.0, 8.0, 10.0]),
            jitter([100.0 * size, 10.0, 40.0], [8.0, 8.0, 10.0]),
            jitter([108.0 * size, 20.0, -60.0], [8.0, 8.0, 10.0]),
            jitter([80.0 * size, 0.0, -160.0], [8.0, 8.0, 10.0]),
        ]
    )
    s["colon_r"] = np.asarray([24, 22, 20, 20, 19, 17, 16, 15], np.float32) * lognorm(0.15, 1)
    s["oral_contrast"] = bool(u() < 0.35)
    s["bowel_density"] = float(u(-0.1, 0.45))

    s["diaphragm"] = float(n(135.0, 12.0))
    s["scan_lo"] = float(u(-256.0, -140.0))
    s["scan_hi"] = float(u(150.0, 256.0))

    phase = int(rng.choice(4, p=_PHASE_P))
    s["phase"] = _PHASES[phase]
    gain = float(np.clip(n(1.0, 0.2), 0.5, 1.5))
    s["enh"] = {k: v[phase] * gain for k, v in _ENHANCE.items()}
    s["native"] = {
        "fat": float(n(-100.0, 10.0)),
        "muscle": float(n(48.0, 6.0)),
        "liver": float(n(58.0, 8.0)),
        "spleen": float(n(48.0, 5.0)),
        "kidney": float(n(33.0, 4.0)),
        "pancreas": float(n(40.0, 6.0)),
        "bile": float(n(10.0, 6.0)),
        "blood": float(n(42.0, 4.0)),
        "fluid": float(n(12.0, 5.0)),
    }
    s["noise_hu"] = float(u(6.0, 22.0))
    s["deform_mm"] = float(u(5.0, 10.0))
    # liver lesions (cysts / hypodense metastases): image only, they keep the liver label
    n_les = int(rng.poisson(0.8))
    s["lesions"] = [
        (
            s["liver_c"] + n(0.0, 1.0, size=3).astype(np.float32) * s["liver_r"] * 0.35,
            float(u(4.0, 16.0)),
            float(u(-40.0, 25.0)),  # HU relative to native water
        )
        for _ in range(n_les)
    ]
    return s


# ----------------------------------------------------------------------------------------------
# Rendering.
# ----------------------------------------------------------------------------------------------
def make_phantom(
    seed: int | Sequence[int], ndim: int = 2, shape: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic abdominal CT subject: image and organ labels.

    Args:
        seed: non-negative int (or sequence of ints); the same seed gives the same subject in 2D
            and 3D (2D is its axial plane ``z = 0``, see the module docstring).
        ndim: 2 (axial slice) or 3 (volume).
        shape: array shape; defaults ``(256, 320)`` (2D: rows anterior→posterior, cols
            right→left) and ``(96, 80, 128)`` (3D: x, y, z). Any shape of sizes >= 8 works; the
            spacing is :func:`phantom_spacing`.

    Returns:
        ``(image, labels)``: image float32 in ``[0, 1]`` of ``shape``; labels int64 of
        ``shape`` with 0 background and ``1..9`` the organs of :data:`LABEL_NAMES`.
    """
    shape = _check_shape(ndim, shape)
    try:
        seq = np.random.SeedSequence(seed)
    except (TypeError, ValueError) as exc:
        raise InputError(f"seed: expected a non-negative integer, got {seed!r} ({exc})") from None
    kids = seq.spawn(8)
    s = _subject(kids[0])
    spacing = phantom_spacing(ndim, shape)

    # Grid axes in mm (3D layout; 2D is the single plane z = 0 and is transposed at the end).
    if ndim == 2:
        ny, nx = shape
        nz = 1
    else:
        nx, ny, nz = shape
    sxy = spacing[0]
    xs = ((np.arange(nx) + 0.5 - nx / 2) * sxy + s["table_shift"][0]).astype(np.float32)
    ys = ((np.arange(ny) + 0.5 - ny / 2) * sxy + s["table_shift"][1]).astype(np.float32)
    if ndim == 2:
        zs = np.zeros(1, np.float32)
    else:
        sz = spacing[2]
        zs = ((np.arange(nz) + 0.5 - nz / 2) * sz).astype(np.float32)
    grid_shape = (nx, ny, nz)

    # Random smooth fields (drawn on the fixed mm lattice: the same for 2D and 3D).
    deform = _Field(kids[1], cell=80.0, channels=3).evaluate(xs, ys, zs)
    shape_noise = _Field(kids[2], cell=22.0, channels=2).evaluate(xs, ys, zs)
    texture = _Field(kids[3], cell=7.0).evaluate(xs, ys, zs)[0]
    vessels = _Field(kids[4], cell=11.0, channels=2).evaluate(xs, ys, zs)
    bowel = _Field(kids[5], cell=16.0, channels=2).evaluate(xs, ys, zs)

    gx, gy, gz = np.meshgrid(xs, ys, zs, indexing="ij")
    amp = s["deform_mm"]
    px = gx + amp * deform[0]
    py = gy + amp * deform[1]
    pz = gz + (amp * deform[2] if ndim == 3 else 0.0)
    reach = np.abs(amp * deform).reshape(3, -1).max(1) + 1.0
    if ndim == 2:
        reach[2] = 0.0
    p = _Grid(
        np.stack([px, py, np.broadcast_to(pz, px.shape)]).astype(np.float32), (xs, ys, zs), reach
    )
    x, y, z = p.p
    sn0, sn1 = shape_noise
    tex = texture
    v0, v1 = vessels
    b0, b1 = bowel

    nat, enh = s["native"], s["enh"]
    hu = np.full(grid_shape, -1000.0, np.float32)
    lab = np.zeros(grid_shape, np.int64)

    # --- body outline, subcutaneous fat, muscle wall, abdominal cavity ----------------------
    zf = np.clip(z / 200.0, -1.0, 1.0)
    a = s["body_a"] * (1.0 + 0.06 * zf - 0.05 * zf**2) + 4.0 * sn0
    b_ant = s["body_b"] * (1.0 + 0.03 * zf) + 4.0 * sn1
    b = np.where(y > 0, 0.9 * b_ant, b_ant)
    pw = s["body_power"]
    body = _superellipse(x, y, a, b, pw) < 1.0
    fat_t = s["fat"] * (1.0 + 0.25 * sn1)
    post = np.clip(y / b, 0.0, 1.0)  # less fat over the back
    inner_a = a - fat_t
    inner_b = b - fat_t * (1.0 - 0.5 * post)
    cav_a = inner_a - s["wall"]
    cav_b = inner_b - s["wall"] * (1.0 + 1.5 * post)
    # nested contours: each one is evaluated inside the previous one only
    inb = np.nonzero(body)
    in_wall = np.zeros(grid_shape, bool)
    in_wall[inb] = _superellipse(x[inb], y[inb], inner_a[inb], inner_b[inb], pw) < 1.0
    inw = np.nonzero(in_wall)
    cavity = np.zeros(grid_shape, bool)
    cavity[inw] = _superellipse(x[inw], y[inw], cav_a[inw], cav_b[inw], pw) < 1.0
    muscle_hu = nat["muscle"] + enh["muscle"]
    hu[body] = nat["fat"] + 8.0 * tex[body]
    wall = in_wall & ~cavity
    hu[wall] = muscle_hu + 6.0 * tex[wall]
    mesentery = nat["fat"] + 10.0 + 12.0 * tex + 6.0 * sn0
    hu[cavity] = mesentery[cavity]

    # --- thorax above the diaphragm: lungs and heart ----------------------------------------
    rn = np.sqrt((x / np.maximum(cav_a, 1.0)) ** 2 + (y / np.maximum(cav_b, 1.0)) ** 2)
    dome = s["diaphragm"] - 25.0 * np.clip(1.0 - rn, 0.0, 1.0) ** 0.5 - 35.0 * rn**2
    dome = dome + 12.0 * (x < 0)  # the right hemidiaphragm sits higher (liver below it)
    thorax = cavity & (z > dome)
    hu[thorax] = -860.0 + 25.0 * tex[thorax] + 40.0 * (np.abs(v0[thorax]) < 0.06)
    heart = thorax & (_ellipsoid(p, [15.0, -45.0, s["diaphragm"] + 55.0], [70, 55, 60]) < 1.0)
    hu[heart] = nat["blood"] + enh["heart"] + 8.0 * tex[heart]
    abdomen = cavity & ~thorax

    # --- bowel loops (small bowel) and colon -----------------------------------------------
    loops = abdomen & (b0 > 0.55 - s["bowel_density"]) & (z < 40.0) & (y < 40.0)
    wall_band = loops & (b0 < 0.75 - s["bowel_density"])
    content = np.full(grid_shape, nat["fluid"], np.float32)
    if s["oral_contrast"]:
        content = content + 180.0 * (b1 > 0.0)
    content = np.where(b1 < -1.6, -900.0, content)  # gas pockets
    hu[loops] = content[loops] + 6.0 * tex[loops]
    hu[wall_band] = nat["muscle"] + enh["bowel_wall"] + 5.0 * tex[wall_band]
    colon_f = _tube(p, s["colon_pts"], s["colon_r"]) + 0.25 * sn1
    colon = abdomen & (colon_f < 1.0)
    stool = np.where(tex > 1.0, -900.0, 25.0 + 25.0 * b1)  # mottled stool and gas
    hu[colon] = stool[colon]
    colon_wall = colon & (colon_f > 0.78)
    hu[colon_wall] = nat["muscle"] + enh["bowel_wall"]

    # --- organs (painted in order; later ones win), restricted to the abdominal cavity -----
    def paint(mask: np.ndarray, label: int, value) -> None:
        m = mask & abdomen
        hu[m] = value[m] if isinstance(value, np.ndarray) else value
        lab[m] = label

    # kidneys (needed first: the liver keeps a fat gap around the right kidney)
    kid_f = {}
    for side in ("lkid", "rkid"):
        rot = _rot(yaw=s[f"{side}_yaw"], pitch=0.25 if side == "lkid" else -0.25)
        f = _ellipsoid(p, s[f"{side}_c"], s[f"{side}_r"], rot) + 0.12 * sn0
        kid_f[side] = f
    # liver: right lobe + left lobe, smooth union
    lrot = _rot(yaw=s["liver_yaw"])
    f_right = _ellipsoid(p, s["liver_c"], s["liver_r"], lrot)
    f_left = _ellipsoid(p, s["liver_left_c"], s["liver_left_r"], _rot(yaw=-0.3))
    f_liver = np.minimum(f_right, f_left) + 0.18 * sn0
    liver = (f_liver < 1.0) & (kid_f["rkid"] > 1.5) & (x < 70.0 + 20.0 * sn1)
    liver_hu = nat["liver"] + enh["liver"] + 7.0 * tex
    vess = (np.abs(v0) < 0.09) & (np.abs(v1) < 0.6)
    liver_hu = np.where(vess, nat["blood"] + enh["portal"], liver_hu)
    for centre, radius, value in s["lesions"]:
        f_les = _ellipsoid(p, centre, [radius, radius * 0.9, radius]) + 0.1 * tex
        liver_hu = np.where(f_les < 1.0, value + 4.0 * tex + 0.2 * enh["liver"], liver_hu)
    paint(liver, _L["liver"], liver_hu)

    # spleen: crescent (lateral convex, hilum concave)
    srot = _rot(yaw=s["spleen_yaw"])
    f_sp = _ellipsoid(p, s["spleen_c"], s["spleen_r"], srot) + 0.15 * sn1
    hollow_c = s["spleen_c"] + (srot @ np.asarray([-0.9 * s["spleen_r"][0], 0, 0], np.float32))
    hollow = _ellipsoid(p, hollow_c, s["spleen_r"] * np.float32([0.6, 0.6, 0.8]), srot)
    spleen = (f_sp < 1.0) & (hollow > 1.0)
    spleen_hu = nat["spleen"] + enh["spleen"] + 8.0 * tex
    if s["phase"] == "arterial":  # arciform ("zebra") enhancement in the arterial phase
        spleen_hu = spleen_hu + 35.0 * np.sin(0.25 * (x + 0.5 * y) + 3.0 * sn0)
    paint(spleen, _L["spleen"], spleen_hu)

    # stomach: wall, fluid or food, gas anteriorly above the air-fluid level
    f_st = _tube(p, s["stom_pts"], s["stom_r"]) + 0.15 * sn1
    stomach = f_st < 1.0
    food = nat["fluid"] + s["stom_food"] * (25.0 + 25.0 * tex)
    gas_level = s["stom_gas"] * 30.0
    gas = y < s["stom_pts"][:, 1].min() + gas_level + 5.0 * sn0
    inner = np.where(gas, -900.0, food)
    st_hu = np.where(f_st > 0.8, nat["muscle"] + enh["bowel_wall"] + 15.0, inner)
    paint(stomach & (f_liver > 0.95), _L["stomach"], st_hu)

    # pancreas: lobulated tube; splenic vein along its back
    f_pa = _tube(p, s["panc_pts"], s["panc_r"]) + 0.3 * (tex + 0.5 * sn0)
    pancreas = f_pa < 1.0
    pa_hu = nat["pancreas"] + enh["pancreas"] + 10.0 * tex
    pa_hu = np.where(tex > 1.1, nat["fat"] + 30.0, pa_hu)  # fatty clefts between lobules
    paint(pancreas, _L["pancreas"], pa_hu)
    sv_pts = s["panc_pts"][1:] + np.float32([0.0, 1.0, 0.0]) * (s["panc_r"][1:, None] + 2.0)
    splenic_vein = _tube(p, sv_pts, np.full(len(sv_pts), 4.5, np.float32)) < 1.0
    portal_hu = nat["blood"] + enh["portal"]
    paint(splenic_vein, 0, portal_hu)
    smv_c = s["panc_pts"][1] + np.float32([4.0, 6.0, 0.0])
    smv = _tube(p, [smv_c + [0, 0, -150], smv_c], [6.0, 6.0]) < 1.0
    paint(smv, 0, portal_hu)

    # gallbladder: small pear, bile density, in the liver's fossa
    gb_rot = _rot(yaw=s["gb_rot"][0], pitch=s["gb_rot"][1])
    f_gb = _ellipsoid(p, s["gb_c"], s["gb_r"], gb_rot) + 0.1 * sn1
    gb_hu = np.where(f_gb > 0.8, nat["bile"] + 25.0 + enh["bowel_wall"] * 0.3, nat["bile"])
    paint(f_gb < 1.0, _L["gallbladder"], gb_hu + 4.0 * tex)

    # kidneys: cortex, medulla (pyramids), sinus fat at the hilum (not labelled)
    for side, lbl in (("lkid", _L["left kidney"]), ("rkid", _L["right kidney"])):
        f = kid_f[side]
        c = s[f"{side}_c"]
        medial = np.float32([-1.0 if side == "lkid" else 1.0, -0.6, 0.0])
        sinus = _ellipsoid(p, c + 0.75 * s[f"{side}_r"][0] * medial, [14, 12, 28]) < 1.0
        kid = (f < 1.0) & ~sinus
        cortex = f > 0.45 + 0.15 * tex
        k_hu = np.where(
            cortex,
            nat["kidney"] + enh["cortex"],
            nat["kidney"] + enh["medulla"] + 5.0 * tex,
        )
        paint(kid, lbl, k_hu)
        paint((f < 1.0) & sinus, 0, nat["fat"] + 25.0)

    # --- retroperitoneum: vessels, psoas, spine, paraspinal muscles, ribs ------------------
    aorta_top = s["diaphragm"] + 60.0
    aorta = (((x - s["aorta"][0]) ** 2 + (y - s["aorta"][1]) ** 2) < s["aorta_r"] ** 2) & (
        z > -110.0
    )
    aorta &= z < aorta_top
    hu[aorta & body] = nat["blood"] + enh["aorta"]
    lab[aorta & body] = _L["aorta"]
    ivc = ((x - s["ivc"][0]) / s["ivc_r"][0]) ** 2 + ((y - s["ivc"][1]) / s["ivc_r"][1]) ** 2
    ivc = (ivc < 1.0) & (z > -120.0) & (z < s["diaphragm"] + 20.0)
    hu[ivc & body] = nat["blood"] + enh["ivc"]
    lab[ivc & body] = _L["inferior vena cava"]

    sx, sy = s["spine"][0], s["spine"][1]
    vr = s["vert_r"]
    for side in (-1.0, 1.0):  # psoas (grows caudally) and paraspinal muscles
        pr = 6.0 + 0.12 * np.clip(60.0 - z, 0.0, 200.0)
        psoas = ((x - sx - side * (vr + 0.6 * pr)) ** 2 + (y - sy + 4.0) ** 2) < pr**2
        psoas &= body & (z < 60.0)
        hu[psoas] = muscle_hu + 5.0 * tex[psoas]
        lab[psoas] = 0
        para = (((x - sx - side * 34.0) / 27.0) ** 2 + ((y - sy - 52.0) / 22.0) ** 2) < 1.0
        para &= in_wall
        hu[para] = muscle_hu + 5.0 * tex[para]
        lab[para] = 0

    level = (z - s["disc_phase"]) % 34.0  # position within one vertebral level (34 mm)
    disc = level > 29.0  # intervertebral disc: 5 mm of each level
    gap = (level < 8.0) | (level > 27.0)  # posterior elements are shorter than the bodies
    rv = ((x - sx) / vr) ** 2 + ((y - sy) / (0.85 * vr)) ** 2
    vbody = (rv < 1.0) & body
    hu[vbody] = np.where(disc[vbody], 90.0, np.where(rv[vbody] > 0.75, 700.0, 230.0))
    canal_y = sy + 0.85 * vr + 12.0
    rc = ((x - sx) ** 2 + (y - canal_y) ** 2) / 81.0
    arch = (rc < 3.2) & (rc > 1.0) & body
    arch &= ~gap | (np.abs(x - sx) > 9.0)  # facet joints stay visible between levels
    spinous = (np.abs(x - sx) < 4.0) & (y > canal_y) & (y < canal_y + 38.0) & ~gap & body
    spinous &= level > 8.0 + 0.5 * (y - canal_y)  # slanted caudally
    transverse = (np.abs(y - canal_y + 6.0) < 3.0) & (np.abs(x - sx) < 1.8 * vr) & ~gap & body
    bone = arch | spinous | transverse
    hu[bone] = 600.0
    canal = (rc < 1.0) & body
    hu[canal] = 15.0
    lab[vbody | bone | canal] = 0

    # ribs: oblique bands in the wall (z rises towards the back), absent far anteriorly
    band = np.nonzero(body & ~cavity)  # ribs lie in the body wall only
    xb, yb, zb = x[band], y[band], z[band]
    theta = np.arctan2(yb, np.abs(xb))  # -pi/2 anterior, +pi/2 posterior
    rib_depth = _superellipse(xb, yb, inner_a[band] - 4.0, inner_b[band] - 4.0, pw)
    ring = (rib_depth > 0.95**pw) & (rib_depth < 1.02**pw) & (theta > -1.1) & (theta < 1.2)
    phase_z = (zb + 120.0 * theta - s["disc_phase"]) % 34.0
    rib_low = -45.0 - 25.0 * np.clip(theta, 0.0, 1.0) + 95.0 * np.clip(-theta, 0.0, 1.6)
    ribs = ring & (phase_z < 7.0) & (zb > rib_low)
    rib_idx = tuple(i[ribs] for i in band)
    hu[rib_idx] = np.where(phase_z[ribs] < 1.5, 700.0, 320.0)

    # --- scan range (padding outside, as in resampled Learn2Reg volumes), noise, window ---
    outside = (z < s["scan_lo"]) | (z > s["scan_hi"])
    lab[outside] = 0
    noise_rng = np.random.default_rng(kids[6])
    noise = noise_rng.standard_normal(grid_shape, dtype=np.float32)
    sigma = 0.6 if ndim == 3 else (0.7, 0.7, 0.0)
    noise = ndimage.gaussian_filter(noise, sigma=sigma, mode="nearest")
    noise *= s["noise_hu"] / max(float(noise.std()), 1e-6)
    hu = hu + noise
    hu[outside] = -1000.0
    lo, hi = WINDOW
    image = np.clip((hu - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if ndim == 2:
        image = np.ascontiguousarray(image[:, :, 0].T)
        lab = np.ascontiguousarray(lab[:, :, 0].T)
    return image, lab.astype(np.int64)
