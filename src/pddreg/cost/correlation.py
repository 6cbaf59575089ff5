"""Displacement set, correlation layer (SSD cost volume) and ``expected_values``.

Convention (see ``pddreg.spatial`` / README): control point ``k`` of a grid of size ``G`` inside
a moving feature map of size ``S`` sits at voxel ``p_k = (k + 0.5) * S / G - 0.5`` per axis
(integer ``k`` when ``G == S``); the displacement set is ``spacing * {-r..r}^ndim`` in voxels of
the moving map, C order (axis 0 slowest), so the ``|L|`` axis reshapes to ``(2r+1,) * ndim``.
Cost volumes are laid out ``(B, |L|, *G)`` (displacement-major).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from ..errors import InputError
from . import _autograd, _native
from ._lattice import (
    CORRELATION_CHUNK_BYTES,
    DEFAULT_MAX_MEMORY,
    TilePlan,
    checkpointed,
    chunk_shape,
    interleave_perm,
    make_plan,
    pad_grid,
    resample_axis,
    run_chunks,
    tiles_view,
    to_lattice,
    to_lattice_native,
    wants_checkpoint,
    windows,
)

logger = logging.getLogger(__name__)

__all__ = ["correlation", "displacement_set", "expected_values"]

_PADDINGS = ("zeros", "border")


def _check_radius_spacing(fn: str, radius: int, spacing: float) -> None:
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise InputError(f"{fn}: radius must be a non-negative integer, got {radius!r}")
    if not (isinstance(spacing, (int, float)) and math.isfinite(spacing) and spacing > 0):
        raise InputError(f"{fn}: spacing must be a positive finite number, got {spacing!r}")


def displacement_set(
    radius: int,
    spacing: float = 1.0,
    ndim: int = 3,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """All displacements ``spacing * {-r..r}^ndim`` as ``(|L|, ndim)``, C order (axis 0 slowest).

    ``|L| = (2r+1)**ndim``; row ``l`` reshaped over ``(2r+1,) * ndim`` gives the index of each
    component, component ``i`` is the displacement along array axis ``i`` in voxels.
    """
    _check_radius_spacing("displacement_set()", radius, spacing)
    if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 1:
        raise InputError(f"displacement_set(): ndim must be a positive integer, got {ndim!r}")
    dtype = dtype or torch.get_default_dtype()
    steps = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64) * spacing
    mesh = torch.meshgrid(*([steps] * ndim), indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=1).to(dtype)


def _shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_pair(fn: str, fixed: torch.Tensor, moving: torch.Tensor, names: tuple[str, str]):
    if not isinstance(fixed, torch.Tensor) or fixed.dim() < 3:
        got = _shape_str(fixed) if isinstance(fixed, torch.Tensor) else type(fixed).__name__
        raise ValueError(f"{fn}: '{names[0]}' must have shape (B, C, *grid), got {got}")
    nd = fixed.dim() - 2
    if not isinstance(moving, torch.Tensor) or moving.dim() != fixed.dim():
        got = _shape_str(moving) if isinstance(moving, torch.Tensor) else type(moving).__name__
        raise ValueError(
            f"{fn}: '{names[1]}' must have shape (B, C, *spatial) with {nd} spatial axes, got {got}"
        )


def _max_memory(max_memory: int | None) -> int:
    if max_memory is None:
        return DEFAULT_MAX_MEMORY
    if max_memory <= 0:
        raise InputError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    return int(max_memory)


def correlation(
    feat_fixed: torch.Tensor,
    feat_moving: torch.Tensor,
    radius: int,
    spacing: float = 1.0,
    *,
    padding: str = "zeros",
    max_memory: int | None = None,
) -> torch.Tensor:
    """SSD cost volume between fixed features at a control grid and displaced moving features.

    ``cost[b, l, k] = sum_c (feat_fixed[b, c, k] - feat_moving[b, c](p_k + d_l))**2`` with
    ``p_k`` the position of control point ``k`` in the moving map (``(k + 0.5) * S / G - 0.5``
    per axis) and ``d_l`` the rows of ``displacement_set(radius, spacing, ndim)``.  Moving
    features are linearly interpolated at fractional positions; outside the map they are 0
    (``padding="zeros"``, as the lecture's ``F.unfold``) or the border value (``"border"``).

    Args:
        feat_fixed: (B, C, *G) fixed features at the control grid.
        feat_moving: (B, C, *S) moving features (any grid size; usually ``S >= G``).
        radius: displacements per axis are ``-radius..radius`` steps.
        spacing: step in voxels of the moving map (sub-voxel allowed, e.g. 0.5).
        padding: "zeros" or "border".
        max_memory: bound in bytes on the working memory of one chunk (default 256 MiB).

    Returns:
        (B, |L|, *G) cost, differentiable w.r.t. both feature maps.
    """
    fn = "correlation()"
    _check_pair(fn, feat_fixed, feat_moving, ("feat_fixed", "feat_moving"))
    _check_radius_spacing(fn, radius, spacing)
    if padding not in _PADDINGS:
        raise InputError(f"{fn}: padding must be 'zeros' or 'border', got {padding!r}")
    B, C = feat_fixed.shape[:2]
    grid = tuple(feat_fixed.shape[2:])
    if feat_moving.shape[:2] != feat_fixed.shape[:2]:
        raise ValueError(
            f"{fn}: 'feat_moving' must have shape ({B}, {C}, *spatial) like 'feat_fixed', "
            f"got {_shape_str(feat_moving)}"
        )
    size = tuple(feat_moving.shape[2:])
    if min(grid) < 1 or min(size) < 1:
        raise ValueError(f"{fn}: empty feature map {_shape_str(feat_fixed)}")
    if feat_moving.dtype != feat_fixed.dtype:
        feat_moving = feat_moving.to(feat_fixed.dtype)
    mem = _max_memory(max_memory)
    plan = make_plan(grid, size, radius, spacing, C)
    if plan is None:
        if grid and len(grid) <= 3 and _native.supports(feat_fixed, feat_moving):
            out = _correlation_product(feat_fixed, feat_moving, radius, spacing, padding, mem)
            if out is not None:
                return out
        logger.debug("correlation: no small common lattice step, using the direct path")
        return _correlation_direct(feat_fixed, feat_moving, radius, spacing, padding, mem)
    return _correlation_tiled(feat_fixed, feat_moving, plan, padding, mem)


def _correlation_tiled(
    fixed: torch.Tensor, moving: torch.Tensor, plan: TilePlan, padding: str, mem: int
) -> torch.Tensor:
    nd = plan.ndim
    B, C = fixed.shape[:2]
    grad = torch.is_grad_enabled() and (fixed.requires_grad or moving.requires_grad)
    if nd <= 3 and _native.supports(fixed, moving):
        g, a, b, plen = to_lattice_native(moving, plan, padding)
        n = 2 * plan.radius + 1
        if grad:  # native backward
            return _autograd.correlation(fixed, g, a, b, n, plen)
        return _native.correlation(fixed.contiguous(), g.contiguous(), a, b, n, plen)
    g = to_lattice(moving, plan, padding)  # (B, C, *N)
    ones_g = torch.ones_like(g[:, :1])
    g_aug = torch.cat([-2.0 * g, (g * g).sum(1, keepdim=True), ones_g], 1)
    f = pad_grid(fixed, plan)
    f_aug = torch.cat([f, torch.ones_like(f[:, :1]), (f * f).sum(1, keepdim=True)], 1)
    # (B, *nT, C+2, *W) and (B, *nT, *T, C+2)
    wv = windows(g_aug, plan).permute(
        [0] + [2 + ax for ax in range(nd)] + [1] + [2 + nd + ax for ax in range(nd)]
    )
    fv = tiles_view(f_aug, plan).permute(
        [0] + [2 + 2 * ax for ax in range(nd)] + [3 + 2 * ax for ax in range(nd)] + [1]
    )
    idx = plan.index(fixed.device)
    kt, nl = idx.shape
    wt = plan.window_nodes
    ca = C + 2
    esize = fixed.element_size()
    per_tile = esize * (kt * ca + ca * wt + kt * wt + 2 * kt * nl) + 8 * kt * nl
    chunk = chunk_shape(plan.ntiles, per_tile, min(mem, CORRELATION_CHUNK_BYTES))
    ckpt = wants_checkpoint(B * nl * math.prod(plan.grid) * esize, fixed, moving)
    out = None if grad else fixed.new_empty((B, nl, *plan.padded_grid))
    results = []
    for b, (fvb, wvb) in enumerate(zip(fv.unbind(0), wv.unbind(0), strict=True)):
        target = None if out is None else tiles_view(out[b : b + 1], plan)[0]

        def block(
            sl: tuple[slice, ...], pieces: list[torch.Tensor], target=target
        ) -> torch.Tensor | None:
            counts = [s.stop - s.start for s in sl]
            n = math.prod(counts)

            def compute(fc: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
                prod = torch.bmm(fc.reshape(n, kt, ca), wc.reshape(n, ca, wt))
                return prod.gather(2, idx.expand(n, kt, nl)).view(*counts, *plan.tile, nl)

            cost = checkpointed(compute, *pieces, enabled=ckpt)
            if target is None:
                return cost
            tsl: list[slice] = [slice(None)]
            for s in sl:
                tsl += [s, slice(None)]
            target[tuple(tsl)].copy_(cost.permute(interleave_perm(nd, 0)))
            return None

        res = run_chunks(block, [fvb, wvb], plan.ntiles, chunk)
        if res is not None:
            results.append(res.permute(interleave_perm(nd, 0)).reshape(nl, *plan.padded_grid))
    if out is None:
        out = results[0].unsqueeze(0) if len(results) == 1 else torch.stack(results, 0)
    if plan.padded_grid != plan.grid:
        out = out[(slice(None), slice(None), *[slice(0, g) for g in plan.grid])].contiguous()
    return out


def _normalised(coords: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(..., ndim) voxel coords (axis order) -> grid_sample coords (reversed, align_corners)."""
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in size], dtype=coords.dtype)
    norm = coords * scale.to(coords.device) - 1.0
    return norm.flip(-1)


def _point_positions(grid: tuple[int, ...], size: tuple[int, ...], device, dtype) -> torch.Tensor:
    """(*G, ndim) voxel positions of the control points in the moving map."""
    axes = [
        (torch.arange(g, device=device, dtype=torch.float64) + 0.5) * (s / g) - 0.5
        for g, s in zip(grid, size, strict=True)
    ]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh, -1).to(dtype)


def _sample_shifted(
    x: torch.Tensor, grid: tuple[int, ...], disps: torch.Tensor, padding: str
) -> torch.Tensor:
    """x (B, C, *S) sampled at p_k + d for d in disps (Lc, ndim) -> (B, C, Lc, *G)."""
    B = x.shape[0]
    size = tuple(x.shape[2:])
    pos = _point_positions(grid, size, x.device, x.dtype)  # (*G, nd)
    nd = len(grid)
    coords = pos.unsqueeze(0) + disps.view(-1, *([1] * nd), nd).to(x.dtype)  # (Lc, *G, nd)
    norm = _normalised(coords, size)
    lc = disps.shape[0]
    norm = norm.reshape(1, lc * grid[0], *grid[1:], nd).expand(B, *([-1] * (nd + 1)))
    out = F.grid_sample(x, norm, mode="bilinear", padding_mode=padding, align_corners=True)
    return out.view(B, x.shape[1], lc, *grid)


def _product_lattice(
    x: torch.Tensor, grid: tuple[int, ...], radius: int, spacing: float, padding: str, mem: int
) -> tuple[torch.Tensor, int] | None:
    """``x`` (B, C, *S) resampled (separable linear interpolation, exactly what trilinear
    sampling does) at every ``p_k + d_j`` per axis: a lattice of ``G * (2r + 1)`` nodes per axis
    with node ``(2r + 1) k + j`` (the last axis phase-major: ``j * G + k``, plen ``G``); None
    when it would exceed ``mem`` bytes."""
    B, C = x.shape[:2]
    size = tuple(x.shape[2:])
    n = 2 * radius + 1
    if B * C * math.prod(g * n for g in grid) * x.element_size() > mem:
        return None
    lat = x
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64) * spacing
    for ax, (g, s) in enumerate(zip(grid, size, strict=True)):
        p = (torch.arange(g, dtype=torch.float64) + 0.5) * (s / g) - 0.5
        if ax == len(grid) - 1:
            pos = (offsets[:, None] + p[None, :]).reshape(-1)  # phase-major
        else:
            pos = (p[:, None] + offsets[None, :]).reshape(-1)
        lat = resample_axis(lat, 2 + ax, pos, padding)
    return lat, grid[-1]


def _correlation_product(
    fixed: torch.Tensor, moving: torch.Tensor, radius: int, spacing: float, padding: str, mem: int
) -> torch.Tensor | None:
    """Native path for any stride and spacing, on the product lattice of ``_product_lattice``
    (lattice steps ``a = 2r + 1``, ``b = 1``); None when that lattice would exceed ``mem``."""
    nd = fixed.dim() - 2
    n = 2 * radius + 1
    res = _product_lattice(moving, tuple(fixed.shape[2:]), radius, spacing, padding, mem)
    if res is None:
        return None
    lat, plen = res
    a, b = (n,) * nd, (1,) * nd
    if torch.is_grad_enabled() and (fixed.requires_grad or lat.requires_grad):
        return _autograd.correlation(fixed, lat, a, b, n, plen)
    return _native.correlation(fixed.contiguous(), lat.contiguous(), a, b, n, plen)


def _correlation_direct(
    fixed: torch.Tensor, moving: torch.Tensor, radius: int, spacing: float, padding: str, mem: int
) -> torch.Tensor:
    nd = fixed.dim() - 2
    B, C = fixed.shape[:2]
    grid = tuple(fixed.shape[2:])
    disps = displacement_set(radius, spacing, nd, device=fixed.device, dtype=fixed.dtype)
    per_disp = 3 * B * C * math.prod(grid) * fixed.element_size()
    lc = max(1, mem // per_disp)
    parts = []
    for l0 in range(0, disps.shape[0], lc):
        warped = _sample_shifted(moving, grid, disps[l0 : l0 + lc], padding)
        parts.append(((warped - fixed.unsqueeze(2)) ** 2).sum(1))
    return torch.cat(parts, 1)


def expected_values(
    values: torch.Tensor,
    prob: torch.Tensor,
    radius: int,
    spacing: float = 1.0,
    *,
    padding: str = "border",
    max_memory: int | None = None,
) -> torch.Tensor:
    """Probability-weighted values at the displaced positions of every control point.

    ``out[b, c, k] = sum_l prob[b, l, k] * values[b, c](p_k + d_l)`` (linear interpolation,
    ``p_k`` and ``d_l`` as in :func:`correlation`).  Used by the non-local label loss with
    one-hot moving labels as ``values``.

    Args:
        values: (B, C, *S) e.g. one-hot moving labels (float).
        prob: (B, |L|, *G) probabilities over the displacement set (``softmax(-cost, 1)``).
        radius, spacing: the displacement set of ``prob``.
        padding: "border" (default) or "zeros" outside ``values``.
        max_memory: bound in bytes on the working memory of one chunk.

    Returns:
        (B, C, *G), differentiable w.r.t. ``prob`` and ``values``.
    """
    fn = "expected_values()"
    _check_pair(fn, prob, values, ("prob", "values"))
    _check_radius_spacing(fn, radius, spacing)
    if padding not in _PADDINGS:
        raise InputError(f"{fn}: padding must be 'zeros' or 'border', got {padding!r}")
    nd = prob.dim() - 2
    nl = (2 * radius + 1) ** nd
    B = prob.shape[0]
    grid = tuple(prob.shape[2:])
    if prob.shape[1] != nl:
        raise ValueError(
            f"{fn}: 'prob' must have shape (B, {nl}, *grid) for radius {radius} in {nd}D, "
            f"got {_shape_str(prob)}"
        )
    if values.shape[0] != B:
        raise ValueError(
            f"{fn}: 'values' must have shape ({B}, C, *spatial), got {_shape_str(values)}"
        )
    if not values.is_floating_point():
        values = values.to(prob.dtype)
    if values.dtype != prob.dtype:
        values = values.to(prob.dtype)
    C = values.shape[1]
    mem = _max_memory(max_memory)
    plan = make_plan(grid, tuple(values.shape[2:]), radius, spacing, C)
    n = 2 * radius + 1
    if 1 <= nd <= 3 and _native.supports(prob, values):
        if plan is not None:
            v, a, b, plen = to_lattice_native(values, plan, padding)
            return _autograd.expected_values(prob, v, a, b, n, plen)
        res = _product_lattice(values, grid, radius, spacing, padding, mem)
        if res is not None:
            return _autograd.expected_values(prob, res[0], (n,) * nd, (1,) * nd, n, res[1])
    if plan is None:
        disps = displacement_set(radius, spacing, nd, device=prob.device, dtype=prob.dtype)
        per_disp = 3 * B * C * math.prod(grid) * prob.element_size()
        lc = max(1, mem // per_disp)
        total = None
        for l0, pc in zip(range(0, nl, lc), prob.split(lc, 1), strict=True):
            sampled = _sample_shifted(values, grid, disps[l0 : l0 + lc], padding)
            part = (sampled * pc.unsqueeze(1)).sum(2)
            total = part if total is None else total + part
        assert total is not None
        return total
    v = to_lattice(values, plan, padding)  # (B, C, *N)
    wv = windows(v, plan).permute(
        [0] + [2 + ax for ax in range(nd)] + [2 + nd + ax for ax in range(nd)] + [1]
    )  # (B, *nT, *W, C)
    pv = tiles_view(pad_grid(prob, plan), plan).permute(
        [0] + [2 + 2 * ax for ax in range(nd)] + [3 + 2 * ax for ax in range(nd)] + [1]
    )  # (B, *nT, *T, L)
    idx = plan.index(prob.device)
    kt = idx.shape[0]
    wt = plan.window_nodes
    esize = prob.element_size()
    per_tile = esize * (kt * nl + kt * wt + wt * C + kt * C) + 8 * kt * nl
    chunk = chunk_shape(plan.ntiles, per_tile, mem)
    ckpt = wants_checkpoint(B * C * math.prod(plan.grid) * esize * kt, prob, values)
    results = []
    for pvb, wvb in zip(pv.unbind(0), wv.unbind(0), strict=True):

        def block(sl: tuple[slice, ...], pieces: list[torch.Tensor]) -> torch.Tensor:
            counts = [s.stop - s.start for s in sl]
            n = math.prod(counts)

            def compute(pc: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
                pc = pc.reshape(n, kt, nl)
                dense = pc.new_zeros(n, kt, wt).scatter(2, idx.expand(n, kt, nl), pc)
                return torch.bmm(dense, wc.reshape(n, wt, C)).view(*counts, *plan.tile, C)

            return checkpointed(compute, *pieces, enabled=ckpt)

        res = run_chunks(block, [pvb, wvb], plan.ntiles, chunk)
        assert res is not None
        results.append(res.permute(interleave_perm(nd, 0)).reshape(C, *plan.padded_grid))
    out = results[0].unsqueeze(0) if len(results) == 1 else torch.stack(results, 0)
    if plan.padded_grid != plan.grid:
        out = out[(slice(None), slice(None), *[slice(0, g) for g in plan.grid])].contiguous()
    return out
