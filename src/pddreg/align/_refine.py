"""Inverse-compositional Gauss-Newton (Levenberg-Marquardt) on MIND-SSC at one pyramid level.

At the level's fixed points ``p`` (mm, fixed physical frame) the residual is
``r(p) = MIND(moving; W(p)) - MIND(fixed; p)``, the moving descriptor evaluated pointwise through
the current map ``W = to_moving @ T`` (see :mod:`._features`): the moving image is sampled from
its own grid at every evaluation. The inverse-compositional linearisation
``MIND(fixed; delta(p)) ~ MIND(fixed; p) + grad MIND(fixed; p) . d delta / d theta`` gives a
Jacobian that depends on the fixed image only (computed once per level and model); the update
is ``T <- T @ inv(delta(theta))``. Points whose mapped centre leaves the moving image (or its
mask) do not take part; in the cost they count as an unrelated pair would
(:attr:`LevelProblem.rho`), so that shrinking the overlap is never rewarded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._features import PointSampler, mind_and_jacobian, mind_from_samples
from ._geometry import increment, jacobian_basis, n_params, unravel
from ._pyramid import Level

__all__ = ["LevelProblem", "evaluate", "make_problem", "refine"]


@dataclass
class LevelProblem:
    """The fixed side of one level and the moving level it is compared with.

    Attributes:
        points: ``(N, ndim)`` fixed points in mm (fixed physical frame).
        feat: ``(N, C)`` fixed MIND-SSC (radius 0) at the points.
        grad: ``(N, C, ndim)`` its gradient per mm.
        mean_var: the fixed descriptor's mean variance estimate (the clamp reference of both
            sides).
        offsets: ``(2 ndim, ndim)`` MIND neighbour offsets in mm (along the fixed axes).
        rho: mean squared descriptor difference (per channel) of unrelated points: the cost of
            a fixed point without partner.
        sampler: samples the moving level image (channel 0) and mask (last channel);
            grad_sampler: the image, its ``ndim`` index-space derivatives and the mask.
        to_moving: fixed mm -> moving level index (float64), without the transform.
        centre, scale: centre (mm) and length scale (mm) of the parametrisation.
        spacing: mm per axis of the fixed level.
    """

    points: Tensor
    feat: Tensor
    grad: Tensor
    mean_var: Tensor
    offsets: Tensor
    rho: float
    sampler: PointSampler
    grad_sampler: PointSampler
    has_mask: bool
    to_moving: Tensor
    centre: Tensor
    scale: float
    spacing: tuple[float, ...]
    _jac: dict = field(default_factory=dict)


def _offsets(steps: Tensor) -> Tensor:
    """``[-s_0, +s_0, -s_1, +s_1, ...]`` from the rows ``s_i`` of ``steps``."""
    ndim = steps.shape[0]
    return torch.stack([sgn * steps[i] for i in range(ndim) for sgn in (-1.0, 1.0)])


def _level_points(level: Level, max_points: int, seed: int) -> Tensor:
    """Level indices ``(N, ndim)`` of the fixed points: the mask voxels (all voxels without a
    mask), a fixed random subset of ``max_points`` above that (choosing the voxels of largest
    image gradient instead was less precise across contrasts)."""
    dev = level.image.device
    if level.mask is not None:
        flat = torch.nonzero(level.mask.reshape(-1) > 0.5).reshape(-1)
    else:
        flat = torch.arange(level.image.numel(), device=dev)
    if flat.numel() > max_points:
        gen = torch.Generator().manual_seed(seed)
        flat = flat[torch.randperm(flat.numel(), generator=gen)[:max_points].to(dev)]
    return unravel(flat, level.shape)


def _unrelated_cost(
    feat: Tensor, moving: Level, to_moving: Tensor, offsets: Tensor, mean_var: Tensor, seed: int
) -> float:
    """Expected squared descriptor difference (per channel) of a fixed and a moving point
    drawn independently: ``mean_c Var(F_c) + Var(G_c) + (E F_c - E G_c)^2``, with ``G`` the
    moving descriptor at random moving voxels (neighbours along the fixed axes as mapped by
    the initial map). It is what a fixed point without partner costs, neutral between
    matching and dropping points (a flat fixed image makes ``2 Var(F)`` vanish)."""
    ndim = offsets.shape[1]
    idx = _level_points(moving, feat.shape[0], seed + 7919).to(offsets.dtype)
    lin = to_moving[:ndim, :ndim].to(offsets.device, offsets.dtype)
    eye = torch.eye(ndim + 1, dtype=torch.float64)
    vals, _ = PointSampler(moving.image)(idx, eye, offsets @ lin.t())
    g = mind_from_samples(vals[0], ndim, mean_var)
    if feat.shape[0] < 2 or g.shape[0] < 2:
        return 1.0
    rho = feat.var(dim=0) + g.var(dim=0) + (feat.mean(dim=0) - g.mean(dim=0)).square()
    return max(float(rho.mean()), 1e-6)


def make_problem(
    fixed: Level,
    moving: Level,
    fixed_spacing: tuple[float, ...],
    phys_to_moving: Tensor,
    centre: Tensor,
    max_points: int,
    dilation: int = 1,
    seed: int = 0,
) -> LevelProblem | None:
    """Fixed points, descriptors and gradients of one level (None when there are too few
    points). ``phys_to_moving``: fixed mm -> moving full-resolution index (float64)."""
    ndim = len(fixed.shape)
    dev, dtype = fixed.image.device, fixed.image.dtype
    idx = _level_points(fixed, max_points, seed)
    if idx.shape[0] < 4 * ndim:
        return None
    sf = torch.tensor(fixed_spacing, dtype=torch.float64)
    mm_from_full = torch.diag(torch.cat([sf, torch.ones(1, dtype=torch.float64)]))
    level_to_mm = mm_from_full @ fixed.to_full
    mm_to_level = torch.linalg.inv(level_to_mm)
    k = idx.to(torch.float64)
    points = (k @ level_to_mm[:ndim, :ndim].t().to(dev) + level_to_mm[:ndim, -1].to(dev)).to(dtype)
    spacing = tuple(float(s) for s in fixed.spacing)
    steps = torch.diag(torch.tensor(spacing, dtype=torch.float64)) * float(dilation)
    offsets = _offsets(steps).to(dev, dtype)
    # fixed samples at the neighbours of the points and of the points +- one voxel per axis
    shifts = torch.cat(
        [
            torch.zeros(1, ndim, dtype=torch.float64),
            _offsets(torch.diag(torch.tensor(spacing, dtype=torch.float64))),
        ]
    )
    all_off = (shifts[:, None, :].to(dev, dtype) + offsets[None]).reshape(-1, ndim)
    fsampler = PointSampler(fixed.image)
    vals, _ = fsampler(points, mm_to_level, all_off)
    vals = vals[0].reshape(points.shape[0], shifts.shape[0], offsets.shape[0])
    a_dist = vals[:, 0]
    from ._features import _pair_index

    a, b = _pair_index(ndim, dev)
    dist = (a_dist.index_select(1, a) - a_dist.index_select(1, b)).square()
    mean_var = (dist - dist.amin(dim=1, keepdim=True)).mean()
    feats = mind_from_samples(vals.reshape(-1, offsets.shape[0]), ndim, mean_var)
    feats = feats.reshape(points.shape[0], shifts.shape[0], -1)
    feat = feats[:, 0]
    grad = torch.stack(
        [(feats[:, 2 + 2 * i] - feats[:, 1 + 2 * i]) / (2.0 * spacing[i]) for i in range(ndim)],
        dim=-1,
    )
    to_moving = torch.linalg.inv(moving.to_full) @ phys_to_moving
    rho = _unrelated_cost(feat, moving, to_moving, offsets, mean_var, seed)
    rel = points.double() - centre.to(dev)
    scale = float(rel.square().sum(dim=1).mean().sqrt().clamp(min=1e-3))
    # moving image, its index-space gradient (for the ESM Jacobian) and its mask as channels
    mgrad = [
        torch.gradient(moving.image[0, 0], dim=i)[0]
        if moving.shape[i] > 1
        else torch.zeros_like(moving.image[0, 0])
        for i in range(ndim)
    ]
    chans = [moving.image, torch.stack(mgrad)[None]]
    plain = [moving.image]
    if moving.mask is not None:
        chans.append(moving.mask)
        plain.append(moving.mask)
    return LevelProblem(
        points=points,
        feat=feat,
        grad=grad,
        mean_var=mean_var,
        offsets=torch.cat([torch.zeros(1, ndim, device=dev, dtype=dtype), offsets]),
        rho=rho,
        sampler=PointSampler(torch.cat(plain, 1)),
        grad_sampler=PointSampler(torch.cat(chans, 1)),
        has_mask=moving.mask is not None,
        to_moving=to_moving,
        centre=centre,
        scale=scale,
        spacing=spacing,
    )


def evaluate(
    prob: LevelProblem, transform: Tensor, with_grad: bool = False
) -> tuple[tuple[float, float], Tensor, Tensor, Tensor | None]:
    """Costs, residuals ``(N, C)``, validity weights ``(N,)`` of a transform (homogeneous
    float64, fixed mm frame) and, with ``with_grad``, the derivative ``(N, C, ndim)`` of the
    moving descriptor with respect to a shift of the fixed point (per mm).

    The costs are the mean squared descriptor difference per channel (1) over all fixed points,
    those without a partner in the moving image counting :attr:`LevelProblem.rho` (used to
    compare maps of different overlap) and (2) over the valid points only (what the local
    steps minimise: with the penalty, a true tilt that pushes points out of a thin slab would
    be resisted)."""
    ndim = prob.points.shape[1]
    mat = prob.to_moving @ transform
    sampler = prob.grad_sampler if with_grad else prob.sampler
    vals, centre = sampler(prob.points, mat, prob.offsets)
    valid = (centre.abs() <= 1.0).all(dim=1)
    if prob.has_mask:
        valid &= vals[-1, :, 0] > 0.5
    if with_grad:
        lin = mat[:ndim, :ndim].to(vals.dtype).to(vals.device)
        gidx = vals[1 : 1 + ndim, :, 1:].permute(1, 2, 0)  # (N, 2n, ndim) per moving index
        g, dg = mind_and_jacobian(vals[0, :, 1:], gidx @ lin, ndim, prob.mean_var)
    else:
        g, dg = mind_from_samples(vals[0, :, 1:], ndim, prob.mean_var), None
    r = g - prob.feat
    w = valid.to(r.dtype)
    return _costs(prob, r, w), r, w, dg


def _costs(prob: LevelProblem, r: Tensor, w: Tensor) -> tuple[float, float]:
    """(penalised cost, mean over the valid points); see :func:`evaluate`."""
    n = prob.points.shape[0]
    ssd = (r.square().mean(dim=1) * w).sum()
    count = w.sum()
    penalised = float((ssd + (n - count) * prob.rho) / n)
    plain = float(ssd / count) if float(count) > 0 else math.inf
    return penalised, plain


def _dpdt(prob: LevelProblem, mode: str) -> Tensor:
    """``(N, ndim, P)``: derivative of ``delta(theta)(p)`` at theta = 0 (cached per model)."""
    key = ("dpdt", mode)
    if key in prob._jac:
        return prob._jac[key]
    ndim = prob.points.shape[1]
    dev, dtype = prob.points.device, prob.points.dtype
    n = prob.points.shape[0]
    cols = [torch.eye(ndim, device=dev, dtype=dtype)[None].expand(n, -1, -1)]
    rel = (prob.points - prob.centre.to(dev, dtype)) / prob.scale
    basis = jacobian_basis(mode, ndim)
    if basis:
        b = torch.stack(basis).to(dev, dtype)  # (K, n, n)
        cols.append(torch.einsum("kij,nj->nik", b, rel))
    if mode == "projective":  # the perspective row (see _geometry.increment)
        cols.append(-rel[:, :, None] * rel[:, None, :])
    out = torch.cat(cols, dim=2)
    prob._jac[key] = out
    return out


def refine(
    prob: LevelProblem,
    transform: Tensor,
    mode: str,
    iterations: int,
    tol: float = 0.01,
    method: str = "esm",
    refresh: int = 1,
    max_rejections: int = 3,
    rtol: float = 1e-3,
) -> tuple[Tensor, float]:
    """Levenberg-Marquardt from ``transform`` (homogeneous mm, fixed frame).

    The update is ``T <- T @ delta(theta)`` with ``theta`` from the linearised residual
    ``r + J theta``; ``method`` picks ``J``: ``"esm"`` (efficient second-order minimisation: the
    mean of the fixed and the current moving descriptor gradients), ``"ic"`` (the fixed
    gradients only, computed once: the inverse-compositional approximation) or ``"fc"`` (the
    moving gradients only). The moving gradients are taken at the start and after every
    ``refresh`` accepted steps.
    Steps are accepted when they lower the mean over the valid points; a rejected step is
    retried with ten times the damping. Stops after ``iterations`` steps, when a step (taken
    or proposed) moves no point by more than about ``tol`` voxels of the level or the model
    predicts a decrease below ``rtol`` times the cost, or after ``max_rejections`` rejected
    steps in a row. Returns the transform and its penalised cost
    (:func:`evaluate`).
    """
    ndim = prob.points.shape[1]
    p_count = n_params(mode, ndim)
    dpdt = _dpdt(prob, mode)
    c = prob.feat.shape[1]
    need_grad = method != "ic"
    costs, r, w, dg = evaluate(prob, transform, need_grad)
    lam = 1e-3
    step_tol = tol * min(prob.spacing)
    eye = torch.eye(p_count, dtype=torch.float64)
    jac = None
    since = 0
    for _ in range(iterations):
        if float(w.sum()) < 2 * p_count:
            break
        if jac is None or (need_grad and since >= refresh):
            if need_grad and dg is None:
                costs, r, w, dg = evaluate(prob, transform, True)
            grad = {"ic": prob.grad, "fc": dg}.get(method)
            if grad is None:
                grad = (dg + prob.grad).mul_(0.5)
            jac = torch.bmm(grad, dpdt).reshape(-1, p_count)  # (N * C, P)
            since = 0
        jw = (jac.reshape(-1, c, p_count) * w[:, None, None]).reshape(-1, p_count)
        g = -(jw.t() @ r.reshape(-1)).double().cpu() / c
        h = (jw.t() @ jac).double().cpu() / c
        damp = torch.diag(torch.diagonal(h).clamp(min=1e-12)) + 1e-9 * eye
        accepted = converged = False
        for _ in range(max_rejections + 1):
            theta = torch.linalg.solve(h + lam * damp, g)
            if not bool(torch.isfinite(theta).all()):
                lam *= 10.0
                continue
            # nothing left to gain: a tiny step, or a tiny decrease predicted by the model
            predicted = float(2.0 * theta @ g - theta @ h @ theta) / max(float(w.sum()), 1.0)
            if float(theta.abs().max()) < step_tol or predicted < rtol * costs[1]:
                converged = True
                break
            trial = transform @ increment(mode, ndim, theta, prob.centre, prob.scale)
            c_try, r_try, w_try, dg_try = evaluate(prob, trial, need_grad and refresh <= 1)
            if c_try[1] <= costs[1]:
                transform, costs, r, w, dg = trial, c_try, r_try, w_try, dg_try
                lam = max(lam / 3.0, 1e-6)
                accepted = True
                since += 1
                break
            lam *= 10.0
        if converged or not accepted or float(theta.abs().max()) < step_tol:
            break
    return transform, costs[0]
