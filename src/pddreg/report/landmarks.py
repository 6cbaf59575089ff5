"""Landmark target registration error (TRE) of a registration: ``register --fixed-landmarks``.

A landmark file holds one point per row (CSV; :func:`pddreg.cli.read_points`): a header
``i,j,k`` (voxel indices, array axis order) or ``x,y,z`` (world mm, NIfTI RAS) says which, no
header means voxels, or the caller says so. Row ``n`` of the fixed file corresponds to row ``n``
of the moving file. A fixed landmark is mapped into the moving image by the registration
(:func:`pddreg.api.map_points`); the error is its distance to the moving landmark in world mm
(pixels for images without a physical spacing). "Before" is the distance by the headers'
alignment alone (the identity for images on one grid).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["landmark_errors", "landmark_summary", "read_landmarks"]


def read_landmarks(path: str, ndim: int, space: str = "auto") -> tuple[np.ndarray, str]:
    """``(points (N, ndim) float64, "voxel" or "mm")`` from a CSV file (see the module)."""
    from ..cli import read_points

    pts, found, _ = read_points(path, ndim, space)
    return pts, found


def _saved(result: Any, moving_shape: tuple[int, ...], space: str) -> Any:
    from pathlib import Path

    from ..data.transforms import SavedRegistration

    return SavedRegistration(
        disp=np.asarray(result.disp, dtype=np.float32),
        fixed_shape=tuple(int(s) for s in result.disp.shape[1:]),
        fixed_world=np.asarray(result.fixed_world, dtype=np.float64),
        moving_shape=tuple(int(s) for s in moving_shape),
        moving_world=np.asarray(result.moving_world, dtype=np.float64),
        space=space,
        folder=Path("."),
    )


def _to_mm(points: np.ndarray, world: np.ndarray) -> np.ndarray:
    n = world.shape[0] - 1
    return points @ world[:n, :n].T + world[:n, n]


def landmark_errors(
    result: Any,
    fixed_points: Any,
    moving_points: Any,
    fixed_space: str = "voxel",
    moving_space: str = "voxel",
    moving_shape: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-landmark errors before and after a registration, in world mm.

    Args:
        result: a :class:`pddreg.api.RegistrationResult` (``disp``, ``fixed_world``,
            ``moving_world``).
        fixed_points: ``(N, ndim)`` in the fixed image (voxel indices or mm).
        moving_points: ``(N, ndim)`` the corresponding points in the moving image.
        fixed_space, moving_space: ``"voxel"`` or ``"mm"`` for each.
        moving_shape: the moving image's shape (only checked for its dimension).

    Returns:
        ``(before (N,), after (N,))`` float64 distances in mm.

    Raises:
        InputError: different numbers of points, wrong dimension, a fixed point outside the
            fixed image.
    """
    from ..api import map_points

    ndim = int(result.disp.shape[0])
    pf = np.asarray(fixed_points, dtype=np.float64)
    pm = np.asarray(moving_points, dtype=np.float64)
    for name, p in (("--fixed-landmarks", pf), ("--moving-landmarks", pm)):
        if p.ndim != 2 or p.shape[1] != ndim or not np.all(np.isfinite(p)):
            raise InputError(f"{name}: expected finite (N, {ndim}) points, got shape {p.shape}")
    if pf.shape[0] != pm.shape[0]:
        raise InputError(
            f"--moving-landmarks: {pm.shape[0]} points do not match the {pf.shape[0]} fixed "
            "landmarks (one row per landmark, in the same order)"
        )
    for name, sp in (("fixed", fixed_space), ("moving", moving_space)):
        if sp not in ("voxel", "mm"):
            raise InputError(f"--landmarks-space: {name} space must be voxel or mm, got {sp!r}")
    world_f = np.asarray(result.fixed_world, dtype=np.float64)
    world_m = np.asarray(result.moving_world, dtype=np.float64)
    shape_m = tuple(moving_shape) if moving_shape is not None else tuple(result.disp.shape[1:])
    saved = _saved(result, shape_m, "world")
    fixed_mm = pf if fixed_space == "mm" else _to_mm(pf, world_f)
    moving_mm = pm if moving_space == "mm" else _to_mm(pm, world_m)
    mapped = map_points(saved, fixed_mm, "mm")
    before = np.linalg.norm(fixed_mm - moving_mm, axis=1)
    after = np.linalg.norm(mapped - moving_mm, axis=1)
    return before, after


def _stat(values: np.ndarray) -> dict[str, float | None]:
    def f(x: float) -> float | None:
        return None if not math.isfinite(x) else float(x)

    return {
        "mean": f(float(values.mean())),
        "std": f(float(values.std())),
        "median": f(float(np.median(values))),
        "max": f(float(values.max())),
    }


def landmark_summary(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """The ``metrics.json`` entries of :func:`landmark_errors`: ``tre_before_mm`` and
    ``tre_mm`` (means) and ``tre`` (count, mean/std/median/max before and after, per landmark).
    """
    return {
        "tre_before_mm": float(before.mean()),
        "tre_mm": float(after.mean()),
        "tre": {
            "landmarks": int(before.size),
            "before_mm": _stat(before),
            "after_mm": _stat(after),
            "per_landmark_before_mm": [float(v) for v in before],
            "per_landmark_after_mm": [float(v) for v in after],
        },
    }
