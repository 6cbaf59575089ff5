"""Training-free registration with MIND-SSC features (``--method mind``, deeds-like).

MIND-SSC features (at half resolution in 3D for speed) -> :func:`discrete_register` with a
coarse level of wide capture range and finer levels on the warped moving features -> feature
instance optimisation -> dense field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from pddreg.features.mind import mind_ssc

from .discrete import InstanceConfig, LevelConfig, discrete_register, pool_features

__all__ = ["MindConfig", "default_levels", "mind_features", "register_mind"]

logger = logging.getLogger(__name__)

#: Default levels (voxels of the feature map F), per number of spatial dimensions; each is
#: ``LevelConfig(pool, grid_stride, radius, spacing, smooth)``.
#: 2D (features at full resolution, ~320x256 slices): level 1 searches +-32 px in steps of 4 px
#: on a control grid of stride 8 (features box-5 smoothed against aliasing), level 2 +-8 px in
#: steps of 2 on a stride-4 grid (box-3), level 3 +-3 px in steps of 1 on a stride-2 grid.
#: 3D (features at half resolution, e.g. 96x80x128 for AbdomenCTCT): level 1 searches +-10
#: feature voxels (+-20 image voxels, 40 mm at 2 mm) in steps of 2 on a stride-4 grid (box-3),
#: level 2 +-3 feature voxels in steps of 1 on a stride-2 grid.
#: Pooling the moving features as well (``pool > 1``) lost accuracy in our checks, and large
#: steps without the smoothing aliased on fine texture.
DEFAULT_LEVELS: dict[int, tuple[LevelConfig, ...]] = {
    2: (
        LevelConfig(pool=1, grid_stride=8, radius=8, spacing=4.0, smooth=2),
        LevelConfig(pool=1, grid_stride=4, radius=4, spacing=2.0, smooth=1),
        LevelConfig(pool=1, grid_stride=2, radius=3, spacing=1.0),
    ),
    3: (
        LevelConfig(pool=1, grid_stride=4, radius=5, spacing=2.0, smooth=1),
        LevelConfig(pool=1, grid_stride=2, radius=3, spacing=1.0),
    ),
}

#: Multiplier of the MIND SSD before the regulariser (with ``pddreg.cost.DEFAULT_ALPHA``; the
#: softmax temperature), calibrated on known deformations of textured images and on phantom
#: pairs (Dice): 4 beat 1, 2 and 16.
DEFAULT_COST_SCALE = 4.0


def default_levels(ndim: int) -> tuple[LevelConfig, ...]:
    """The default :class:`LevelConfig` sequence for 2D or 3D."""
    if ndim not in DEFAULT_LEVELS:
        raise ValueError(f"default_levels(): ndim must be 2 or 3, got {ndim}")
    return DEFAULT_LEVELS[ndim]


@dataclass
class MindConfig:
    """Settings of :func:`register_mind`; the defaults work on 2D slices and 3D volumes.

    Attributes:
        mind_radius, mind_dilation: MIND-SSC patch radius and neighbour distance (voxels of
            the feature grid).
        feature_stride: the image is area-downsampled by this factor before MIND; None: 1 in
            2D, 2 in 3D (half resolution: 8x fewer voxels, and a coarser, more robust
            descriptor for abdominal CT).
        levels: :class:`LevelConfig` per level (coarse to fine); None: :func:`default_levels`.
        alpha: six regularisation weights (None: ``pddreg.cost.DEFAULT_ALPHA``).
        cost_scale: multiplier of the MIND SSD (None: :data:`DEFAULT_COST_SCALE`).
        instance: instance optimisation (None to skip it).
        max_memory: bytes per chunk for the correlation/regularisation (None: their default).
    """

    mind_radius: int = 1
    mind_dilation: int = 2
    feature_stride: int | None = None
    levels: tuple[LevelConfig, ...] | None = None
    alpha: tuple[float, ...] | None = None
    cost_scale: float | None = None
    instance: InstanceConfig | None = field(default_factory=InstanceConfig)
    max_memory: int | None = None

    def resolved(self, ndim: int) -> MindConfig:
        """A copy with every None default filled in for ``ndim`` spatial dimensions."""
        return replace(
            self,
            feature_stride=self.feature_stride or (2 if ndim == 3 else 1),
            levels=tuple(self.levels) if self.levels is not None else default_levels(ndim),
            cost_scale=DEFAULT_COST_SCALE if self.cost_scale is None else self.cost_scale,
        )


def mind_features(image: Tensor, stride: int = 1, radius: int = 1, dilation: int = 2) -> Tensor:
    """MIND-SSC of ``image`` ``(B, 1, *S)`` area-downsampled by ``stride``: ``(B, C, *F)``,
    ``F = ceil(S / stride)``."""
    return mind_ssc(pool_features(image, stride), radius, dilation)


def register_mind(fixed: Tensor, moving: Tensor, config: MindConfig | None = None) -> Tensor:
    """Register ``moving`` to ``fixed`` with MIND-SSC features and discrete search.

    Args:
        fixed, moving: ``(B, 1, *S)`` images (2D or 3D, same shape), float, ideally in [0, 1]
            (MIND-SSC is invariant to affine intensity changes).
        config: :class:`MindConfig` (None: defaults).

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
    cfg = (config or MindConfig()).resolved(ndim)
    if not fixed.is_floating_point():
        fixed = fixed.float()
    if not moving.is_floating_point():
        moving = moving.float()
    stride = int(cfg.feature_stride or 1)

    def features(image: Tensor) -> Tensor:
        return mind_features(image, stride, cfg.mind_radius, cfg.mind_dilation)

    logger.debug("register_mind: %s, config %s", tuple(fixed.shape), cfg)
    return discrete_register(
        fixed,
        moving,
        features,
        cfg.levels or default_levels(ndim),
        alpha=None if cfg.alpha is None else torch.tensor(cfg.alpha, dtype=torch.float32),
        instance=cfg.instance,
        cost_scale=float(cfg.cost_scale or DEFAULT_COST_SCALE),
        max_memory=cfg.max_memory,
    )
