"""Differential quantities of displacement fields: Jacobian determinant and diffusion.

Convention:
    Displacements are ``(B, ndim, *spatial)`` in voxel units, component ``i`` along array axis
    ``i``; the transform is ``x -> x + u(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["diffusion", "field_gradient", "jacobian_det"]


def _check_field(disp: torch.Tensor, fn: str) -> int:
    if not isinstance(disp, torch.Tensor):
        raise TypeError(f"{fn}: 'disp' must be a torch.Tensor, got {type(disp).__name__}")
    ndim = disp.dim() - 2
    if ndim < 1 or disp.shape[1] != ndim:
        raise ValueError(
            f"{fn}: 'disp' must have shape (B, ndim, *spatial) with ndim spatial axes, "
            f"got {tuple(disp.shape)}"
        )
    if not disp.is_floating_point():
        raise ValueError(f"{fn}: 'disp' must be floating point, got {disp.dtype}")
    return ndim


def _derivative(x: torch.Tensor, axis: int, step: float) -> torch.Tensor:
    """Central differences along ``axis``, one-sided on the first and last entries."""
    n = x.shape[axis]
    g = torch.empty_like(x)
    if n < 2:
        return g.zero_()
    if n > 2:
        g.narrow(axis, 1, n - 2).copy_(
            (x.narrow(axis, 2, n - 2) - x.narrow(axis, 0, n - 2)) * (0.5 / step)
        )
    g.narrow(axis, 0, 1).copy_((x.narrow(axis, 1, 1) - x.narrow(axis, 0, 1)) / step)
    g.narrow(axis, n - 1, 1).copy_((x.narrow(axis, n - 1, 1) - x.narrow(axis, n - 2, 1)) / step)
    return g


def _steps(spacing: Sequence[float] | None, ndim: int, fn: str) -> list[float]:
    steps = [1.0] * ndim if spacing is None else [float(s) for s in spacing]
    if len(steps) != ndim or any(not s > 0 for s in steps):
        raise ValueError(f"{fn}: 'spacing' must hold {ndim} positive values, got {spacing}")
    return steps


def field_gradient(disp: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Spatial derivatives of every component: ``grad[:, i, j] = d u_i / d x_j``.

    Central differences inside, one-sided differences on the first and last voxels (as
    ``numpy.gradient``); an axis of size 1 has derivative 0.

    Args:
        disp: ``(B, ndim, *S)`` field.
        spacing: step per axis (default 1 voxel).

    Returns:
        ``(B, ndim, ndim, *S)``.
    """
    ndim = _check_field(disp, "field_gradient()")
    steps = _steps(spacing, ndim, "field_gradient()")
    return torch.stack([_derivative(disp, 2 + j, steps[j]) for j in range(ndim)], dim=2)


def jacobian_det(disp: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Jacobian determinant of the transform ``x -> x + u(x)`` at every voxel.

    Args:
        disp: ``(B, ndim, *S)`` displacement. In voxel units (the package convention) when
            ``spacing`` is None. With ``spacing`` (voxel size per axis, e.g. mm), ``disp`` is taken
            in those physical units and derivatives are taken per physical unit. For a voxel-unit
            field the determinant does not depend on the voxel size (``det(I + S G S^-1) =
            det(I + G)``), so leave ``spacing`` None for fields that follow the convention.

    Returns:
        ``(B, *S)``: ``det(I + grad u)`` with central differences (one-sided at the borders).
        Values ``<= 0`` mark folding. Differentiable.

    Convention: see :mod:`pddreg.spatial`.
    """
    ndim = _check_field(disp, "jacobian_det()")
    steps = _steps(spacing, ndim, "jacobian_det()")
    if ndim > 3:
        grad = field_gradient(disp, steps)
        eye = torch.eye(ndim, device=disp.device, dtype=disp.dtype)
        j = grad.movedim(1, -1).movedim(1, -1) + eye
        return torch.linalg.det(j)
    per_axis = [_derivative(disp, 2 + k, steps[k]) for k in range(ndim)]

    def jac(i: int, k: int) -> torch.Tensor:  # d(x + u)_i / d x_k
        d = per_axis[k][:, i]
        return d + 1.0 if i == k else d

    if ndim == 1:
        return jac(0, 0)
    if ndim == 2:
        return jac(0, 0) * jac(1, 1) - jac(0, 1) * jac(1, 0)
    return (
        jac(0, 0) * (jac(1, 1) * jac(2, 2) - jac(1, 2) * jac(2, 1))
        - jac(0, 1) * (jac(1, 0) * jac(2, 2) - jac(1, 2) * jac(2, 0))
        + jac(0, 2) * (jac(1, 0) * jac(2, 1) - jac(1, 1) * jac(2, 0))
    )


def diffusion(disp: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: squared forward differences of the field, averaged.

    ``sum_j mean((u[..., x_j + 1, ...] - u[..., x_j, ...]) ** 2)`` over the spatial axes ``j``
    (each mean runs over batch, components and positions). Differentiable; used as a loss.

    Args:
        disp: ``(B, ndim, *S)`` displacement (any units; the result is in those units squared).

    Returns:
        scalar tensor (0 for a constant field).
    """
    ndim = _check_field(disp, "diffusion()")
    total = disp.new_zeros(())
    for j in range(ndim):
        axis = 2 + j
        n = disp.shape[axis]
        if n < 2:
            continue
        diff = disp.narrow(axis, 1, n - 1) - disp.narrow(axis, 0, n - 1)
        total = total + diff.pow(2).mean()
    return total
