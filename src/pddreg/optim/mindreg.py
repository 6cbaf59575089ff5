"""Training-free registration with MIND-SSC features (``--method mind``, deeds-like).

MIND-SSC features (at half resolution in 3D for speed) -> :func:`discrete_register` with a
coarse level of wide capture range and finer levels on the warped moving features -> feature
instance optimisation -> dense field.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from pddreg.features.mind import mind_ssc

from .discrete import InstanceConfig, LevelConfig, discrete_register, pool_features
from .uncertainty import Posterior

__all__ = [
    "MindConfig",
    "blend_distances",
    "block_capture_level",
    "capture",
    "capture_level",
    "capture_start",
    "default_instance",
    "default_levels",
    "feature_mismatch",
    "keep_better",
    "mind_features",
    "refine_mind",
    "register_mind",
]

logger = logging.getLogger(__name__)

#: Default levels (voxels of the feature map F), per number of spatial dimensions; each is
#: ``LevelConfig(pool, grid_stride, radius, spacing, smooth, fixed_sampling)``.
#: 2D (features at full resolution, ~320x256 slices): level 1 searches +-24 px in steps of 2 px
#: on a control grid of stride 8 (features box-5 smoothed: block aggregation and anti-aliasing),
#: level 2 +-4 px in steps of 1 on a stride-4 grid, level 3 +-2 px on a stride-2 grid (box-3).
#: 3D (features at half resolution, e.g. 96x80x128 for AbdomenCTCT): level 1 searches +-8
#: feature voxels (+-16 image voxels, 32 mm at 2 mm) in steps of 2 on a stride-4 grid, level 2
#: +-2 feature voxels on a stride-3 grid (box-3 both); about 11 M and 5 M costs for AbdomenCTCT,
#: chosen for the time of the regularisation, which grows faster than the cost volume.
#: Steps of 4 (or 2.5) voxels of the feature map aliased on fine texture and lost the capture
#: (and a non-integer step made the correlation 40x slower).
#: The fixed features are sampled at the control points ("point"), as the moving ones are at
#: displacement 0; block means against point samples ("area") biased identical images away
#: from zero. Pooling the moving features as well (``pool > 1``) lost accuracy in our checks.
DEFAULT_LEVELS: dict[int, tuple[LevelConfig, ...]] = {
    2: (
        LevelConfig(
            pool=1, grid_stride=8, radius=12, spacing=2.0, smooth=2, fixed_sampling="point"
        ),
        LevelConfig(pool=1, grid_stride=4, radius=4, spacing=1.0, smooth=1, fixed_sampling="point"),
        LevelConfig(pool=1, grid_stride=2, radius=2, spacing=1.0, smooth=1, fixed_sampling="point"),
    ),
    3: (
        LevelConfig(pool=1, grid_stride=4, radius=4, spacing=2.0, smooth=1, fixed_sampling="point"),
        LevelConfig(pool=1, grid_stride=3, radius=2, spacing=1.0, smooth=1, fixed_sampling="point"),
    ),
}

#: Multiplier of the mean-normalised MIND SSD before the regulariser (with
#: ``pddreg.cost.DEFAULT_ALPHA``; the softmax temperature), calibrated on known deformations of
#: textured images, identical pairs and phantom pairs (Dice): 4 beat 1 and 16.
DEFAULT_COST_SCALE = 4.0

#: Gaussian prior on each level's residual (standard deviation in units of the radius):
#: 0.25 kept identical images near zero displacement (0.56 px mean on a 2D phantom, against
#: 3 px without) and gave the best end-point errors on known deformations.
DEFAULT_PRIOR = 0.25

#: Moving MIND features outside the image repeat the border ones in the correlation ("zeros"
#: makes every displacement that leaves the image expensive, which pushes the soft-argmin of
#: points near the border inwards, several voxels even for identical images).
PADDING = "border"


#: 3D images with more voxels than this get their MIND features at half resolution.
LARGE_VOLUME = 128**3

#: 3D feature grids with at least this many voxels get their instance optimisation on features
#: pooled by 2 (30 steps): each Adam step resamples every feature channel and grid_sample's
#: backward dominates. On 8 held-out phantom3d pairs the pooled variant matched or beat the
#: full-resolution one (50 steps, stride-2 grid) at every size we tried: mean Dice 0.408 vs 0.409
#: at 32x28x44 (0.29 s vs 1.67 s), 0.471 vs 0.465 at 48x40x64 (0.67 s vs 4.88 s); it was the
#: default above 64^3 before. Below 16^3 the pooled grid would be too coarse.
POOLED_FEATURE_GRID = 16**3


def default_instance(ndim: int, feature_voxels: int = 0) -> InstanceConfig:
    """Default instance optimisation: feature SSD; in 2D (and 3D grids below
    :data:`POOLED_FEATURE_GRID` voxels) 50 Adam steps on a stride-2 grid, in 3D 30 steps on
    features pooled by 2 (a second or two even for AbdomenCTCT at half resolution)."""
    if ndim == 3 and feature_voxels >= POOLED_FEATURE_GRID:
        return InstanceConfig(mode="features", iters=30, lr=0.5, lambda_=1.0, grid_stride=1, pool=2)
    return InstanceConfig(mode="features", iters=50, lr=0.5, lambda_=1.0, grid_stride=2)


#: Displacements up to this fraction of the image extent (the longest axis of the feature map)
#: must lie within the capture range of the levels, at any image size (with 20 % margin).
CAPTURE_FRACTION = 0.15
#: The capture level pools the feature map to about this many voxels along its longest axis
#: (2D, 3D): coarse enough to be cheap and robust, fine enough to locate the structures.
CAPTURE_GRID = {2: 48, 3: 24}
#: Prior of the capture level (standard deviation in units of its radius): weak, so that a
#: large true displacement is not pulled back (the default 0.25 would cost a 38 px shift of a
#: 256 px slice more than its data term gains).
CAPTURE_PRIOR = 1.0


def capture(levels: Sequence[LevelConfig]) -> float:
    """The capture range of a level sequence in voxels of the feature map:
    ``sum(pool * spacing * radius)``."""
    return float(sum(lv.pool * lv.spacing * lv.radius for lv in levels))


#: The first level searches at most this fraction of the longest extent of the feature map
#: (with at least :data:`MIN_RADIUS` steps): on small images a +-24 px search over noise-only
#: regions drifted (a 40x48 disk with 5 % noise against itself: Dice 1.0 -> 0.25 at radius 12,
#: 0.99 at radius 5).
FIRST_LEVEL_FRACTION = 0.2
MIN_RADIUS = 4


def default_levels(
    ndim: int, feature_shape: Sequence[int] | None = None
) -> tuple[LevelConfig, ...]:
    """The default :class:`LevelConfig` sequence for 2D or 3D (without the capture level); with
    ``feature_shape`` the first level's radius is limited to :data:`FIRST_LEVEL_FRACTION` of
    the longest extent."""
    if ndim not in DEFAULT_LEVELS:
        raise ValueError(f"default_levels(): ndim must be 2 or 3, got {ndim}")
    levels = DEFAULT_LEVELS[ndim]
    if feature_shape is None:
        return levels
    first = levels[0]
    reach = FIRST_LEVEL_FRACTION * max(int(s) for s in feature_shape) / (first.pool * first.spacing)
    radius = max(MIN_RADIUS, min(first.radius, math.ceil(reach)))
    if radius == first.radius:
        return levels
    return (replace(first, radius=radius), *levels[1:])


def _capture_need(extent: int) -> float:
    """The range a capture level must reach on a feature map of longest extent ``extent``."""
    return 1.2 * CAPTURE_FRACTION * extent


def capture_level(
    ndim: int, feature_shape: Sequence[int], levels: Sequence[LevelConfig]
) -> LevelConfig | None:
    """The coarse level that extends ``levels`` to :data:`CAPTURE_FRACTION` of the longest
    extent of the feature map ``F`` (plus 20 %), or None when they reach it already.

    Both maps pooled by a power of two ``p`` to about :data:`CAPTURE_GRID` voxels, a control
    point every 2 pooled voxels, displacements in steps of one pooled voxel up to the required
    range, a weak prior (:data:`CAPTURE_PRIOR`) and 3 smoothing passes of its field: the
    capture range grows with the image.
    """
    extent = max(int(s) for s in feature_shape)
    need = _capture_need(extent)
    if capture(levels) >= need:
        return None
    pool = 2 ** max(1, round(math.log2(extent / CAPTURE_GRID[ndim])))
    return LevelConfig(
        pool=pool,
        grid_stride=2,
        radius=math.ceil(need / pool),
        spacing=1.0,
        smooth=1,
        fixed_sampling="point",
        prior=CAPTURE_PRIOR,
        field_smooth=3,
    )


#: The block-matching capture level (2D) pools the feature map to about this many voxels along
#: its longest axis and averages the cost of every displacement over a window of ``2 *
#: BLOCK_RADIUS + 1`` pooled voxels around each control point (every ``BLOCK_STRIDE``).
BLOCK_GRID = 160
BLOCK_RADIUS = 4
BLOCK_STRIDE = 4
#: Its regulariser: led by the data (a near layer moving tens of pixels further than the
#: background keeps its own displacement; the default 13-point mean field smoothed it away on
#: this coarse grid: EPE 30 px against 5.5 on layered 20-100 px disparities).
BLOCK_ALPHA = (1.0, 0.5, 1.0, 0.5, 0.0, 16.0)


def block_capture_level(
    ndim: int, feature_shape: Sequence[int], levels: Sequence[LevelConfig]
) -> LevelConfig | None:
    """A second capture level for 2D images (None in 3D, or where :func:`capture_level` is
    None): block matching over the same range.

    The smooth capture level compares features pooled by ~1/48 of the extent voxel by voxel:
    robust in low-texture images, but its cost is almost flat where a near object moves tens of
    pixels further than its surroundings (stereo: the best displacement within one step of the
    truth at 15 % of its control points on layered 20-100 px disparities). This level pools
    by ~1/160 of the extent and averages the cost over windows of 9 x 9 pooled voxels
    (``LevelConfig.aggregate``): 92 % there, but no answer in flat organ interiors, hence a
    second candidate kept region by region (:func:`keep_better`), not a replacement.
    """
    if ndim != 2 or capture_level(ndim, feature_shape, levels) is None:
        return None
    extent = max(int(s) for s in feature_shape)
    pool = max(1, math.ceil(extent / BLOCK_GRID))
    return LevelConfig(
        pool=pool,
        grid_stride=BLOCK_STRIDE,
        radius=math.ceil(_capture_need(extent) / pool),
        spacing=1.0,
        fixed_sampling="point",
        prior=CAPTURE_PRIOR,
        aggregate=BLOCK_RADIUS,
        alpha=BLOCK_ALPHA,
    )


def feature_mismatch(
    feat_fixed: Tensor,
    feat_moving: Tensor,
    disp: Tensor,
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
) -> Tensor:
    """Mean feature SSD per batch element ``(B,)`` of ``feat_fixed`` against ``feat_moving``
    warped by ``disp`` (``(B, ndim, *F)``, voxels of ``F``), over the fixed points inside
    ``fixed_mask`` whose displaced position lies inside the moving map (and ``moving_mask``)."""
    ssd, w = _weighted_ssd(feat_fixed, feat_moving, disp, fixed_mask, moving_mask)
    dims = tuple(range(1, ssd.dim()))
    return (w * ssd).sum(dims) / w.sum(dims).clamp_min(1e-6)


def _weighted_ssd(
    feat_fixed: Tensor,
    feat_moving: Tensor,
    disp: Tensor,
    fixed_mask: Tensor | None,
    moving_mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The SSD ``(B, 1, *F)`` of ``feat_fixed`` against ``feat_moving`` warped by ``disp``
    (voxels of ``F``) and its weight ``(B, 1, *F)``: inside ``fixed_mask``, and displaced
    inside the moving map (and ``moving_mask``); masks on ``F`` or None. On the native kernel
    of the instance optimisation where it runs (float32 CPU: 3x faster than ``grid_sample``
    in 3D), else by :func:`pddreg.spatial.warp`."""
    from pddreg.cost import _native
    from pddreg.spatial import warp

    from .instance import _native_warped_ssd

    inside = torch.ones_like(feat_moving[:, :1]) if moving_mask is None else moving_mask
    if _native.supports(feat_fixed, feat_moving, inside, disp):
        ssd, w = _native_warped_ssd(feat_fixed, feat_moving, inside)(disp)
    else:
        ssd = (feat_fixed - warp(feat_moving, disp)).square().sum(1, keepdim=True)
        w = warp(inside.to(ssd.dtype), disp, padding="zeros")
    if fixed_mask is not None:
        w = w * fixed_mask.to(ssd.dtype)
    return ssd, w


def _windowed_mismatch(
    feat_fixed: Tensor,
    feat_moving: Tensor,
    fields: Sequence[Tensor],
    fixed_mask: Tensor | None,
    moving_mask: Tensor | None,
    radius: int,
) -> list[tuple[Tensor, Tensor]]:
    """Per field ``(B, ndim, *F)`` (voxels of the feature grid ``F``): the box means over
    ``(2 radius + 1)``-voxel windows of the weighted feature SSD and of its weight
    (:func:`_weighted_ssd`; their ratio is the windowed mean mismatch), each ``(B, 1, *F)``;
    ``fixed_mask``, ``moving_mask`` ``(B, 1, *S)`` or None, area-resampled onto ``F``."""
    from pddreg.features.mind import _box_filter

    from .discrete import _area

    fshape = tuple(feat_fixed.shape[2:])
    fm = None if fixed_mask is None else _area(fixed_mask.to(feat_fixed.dtype), fshape)
    mm = None if moving_mask is None else _area(moving_mask.to(feat_fixed.dtype), fshape)
    out = []
    for d in fields:
        ssd, w = _weighted_ssd(feat_fixed, feat_moving, d, fm, mm)
        out.append((_box_filter(w * ssd, radius), _box_filter(w, radius)))
    return out


@dataclass
class MindConfig:
    """Settings of :func:`register_mind`; the defaults work on 2D slices and 3D volumes.

    Attributes:
        mind_radius, mind_dilation: MIND-SSC patch radius and neighbour distance (voxels of
            the feature grid).
        feature_stride: the image is area-downsampled by this factor before MIND; None: 2 for
            3D images above :data:`LARGE_VOLUME` voxels (half resolution: 8x fewer voxels and
            a coarser, more robust descriptor, e.g. AbdomenCTCT and brain MRI), else 1. The
            levels count feature voxels, so their capture range in image voxels doubles too.
        levels: :class:`LevelConfig` per level (coarse to fine); None: :func:`default_levels`.
        alpha: six regularisation weights (None: ``pddreg.cost.DEFAULT_ALPHA``).
        cost_scale: multiplier of the MIND SSD (None: :data:`DEFAULT_COST_SCALE`).
        prior: Gaussian prior on each level's residual, standard deviation ``prior * radius``
            steps (None: off); see :func:`discrete_register`.
        instance: instance optimisation; None: :func:`default_instance` (to skip it, pass
            ``InstanceConfig(iters=0)``).
        max_memory: bytes per chunk for the correlation/regularisation (None: their default).
        capture: large-motion search (default levels only): None (auto) adds the capture
            level (:func:`capture_level`) where the levels cannot reach
            :data:`CAPTURE_FRACTION` of the image extent, runs the levels with and without it
            (in 2D also from the block-matching capture level, :func:`block_capture_level`)
            and keeps, region by region, the field whose warped moving features match the
            fixed ones better (:func:`keep_better`); True always tries it, False never.
    """

    mind_radius: int = 1
    mind_dilation: int = 2
    feature_stride: int | None = None
    levels: tuple[LevelConfig, ...] | None = None
    alpha: tuple[float, ...] | None = None
    cost_scale: float | None = None
    prior: float | None = DEFAULT_PRIOR
    instance: InstanceConfig | None = None
    max_memory: int | None = None
    capture: bool | None = None

    def resolved(self, ndim: int, shape: tuple[int, ...] | None = None) -> MindConfig:
        """A copy with every None default filled in for ``ndim`` spatial dimensions (and an
        image of ``shape``, which picks the instance optimisation for large volumes)."""
        stride = self.feature_stride
        if stride is None:
            large = ndim == 3 and (shape is None or math.prod(shape) > LARGE_VOLUME)
            stride = 2 if large else 1
        voxels = math.prod(-(-s // stride) for s in shape) if shape else 0
        return replace(
            self,
            feature_stride=stride,
            levels=tuple(self.levels)
            if self.levels is not None
            else default_levels(ndim, [-(-s // stride) for s in shape] if shape else None),
            cost_scale=DEFAULT_COST_SCALE if self.cost_scale is None else self.cost_scale,
            instance=self.instance if self.instance is not None else default_instance(ndim, voxels),
        )


def mind_features(image: Tensor, stride: int = 1, radius: int = 1, dilation: int = 2) -> Tensor:
    """MIND-SSC of ``image`` ``(B, 1, *S)`` area-downsampled by ``stride``: ``(B, C, *F)``,
    ``F = ceil(S / stride)``."""
    return mind_ssc(pool_features(image, stride), radius, dilation)


def _mind_run(
    cfg: MindConfig, stride: int, fixed_mask: Tensor | None, moving_mask: Tensor | None
) -> tuple[Callable[[Tensor], Tensor], dict[str, Any]]:
    """The MIND-SSC feature function (cached per image: the fixed and moving features serve
    every run of one registration) and the keywords of :func:`discrete_register` for
    ``cfg``."""
    cache: dict[int, Tensor] = {}

    def features(image: Tensor) -> Tensor:
        key = id(image)
        if key not in cache:
            cache[key] = mind_features(image, stride, cfg.mind_radius, cfg.mind_dilation)
        return cache[key]

    common = {
        "alpha": None if cfg.alpha is None else torch.tensor(cfg.alpha, dtype=torch.float32),
        "cost_scale": float(cfg.cost_scale or DEFAULT_COST_SCALE),
        "normalise": True,
        "prior": cfg.prior,
        "padding": PADDING,
        "max_memory": cfg.max_memory,
        "fixed_mask": fixed_mask,
        "moving_mask": moving_mask,
    }
    return features, common


def register_mind(
    fixed: Tensor,
    moving: Tensor,
    config: MindConfig | None = None,
    *,
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
    posterior: Posterior | None = None,
) -> Tensor:
    """Register ``moving`` to ``fixed`` with MIND-SSC features and discrete search.

    Args:
        fixed, moving: ``(B, 1, *S)`` images (2D or 3D, same shape), float, ideally in [0, 1]
            (MIND-SSC is invariant to affine intensity changes).
        config: :class:`MindConfig` (None: defaults).
        fixed_mask, moving_mask: ``(B, 1, *S)`` masks in [0, 1] or None: only voxels inside
            count in the similarity (see :func:`discrete_register`).
        posterior: a :class:`pddreg.optim.uncertainty.Posterior` to record the displacement
            probabilities in (of the run kept where the capture level was tried, between the
            plain run and the smooth capture level's); None: none.

    Where the capture level runs, the instance optimisation from the kept field ends with
    :func:`restore_layers` (layers its steps dragged come back).

    Returns:
        ``(B, ndim, *S)`` dense displacement in voxels, ``warped(x) = moving(x + u(x))``.
    """
    for name, x in (("fixed", fixed), ("moving", moving)):
        if not isinstance(x, Tensor):
            raise ValueError(f"register_mind(): '{name}' must be a torch.Tensor")
        if x.dim() not in (4, 5) or x.shape[1] != 1:
            raise ValueError(
                f"register_mind(): '{name}' must have shape (B, 1, *spatial) with 2 or 3 "
                f"spatial dims, got {tuple(x.shape)}"
            )
    if moving.shape != fixed.shape:
        raise ValueError(
            f"register_mind(): 'moving' must have the shape of 'fixed' {tuple(fixed.shape)}, "
            f"got {tuple(moving.shape)}"
        )
    ndim = fixed.dim() - 2
    user_levels = config is not None and config.levels is not None
    cfg = (config or MindConfig()).resolved(ndim, tuple(fixed.shape[2:]))
    if not fixed.is_floating_point():
        fixed = fixed.float()
    if not moving.is_floating_point():
        moving = moving.float()
    stride = int(cfg.feature_stride or 1)

    features, common = _mind_run(cfg, stride, fixed_mask, moving_mask)
    logger.debug("register_mind: %s, config %s", tuple(fixed.shape), cfg)
    levels = tuple(cfg.levels or default_levels(ndim))
    fshape = [-(-s // stride) for s in fixed.shape[2:]]
    reach = levels if not cfg.capture else ()  # the levels whose range the capture counts on
    extra = None
    if cfg.capture or (cfg.capture is None and not user_levels):
        extra = capture_level(ndim, fshape, reach)
    if extra is None:
        return discrete_register(
            fixed, moving, features, levels, instance=cfg.instance, posterior=posterior, **common
        )
    # Large motion: the levels with and without the capture level, the better match wins
    # (region by region).
    posts = [None, None] if posterior is None else [Posterior(posterior.keep_prob) for _ in "pw"]
    plain = discrete_register(fixed, moving, features, levels, posterior=posts[0], **common)
    wide = discrete_register(
        fixed, moving, features, (extra, *levels), posterior=posts[1], **common
    )
    chosen = keep_better(plain, wide, features(fixed), features(moving), fixed_mask, moving_mask)
    block = block_capture_level(ndim, fshape, reach)
    if block is not None:
        # 2D: block matching as a third candidate (layers that move further than the rest)
        blocks = discrete_register(fixed, moving, features, (block, *levels), **common)
        chosen = keep_better(
            chosen, blocks, features(fixed), features(moving), fixed_mask, moving_mask
        )
    if posterior is not None and posts[0] is not None and posts[1] is not None:
        # the batch elements whose blend lies nearer ``wide`` take its probabilities
        to_plain, to_wide = blend_distances(chosen, plain, wide)
        take = to_wide < to_plain
        posterior.update(posts[0].select(take, posts[1]))
    if cfg.instance is None or cfg.instance.iters <= 0:
        return chosen
    out = discrete_register(
        fixed, moving, features, (), instance=cfg.instance, init=chosen, **common
    )
    return restore_layers(out, chosen, features(fixed), features(moving), fixed_mask, moving_mask)


def refine_mind(
    fixed: Tensor,
    moving: Tensor,
    init: Tensor,
    config: MindConfig | None = None,
    *,
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
    levels: int = 0,
    coarse: int = 0,
    posterior: Posterior | None = None,
    **instance: float,
) -> Tensor:
    """The instance optimisation that ends :func:`register_mind`, started from any field;
    with ``levels`` the last ``levels`` of ``mind``'s discrete levels run first, with
    ``coarse`` that many Adam steps on features pooled by 2 before the full-resolution ones.

    Adam on the SSD of MIND-SSC features (at ``mind``'s feature resolution, with its
    :func:`default_instance` settings; keywords of :class:`InstanceConfig` such as ``iters``
    or ``lr`` override them) plus diffusion, from ``init``. It is what ``pdd``'s instance
    optimisation runs by default: on the known-answer cases of ``benchmarks/real.py --quick``
    the learned levels followed by this refinement end nearer the truth than ``mind`` itself
    (mean EPE 0.83 vs 1.05 voxels), whereas refining on the learned stride-2 features stayed at
    1.37.

    Args:
        fixed, moving: ``(B, 1, *S)`` images in [0, 1].
        init: ``(B, ndim, *S)`` starting field in image voxels.
        config: :class:`MindConfig` (None: defaults); its ``instance`` is used when given.
        fixed_mask, moving_mask: ``(B, 1, *S)`` masks or None (see :func:`register_mind`).
        levels: how many of the finest of ``mind``'s levels (the config's, or
            :func:`default_levels` for the image) run on MIND-SSC from ``init`` before the
            Adam steps: a discrete search of a few voxels around ``init`` that gradient steps
            from a coarse start do not make (0: the Adam steps alone).
        coarse: Adam steps on the MIND-SSC features average-pooled by 2 (the control grid of
            the same spacing) before the ``iters`` steps at full resolution: a quarter of the
            cost per step in 2D for the long way of large motion (0: none).
        posterior: a :class:`pddreg.optim.uncertainty.Posterior` to which the ``levels`` add
            their displacement probabilities (on top of what it holds, e.g. the network's
            levels: they refine that field), or None.

    Where the Adam steps dragged a layer of their start (``init``, after the ``levels``),
    :func:`restore_layers` puts it back.

    Returns:
        ``(B, ndim, *S)`` refined field in image voxels.
    """
    if init.shape[0] != fixed.shape[0] or tuple(init.shape[2:]) != tuple(fixed.shape[2:]):
        raise ValueError(
            f"refine_mind(): 'init' must have shape (B, ndim, *S) for images {tuple(fixed.shape)}, "
            f"got {tuple(init.shape)}"
        )
    ndim = fixed.dim() - 2
    cfg = (config or MindConfig()).resolved(ndim, tuple(fixed.shape[2:]))
    inst = replace(cfg.instance, **instance) if instance else cfg.instance
    if levels < 0 or coarse < 0:
        raise ValueError(
            f"refine_mind(): 'levels' and 'coarse' must be >= 0, got {levels} and {coarse}"
        )
    if inst is not None and inst.iters <= 0:
        inst = None
    stride = int(cfg.feature_stride or 1)
    fshape = [-(-s // stride) for s in fixed.shape[2:]]
    fine = tuple(cfg.levels or default_levels(ndim, fshape))[-levels:] if levels else ()
    if inst is None and not fine:
        return init
    features, common = _mind_run(cfg, stride, fixed_mask, moving_mask)
    fixed, moving, init = fixed.float(), moving.float(), init.float()
    with torch.no_grad():
        if fine:
            init = discrete_register(
                fixed, moving, features, fine, init=init, posterior=posterior, **common
            )
        if inst is None:
            return init
        start = init
        if coarse:
            # the first steps on features pooled by 2, on a control grid of the same spacing
            half = replace(
                inst,
                iters=int(coarse),
                pool=inst.pool * 2,
                grid_stride=max(1, inst.grid_stride // 2),
            )
            init = discrete_register(
                fixed, moving, features, (), instance=half, init=init, **common
            )
        out = discrete_register(fixed, moving, features, (), instance=inst, init=init, **common)
        return restore_layers(
            out, start, features(fixed), features(moving), fixed_mask, moving_mask
        )


def capture_start(
    fixed: Tensor,
    moving: Tensor,
    levels: Sequence[LevelConfig],
    stride: int = 1,
    *,
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
    block: bool = False,
    features: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The capture level alone, as the start of another method's levels (``pdd``).

    ``levels`` are counted in voxels of MIND-SSC features at ``stride`` (``F = ceil(S /
    stride)``); where they reach :data:`CAPTURE_FRACTION` of the extent already
    (:func:`capture_level`) the result is None. Otherwise the capture level runs on those
    features (``mind``'s cost scale, prior and padding) and the result is ``(field, feat_fixed,
    feat_moving)``: the field ``(B, ndim, *S)`` in image voxels and the features ``(B, C, *F)``
    for :func:`keep_better`.

    Args:
        fixed, moving: ``(B, 1, *S)`` images in [0, 1].
        levels: the levels that follow (their capture range decides).
        stride: the feature stride the levels count in.
        fixed_mask, moving_mask: ``(B, 1, *S)`` masks or None (see :func:`register_mind`).
        block: the block-matching capture level instead (:func:`block_capture_level`; None
            in 3D).
        features: the MIND-SSC features ``(B, C, *F)`` of ``fixed`` and ``moving`` at
            ``stride`` where a first call made them already (None: computed here).
    """
    ndim = fixed.dim() - 2
    fshape = [-(-int(n) // stride) for n in fixed.shape[2:]]
    extra = (block_capture_level if block else capture_level)(ndim, fshape, levels)
    if extra is None:
        return None
    with torch.no_grad():
        feats = features or [mind_features(x.float(), stride) for x in (fixed, moving)]
        field = discrete_register(
            fixed,
            moving,
            lambda image: feats[0] if image is fixed else feats[1],
            (extra,),
            cost_scale=DEFAULT_COST_SCALE,
            normalise=True,
            prior=DEFAULT_PRIOR,
            padding=PADDING,
            fixed_mask=fixed_mask,
            moving_mask=moving_mask,
        )
    return field, feats[0], feats[1]


#: The capture level's field is kept where its feature mismatch is this much (relative) lower ...
CAPTURE_MARGIN = 0.25
#: ... over windows of this fraction of the longest extent of the feature map (see
#: :func:`keep_better`).
CAPTURE_WINDOW = 1 / 6


def blend_distances(blend: Tensor, plain: Tensor, wide: Tensor) -> tuple[Tensor, Tensor]:
    """L1 distances ``(B,)`` of a :func:`keep_better` blend to ``plain`` and to ``wide`` (which
    run it lies nearer: whose other outputs, e.g. probabilities, stand for it)."""
    return tuple((blend - x).abs().flatten(1).sum(1) for x in (plain, wide))


#: :func:`restore_layers`: the refinement's start comes back where the Adam steps moved the
#: field by more than this many feature voxels ...
LAYER_MOVE = 3.0
#: ... and the start's feature mismatch (averaged over (2 * LAYER_RADIUS + 1) voxel windows)
#: is this much (relative) lower ...
LAYER_MARGIN = 0.2
LAYER_RADIUS = 2
#: ... on regions that survive an opening by a (2 * LAYER_OPENING + 1) voxel square / cube
#: (isolated spots where a noisy start matches by chance do not come back).
LAYER_OPENING = 5


def _max_filter(x: Tensor, radius: int) -> Tensor:
    """Maximum over the ``(2 * radius + 1)``-voxel square / cube around each voxel of
    ``(B, C, *S)`` (2D or 3D), one axis at a time (a cube of 11 voxels at once took 1 s on a
    97x97x80 grid, by axes 0.07 s)."""
    import torch.nn.functional as F

    ndim = x.dim() - 2
    pool = F.max_pool2d if ndim == 2 else F.max_pool3d
    for axis in range(ndim):
        kernel = [1] * ndim
        kernel[axis] = 2 * radius + 1
        x = pool(x, tuple(kernel), 1, tuple(k // 2 for k in kernel))
    return x


def _min_filter(x: Tensor, radius: int) -> Tensor:
    """Minimum over the ``(2 * radius + 1)``-voxel square / cube (an erosion)."""
    return -_max_filter(-x, radius)


def restore_layers(
    refined: Tensor,
    start: Tensor,
    feat_fixed: Tensor,
    feat_moving: Tensor,
    fixed_mask: Tensor | None,
    moving_mask: Tensor | None,
) -> Tensor:
    """``refined`` (the instance optimisation's field) with its ``start`` (the discrete
    levels' field) put back where the diffusion-regularised Adam steps dragged a layer.

    The discrete levels keep a motion discontinuity (a near object before its background:
    stereo pairs, layered scenes) sharp; the smoothed control grid and the diffusion term of
    the Adam steps spread it over several voxels, and the steps then pull the whole band to a
    compromise that matches neither side. Where the two fields differ by more than
    :data:`LAYER_MOVE` feature voxels and the start matches the MIND-SSC features clearly
    better in its neighbourhood (:data:`LAYER_MARGIN`), on regions wider than an opening by
    :data:`LAYER_OPENING` voxels and away from the start's own folds (by the same width: a
    noisy start, not a layer), the start is blended back in (one box-3 pass of the
    indicator). On the layered Middlebury frames of ``benchmarks/bench_stereo.py`` the
    default's mean EPE went 4.72 -> 3.58 px (``mind``'s 4.08 -> 3.52); on the smooth known fields of
    ``benchmarks/real.py`` it changed no case by more than 0.01 voxel: there the Adam steps
    move the field by little, and the spots where a noisy start matches by chance are small.
    Without the fold exclusion stereo reached 3.16 px, but the start came back on noisy
    regions of real echocardiography pairs (0.1-0.5 % folding where there was none).

    Args:
        refined, start: ``(B, ndim, *S)`` fields in image voxels.
        feat_fixed, feat_moving: ``(B, C, *F)`` MIND-SSC features (``F`` the feature grid).
        fixed_mask, moving_mask: ``(B, 1, *S)`` masks or None (outside, ``refined`` stays).

    Returns:
        ``(B, ndim, *S)`` field in image voxels.
    """
    import torch.nn.functional as F

    from pddreg.features.mind import _box_filter
    from pddreg.spatial import jacobian_det, resize_field

    ndim = refined.dim() - 2
    fshape = tuple(feat_fixed.shape[2:])
    fields = [resize_field(d, fshape) for d in (refined, start)]
    moved = (fields[0] - fields[1]).norm(dim=1, keepdim=True) > LAYER_MOVE
    r = LAYER_OPENING
    # what is kept lies inside the opening of `moved`: nothing to compare if that is empty
    moved_wide = _min_filter(moved.to(refined.dtype), r) > 0
    if not bool(moved_wide.any()):
        return refined
    local = [
        (num / den.clamp_min(1e-6), den)
        for num, den in _windowed_mismatch(
            feat_fixed, feat_moving, fields, fixed_mask, moving_mask, LAYER_RADIUS
        )
    ]
    valid = torch.minimum(local[0][1], local[1][1]) > 0.5
    take = (moved & valid & (local[1][0] < (1.0 - LAYER_MARGIN) * local[0][0])).to(refined.dtype)
    # not where the start folds (a noisy start, not a layer), with the opening's margin
    folds = (jacobian_det(fields[1]) <= 0).to(refined.dtype).unsqueeze(1)
    take = take * (1.0 - _max_filter(folds, r))
    take = _max_filter(_min_filter(take, r), r)  # opening: erosion, then dilation
    weight = _box_filter(take, 1)
    logger.debug("restore_layers: the start kept on %.2f %% of the image", 100 * weight.mean())
    mode = "bilinear" if ndim == 2 else "trilinear"
    weight = F.interpolate(weight, size=tuple(refined.shape[2:]), mode=mode, align_corners=False)
    return torch.lerp(refined, start.to(refined.dtype), weight)


def keep_better(
    plain: Tensor,
    wide: Tensor,
    feat_fixed: Tensor,
    feat_moving: Tensor,
    fixed_mask: Tensor | None,
    moving_mask: Tensor | None,
) -> Tensor:
    """``wide`` (the run with the capture level) where its feature mismatch beats ``plain``'s
    by :data:`CAPTURE_MARGIN`, over the whole image or region by region, else ``plain``.

    The SSD of ``feat_fixed`` against ``feat_moving`` warped by each field (``(B, C, *F)``) is
    averaged over windows of :data:`CAPTURE_WINDOW` of the longest extent; the indicator of
    "wide is better" is smoothed by the same window and blends the fields (``(B, ndim, *S)``
    in image voxels). A whole-image choice alone kept the plain field for a near object that
    moves further than the rest (Middlebury frames under 20 / 40 / 60 px disparities: mean EPE
    5.9 -> 1.6 and 5.8 -> 3.6 px with ``mind``, 6.6 -> 2.8 with ``pdd``). Windows of 1/12 of
    the extent folded the network's field where the runs differ by tens of pixels (1-3 % of
    the pixels of the Middlebury known-answer cases, 0.0-1.3 % with 1/6). Outside the masks
    (``(B, 1, *S)`` or None) and the moving domain the comparison keeps ``plain``.
    """
    import torch.nn.functional as F

    from pddreg.features.mind import _box_filter
    from pddreg.spatial import resize_field

    fshape = tuple(feat_fixed.shape[2:])
    radius = max(2, round(CAPTURE_WINDOW * max(fshape) / 2))
    # windowed mean over the valid voxels; windows without any count as no gain
    fields = [resize_field(d, fshape) for d in (plain, wide)]
    local = _windowed_mismatch(feat_fixed, feat_moving, fields, fixed_mask, moving_mask, radius)
    dims = tuple(range(1, feat_fixed.dim()))
    whole = [num.sum(dims) / den.sum(dims).clamp_min(1e-6) for num, den in local]
    whole = [w.view(-1, *([1] * len(dims))) for w in whole]
    valid = torch.minimum(local[0][1], local[1][1]) > 1e-3
    mean = [num / den.clamp_min(1e-6) for num, den in local]
    # a region takes the capture run where it matches better by the margin, relative to the
    # region and to the whole image (flat regions, whose small differences are noise, do not)
    gain = mean[0] - mean[1]
    take = valid & (gain > CAPTURE_MARGIN * mean[0]) & (gain > CAPTURE_MARGIN * whole[0])
    weight = _box_filter(take.to(feat_fixed.dtype), radius)
    # where the capture run matches better over the whole image it is kept everywhere
    # (homogeneous regions cannot tell the two runs apart locally)
    everywhere = whole[1] < (1.0 - CAPTURE_MARGIN) * whole[0]
    weight = torch.where(everywhere, torch.ones_like(weight), weight)
    logger.debug("capture level kept on %.1f %% of the image", 100.0 * float(weight.mean()))
    mode = "bilinear" if plain.dim() == 4 else "trilinear"
    weight = F.interpolate(weight, size=tuple(plain.shape[2:]), mode=mode, align_corners=False)
    return torch.lerp(plain, wide, weight.to(plain.dtype))
