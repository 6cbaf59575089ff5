"""Known-answer registration cases made from real images.

A real image has no ground-truth correspondence with another scan, but it has one with a copy
of itself warped by a field we choose. This module makes such cases, 2D or 3D, with NumPy:

- :func:`random_field`: a smooth random displacement (cubic B-spline of random coefficients on
  a control grid), of a given maximum amplitude and control-point spacing, reproducible by seed;
- :func:`affine_field`: a rotation (degrees, about the centre), scaling and translation written
  as a displacement field, in physical units when a spacing is given;
- :func:`compose_fields`: the displacement of ``phi_outer o phi_inner``;
- :func:`warp_image`: ``fixed = image o phi`` with zeros outside, so the true pddreg field of the
  pair (``fixed``, ``image``) is exactly ``phi(x) - x`` (no inversion needed);
- :func:`remap_intensity`: a random non-monotonic intensity curve applied to the normalised image,
  plus noise, for a "different contrast" case;
- :func:`object_mask`: the object (Otsu-like threshold, holes filled), optionally carried onto
  the fixed grid through ``phi`` and cut to where ``phi`` stays inside the image;
- :func:`carry_mask`: a source mask carried onto the fixed grid;
- :func:`make_case`: all of it at once, returning a :class:`KnownCase`.

Convention (that of :mod:`pddreg.spatial`): a displacement field is an array ``(ndim, *S)`` in
voxels, component ``i`` along array axis ``i``, and maps the fixed grid into the moving image:
``fixed(x) = moving(x + u(x))``. Physical coordinates are ``p = x * spacing`` (per axis).
Everything is deterministic per seed (``numpy.random.default_rng``; no global RNG).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "KnownCase",
    "affine_field",
    "carry_mask",
    "compose_fields",
    "in_domain",
    "make_case",
    "object_mask",
    "otsu_threshold",
    "random_field",
    "remap_intensity",
    "rotation_matrix",
    "warp_image",
]


# ----------------------------------------------------------------------------- helpers


def _shape(shape: Sequence[int], fn: str) -> tuple[int, ...]:
    out = tuple(int(s) for s in shape)
    if len(out) not in (2, 3) or any(s < 1 for s in out):
        raise ValueError(f"{fn}: 'shape' must hold 2 or 3 positive sizes, got {tuple(shape)}")
    return out


def _per_axis(
    value: float | Sequence[float] | None, ndim: int, name: str, fn: str, default: float
) -> np.ndarray:
    if value is None:
        return np.full(ndim, default, dtype=np.float64)
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.full(ndim, float(arr[0]))
    if arr.size != ndim or not np.all(np.isfinite(arr)):
        raise ValueError(f"{fn}: '{name}' must be a number or {ndim} finite numbers, got {value!r}")
    return arr


def _spacing(spacing: float | Sequence[float] | None, ndim: int, fn: str) -> np.ndarray:
    sp = _per_axis(spacing, ndim, "spacing", fn, 1.0)
    if np.any(sp <= 0):
        raise ValueError(f"{fn}: 'spacing' must be positive, got {spacing!r}")
    return sp


def _as_array(x: Any, name: str, fn: str) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    arr = np.asarray(x)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"{fn}: '{name}' must be a 2D or 3D array (*S), got shape {arr.shape}")
    return arr


def _check_disp(disp: Any, shape: tuple[int, ...] | None, fn: str) -> np.ndarray:
    d = np.asarray(disp, dtype=np.float32)
    ndim = d.ndim - 1
    if ndim not in (2, 3) or d.shape[0] != ndim or (shape is not None and d.shape[1:] != shape):
        want = f"(ndim, *S) = {(len(shape), *shape)}" if shape is not None else "(ndim, *S)"
        raise ValueError(f"{fn}: 'disp' must have shape {want}, got {d.shape}")
    return d


def _bspline(t: np.ndarray) -> np.ndarray:
    """Cubic B-spline kernel (support ``|t| < 2``)."""
    a = np.abs(t)
    out = np.zeros_like(a)
    inner = a < 1
    outer = (a >= 1) & (a < 2)
    out[inner] = (4.0 - 6.0 * a[inner] ** 2 + 3.0 * a[inner] ** 3) / 6.0
    out[outer] = (2.0 - a[outer]) ** 3 / 6.0
    return out


def rotation_matrix(
    ndim: int, rotation: float | Sequence[float] = 0.0, axis: Sequence[float] | None = None
) -> np.ndarray:
    """Rotation matrix ``(ndim, ndim)`` from degrees.

    Args:
        ndim: 2 or 3.
        rotation: as in :func:`affine_field` (one angle: plane of axes 0 and 1, from axis 0
            towards axis 1; three angles in 3D: about axes 0, 1, 2 in that order); with ``axis``
            one angle about that axis (3D, right-handed in array-axis order).
        axis: optional 3D rotation axis (any length).

    Returns:
        ``(ndim, ndim)`` float64 orthogonal matrix with determinant 1, acting on column vectors
        of array-axis coordinates.
    """
    if axis is None:
        return _rotation(ndim, rotation)
    n = np.asarray(axis, dtype=np.float64).reshape(-1)
    if ndim != 3 or n.size != 3 or not np.linalg.norm(n) > 0:
        raise ValueError(f"rotation_matrix(): 'axis' needs ndim 3 and 3 values, got {axis!r}")
    n = n / np.linalg.norm(n)
    theta = math.radians(float(np.asarray(rotation).reshape(-1)[0]))
    k = np.array([[0.0, -n[2], n[1]], [n[2], 0.0, -n[0]], [-n[1], n[0], 0.0]])
    return np.eye(3) + math.sin(theta) * k + (1 - math.cos(theta)) * (k @ k)


def _rotation(ndim: int, rotation: float | Sequence[float]) -> np.ndarray:
    """Rotation matrix ``(ndim, ndim)`` from degrees (see :func:`affine_field`)."""
    angles = np.asarray(rotation, dtype=np.float64).reshape(-1)
    if ndim == 2 or angles.size == 1:
        if angles.size != 1:
            raise ValueError(f"rotation: 2D takes one angle, got {rotation!r}")
        planes = [((0, 1), float(angles[0]))]
    elif angles.size == 3:
        # about axis 0 (plane 1-2), then axis 1 (plane 0-2), then axis 2 (plane 0-1)
        planes = [((1, 2), angles[0]), ((0, 2), angles[1]), ((0, 1), angles[2])]
    else:
        raise ValueError(f"rotation: 3D takes 1 or 3 angles, got {rotation!r}")
    rot = np.eye(ndim)
    for (a, b), deg in planes:
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        r = np.eye(ndim)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        rot = r @ rot
    return rot


# ----------------------------------------------------------------------------- fields


def random_field(
    shape: Sequence[int],
    amplitude: float,
    scale: float,
    seed: int = 0,
    spacing: float | Sequence[float] | None = None,
) -> np.ndarray:
    """A smooth random displacement field: cubic B-spline of random control-point vectors.

    The control points lie on a regular grid ``scale`` apart (physical units) covering the image;
    their vectors are standard normal, independent per component, so the field is statistically
    isotropic in physical space. The field is rescaled so that its largest vector length over the
    grid is ``amplitude`` (physical units). No folding is guaranteed only for a small
    ``amplitude / scale`` (below about 0.3 in practice; check with
    :func:`pddreg.metrics.folding_fraction`).

    Args:
        shape: the grid ``(*S)``, 2D or 3D.
        amplitude: the largest displacement length (physical units; voxels without ``spacing``).
        scale: control-point spacing (same units), i.e. the length over which the field varies.
        seed: random seed (same seed, same field).
        spacing: voxel size per axis (default 1: everything in voxels).

    Returns:
        ``(ndim, *S)`` float32 displacement in **voxels** (component ``i`` along axis ``i``).
    """
    fn = "random_field()"
    shape = _shape(shape, fn)
    ndim = len(shape)
    sp = _spacing(spacing, ndim, fn)
    if not (amplitude >= 0 and math.isfinite(amplitude)):
        raise ValueError(f"{fn}: 'amplitude' must be finite and >= 0, got {amplitude!r}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"{fn}: 'scale' must be finite and > 0, got {scale!r}")
    rng = np.random.default_rng(seed)
    weights = []  # per axis (S_i, n_i): B-spline weights of the control points at each voxel
    for size, s in zip(shape, sp, strict=True):
        extent = (size - 1) * s
        n = int(math.floor(extent / scale)) + 4
        t = np.arange(size) * s / scale + 1.0  # voxel positions in control-grid units
        weights.append(_bspline(t[:, None] - np.arange(n)[None, :]))
    coeff = rng.standard_normal((ndim, *(w.shape[1] for w in weights)))
    out = coeff
    for axis, w in enumerate(weights):  # contract control axis `axis + 1` with its weights
        out = np.moveaxis(np.tensordot(out, w, axes=([axis + 1], [1])), -1, axis + 1)
    length = np.sqrt((out**2).sum(axis=0)).max()
    if length > 0:
        out = out * (amplitude / length)
    out = out / sp.reshape((ndim,) + (1,) * ndim)
    return out.astype(np.float32)


def affine_field(
    shape: Sequence[int],
    rotation: float | Sequence[float] = 0.0,
    translation: float | Sequence[float] = 0.0,
    scaling: float | Sequence[float] = 1.0,
    spacing: float | Sequence[float] | None = None,
    center: Sequence[float] | None = None,
    matrix: Any = None,
) -> np.ndarray:
    """An affine map ``phi(p) = c + R diag(scaling) (p - c) + t`` as a displacement field.

    ``p`` is the physical position of a voxel (``x * spacing``), ``c`` the centre. With
    ``fixed = image o phi`` (:func:`warp_image`) the fixed image shows the source turned by
    ``-rotation``, scaled by ``1 / scaling`` and moved by ``-translation``.

    Args:
        shape: the grid ``(*S)``, 2D or 3D.
        rotation: degrees. One angle: a rotation in the plane of array axes 0 and 1 (from axis 0
            towards axis 1), in 2D and 3D. Three angles (3D): rotations about axes 0, 1 and 2
            (planes 1-2, 0-2, 0-1), applied in that order.
        translation: ``t`` per axis (or one value for all), physical units.
        scaling: scale factor per axis (or one value), applied before the rotation.
        spacing: voxel size per axis (default 1: physical units are voxels).
        center: ``c`` in physical units (default: the centre of the grid,
            ``(S - 1) / 2 * spacing``).
        matrix: ``(ndim, ndim)`` linear part used instead of ``R diag(scaling)`` (e.g. a
            rotation about an oblique axis); ``rotation`` and ``scaling`` must then be left at
            their defaults.

    Returns:
        ``(ndim, *S)`` float32 displacement ``(phi(p) - p) / spacing`` in voxels.
    """
    fn = "affine_field()"
    shape = _shape(shape, fn)
    ndim = len(shape)
    sp = _spacing(spacing, ndim, fn)
    t = _per_axis(translation, ndim, "translation", fn, 0.0)
    s = _per_axis(scaling, ndim, "scaling", fn, 1.0)
    if center is None:
        c = (np.asarray(shape, dtype=np.float64) - 1) / 2 * sp
    else:
        c = _per_axis(center, ndim, "center", fn, 0.0)
    if matrix is None:
        linear = _rotation(ndim, rotation) @ np.diag(s)
    else:
        linear = np.asarray(matrix, dtype=np.float64)
        if linear.shape != (ndim, ndim) or not np.all(np.isfinite(linear)):
            raise ValueError(
                f"{fn}: 'matrix' must be a finite ({ndim}, {ndim}) array, got {linear.shape}"
            )
        if np.any(np.asarray(rotation) != 0) or np.any(s != 1):
            raise ValueError(f"{fn}: give either 'matrix' or 'rotation'/'scaling', not both")
    delta = linear - np.eye(ndim)  # phi(p) - p, linear part
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    rel = np.stack([g * sp[i] - c[i] for i, g in enumerate(grids)])  # p - c, (ndim, *S)
    disp = np.tensordot(delta, rel, axes=([1], [0])) + t.reshape((ndim,) + (1,) * ndim)
    return (disp / sp.reshape((ndim,) + (1,) * ndim)).astype(np.float32)


def compose_fields(outer: Any, inner: Any) -> np.ndarray:
    """Displacement of ``phi_outer o phi_inner``: ``c(x) = u_inner(x) + u_outer(x + u_inner(x))``.

    Warping by the result equals warping by ``outer`` first and then by ``inner``:
    ``warp_image(image, c) == warp_image(warp_image(image, outer), inner)`` up to interpolation
    (see :func:`pddreg.spatial.compose`). ``u_outer`` is sampled linearly, repeating its border
    values outside the grid.

    Args:
        outer, inner: ``(ndim, *S)`` displacement fields in voxels (NumPy arrays or tensors).

    Returns:
        ``(ndim, *S)`` float32.
    """
    import torch

    from ..spatial import compose

    fn = "compose_fields()"
    o = _check_disp(_to_numpy(outer), None, fn)
    i = _check_disp(_to_numpy(inner), tuple(o.shape[1:]), fn)
    with torch.no_grad():
        c = compose(torch.from_numpy(o)[None], torch.from_numpy(i)[None], padding="border")
    return c[0].numpy().astype(np.float32)


def _to_numpy(x: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x)


def in_domain(disp: Any, shape: Sequence[int] | None = None) -> np.ndarray:
    """Where ``x + disp(x)`` lies inside the grid of the image it points into.

    Args:
        disp: ``(ndim, *S)`` displacement in voxels.
        shape: the grid of the image sampled (default: ``S``).

    Returns:
        ``(*S)`` bool, True where ``0 <= x_i + u_i(x) <= shape_i - 1`` for every axis.
    """
    d = _check_disp(_to_numpy(disp), None, "in_domain()")
    ndim = d.shape[0]
    target = tuple(d.shape[1:]) if shape is None else _shape(shape, "in_domain()")
    inside = np.ones(d.shape[1:], dtype=bool)
    for i in range(ndim):
        view = [1] * ndim
        view[i] = -1
        pos = np.arange(d.shape[1 + i], dtype=np.float32).reshape(view) + d[i]
        inside &= (pos >= 0) & (pos <= target[i] - 1)
    return inside


def warp_image(image: Any, disp: Any, mode: str = "linear") -> np.ndarray:
    """``fixed(x) = image(x + disp(x))``, zero outside the image (pddreg's own warp).

    So the pair (``fixed``, ``image``) has the true pddreg field ``disp`` exactly.

    Args:
        image: ``(*S)`` image (or a label map with ``mode="nearest"``).
        disp: ``(ndim, *S)`` displacement in voxels.
        mode: ``"linear"`` or ``"nearest"``.

    Returns:
        ``(*S)`` float32.
    """
    import torch

    from ..spatial import warp

    fn = "warp_image()"
    img = _as_array(image, "image", fn).astype(np.float32)
    d = _check_disp(_to_numpy(disp), tuple(img.shape), fn)
    with torch.no_grad():
        out = warp(
            torch.from_numpy(np.ascontiguousarray(img))[None, None],
            torch.from_numpy(np.ascontiguousarray(d))[None],
            mode=mode,
            padding="zeros",
        )
    return out[0, 0].numpy()


# ----------------------------------------------------------------------------- intensities


def remap_intensity(
    image: Any,
    seed: int = 0,
    knots: int = 7,
    noise: float = 0.0,
    keep_zero: bool = True,
    normalise: bool = True,
) -> np.ndarray:
    """A random non-monotonic intensity remap of an image (a "different contrast"), plus noise.

    The image is first mapped to ``[0, 1]`` (:func:`pddreg.data.io.normalise_intensity`, unless
    ``normalise=False``), then through a piecewise-linear curve with ``knots`` evenly spaced
    knots of random values in ``[0, 1]``, drawn until the curve changes direction at least once
    and spans at least 0.6, and Gaussian noise of standard deviation ``noise`` is added.

    Args:
        image: ``(*S)`` image.
        seed: random seed (same seed, same curve and noise).
        knots: number of knots (>= 3).
        noise: standard deviation of the added noise (in units of the ``[0, 1]`` range).
        keep_zero: the curve maps 0 to 0, so a dark background stays dark (as air does in CT
            and MR).
        normalise: map the image to ``[0, 1]`` first (else it must already be there).

    Returns:
        ``(*S)`` float32 (not clipped after the noise).
    """
    from .io import normalise_intensity

    if knots < 3:
        raise ValueError(f"remap_intensity(): 'knots' must be >= 3, got {knots}")
    if not (noise >= 0 and math.isfinite(noise)):
        raise ValueError(f"remap_intensity(): 'noise' must be finite and >= 0, got {noise!r}")
    arr = _to_numpy(image).astype(np.float32)
    x = normalise_intensity(arr) if normalise else np.clip(arr, 0.0, 1.0)
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, knots)
    while True:
        v = rng.uniform(0.0, 1.0, knots)
        if keep_zero:
            v[0] = 0.0
        steps = np.sign(np.diff(v))
        if np.ptp(v) >= 0.6 and np.any(steps > 0) and np.any(steps < 0):
            break
    out = np.interp(x, t, v).astype(np.float32)
    if noise > 0:
        out += rng.normal(0.0, noise, out.shape).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- masks


def otsu_threshold(values: Any, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of ``values``."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0 or v.min() == v.max():
        return float(v.min()) if v.size else 0.0
    hist, edges = np.histogram(v, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _fill(mask: np.ndarray) -> np.ndarray:
    """Largest connected component, holes filled (in N-D, then in every 2D slice of a volume)."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        mask = lab == int(np.argmax(sizes))
    mask = ndimage.binary_fill_holes(mask)
    if mask.ndim == 3:  # cavities open at the volume's ends (lungs) are closed in-plane
        for axis in range(3):
            for k in range(mask.shape[axis]):
                index = [slice(None)] * 3
                index[axis] = k
                mask[tuple(index)] = ndimage.binary_fill_holes(mask[tuple(index)])
    return mask


def object_mask(
    image: Any,
    disp: Any = None,
    threshold: float | str | None = "otsu",
    smooth: float = 1.0,
    close: int = 2,
) -> np.ndarray:
    """The object in ``image`` (e.g. the body or the head) as a bool mask.

    Voxels above the threshold (Otsu's on the normalised image, smoothed by a Gaussian of
    ``smooth`` voxels, by default), closed by ``close`` iterations, the largest connected part,
    holes filled. With ``disp`` the mask is carried to the fixed grid of the
    pair ``fixed = image o phi`` (``mask(x + disp(x))``, nearest) and cut to where ``phi`` stays
    inside the image: the region where a known-answer case's error is measured.

    Args:
        image: ``(*S)`` the source image.
        disp: optional ``(ndim, *S)`` displacement in voxels of the case.
        threshold: ``"otsu"``, a value in ``[0, 1]`` of the normalised image, or None (the
            whole image is the object, e.g. a photograph).
        smooth: standard deviation (voxels) of the Gaussian applied before the threshold.
        close: iterations of the binary closing after the threshold (0: none).

    Returns:
        ``(*S)`` bool.
    """
    from scipy import ndimage

    from .io import normalise_intensity

    img = _as_array(image, "image", "object_mask()")
    if threshold is None:
        mask = np.ones(img.shape, dtype=bool)
    else:
        x = normalise_intensity(img.astype(np.float32))
        if smooth > 0:
            x = ndimage.gaussian_filter(x, smooth)
        thr = otsu_threshold(x) if threshold == "otsu" else float(threshold)
        mask = x > thr
        if close > 0:  # bridge dark gaps inside the object (bowel gas, vessels, speckle)
            pad = [(close, close)] * mask.ndim
            mask = ndimage.binary_closing(np.pad(mask, pad), iterations=close)
            mask = mask[tuple(slice(close, -close) for _ in range(mask.ndim))]
        mask = _fill(mask)
    if disp is None:
        return mask
    return carry_mask(mask, disp)


def carry_mask(mask: Any, disp: Any) -> np.ndarray:
    """A source mask on the fixed grid of ``fixed = source o phi``, where ``phi`` stays inside.

    Args:
        mask: ``(*S)`` bool (or 0/1) mask of the source image.
        disp: ``(ndim, *S)`` displacement ``phi(x) - x`` in voxels.

    Returns:
        ``(*S)`` bool: ``mask(x + disp(x))`` (nearest) and ``x + disp(x)`` inside the grid.
    """
    m = _as_array(mask, "mask", "carry_mask()")
    d = _check_disp(_to_numpy(disp), tuple(m.shape), "carry_mask()")
    carried = warp_image(m.astype(np.float32), d, mode="nearest") > 0.5
    return carried & in_domain(d)


# ----------------------------------------------------------------------------- cases


@dataclass
class KnownCase:
    """A registration pair with a known answer.

    Attributes:
        fixed: ``(*S)`` float32, ``source o phi`` (the source normalised to ``[0, 1]``).
        moving: ``(*S)`` float32, the source (through the intensity remap when ``remapped``).
        disp: ``(ndim, *S)`` float32, the true field ``phi(x) - x`` in voxels:
            ``fixed(x) = source(x + disp(x))``.
        mask: ``(*S)`` bool, the object in the fixed image where ``phi`` stays in the domain.
        spacing: voxel size per axis (mm).
        remapped: whether the moving image went through :func:`remap_intensity`.
        name: a label for tables.
    """

    fixed: np.ndarray
    moving: np.ndarray
    disp: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, ...] = field(default=())
    remapped: bool = False
    name: str = ""


def make_case(
    image: Any,
    disp: Any,
    remap: bool = False,
    noise: float = 0.0,
    seed: int = 0,
    spacing: float | Sequence[float] | None = None,
    threshold: float | str | None = "otsu",
    name: str = "",
    source_mask: Any = None,
) -> KnownCase:
    """A known-answer case: ``fixed = source o phi``, ``moving = source`` (or remapped).

    Args:
        image: ``(*S)`` the source image (any intensity range; normalised to ``[0, 1]``).
        disp: ``(ndim, *S)`` the field ``phi(x) - x`` in voxels (e.g. :func:`random_field`,
            :func:`affine_field`, :func:`compose_fields`).
        remap: pass the moving image through :func:`remap_intensity` (different contrast).
        noise: standard deviation of independent Gaussian noise added to both images.
        seed: seed of the remap and the noise.
        spacing: voxel size per axis (stored with the case).
        threshold: of :func:`object_mask`.
        name: a label for tables.
        source_mask: ``(*S)`` the object in the source image, used instead of
            :func:`object_mask` of it (e.g. a slice of a mask made in 3D).

    Returns:
        :class:`KnownCase`.
    """
    from .io import normalise_intensity

    fn = "make_case()"
    src = normalise_intensity(_as_array(image, "image", fn).astype(np.float32))
    d = _check_disp(_to_numpy(disp), tuple(src.shape), fn)
    ndim = src.ndim
    sp = tuple(float(s) for s in _spacing(spacing, ndim, fn))
    fixed = warp_image(src, d)
    rng = np.random.default_rng([seed, 1])
    moving = remap_intensity(src, seed=seed, normalise=False) if remap else src.copy()
    if noise > 0:
        fixed = fixed + rng.normal(0.0, noise, fixed.shape).astype(np.float32)
        moving = moving + rng.normal(0.0, noise, moving.shape).astype(np.float32)
    if source_mask is None:
        mask = object_mask(src, d, threshold=threshold)
    else:
        m = np.asarray(source_mask)
        if m.shape != src.shape:
            raise ValueError(
                f"{fn}: 'source_mask' must have the image shape {src.shape}, got {m.shape}"
            )
        mask = carry_mask(m, d)
    return KnownCase(
        fixed=fixed.astype(np.float32),
        moving=moving.astype(np.float32),
        disp=d,
        mask=mask,
        spacing=sp,
        remapped=bool(remap),
        name=name,
    )
