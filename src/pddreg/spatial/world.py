"""World coordinates: index-to-world matrices, maps between grids, working grids.

Convention:
    * Every image carries an index-to-world matrix ``A`` of shape ``(ndim + 1, ndim + 1)``
      (homogeneous): the world point in mm of voxel index ``i`` (array axis order) is
      ``A @ [i, 1]``. The world frame is NIfTI's (RAS: x to the left of the patient's right,
      ...); ITK's physical frame (LPS) differs by ``diag(-1, -1, 1)`` (:data:`RAS_TO_LPS`).
    * The map from the fixed grid into the moving grid is ``M = inv(A_m) @ A_f`` (a fixed voxel
      index to the moving voxel index of the same world point, :func:`grid_map`).
    * ``moving_world`` is the moving image seen on the fixed index grid:
      ``moving_world(y) = moving(M y)`` for fixed-voxel coordinates ``y`` (also outside the
      fixed grid). A registration's field ``d`` ``(B, ndim, *S_f)`` is in fixed voxels:
      ``warped(x) = moving_world(x + d(x)) = moving(M (x + d(x)))`` (:func:`map_coords`); the
      same displacement in world mm is ``A_f[:ndim, :ndim] @ d(x)`` (:func:`field_to_world`).
    * A working grid (:func:`working_grid`) covers the fixed image's extent with (nearly)
      isotropic voxels; it relates to the fixed grid as every coarse grid of pddreg does
      (``align_corners=False``): working point ``k`` of a grid of size ``G`` sits at fixed voxel
      ``(k + 0.5) * S / G - 0.5``, so :func:`pddreg.spatial.resize_field` moves fields between
      the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .grid import identity_grid

__all__ = [
    "RAS_TO_LPS",
    "apply_matrix",
    "is_projective",
    "field_to_world",
    "grid_map",
    "map_coords",
    "matrix_field",
    "overlap_fraction",
    "spacing_of",
    "to_lps",
    "working_grid",
    "working_to_fixed",
]


def RAS_TO_LPS(ndim: int) -> np.ndarray:  # noqa: N802 - a named constant matrix per ndim
    """``diag(-1, -1, [1,] 1)``: NIfTI's RAS world to ITK's LPS (its own inverse)."""
    return np.diag([-1.0, -1.0] + [1.0] * (ndim - 2) + [1.0])


def to_lps(matrix: np.ndarray) -> np.ndarray:
    """An index-to-world (or world-to-world) matrix expressed in ITK's LPS frame.

    For an index-to-world matrix ``A`` this is ``RAS_TO_LPS @ A``; for a world-to-world map
    ``W`` use ``F @ W @ F`` (``F = RAS_TO_LPS(ndim)``).
    """
    m = np.asarray(matrix, dtype=np.float64)
    return RAS_TO_LPS(m.shape[0] - 1) @ m


def _check_matrix(matrix: np.ndarray, ndim: int | None, fn: str, name: str) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0] - 1 if m.ndim == 2 else -1
    if m.ndim != 2 or m.shape[0] != m.shape[1] or n not in (1, 2, 3) or (ndim and n != ndim):
        want = f"({ndim + 1}, {ndim + 1})" if ndim else "(ndim + 1, ndim + 1)"
        raise ValueError(f"{fn}: '{name}' must be a homogeneous matrix {want}, got {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{fn}: '{name}' holds NaN or Inf")
    return m


def spacing_of(matrix: np.ndarray) -> tuple[float, ...]:
    """Voxel size in mm per array axis of an index-to-world matrix (its column norms)."""
    m = _check_matrix(matrix, None, "spacing_of()", "matrix")
    n = m.shape[0] - 1
    return tuple(float(v) for v in np.linalg.norm(m[:n, :n], axis=0))


def grid_map(fixed_world: np.ndarray, moving_world: np.ndarray) -> np.ndarray:
    """``M = inv(A_m) @ A_f``: fixed voxel index -> moving voxel index of the same world point.

    Raises ValueError when ``A_m`` is singular (a degenerate header).
    """
    a_f = _check_matrix(fixed_world, None, "grid_map()", "fixed_world")
    a_m = _check_matrix(moving_world, a_f.shape[0] - 1, "grid_map()", "moving_world")
    n = a_m.shape[0] - 1
    if abs(np.linalg.det(a_m[:n, :n])) < 1e-12 * max(1.0, np.abs(a_m[:n, :n]).max() ** n):
        raise ValueError("grid_map(): 'moving_world' is singular (degenerate voxel axes)")
    return np.linalg.solve(a_m, a_f)


def apply_matrix(matrix: np.ndarray | torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Apply a homogeneous matrix ``(ndim + 1, ndim + 1)`` to coordinates ``(B, ndim, *S)``
    (with the perspective division for a projective matrix, :func:`is_projective`)."""
    ndim = coords.shape[1]
    m = torch.as_tensor(
        np.asarray(matrix, dtype=np.float64) if not torch.is_tensor(matrix) else matrix,
        dtype=coords.dtype,
        device=coords.device,
    )
    if m.shape != (ndim + 1, ndim + 1):
        raise ValueError(
            f"apply_matrix(): 'matrix' must be ({ndim + 1}, {ndim + 1}) for coordinates "
            f"(B, {ndim}, *S), got {tuple(m.shape)}"
        )
    lin = m[:ndim, :ndim]
    out = torch.einsum("ij,bj...->bi...", lin, coords)
    out = out + m[:ndim, ndim].view(1, ndim, *([1] * (coords.dim() - 2)))
    if is_projective(m):
        w = torch.einsum("j,bj...->b...", m[ndim, :ndim], coords) + m[ndim, ndim]
        out = out / w.unsqueeze(1)
    return out


def is_projective(matrix: np.ndarray | torch.Tensor) -> bool:
    """Whether a homogeneous matrix has a perspective part (a homography of the 2D global
    stage: its last row is not ``[0, ..., 0, 1]``); :func:`apply_matrix` then divides by the
    last coordinate."""
    last = np.asarray(matrix.detach().cpu() if torch.is_tensor(matrix) else matrix, np.float64)[-1]
    return bool(np.any(last[:-1] != 0.0) or last[-1] != 1.0)


def map_coords(
    matrix: np.ndarray | torch.Tensor,
    shape: Sequence[int],
    disp: torch.Tensor | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Voxel coordinates ``M (x + d(x))`` into the moving grid for every fixed voxel ``x``.

    Args:
        matrix: ``(ndim + 1, ndim + 1)`` fixed index -> moving index (:func:`grid_map`, with the
            global stage composed in where one ran).
        shape: the fixed grid ``S``.
        disp: ``(B, ndim, *S)`` field in fixed voxels, or None (zero).
        device, dtype: of the result when ``disp`` is None (else those of ``disp``, at least
            float32).

    Returns:
        ``(B, ndim, *S)`` coordinates for :func:`pddreg.spatial.sample` on the moving image.
    """
    shape = tuple(int(s) for s in shape)
    if disp is not None:
        if disp.dim() != len(shape) + 2 or tuple(disp.shape[1:]) != (len(shape), *shape):
            raise ValueError(
                f"map_coords(): 'disp' must have shape (B, {len(shape)}, *{shape}), "
                f"got {tuple(disp.shape)}"
            )
        device = disp.device
        dtype = torch.float64 if disp.dtype == torch.float64 else torch.float32
    x = identity_grid(shape, device, dtype).unsqueeze(0)
    if disp is not None:
        x = x + disp.to(dtype)
    return apply_matrix(matrix, x)


def matrix_field(
    matrix: np.ndarray | torch.Tensor,
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The displacement ``A x - x`` ``(1, ndim, *S)`` of an index-space affine map ``A``."""
    x = identity_grid(tuple(shape), device, dtype).unsqueeze(0)
    return apply_matrix(matrix, x) - x


def field_to_world(disp: torch.Tensor, fixed_world: np.ndarray) -> torch.Tensor:
    """A field ``(B, ndim, *S)`` in fixed voxels as world displacements in mm, same shape
    (``A_f[:ndim, :ndim] @ d``; component ``i`` along world axis ``i``)."""
    ndim = disp.shape[1]
    a = _check_matrix(fixed_world, ndim, "field_to_world()", "fixed_world")
    lin = torch.as_tensor(a[:ndim, :ndim], dtype=disp.dtype, device=disp.device)
    return torch.einsum("ij,bj...->bi...", lin, disp)


def overlap_fraction(
    matrix: np.ndarray, fixed_shape: Sequence[int], moving_shape: Sequence[int], samples: int = 24
) -> float:
    """Fraction of the fixed grid whose world points fall inside the moving grid.

    Evaluated on a lattice of at most ``samples`` points per axis (the grids' voxel centres,
    half a voxel of margin on every side).
    """
    fixed_shape = tuple(int(s) for s in fixed_shape)
    moving_shape = np.asarray([int(s) for s in moving_shape], dtype=np.float64)
    m = _check_matrix(matrix, len(fixed_shape), "overlap_fraction()", "matrix")
    axes = [np.linspace(0, s - 1, min(s, samples)) for s in fixed_shape]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(fixed_shape))
    mapped = pts @ m[:-1, :-1].T + m[:-1, -1]
    if is_projective(m):
        w = pts @ m[-1, :-1] + m[-1, -1]
        mapped = np.where(w[:, None] > 0, mapped / np.where(w > 0, w, 1.0)[:, None], np.inf)
    inside = np.all((mapped >= -0.5) & (mapped <= moving_shape - 0.5), axis=1)
    return float(inside.mean())


def working_grid(
    shape: Sequence[int], spacing: Sequence[float], max_voxels: int, min_spacing: float = 0.0
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A grid covering the same extent as ``shape`` with (nearly) isotropic voxels.

    The working voxel size is the finest of ``spacing`` (and at least ``min_spacing``), made
    coarser until the grid holds at most ``max_voxels`` voxels; each axis then gets
    ``round(extent / size)`` voxels (at least 1). Thick slices are thus interpolated and fine
    in-plane voxels pooled, so that features and displacement search see the same mm in
    every direction.

    Returns:
        ``(work_shape, work_spacing)``: the grid size and its actual voxel size per axis in mm
        (extent / size; equal to within the rounding).
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != len(shape) or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(
            f"working_grid(): 'spacing' must hold {len(shape)} positive values, got {spacing}"
        )
    extent = [n * s for n, s in zip(shape, spacing, strict=True)]
    size = max(min(spacing), float(min_spacing))
    volume = math.prod(extent)
    if volume / size ** len(shape) > max_voxels:
        size = (volume / max_voxels) ** (1.0 / len(shape))

    def grid(sz: float) -> tuple[int, ...]:
        return tuple(max(1, int(round(e / sz))) for e in extent)

    out = grid(size)
    while math.prod(out) > max_voxels:  # rounding up on every axis can overshoot slightly
        size *= 1.01
        out = grid(size)
    return out, tuple(e / n for e, n in zip(extent, out, strict=True))


def working_to_fixed(work_shape: Sequence[int], fixed_shape: Sequence[int]) -> np.ndarray:
    """Homogeneous ``(ndim + 1, ndim + 1)`` map from working voxel ``k`` to fixed voxel
    ``(k + 0.5) * S / G - 0.5`` (the ``align_corners=False`` relation)."""
    ratio = [s / g for s, g in zip(fixed_shape, work_shape, strict=True)]
    m = np.diag([*ratio, 1.0])
    m[:-1, -1] = [0.5 * r - 0.5 for r in ratio]
    return m
