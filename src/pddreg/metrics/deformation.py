"""Quality of displacement fields: SDlogJ, folding, end-point error, landmark TRE.

Fields follow the package convention (:mod:`pddreg.spatial`): ``(ndim, *S)`` or
``(B, ndim, *S)`` in voxel units, component ``i`` along array axis ``i``,
``warped(x) = moving(x + u(x))``. Numpy arrays and torch tensors are accepted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ..errors import InputError
from ..spatial import jacobian_det
from ._convert import disp_batch, spacing_tuple, to_numpy

__all__ = ["JACOBIAN_CLIP", "epe", "folding_fraction", "jacobian_metrics", "sdlogj", "tre"]

#: Jacobian determinants are clipped to this range before the log (as Learn2Reg does).
JACOBIAN_CLIP = (1e-9, 1e9)


def _jacobian(disp: Any) -> np.ndarray:
    arr = disp_batch(disp, keep_float32=True)  # float32 halves the memory of large 3-D fields
    return jacobian_det(torch.from_numpy(np.ascontiguousarray(arr))).numpy()


def _mask(mask: Any, spatial: tuple[int, ...], batch: int) -> np.ndarray | None:
    if mask is None:
        return None
    m = to_numpy(mask, "mask") != 0
    while m.ndim > len(spatial) and m.shape[0] == 1 and m.ndim > 1:
        m = m[0]
    if m.shape == spatial:
        return np.broadcast_to(m, (batch,) + spatial)
    if m.shape == (batch,) + spatial:
        return m
    raise ValueError(f"'mask' must have the spatial shape {spatial} of 'disp', got {m.shape}")


def sdlogj(disp: Any, mask: Any = None) -> float:
    """Standard deviation of the log Jacobian determinant (Learn2Reg's SDlogJ).

    ``std(log(clip(det(I + grad u), 1e-9, 1e9)))`` over all voxels, or over ``mask != 0``.

    Args:
        disp: ``(ndim, *S)`` or ``(B, ndim, *S)`` displacement in voxels.
        mask: optional ``(*S)`` (or ``(B, *S)``) region, e.g. the fixed segmentation ``> 0``.

    Returns:
        the value (mean over the batch for ``B > 1``); NaN for an empty mask.
    """
    return _sdlogj_of(_jacobian(disp), mask)


def folding_fraction(disp: Any, mask: Any = None) -> float:
    """Fraction of voxels (in ``mask`` if given) where the Jacobian determinant is ``<= 0``."""
    return _folding_of(_jacobian(disp), mask)


def jacobian_metrics(disp: Any, mask: Any = None) -> dict[str, float]:
    """:func:`sdlogj` and :func:`folding_fraction` from one Jacobian determinant (half the time
    of the two calls: 1.5 s for a 512x512x48 field): ``{"sdlogj": ..., "folding_fraction":
    ...}``; arguments as there."""
    jac = _jacobian(disp)
    return {"sdlogj": _sdlogj_of(jac, mask), "folding_fraction": _folding_of(jac, mask)}


def _sdlogj_of(jac: np.ndarray, mask: Any) -> float:
    logj = np.log(np.clip(jac, *JACOBIAN_CLIP))
    m = _mask(mask, jac.shape[1:], jac.shape[0])
    values = []
    for i in range(jac.shape[0]):
        sel = logj[i] if m is None else logj[i][m[i]]
        values.append(float(sel.std()) if sel.size else math.nan)
    return float(np.mean(values))


def _folding_of(jac: np.ndarray, mask: Any) -> float:
    m = _mask(mask, jac.shape[1:], jac.shape[0])
    sel = jac if m is None else jac[m]
    return float((sel <= 0).mean()) if sel.size else math.nan


def epe(
    disp: Any,
    disp_true: Any,
    mask: Any = None,
    spacing: Sequence[float] | float | None = None,
) -> float:
    """Mean end-point error ``mean |u - u_true|`` (Euclidean over components).

    Args:
        disp, disp_true: ``(ndim, *S)`` or ``(B, ndim, *S)`` fields of one shape, voxels.
        mask: optional ``(*S)`` region to average over.
        spacing: voxel size per axis; with it the error is in mm, else in voxels.
    """
    a, b = disp_batch(disp, "disp"), disp_batch(disp_true, "disp_true")
    if a.shape != b.shape:
        raise ValueError(
            f"epe(): 'disp' and 'disp_true' must have one shape, got {a.shape}, {b.shape}"
        )
    ndim = a.shape[1]
    sp = np.asarray(spacing_tuple(spacing, ndim)).reshape((1, ndim) + (1,) * ndim)
    err = np.sqrt((((a - b) * sp) ** 2).sum(axis=1))
    m = _mask(mask, err.shape[1:], err.shape[0])
    sel = err if m is None else err[m]
    return float(sel.mean()) if sel.size else math.nan


def _points(points: Any, name: str, ndim: int | None = None) -> np.ndarray:
    arr = to_numpy(points, name).astype(np.float64)
    if arr.ndim != 2 or (ndim is not None and arr.shape[1] != ndim):
        want = "ndim" if ndim is None else str(ndim)
        raise InputError(f"{name}: landmarks must have shape (N, {want}), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name}: landmarks contain NaN or Inf values")
    return arr


def tre(
    points_fixed: Any,
    points_moving: Any,
    disp: Any,
    spacing: Sequence[float] | float | None = None,
) -> np.ndarray:
    """Target registration error of landmark pairs.

    A fixed landmark ``x`` (voxel coordinates in the fixed image, array axis order) is mapped to
    ``x + u(x)`` in the moving image, ``u`` interpolated linearly; the error is the distance to
    the corresponding moving landmark, in mm when ``spacing`` is given (the moving image's voxel
    size per axis; usually both images share it).

    Args:
        points_fixed, points_moving: ``(N, ndim)`` corresponding landmarks in voxels.
        disp: ``(ndim, *S)`` or ``(1, ndim, *S)`` displacement in voxels on the fixed grid.
        spacing: voxel size per axis (default 1: the errors are in voxels).

    Returns:
        ``(N,)`` float64 errors; ``.mean()`` is the usual TRE. Use ``disp = 0`` for the
        initial error.
    """
    field = disp_batch(disp)
    if field.shape[0] != 1:
        raise ValueError(f"tre(): 'disp' must hold one field, got batch {field.shape[0]}")
    field = field[0]
    ndim = field.shape[0]
    pf = _points(points_fixed, "points_fixed", ndim)
    pm = _points(points_moving, "points_moving", ndim)
    if pf.shape != pm.shape:
        raise InputError(
            f"points_moving: {pm.shape[0]} landmarks do not match the {pf.shape[0]} fixed ones"
        )
    shape = np.asarray(field.shape[1:], dtype=np.float64)
    outside = np.any((pf < -0.5) | (pf > shape - 0.5), axis=1)
    if outside.any():
        k = int(np.argmax(outside))
        raise InputError(
            f"points_fixed: landmark {k} at {tuple(pf[k])} lies outside the grid "
            f"{tuple(int(s) for s in shape)}"
        )
    coords = pf.T
    u = np.stack(
        [ndimage.map_coordinates(field[i], coords, order=1, mode="nearest") for i in range(ndim)],
        axis=1,
    )
    sp = np.asarray(spacing_tuple(spacing, ndim))
    return np.sqrt((((pf + u - pm) * sp) ** 2).sum(axis=1))
