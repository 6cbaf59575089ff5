"""Generic multi-level discrete registration: features -> dense search -> regularise -> field.

:func:`discrete_register` is the training-free pipeline behind ``--method mind`` and the
inference path a learned feature net can reuse (pass its ``features`` and its ``alpha``).

Convention: fields are ``(B, ndim, *grid)`` in voxels, ``warped(x) = moving(x + u(x))``, coarse
grids follow ``align_corners=False`` (see :mod:`pddreg.spatial`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from pddreg.features.mind import _box_filter

from .instance import feature_optimise, instance_optimise

if TYPE_CHECKING:
    from .uncertainty import Posterior

__all__ = [
    "InstanceConfig",
    "LevelConfig",
    "LevelOutput",
    "discrete_register",
    "level_step",
    "pool_features",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LevelConfig:
    """One level of the discrete search, all sizes in voxels of the feature map ``F``.

    Attributes:
        pool: both feature maps are average-pooled by this factor first (the level's own
            resolution ``P = ceil(F / pool)``); displacements are counted in voxels of ``P``.
        grid_stride: the fixed features are pooled further by this factor to the control grid
            ``G = ceil(P / grid_stride)`` (one control point per ``grid_stride`` voxels of ``P``).
        radius: displacement set ``spacing * {-radius..radius}^ndim`` (voxels of ``P``).
        spacing: step of the displacement set (voxels of ``P``).
        smooth: radius of a box filter (stride 1, voxels of ``P``) applied to both feature
            maps of this level before the search: it aggregates the features of a block
            around each point and is the anti-aliasing filter for levels whose displacement
            step ``spacing`` is larger than one voxel (0: none).
        fixed_sampling: how the fixed features reach the control grid: ``"area"`` (mean over
            the ``grid_stride`` block, as PDD-Net trains) or ``"point"`` (linear sample at the
            control point, exactly as the moving features are sampled at displacement 0, so
            that identical images give their minimum cost at zero; use with ``smooth``).
        prior: this level's Gaussian prior on its residual (standard deviation in units of the
            radius; 0: none); None takes :func:`discrete_register`'s ``prior``.
        field_smooth: box-3 averaging passes of this level's residual field on its control
            grid (replicate borders): a coarse level then passes on only its bulk motion.
        aggregate: radius of a box window (voxels of ``P``) over which the cost of every
            displacement is averaged before it is sampled at the control points (block
            matching: the mean SSD over the window, not the SSD of window-averaged features,
            which flattens the cost of coarse levels; 0: none). The correlation then runs at
            every voxel of ``P``, so the level costs ``grid_stride^ndim`` times more; the
            windows are centred where ``"point"`` sampling puts the control points
            (``fixed_sampling`` does not apply).
        alpha: this level's six regularisation weights (see ``pddreg.cost.regularise``);
            None takes :func:`discrete_register`'s.

    The capture range of a level is ``pool * spacing * radius`` voxels of ``F``; the cost tensor
    holds ``(2 * radius + 1)^ndim * prod(G)`` values.
    """

    pool: int = 1
    grid_stride: int = 1
    radius: int = 3
    spacing: float = 1.0
    smooth: int = 0
    fixed_sampling: str = "area"
    prior: float | None = None
    field_smooth: int = 0
    aggregate: int = 0
    alpha: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if int(self.smooth) != self.smooth or self.smooth < 0:
            raise ValueError(f"LevelConfig: 'smooth' must be an integer >= 0, got {self.smooth!r}")
        if int(self.aggregate) != self.aggregate or self.aggregate < 0:
            raise ValueError(
                f"LevelConfig: 'aggregate' must be an integer >= 0, got {self.aggregate!r}"
            )
        if self.alpha is not None and len(self.alpha) != 6:
            raise ValueError(f"LevelConfig: 'alpha' must hold six weights, got {self.alpha!r}")
        if self.fixed_sampling not in ("area", "point"):
            raise ValueError(
                "LevelConfig: 'fixed_sampling' must be 'area' or 'point', "
                f"got {self.fixed_sampling!r}"
            )
        if int(self.pool) != self.pool or self.pool < 1:
            raise ValueError(f"LevelConfig: 'pool' must be an integer >= 1, got {self.pool!r}")
        if int(self.grid_stride) != self.grid_stride or self.grid_stride < 1:
            raise ValueError(
                f"LevelConfig: 'grid_stride' must be an integer >= 1, got {self.grid_stride!r}"
            )
        if int(self.radius) != self.radius or self.radius < 0:
            raise ValueError(f"LevelConfig: 'radius' must be an integer >= 0, got {self.radius!r}")
        if not self.spacing > 0:
            raise ValueError(f"LevelConfig: 'spacing' must be > 0, got {self.spacing!r}")


@dataclass(frozen=True)
class InstanceConfig:
    """Instance optimisation after the discrete levels.

    Attributes:
        mode: ``"features"`` (Adam on the feature SSD of the warped moving features, see
            :func:`pddreg.optim.feature_optimise`) or ``"cost"`` (Adam against the last level's
            raw cost volume, see :func:`pddreg.optim.instance_optimise`).
        iters, lr, lambda_: Adam steps, step size and diffusion weight.
        grid_stride: control-point spacing in voxels of ``F`` (mode ``"features"``).
        smooth: box-3 smoothing passes of the control field (mode ``"features"``).
        pool: both feature maps are average-pooled by this factor for the optimisation
            (mode ``"features"``; 2 makes each Adam step 4x (2D) or 8x (3D) cheaper); the
            ``grid_stride`` then counts voxels of the pooled map.
    """

    mode: str = "features"
    iters: int = 50
    lr: float = 0.5
    lambda_: float = 1.0
    grid_stride: int = 2
    smooth: int = 1
    pool: int = 1

    def __post_init__(self) -> None:
        if int(self.pool) != self.pool or self.pool < 1:
            raise ValueError(f"InstanceConfig: 'pool' must be an integer >= 1, got {self.pool!r}")
        if self.mode not in ("features", "cost"):
            raise ValueError(
                f"InstanceConfig: 'mode' must be 'features' or 'cost', got {self.mode!r}"
            )


def pool_features(feat: Tensor, factor: int) -> Tensor:
    """Average-pool ``(B, C, *S)`` to ``ceil(S / factor)`` (area weights; exact box pooling
    when ``factor`` divides ``S``, so pooled point ``k`` sits at ``(k + 0.5) * factor - 0.5``)."""
    if factor == 1:
        return feat
    ndim = feat.dim() - 2
    size = tuple(max(1, -(-s // factor)) for s in feat.shape[2:])
    if all(s % factor == 0 for s in feat.shape[2:]):
        pool = F.avg_pool3d if ndim == 3 else F.avg_pool2d
        return pool(feat, factor, stride=factor)
    adaptive = F.adaptive_avg_pool3d if ndim == 3 else F.adaptive_avg_pool2d
    return adaptive(feat, size)


def _area(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Area-resample ``(B, C, *S)`` to ``shape`` (identity when equal)."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    pool = F.adaptive_avg_pool3d if x.dim() == 5 else F.adaptive_avg_pool2d
    if all(s >= t for s, t in zip(x.shape[2:], shape, strict=True)):
        return pool(x, shape)
    mode = "trilinear" if x.dim() == 5 else "bilinear"
    return F.interpolate(x, size=shape, mode=mode, align_corners=False)


def _to_grid(feat: Tensor, stride: int, how: str) -> Tensor:
    """Fixed features ``(B, C, *P)`` on the control grid ``ceil(P / stride)``."""
    if stride == 1:
        return feat
    if how == "area":
        return pool_features(feat, stride)
    size = tuple(max(1, -(-s // stride)) for s in feat.shape[2:])
    mode = "trilinear" if feat.dim() == 5 else "bilinear"
    return F.interpolate(feat, size=size, mode=mode, align_corners=False)


def _block_mean(cost: Tensor, radius: int, stride: int) -> Tensor:
    """The mean of ``cost`` ``(B, L, *P)`` over a window around each control point of the
    grid ``G = P / stride`` (``P`` a multiple of ``stride``): the points where
    :func:`_to_grid` samples (``i * stride + (stride - 1) / 2``), windows of ``2 * radius +
    1`` voxels (``2 * radius + 2`` for even strides, centred there), replicate borders; one
    strided average pool, without the dense filtered volume."""
    ndim = cost.dim() - 2
    k = 2 * radius + 1 + (1 - stride % 2)
    start = (stride - 1) // 2 - radius
    pad = []
    for n in reversed(cost.shape[2:]):
        g = n // stride
        pad += [max(0, -start), max(0, (g - 1) * stride + start + k - n)]
    pool = F.avg_pool3d if ndim == 3 else F.avg_pool2d
    parts = []
    for chunk in cost.split(256, 1):  # the padded copy one chunk of displacements at a time
        x = F.pad(chunk, pad, mode="replicate") if any(pad) else chunk
        if start > 0:
            x = x[(slice(None), slice(None), *([slice(start, None)] * ndim))]
        parts.append(pool(x, k, stride))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def _pad_to(x: Tensor, stride: int) -> Tensor:
    """Replicate-pad ``(B, C, *P)`` at the end of each axis to a multiple of ``stride``, so that
    the control grid of the level has an integer stride (the correlation's fast lattice path)."""
    if stride == 1:
        return x
    extra = [(-s) % stride for s in x.shape[2:]]
    if not any(extra):
        return x
    pad = []
    for e in reversed(extra):
        pad += [0, e]
    return F.pad(x, pad, mode="replicate")


def _dense(
    field: Tensor,
    pshape: tuple[int, ...],
    padded: tuple[int, ...],
    gshape: tuple[int, ...],
    fshape: tuple[int, ...],
) -> Tensor:
    """A level's control-grid field (voxels of its map ``P``, grid ``G`` over the padded map)
    as a dense field on the feature grid ``F`` in voxels of ``F``."""
    from pddreg.spatial import resize_field

    dense = resize_field(_scale(field, padded, gshape), padded)
    if padded != pshape:
        dense = dense[(slice(None), slice(None), *(slice(0, s) for s in pshape))]
    return dense if pshape == fshape else resize_field(dense, fshape)


def _prior_term(radius: int, ndim: int, sigma: float, like: Tensor) -> Tensor:
    """``|j|^2 / (2 sigma^2)`` over the displacement lattice, shaped ``(1, |L|, 1, ...)``."""
    j = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device) ** 2
    total = j
    for _ in range(ndim - 1):
        total = (total.unsqueeze(-1) + j).flatten()
    return (total / (2 * sigma**2)).view(1, -1, *([1] * ndim))


def _scale(field: Tensor, src: Sequence[int], dst: Sequence[int]) -> Tensor:
    """Re-express a field counted in voxels of a grid ``src`` in voxels of ``dst``."""
    ndim = field.shape[1]
    factors = torch.tensor(
        [d / s for s, d in zip(src, dst, strict=True)], dtype=field.dtype, device=field.device
    )
    return field * factors.view(1, ndim, *([1] * ndim))


def _alphas(alpha: object, n_levels: int) -> list[Tensor | None]:
    if alpha is None:
        return [None] * n_levels
    if isinstance(alpha, Tensor):
        a = alpha.detach().float()
        if a.numel() == 6:
            return [a.flatten()] * n_levels
        if a.dim() == 2 and a.shape == (n_levels, 6):
            return list(a)
    else:
        items = list(alpha)  # type: ignore[call-overload]
        if len(items) == 6 and all(isinstance(v, (int, float)) for v in items):
            t = torch.tensor(items, dtype=torch.float32)
            return [t] * n_levels
        if len(items) == n_levels:
            return [None if v is None else torch.as_tensor(v, dtype=torch.float32) for v in items]
    raise ValueError(
        f"discrete_register(): 'alpha' must hold 6 weights or one set of 6 per level "
        f"({n_levels}), got {alpha!r}"
    )


@dataclass
class LevelOutput:
    """What one level of the discrete search gives (:func:`level_step`).

    Attributes:
        residual: ``(B, ndim, *F)`` the level's field, dense on the feature grid, voxels of F.
        field: ``(B, ndim, *G)`` its soft field on the control grid, voxels of the level's map.
        prob: ``(B, |L|, *G)`` the probabilities (only with ``want_prob``), else None.
        cost: ``(B, |L|, *G)`` the raw (masked, normalised, scaled) cost with ``keep_cost``.
        shapes: ``(P, padded P, G)``: the level's map, padded to the stride, control grid.
    """

    residual: Tensor
    field: Tensor
    prob: Tensor | None
    cost: Tensor | None
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def level_step(
    feat_fixed: Tensor,
    feat_moving: Tensor,
    disp: Tensor | None,
    level: LevelConfig,
    alpha: Tensor | None,
    *,
    cost_scale: float | Tensor = 1.0,
    normalise: bool = False,
    prior: float | None = None,
    padding: str = "border",
    max_memory: int | None = None,
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
    image_shape: tuple[int, ...] | None = None,
    want_prob: bool = False,
    keep_cost: bool = False,
    posterior: Posterior | None = None,
    fixed_cache: dict[tuple[int, int], Tensor] | None = None,
) -> LevelOutput:
    """One level of :func:`discrete_register` (differentiable when autograd is on: the learned
    PDD-Net runs the same levels in training).

    Args:
        feat_fixed, feat_moving: ``(B, C, *F)`` feature maps (the moving ones unwarped).
        disp: ``(B, ndim, *F)`` the field so far (voxels of F) or None.
        level: the :class:`LevelConfig`.
        alpha: its six regularisation weights (None: ``pddreg.cost.DEFAULT_ALPHA``).
        cost_scale, normalise, prior, padding, max_memory: see :func:`discrete_register`.
        fixed_mask, moving_mask: ``(B, 1, *F)`` masks on the feature grid, or None.
        image_shape: the image grid ``S`` the features cover (for ``posterior``; None: ``F``).
        want_prob: also return the probabilities (and use the fused softmax + field).
        keep_cost: also return the raw cost (for the cost-volume instance optimisation).
        posterior: a :class:`pddreg.optim.uncertainty.Posterior` that records the level's
            regularised cost (the displacement probabilities), or None.
        fixed_cache: a dict that keeps the fixed features pooled and smoothed per ``(pool,
            smooth)`` for the next levels of the same features (they do not move; without
            gradients only), or None.

    Returns:
        :class:`LevelOutput`.
    """
    from pddreg.cost import (
        DEFAULT_ALPHA,
        correlation,
        displacement_set,
        mask_cost,
        probabilities_and_field,
        regularise,
        soft_field,
        valid_weights,
    )
    from pddreg.spatial import warp

    grad = torch.is_grad_enabled()
    ndim = feat_fixed.dim() - 2
    fshape = tuple(feat_fixed.shape[2:])
    moved = feat_moving if disp is None else warp(feat_moving, disp, padding="border")
    key = (level.pool, level.smooth)
    if fixed_cache is not None and key in fixed_cache:
        fix_p = fixed_cache[key]
    else:
        fix_p = _box_filter(pool_features(feat_fixed, level.pool), level.smooth)
        if fixed_cache is not None and not grad:
            fixed_cache[key] = fix_p
    mov_p = _box_filter(pool_features(moved, level.pool), level.smooth)
    del moved
    pshape = tuple(mov_p.shape[2:])
    fix_p, mov_p = _pad_to(fix_p, level.grid_stride), _pad_to(mov_p, level.grid_stride)
    padded = tuple(mov_p.shape[2:])
    if level.aggregate:
        # block matching: the cost at every voxel of P, averaged over the window around each
        # control point (a strided pool: sampling the box-filtered cost by F.interpolate took
        # 0.9 s of a 2D capture level at 240x320, this 0.34 s)
        cost = correlation(
            fix_p, mov_p, level.radius, level.spacing, padding=padding, max_memory=max_memory
        )
        cost = _block_mean(cost, level.aggregate, level.grid_stride)
    else:
        fix_g = _to_grid(fix_p, level.grid_stride, level.fixed_sampling)
        cost = correlation(
            fix_g, mov_p, level.radius, level.spacing, padding=padding, max_memory=max_memory
        )
        del fix_g
    del fix_p, mov_p
    gshape = tuple(cost.shape[2:])
    if fixed_mask is not None or moving_mask is not None:
        fw = None
        if fixed_mask is not None:
            fw = _pad_to(pool_features(fixed_mask, level.pool), level.grid_stride)
            fw = _to_grid(fw, level.grid_stride, "area")
        mw = None
        if moving_mask is not None:
            mm = moving_mask if disp is None else warp(moving_mask, disp, padding="zeros")
            mw = _pad_to(pool_features(mm, level.pool), level.grid_stride)
        weight = valid_weights(fw, mw, level.radius, level.spacing, gshape, max_memory=max_memory)
        cost = mask_cost(cost, weight)
        del weight
    if normalise:
        mean = cost.flatten(1).mean(1).clamp_min(torch.finfo(cost.dtype).tiny)
        mean = mean.view(-1, *([1] * (cost.dim() - 1)))
        cost = cost / mean if grad else cost.div_(mean)
    if isinstance(cost_scale, Tensor) or cost_scale != 1.0:
        cost = cost * cost_scale if grad else cost.mul_(cost_scale)
    if level.alpha is not None:
        a = torch.tensor(level.alpha, dtype=torch.float32)
    else:
        a = alpha if alpha is not None else torch.as_tensor(DEFAULT_ALPHA, dtype=torch.float32)
    c = regularise(cost, a.to(device=cost.device, dtype=cost.dtype), max_memory=max_memory)
    level_prior = prior if level.prior is None else level.prior
    if level_prior and level.radius > 0:
        term = _prior_term(level.radius, ndim, level_prior * level.radius, c)
        c = c + term if grad else c.add_(term)
    if posterior is not None:
        shape = fshape if image_shape is None else image_shape
        posterior.add_level(c, level.radius, level.spacing, pshape, padded, shape)
    prob = None
    if want_prob:
        disps = displacement_set(level.radius, level.spacing, ndim, device=c.device, dtype=c.dtype)
        prob, field = probabilities_and_field(c, disps)
    else:
        field = soft_field(c, level.radius, level.spacing, max_memory=max_memory)
    del c
    for _ in range(level.field_smooth):
        field = _box_filter(field, 1)
    residual = _dense(field, pshape, padded, gshape, fshape)
    return LevelOutput(
        residual=residual,
        field=field,
        prob=prob,
        cost=cost if keep_cost else None,
        shapes=(pshape, padded, gshape),
    )


def discrete_register(
    fixed: Tensor,
    moving: Tensor,
    features: Callable[[Tensor], Tensor],
    levels: Sequence[LevelConfig],
    alpha: Tensor | Sequence[float] | Sequence[Sequence[float] | None] | None = None,
    instance: InstanceConfig | None = None,
    *,
    cost_scale: float = 1.0,
    normalise: bool = False,
    prior: float | None = None,
    padding: str = "border",
    max_memory: int | None = None,
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
    init: Tensor | None = None,
    posterior: Posterior | None = None,
) -> Tensor:
    """Multi-level discrete registration with any feature extractor.

    For each level (coarse to fine), with ``u`` the current field on the feature grid ``F``:

    1. warp the moving features by ``u`` (linear, border);
    2. pool both feature maps by ``level.pool`` (grid ``P``) and the fixed ones further by
       ``level.grid_stride`` (control grid ``G``);
    3. ``cost = cost_scale * correlation(fixed_G, moving_P, radius, spacing)`` (SSD summed over
       channels), ``c = regularise(cost, alpha)``, residual ``r = soft_field(c)`` on ``G``;
    4. ``u = compose(u, resize(r))`` on ``F``.

    Then optional instance optimisation (``instance``) and a final linear upsampling of ``u``
    to the image grid.

    Args:
        fixed, moving: ``(B, 1, *S)`` images, 2D or 3D, same shape, float.
        features: maps ``(B, 1, *S) -> (B, C, *F)`` (e.g. MIND-SSC, or a learned net at a
            stride); ``F`` may be smaller than ``S`` (feature point ``k`` at image voxel
            ``(k + 0.5) * S / F - 0.5``). Called once per image, without gradients.
        levels: :class:`LevelConfig` per level, coarse to fine (at least one).
        alpha: the six regularisation weights of :func:`pddreg.cost.regularise` for every
            level, or one set (or None) per level; None takes ``pddreg.cost.DEFAULT_ALPHA``.
        instance: :class:`InstanceConfig`, or None for no instance optimisation.
        cost_scale: factor applied to the raw SSD before regularisation (the softmax
            temperature; calibrate it to the feature's SSD scale).
        normalise: divide each level's raw SSD by its mean (per batch element) before
            ``cost_scale``, which makes the temperature independent of the feature contrast
            (hand-crafted features; learned features with a learned ``alpha`` leave it off).
        prior: if given, a Gaussian prior on each level's residual displacement with standard
            deviation ``prior * radius`` displacement steps is added to the regularised cost
            (``+ |j|^2 / (2 sigma^2)``, ``j`` the index offset from the centre): where the cost
            is flat (background, homogeneous organs) the soft-argmin then stays near the
            current estimate instead of drifting to the mean of the plateau.
        padding: how the moving features are extended outside their grid in the correlation
            (``"border"`` or ``"zeros"``).
        max_memory: passed to the correlation/regularisation (bytes per chunk).
        fixed_mask, moving_mask: ``(B, 1, *S)`` masks in [0, 1] (or None): only control points
            inside the fixed mask whose displaced position falls inside the (warped) moving
            mask keep their data cost; the other entries get a neutral cost
            (:func:`pddreg.cost.mask_cost`), and the instance optimisation weights its SSD the
            same way.
        init: ``(B, ndim, *S)`` field in image voxels to start from (None: zero); with
            ``levels`` empty only the instance optimisation runs on it.
        posterior: a :class:`pddreg.optim.uncertainty.Posterior` that records every level's
            displacement probabilities (their variance on the image grid, the last level's
            probabilities) for the uncertainty outputs; None: nothing recorded.

    Returns:
        ``(B, ndim, *S)`` dense displacement in voxels of the image grid.
    """
    from pddreg.spatial import compose, resize_field

    if not isinstance(fixed, Tensor) or not isinstance(moving, Tensor):
        raise ValueError("discrete_register(): 'fixed' and 'moving' must be torch.Tensors")
    if fixed.dim() not in (4, 5) or fixed.shape[1] != 1 or moving.shape != fixed.shape:
        raise ValueError(
            "discrete_register(): 'fixed' and 'moving' must both have shape (B, 1, *spatial) "
            f"with 2 or 3 spatial dims, got {tuple(fixed.shape)} and {tuple(moving.shape)}"
        )
    if len(levels) == 0 and init is None:
        raise ValueError("discrete_register(): 'levels' must hold at least one LevelConfig")
    ndim = fixed.dim() - 2
    shape = tuple(fixed.shape[2:])
    alphas = _alphas(alpha, len(levels))

    with torch.no_grad():
        feat_fixed = features(fixed)
        feat_moving = features(moving)
        if feat_fixed.dim() != ndim + 2 or feat_fixed.shape != feat_moving.shape:
            raise ValueError(
                "discrete_register(): 'features' must map (B, 1, *S) to (B, C, *F), got "
                f"{tuple(feat_fixed.shape)} and {tuple(feat_moving.shape)}"
            )
        fshape = tuple(feat_fixed.shape[2:])
        fmask_f = None if fixed_mask is None else _area(fixed_mask.to(feat_fixed.dtype), fshape)
        mmask_f = None if moving_mask is None else _area(moving_mask.to(feat_fixed.dtype), fshape)
        disp = None if init is None else resize_field(init.to(feat_fixed.dtype), fshape)
        last = None  # (the field so far is (B, ndim, *F) in voxels of F)
        fixed_cache: dict[tuple[int, int], Tensor] = {}
        for i, level in enumerate(levels):
            keep_cost = instance is not None and instance.mode == "cost"
            out = level_step(
                feat_fixed,
                feat_moving,
                disp,
                level,
                alphas[i],
                cost_scale=cost_scale,
                normalise=normalise,
                prior=prior,
                padding=padding,
                max_memory=max_memory,
                fixed_mask=fmask_f,
                moving_mask=mmask_f,
                image_shape=shape,
                keep_cost=keep_cost,
                posterior=posterior,
                fixed_cache=fixed_cache,
            )
            logger.debug(
                "discrete_register: level %d grid %s labels %d |r| max %.2f",
                i,
                out.shapes[2],
                (2 * level.radius + 1) ** ndim,
                out.field.abs().max().item(),
            )
            last = (out.cost, out.field, level, out.shapes[:2], out.shapes[2], disp)
            disp = out.residual if disp is None else compose(disp, out.residual)
            del out

        if instance is not None and instance.iters > 0:
            if instance.mode == "features":
                fix_io = pool_features(feat_fixed, instance.pool)
                mov_io = pool_features(feat_moving, instance.pool)
                del feat_fixed, feat_moving
                ioshape = tuple(fix_io.shape[2:])
                init = disp if ioshape == fshape else resize_field(disp, ioshape)
                refined = feature_optimise(
                    fix_io,
                    mov_io,
                    init,
                    grid_stride=instance.grid_stride,
                    lambda_=instance.lambda_,
                    iters=instance.iters,
                    lr=instance.lr,
                    smooth=instance.smooth,
                    fixed_mask=None if fmask_f is None else _area(fmask_f, ioshape),
                    moving_mask=None if mmask_f is None else _area(mmask_f, ioshape),
                )
                disp = refined if ioshape == fshape else resize_field(refined, fshape)
            else:
                cost, field, level, pshape, gshape, before = last  # type: ignore[misc]
                refined = instance_optimise(
                    cost,
                    field,
                    level.radius,
                    level.spacing,
                    lambda_=instance.lambda_,
                    iters=instance.iters,
                    lr=instance.lr,
                )
                residual = _dense(refined, *pshape, gshape, fshape)
                disp = residual if before is None else compose(before, residual)
        del last
        if disp is None:  # no levels, no init: cannot happen (checked above)
            raise ValueError("discrete_register(): nothing to do")
        return disp if fshape == shape else resize_field(disp, shape)
