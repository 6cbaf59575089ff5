"""PDD-Net: probabilistic dense displacement network (Heinrich, MICCAI 2019), 2D and 3D.

features (learned, shared by both images) -> correlation over a dense discrete displacement
set on a coarse control grid -> min-convolution / mean-field regularisation with six learned
scalar weights -> probabilities -> expected (soft) displacement -> dense field.
Optionally a second level on the moving features warped by the first field (smaller range,
finer steps, its own six weights; fields composed) and instance optimisation at inference.

Inference (:meth:`PDDNet.register`) is the forward pass without gradients (the same multi-level
scheme as :func:`pddreg.optim.discrete_register`, which cannot switch the mean-field off for
the ablations), optionally followed by MIND's feature instance optimisation.

Units: the displacement set of a level is ``spacing * {-r..r}^ndim`` in voxels of the moving
feature map (size ``S_f = ceil(S / stride)``); the control grid ``G = ceil(S_f / grid_stride)``.
``disp_grid`` is returned in voxels of ``G`` (so ``resize_field(disp_grid, S) == disp``);
``disp`` is in voxels of the image, ``warped(x) = moving(x + disp(x))``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pddreg.features.nets import build_feature_net, feature_grid_shape

__all__ = ["PDDNet", "PDDNetConfig", "default_config"]

log = logging.getLogger(__name__)

FEATURES = ("lecture", "obelisk", "mind", "hybrid")
LABEL_LOSSES = ("nonlocal", "warped", "both")


@dataclass
class PDDNetConfig:
    """Configuration of :class:`PDDNet` (saved with the weights).

    Attributes:
        ndim: 2 or 3.
        features: "lecture" (small CNN), "obelisk" (learned sampling offsets) or "mind"
            (MIND-SSC, no weights: only the six regularisation weights are learned).
        feature_kwargs: extra arguments of the feature net (e.g. ``{"channels": 16}``).
        radius, spacing, grid_stride: level 1 displacement set ``spacing * {-r..r}^ndim`` (in
            moving feature voxels) and control grid (feature grid pooled by ``grid_stride``).
        levels: 1 or 2; level 2 runs on the moving image warped by level 1 with
            ``radius2``, ``spacing2``, ``grid_stride2``.
        use_meanfield: mean-field smoothing over the control grid (ablation switch).
        exact_minconv: exact lower-envelope min-convolution instead of the lecture's approximation.
        alpha: initial regularisation weights (six); None takes ``pddreg.cost.DEFAULT_ALPHA``.
        padding: how the moving features are padded outside the image ("border" or "zeros").
        label_loss: "nonlocal" (PDD-Net's loss on the probabilities), "warped" (warp the
            moving one-hot labels with the expected field) or "both" (their sum: the
            probabilities and the field they give are supervised; on held-out phantom pairs
            "nonlocal" alone let the probabilities hedge and the expected field lag behind
            "warped", see benchmarks/ablation_2d.py).
        lambda_diffusion: weight of the diffusion penalty of the control-grid field.
        smooth: box-3 averaging passes (replicate borders) of every level's control-grid field
            before it is upsampled: a light spatial regularisation of the expected field
            against folding where neighbouring control points disagree.
        instance_opt: run instance optimisation in :meth:`PDDNet.register` by default.
        io_iters, io_lambda, io_lr: instance optimisation settings (None: the optimiser's own).
        io_features: what the instance optimisation matches: ``"mind"`` (MIND-SSC at
            ``mind``'s resolution, :func:`pddreg.optim.refine_mind`: the learned levels give
            the start, the training-free refinement the sub-voxel precision) or ``"learned"``
            (the network's own features on its feature grid).
        io_levels: with ``io_features == "mind"``: how many of ``mind``'s finest discrete
            levels run on MIND-SSC from the network's field before the Adam steps
            (:func:`pddreg.optim.refine_mind`'s ``levels``; 0: the Adam steps alone).
        io_coarse: with ``io_features == "mind"``: Adam steps on MIND-SSC pooled by 2 before
            the ``io_iters`` full-resolution ones (``refine_mind``'s ``coarse``).
        level_specs: the multi-level search of ``pddreg.optim.discrete_register``: one dict of
            :class:`pddreg.optim.LevelConfig` fields per level (coarse to fine, counted in
            feature voxels), each level with its own six learned weights. When given it
            replaces ``radius``/``spacing``/``grid_stride``/``levels``/``*2``: the network then
            runs exactly the levels ``mind`` runs (:func:`pddreg.optim.level_step`), on its
            learned features, in training as at inference.
        normalise_cost, cost_scale, prior: as in ``discrete_register`` (level_specs only): the
            raw SSD divided by its mean, times ``cost_scale``, and a Gaussian prior on each
            level's residual (``prior`` times the radius; None: none).
        field_loss: weight of the end-point error against a known field (synthetic pairs) in
            :meth:`PDDNet.training_loss`; 0: not used.
    """

    ndim: int = 2
    features: str = "lecture"
    feature_kwargs: dict[str, Any] = field(default_factory=dict)
    radius: int = 6
    spacing: float = 1.0
    grid_stride: int = 1
    levels: int = 1
    radius2: int = 2
    spacing2: float = 0.5
    grid_stride2: int = 1
    use_meanfield: bool = True
    exact_minconv: bool = False
    alpha: list[float] | None = None
    padding: str = "border"
    label_loss: str = "both"
    lambda_diffusion: float = 0.1
    smooth: int = 0
    instance_opt: bool = False
    io_iters: int | None = None
    io_lambda: float | None = None
    io_lr: float | None = None
    io_features: str = "mind"
    io_levels: int = 0
    io_coarse: int = 0
    level_specs: list[dict[str, Any]] | None = None
    normalise_cost: bool = False
    cost_scale: float = 1.0
    prior: float | None = None
    field_loss: float = 0.0

    def __post_init__(self) -> None:
        if self.ndim not in (2, 3):
            raise ValueError(f"PDDNetConfig: ndim must be 2 or 3, got {self.ndim}")
        if self.features not in FEATURES:
            raise ValueError(
                f"PDDNetConfig: features must be one of {FEATURES}, got {self.features!r}"
            )
        if self.levels not in (1, 2):
            raise ValueError(f"PDDNetConfig: levels must be 1 or 2, got {self.levels}")
        if int(self.io_levels) < 0 or int(self.io_coarse) < 0:
            raise ValueError(
                "PDDNetConfig: io_levels and io_coarse must be >= 0, got "
                f"{self.io_levels} and {self.io_coarse}"
            )
        if self.io_features not in ("mind", "learned"):
            raise ValueError(
                f"PDDNetConfig: io_features must be 'mind' or 'learned', got {self.io_features!r}"
            )
        if self.label_loss not in LABEL_LOSSES:
            raise ValueError(
                f"PDDNetConfig: label_loss must be one of {LABEL_LOSSES}, got {self.label_loss!r}"
            )
        for name in ("radius", "radius2", "grid_stride", "grid_stride2"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PDDNetConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.spacing <= 0 or self.spacing2 <= 0:
            raise ValueError("PDDNetConfig: spacing and spacing2 must be > 0")
        if self.level_specs is not None:
            from pddreg.optim import LevelConfig

            if not self.level_specs:
                raise ValueError("PDDNetConfig: level_specs must hold at least one level")
            for spec in self.level_specs:
                try:
                    LevelConfig(**spec)
                except TypeError as err:
                    raise ValueError(f"PDDNetConfig: bad level spec {spec!r} ({err})") from None


#: Box-3 smoothing passes of the control-grid fields of the shipped models. Without it the 2D
#: model folded 1.4% of the pixels of unseen phantom pairs (mean of 4, control points 8 px
#: apart); 2 passes: 0.07% with slightly higher Dice (0.393 vs 0.385). A 10x larger diffusion
#: weight in training did not remove the folds (they sit at a few points with large jumps).
SHIPPED_SMOOTH = 2
#: The 2D model at inference on the held-out phantom2d test pairs (12 pairs): 2 passes gave
#: Dice 0.380 / SDlogJ 1.57 at 256x320 and 0.419 / 0.19 at 128x160; 12 passes 0.418 / 0.29 and
#: 0.438 / 0.11 (16: 0.424 at 256x320). The undertrained shipped features leave outliers in
#: the soft field; heavier smoothing of the control grid removes them at both resolutions.
#: Only the shipped file carries it (``scripts/pretrain.py`` sets it after training); training
#: uses SHIPPED_SMOOTH: fine-tuned on labels with 12 passes, the demo's model scored 0.441
#: against 0.478 with 2.
SHIPPED_SMOOTH_2D = 12


#: The multi-level search of the shipped models, in feature voxels (features at stride 2):
#: 2D: +-12 feature voxels (+-24 px) in steps of 2 on a control grid every 4 feature voxels
#: (8 px), then +-2 on a grid of 2 (4 px), then +-1 in half steps on the feature grid (2 px);
#: 3D: +-8 (+-16 voxels) in steps of 2 every 4 feature voxels, then +-2 every 2, then +-1 in
#: half steps on the feature grid (without it the untrained 3D net ended 2.2 voxels from known
#: fields of real volumes, against 2.0 unregistered: no sub-voxel refinement). The same kind
#: of levels ``mind`` runs (pddreg.optim.mindreg.DEFAULT_LEVELS), at half the resolution.
SHIPPED_LEVELS = {
    2: [
        {"grid_stride": 4, "radius": 6, "spacing": 2.0, "smooth": 1, "fixed_sampling": "point"},
        {"grid_stride": 2, "radius": 2, "spacing": 1.0, "smooth": 1, "fixed_sampling": "point"},
        {"grid_stride": 1, "radius": 1, "spacing": 0.5, "smooth": 0, "fixed_sampling": "point"},
    ],
    3: [
        {"grid_stride": 4, "radius": 4, "spacing": 2.0, "smooth": 1, "fixed_sampling": "point"},
        {"grid_stride": 2, "radius": 2, "spacing": 1.0, "smooth": 1, "fixed_sampling": "point"},
        {"grid_stride": 1, "radius": 1, "spacing": 0.5, "smooth": 0, "fixed_sampling": "point"},
    ],
}


#: The refinement of the shipped models' fields (:meth:`PDDNet.register`, ``io_*``), chosen on
#: the known-answer cases of ``benchmarks/real.py`` (mean EPE over its 2D / 3D cases): the Adam
#: steps alone (2D: 50 steps, diffusion 1; 3D: 50 steps) left the network's coarser field in
#: local minima that ``mind``'s own levels avoid (2D chest CT 0.83 against ``mind``'s 0.69,
#: echo 0.79 against 0.65, 3D brain MR remapped 0.94 against 0.85). ``mind``'s finest levels
#: run from the network's field first (``io_levels``): 2D two levels 1.24 (Adam alone 1.50,
#: ``mind`` 1.50), and 200 steps (the photographs' large motion keeps improving up to 200:
#: Urban2 1.90 -> 1.44) with diffusion 0.7 (the best of 0.5 / 0.7 / 1 / 1.5) 1.05, no folding;
#: the first 100 of them on MIND-SSC pooled by 2 (``io_coarse``): 1.04, and 2.3 s instead of
#: 3.3 s for the steps on a 384x512 echo frame;
#: 3D one level 0.547, two 0.544 (Adam alone 0.562, ``mind`` 0.551); on the larger volumes
#: of ``benchmarks/bench_speed3d.py`` one level gains nothing (brain MR 91x109x91 and 128^3:
#: EPE 0.32 / 0.33 either way) for about 0.5 s more at 91x109x91, but on the real pairs as they
#: are it does (the two brain MRs of different patients: NCC 0.652 -> 0.661, where ``mind``
#: reaches 0.693; the two chest CTs 0.672 -> 0.676 with SDlogJ 0.573 -> 0.512), and on the 3D
#: known-answer cases 0.523 -> 0.518 (remapped brain MR 0.75 -> 0.73, ``mind`` 0.73): 3D runs
#: ``mind``'s finest level, then 50 Adam steps (two levels: brain NCC 0.680, but the chest CTs
#: folded, 0.72 %, SDlogJ 1.85; diffusion 0.7 was worse too).
SHIPPED_REFINEMENT: dict[int, dict[str, Any]] = {
    2: {"io_levels": 2, "io_coarse": 100, "io_iters": 100, "io_lambda": 0.7},
    3: {"io_levels": 1, "io_iters": 50},
}


#: The fields of :class:`PDDNetConfig` used only at inference (the refinement of the network's
#: field): ``scripts/pretrain.py --refresh-config`` sets them in a trained file.
INFERENCE_FIELDS = (
    "instance_opt",
    "io_iters",
    "io_lambda",
    "io_lr",
    "io_features",
    "io_levels",
    "io_coarse",
)


def default_config(ndim: int) -> PDDNetConfig:
    """The configuration of the shipped pretrained models (``scripts/pretrain.py``).

    Features: :class:`pddreg.features.nets.HybridNet` at stride 2 (MIND-SSC channels beside 16
    learned ones, learned gains); the levels of :data:`SHIPPED_LEVELS`, each with its six
    learned regularisation weights, on the mean-normalised SSD times 4 with ``mind``'s prior;
    trained on synthetic pairs against their true fields (``field_loss``). :meth:`PDDNet.register`
    refines the network's field on MIND-SSC by default (``instance_opt``, ``io_features``):
    :data:`SHIPPED_REFINEMENT` (2D: ``mind``'s two finest discrete levels from the network's
    field, then Adam steps; 3D: the finest one, then Adam steps), the inference settings that
    ``scripts/pretrain.py --refresh-config`` writes into the shipped files.
    """
    if ndim not in (2, 3):
        raise ValueError(f"default_config(): ndim must be 2 or 3, got {ndim}")
    return PDDNetConfig(
        ndim=ndim,
        features="hybrid",
        feature_kwargs={"channels": 16, "width": 24 if ndim == 2 else 16, "stride": 2},
        level_specs=[dict(spec) for spec in SHIPPED_LEVELS[ndim]],
        normalise_cost=True,
        cost_scale=4.0,
        prior=0.25,
        lambda_diffusion=0.1,
        field_loss=1.0,
        label_loss="warped",
        instance_opt=True,
        io_features="mind",
        **SHIPPED_REFINEMENT[ndim],
    )


def _box3(field: Tensor, passes: int) -> Tensor:
    """``passes`` box-3 averages of ``(B, ndim, *G)`` with replicate borders."""
    if passes <= 0:
        return field
    ndim = field.dim() - 2
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    for _ in range(passes):
        field = pool(F.pad(field, (1, 1) * ndim, mode="replicate"), 3, stride=1)
    return field


def _large(shape: tuple[int, ...]) -> bool:
    """Whether :meth:`PDDNet.register` runs the network on a 3D image pooled by 2: above
    ``pddreg.optim.mindreg.LARGE_VOLUME`` voxels, where ``mind`` takes its features at half
    resolution too (192x160x256: the levels at stride 2 took 4x the time of ``mind``)."""
    from pddreg.optim.mindreg import LARGE_VOLUME

    return len(shape) == 3 and math.prod(shape) > LARGE_VOLUME


def _area(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    if tuple(x.shape[2:]) == shape:
        return x
    pool = F.adaptive_avg_pool2d if x.dim() == 4 else F.adaptive_avg_pool3d
    return pool(x, shape)


class PDDNet(nn.Module):
    """PDD-Net with a learned feature net and learned regularisation weights.

    ``model(fixed, moving)`` with images ``(B, 1, *S)`` in ``[0, 1]`` returns a dict:
    ``"disp"`` ``(B, ndim, *S)`` (image voxels), ``"disp_grid"`` ``(B, ndim, *G)`` (voxels of
    ``G``), ``"prob"`` ``(B, |L|, *G)`` and ``"cost"`` (regularised) of the last level, and
    ``"levels"``: a list with those entries (plus ``"raw_cost"``, ``"radius"``, ``"spacing"``,
    ``"feature_shape"``, and ``"disp_feat"``: the field so far on the feature grid ``F`` in
    voxels of ``F``) per level; ``"features"``: the fixed and moving feature maps.
    """

    def __init__(self, config: PDDNetConfig | None = None) -> None:
        super().__init__()
        from pddreg.cost import DEFAULT_ALPHA

        self.config = config = config if config is not None else PDDNetConfig()
        self.features = build_feature_net(config.features, config.ndim, **config.feature_kwargs)
        alpha = config.alpha if config.alpha is not None else DEFAULT_ALPHA
        alpha = torch.as_tensor(alpha, dtype=torch.float32).flatten()
        if alpha.numel() != 6:
            raise ValueError(f"PDDNetConfig: alpha must have 6 values, got {alpha.numel()}")
        if config.level_specs is not None:
            from pddreg.optim import LevelConfig

            self.level_configs = [LevelConfig(**spec) for spec in config.level_specs]
            self.alphas = nn.ParameterList(
                [nn.Parameter(alpha.clone()) for _ in self.level_configs]
            )
            return
        self.alpha = nn.Parameter(alpha.clone())
        self.alpha2 = nn.Parameter(alpha.clone()) if config.levels == 2 else None

    # ------------------------------------------------------------------ helpers
    def _check(self, fixed: Tensor, moving: Tensor) -> None:
        nd = self.config.ndim
        if fixed.dim() != nd + 2 or fixed.shape[1] != 1:
            raise ValueError(
                f"PDDNet: 'fixed' must have shape (B, 1, *spatial) with {nd} spatial axes, "
                f"got {tuple(fixed.shape)}"
            )
        if moving.shape != fixed.shape:
            raise ValueError(
                f"PDDNet: 'moving' must have the shape of 'fixed' {tuple(fixed.shape)}, "
                f"got {tuple(moving.shape)}"
            )

    def _level(
        self,
        feat_fixed: Tensor,
        feat_moving: Tensor,
        alpha: Tensor,
        radius: int,
        spacing: float,
        grid_stride: int,
        fixed_mask: Tensor | None = None,
        moving_mask: Tensor | None = None,
    ) -> dict[str, Any]:
        from pddreg.cost import (
            correlation,
            displacement_set,
            mask_cost,
            probabilities_and_field,
            regularise,
            valid_weights,
        )

        cfg = self.config
        feat_shape = tuple(feat_moving.shape[2:])
        grid = tuple(-(-s // grid_stride) for s in feat_shape)
        raw = correlation(
            _area(feat_fixed, grid), feat_moving, radius, spacing, padding=cfg.padding
        )
        if fixed_mask is not None or moving_mask is not None:
            fw = None if fixed_mask is None else _area(fixed_mask, grid)
            raw = mask_cost(raw, valid_weights(fw, moving_mask, radius, spacing, grid))
        cost = regularise(
            raw, alpha.to(raw.dtype), use_meanfield=cfg.use_meanfield, exact=cfg.exact_minconv
        )
        disps = displacement_set(radius, spacing, cfg.ndim, device=raw.device, dtype=raw.dtype)
        # one pass (and on float32 CPU tensors one native backward) for both
        prob, field_f = probabilities_and_field(cost, disps)  # field: moving feature voxels
        scale = torch.tensor(
            [g / f for g, f in zip(grid, feat_shape, strict=True)], dtype=raw.dtype
        )
        disp_grid = _box3(field_f * scale.to(raw.device).view(1, -1, *([1] * cfg.ndim)), cfg.smooth)
        return {
            "raw_cost": raw,
            "cost": cost,
            "prob": prob,
            "disp_grid": disp_grid,
            "radius": radius,
            "spacing": spacing,
            "feature_shape": feat_shape,
        }

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        fixed: Tensor,
        moving: Tensor,
        fixed_mask: Tensor | None = None,
        moving_mask: Tensor | None = None,
        init: Tensor | None = None,
    ) -> dict[str, Any]:
        """Register ``moving`` to ``fixed`` (both ``(B, 1, *S)``); see the class docstring.

        ``fixed_mask``, ``moving_mask``: optional ``(B, 1, *S)`` masks in [0, 1]: cost entries
        of control points outside the fixed mask, or displaced outside the moving mask, get a
        neutral cost (:func:`pddreg.cost.mask_cost`). ``init``: ``(B, ndim, *S)`` field in
        image voxels the levels start from (``level_specs`` models only; None: zero)."""
        from pddreg.spatial import compose, resize_field, warp

        self._check(fixed, moving)
        if self.config.level_specs is not None:
            return self._forward_levels(fixed, moving, fixed_mask, moving_mask, init)
        if init is not None:
            raise ValueError("PDDNet.forward(): 'init' needs a model with level_specs")
        feat_fixed, feat_moving, fmask, mmask = self._features(
            fixed, moving, fixed_mask, moving_mask
        )
        fshape = tuple(feat_fixed.shape[2:])
        levels = []
        disp = None  # (B, ndim, *F) in voxels of F
        for i, (alpha, radius, spacing, stride) in enumerate(self._levels()):
            moved = feat_moving if disp is None else warp(feat_moving, disp, padding="border")
            mm = mmask if mmask is None or disp is None else warp(mmask, disp, padding="zeros")
            lv = self._level(feat_fixed, moved, alpha, radius, spacing, stride, fmask, mm)
            residual = resize_field(lv["disp_grid"], fshape)
            disp = residual if i == 0 else compose(disp, residual)
            lv["disp_feat"] = disp
            levels.append(lv)
        last = levels[-1]
        return {
            "disp": resize_field(disp, tuple(fixed.shape[2:])),
            "disp_grid": last["disp_grid"],
            "prob": last["prob"],
            "cost": last["cost"],
            "levels": levels,
            "features": (feat_fixed, feat_moving),
        }

    def _features(
        self,
        fixed: Tensor,
        moving: Tensor,
        fixed_mask: Tensor | None,
        moving_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Both images through the feature net in one batch ``(B, C, *F)`` each, and the
        masks area-resampled to ``F`` (or None)."""
        b = fixed.shape[0]
        feats = self.features(torch.cat([fixed, moving]))
        fshape = tuple(feats.shape[2:])
        fmask = None if fixed_mask is None else _area(fixed_mask.to(feats.dtype), fshape)
        mmask = None if moving_mask is None else _area(moving_mask.to(feats.dtype), fshape)
        return feats[:b], feats[b:], fmask, mmask

    def _forward_levels(
        self,
        fixed: Tensor,
        moving: Tensor,
        fixed_mask: Tensor | None,
        moving_mask: Tensor | None,
        init: Tensor | None = None,
    ) -> dict[str, Any]:
        """:meth:`forward` for ``level_specs``: the levels of ``discrete_register``."""
        from pddreg.optim import level_step
        from pddreg.spatial import compose, resize_field

        cfg = self.config
        feat_fixed, feat_moving, fmask, mmask = self._features(
            fixed, moving, fixed_mask, moving_mask
        )
        fshape = tuple(feat_fixed.shape[2:])
        disp = None if init is None else resize_field(init.to(feat_fixed.dtype), fshape)
        levels = []
        fixed_cache: dict = {}  # the fixed features pooled and smoothed, outside autograd
        for level, alpha in zip(self.level_configs, self.alphas, strict=True):
            out = level_step(
                feat_fixed,
                feat_moving,
                disp,
                level,
                alpha,
                cost_scale=cfg.cost_scale,
                normalise=cfg.normalise_cost,
                prior=cfg.prior,
                padding=cfg.padding,
                fixed_mask=fmask,
                moving_mask=mmask,
                want_prob=True,
                fixed_cache=fixed_cache,
            )
            disp = out.residual if disp is None else compose(disp, out.residual)
            levels.append(
                {
                    "prob": out.prob,
                    "residual": out.residual,
                    "disp_feat": disp,
                    "radius": level.radius,
                    "spacing": level.spacing,
                    "feature_shape": out.shapes[0],
                    "padded": out.shapes[1],
                }
            )
        assert disp is not None
        return {
            "disp": resize_field(disp, tuple(fixed.shape[2:])),
            "prob": levels[-1]["prob"],
            "levels": levels,
            "features": (feat_fixed, feat_moving),
        }

    def _levels_loss(
        self,
        fixed: Tensor,
        moving: Tensor,
        fixed_seg: Tensor | None,
        moving_seg: Tensor | None,
        num_labels: int,
        field: Tensor | None,
    ) -> tuple[Tensor, dict[str, float]]:
        """:meth:`training_loss` for ``level_specs``: end-point error of the dense field
        against a known field and the label loss of the moving labels warped by it (both for
        every level's field so far, the last one counting fully and each coarser one half as
        much as the next), and diffusion of every level's residual."""
        from pddreg.losses import diffusion, similarity_loss, warped_label_loss
        from pddreg.spatial import resize_field

        cfg = self.config
        out = self(fixed, moving)
        shape = tuple(fixed.shape[2:])
        logs: dict[str, float] = {}
        total = fixed.new_zeros(())
        n = len(out["levels"])
        if field is not None and cfg.field_loss > 0:
            fshape = tuple(out["levels"][0]["disp_feat"].shape[2:])
            target = resize_field(field.to(fixed.dtype), fshape)
            for i, lv in enumerate(out["levels"]):
                err = (lv["disp_feat"] - target).square().sum(1).add(1e-6).sqrt().mean()
                weight = cfg.field_loss * 0.5 ** (n - 1 - i)
                total = total + weight * err
                logs[f"epe{i + 1}"] = float(err.detach()) * shape[0] / fshape[0]
        if fixed_seg is not None and moving_seg is not None:
            # every level's field so far warps the moving labels (on the feature grid), the
            # last one counting fully and each coarser one half as much as the next
            for i, lv in enumerate(out["levels"]):
                term = warped_label_loss(lv["disp_feat"], fixed_seg, moving_seg, num_labels)
                total = total + 0.5 ** (n - 1 - i) * term
                logs[f"warped{i + 1}"] = float(term.detach())
        elif field is None:
            term = similarity_loss(fixed, moving, out["disp"])
            total = total + term
            logs["similarity"] = float(term.detach())
        for i, lv in enumerate(out["levels"]):
            reg = diffusion(lv["residual"])
            total = total + cfg.lambda_diffusion * reg
            logs[f"diffusion{i + 1}"] = float(reg.detach())
        logs["loss"] = float(total.detach())
        return total, logs

    def _levels(self) -> list[tuple[Tensor, int, float, int]]:
        """``(alpha, radius, spacing, grid_stride)`` per level."""
        cfg = self.config
        levels = [(self.alpha, cfg.radius, cfg.spacing, cfg.grid_stride)]
        if cfg.levels == 2:
            levels.append((self.alpha2, cfg.radius2, cfg.spacing2, cfg.grid_stride2))
        return levels

    # ------------------------------------------------------------------ interface
    @torch.no_grad()
    def register(
        self,
        fixed: Tensor,
        moving: Tensor,
        instance_opt: bool | None = None,
        fixed_mask: Tensor | None = None,
        moving_mask: Tensor | None = None,
        capture: bool | None = False,
        posterior: Any = None,
        **kwargs: Any,
    ) -> Tensor:
        """Dense displacement ``(B, ndim, *S)`` mapping the fixed grid into ``moving``.

        ``fixed``, ``moving``: ``(B, 1, *S)`` in ``[0, 1]``, on the model's device. Runs
        :meth:`forward` in eval mode without gradients. ``instance_opt`` (default:
        ``config.instance_opt``): then refine the field by Adam on a feature SSD + diffusion:
        with ``config.io_features == "mind"`` :func:`pddreg.optim.refine_mind` (MIND-SSC, the
        settings of ``mind``'s own refinement, after ``config.io_levels`` of ``mind``'s finest
        discrete levels and ``config.io_coarse`` steps at half resolution), with ``"learned"``
        :func:`pddreg.optim.feature_optimise` on the learned features (defaults from
        :class:`pddreg.optim.InstanceConfig`); ``config.io_*`` and keyword arguments
        (``iters``, ``lr``, ``lambda_``, ``grid_stride``, ``smooth``; ``levels`` and
        ``coarse`` for ``"mind"``) override the settings.
        ``fixed_mask``, ``moving_mask``: ``(B, 1, *S)`` masks (see :meth:`forward`).

        ``capture`` (``level_specs`` models): the large-motion search of ``mind``. None or
        True: where the levels cannot reach :data:`pddreg.optim.mindreg.CAPTURE_FRACTION` of
        the image extent, the levels run once more from the field of ``mind``'s capture level
        (:func:`pddreg.optim.capture_start` on MIND-SSC at the network's stride) and the run
        whose warped moving MIND features match better (:func:`pddreg.optim.keep_better`,
        region by region) is kept, in 2D also against a third run from the block-matching
        capture level (:func:`pddreg.optim.block_capture_level`); False (default): the
        levels alone. 3D images above
        ``pddreg.optim.mindreg.LARGE_VOLUME`` voxels (``level_specs`` models) are area-pooled
        by 2 for the network (its field upsampled; the refinement runs at full size). The kept
        run is the last forward pass (what a forward hook, e.g. the uncertainty recording, sees
        last).

        ``posterior``: a :class:`pddreg.optim.uncertainty.Posterior` to which the refinement's
        discrete levels (``"mind"`` with ``io_levels``) add their probabilities, after the
        network's levels that :func:`pddreg.optim.uncertainty.record_forward` recorded
        (None: not recorded).
        """
        from pddreg.spatial import resize_field

        shape = tuple(fixed.shape[2:])
        images = [fixed, moving, fixed_mask, moving_mask]
        if self.config.level_specs is not None and _large(shape):
            # large volumes: the network on the images area-pooled by 2 (as mind's features)
            half = feature_grid_shape(shape, 2)
            images = [None if x is None else _area(x.float(), half) for x in images]
        was_training = self.training
        self.eval()
        try:
            out = None
            if capture is not False:
                out = self._capture(*images)
            if out is None:
                out = self(*images)
        finally:
            self.train(was_training)
        if images[0] is not fixed:
            out = {**out, "disp": resize_field(out["disp"], shape)}
        cfg = self.config
        if not (cfg.instance_opt if instance_opt is None else instance_opt):
            return out["disp"]
        from pddreg.optim import InstanceConfig, feature_optimise

        opts = {"iters": cfg.io_iters, "lr": cfg.io_lr, "lambda_": cfg.io_lambda}
        opts = {k: v for k, v in opts.items() if v is not None}
        opts.update(kwargs)
        if cfg.io_features == "mind":
            from pddreg.optim import refine_mind

            opts.setdefault("levels", cfg.io_levels)
            opts.setdefault("coarse", cfg.io_coarse)
            return refine_mind(
                fixed,
                moving,
                out["disp"],
                fixed_mask=fixed_mask,
                moving_mask=moving_mask,
                posterior=posterior,
                **opts,
            )
        io = InstanceConfig(mode="features", **opts)
        feat_fixed, feat_moving = out["features"]
        fshape = tuple(feat_fixed.shape[2:])
        refined = feature_optimise(
            feat_fixed,
            feat_moving,
            out["levels"][-1]["disp_feat"],
            grid_stride=io.grid_stride,
            lambda_=io.lambda_,
            iters=io.iters,
            lr=io.lr,
            smooth=io.smooth,
            fixed_mask=None if fixed_mask is None else _area(fixed_mask.float(), fshape),
            moving_mask=None if moving_mask is None else _area(moving_mask.float(), fshape),
        )
        return resize_field(refined, tuple(fixed.shape[2:]))

    def _capture(
        self,
        fixed: Tensor,
        moving: Tensor,
        fixed_mask: Tensor | None,
        moving_mask: Tensor | None,
    ) -> dict[str, Any] | None:
        """:meth:`register`'s large-motion search: the forward output of the plain run and
        of the run from the capture level, blended region by region by which matches better
        (:func:`pddreg.optim.keep_better`; the outputs other than ``disp`` are those of the
        run the blend lies nearer); None where it does not apply."""
        if self.config.level_specs is None:
            return None
        from pddreg.optim import capture_start, keep_better
        from pddreg.optim.mindreg import blend_distances

        stride = int(getattr(self.features, "stride", 1))
        args = (fixed, moving, self.level_configs, stride)
        masks = {"fixed_mask": fixed_mask, "moving_mask": moving_mask}
        start = capture_start(*args, **masks)
        if start is None:
            return None
        field, feat_fixed, feat_moving = start
        wide = self(fixed, moving, fixed_mask, moving_mask, init=field)
        plain = self(fixed, moving, fixed_mask, moving_mask)
        disp = keep_better(
            plain["disp"], wide["disp"], feat_fixed, feat_moving, fixed_mask, moving_mask
        )
        blocks = capture_start(*args, **masks, block=True, features=(feat_fixed, feat_moving))
        if blocks is not None:
            # 2D: the levels from the block-matching capture level, a third candidate
            third = self(fixed, moving, fixed_mask, moving_mask, init=blocks[0])["disp"]
            disp = keep_better(disp, third, feat_fixed, feat_moving, fixed_mask, moving_mask)
        if torch.equal(disp, plain["disp"]):
            return plain
        to_plain, to_wide = blend_distances(disp, plain["disp"], wide["disp"])
        if to_wide.sum() < to_plain.sum():
            # mostly the capture run: it runs last (the forward hooks record it)
            wide = self(fixed, moving, fixed_mask, moving_mask, init=field)
            return {**wide, "disp": disp}
        return {**plain, "disp": disp}

    def training_loss(
        self,
        fixed: Tensor,
        moving: Tensor,
        fixed_seg: Tensor | None,
        moving_seg: Tensor | None,
        num_labels: int,
        field: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Weakly supervised loss on a batch: label loss of every level + lambda * diffusion.

        ``fixed``, ``moving``: ``(B, 1, *S)``; ``fixed_seg``, ``moving_seg``: ``(B, 1, *S)``
        int64 (or None: MIND similarity of the dense field instead); ``field``: the true
        field ``(B, ndim, *S)`` of synthetic pairs, scored by the end-point error with weight
        ``config.field_loss``. Returns ``(loss, logs)``.
        """
        if self.config.level_specs is not None:
            return self._levels_loss(fixed, moving, fixed_seg, moving_seg, num_labels, field)
        from pddreg.losses import (
            diffusion,
            nonlocal_label_loss,
            similarity_loss,
            warped_label_loss,
        )
        from pddreg.spatial import resize_field, warp_labels

        cfg = self.config
        out = self(fixed, moving)
        logs: dict[str, float] = {}
        total = fixed.new_zeros(())
        seg = moving_seg
        for i, lv in enumerate(out["levels"]):
            last = i == len(out["levels"]) - 1
            terms: dict[str, Tensor] = {}
            if fixed_seg is None or moving_seg is None:
                if last:
                    terms["similarity"] = similarity_loss(fixed, moving, out["disp"])
            else:
                if cfg.label_loss in ("nonlocal", "both"):
                    terms[f"label{i + 1}"] = nonlocal_label_loss(
                        lv["prob"],
                        fixed_seg,
                        seg,
                        num_labels,
                        lv["radius"],
                        lv["spacing"],
                        moving_shape=lv["feature_shape"],
                    )
                if cfg.label_loss in ("warped", "both"):
                    terms[f"warped{i + 1}"] = warped_label_loss(
                        lv["disp_grid"], fixed_seg, seg, num_labels
                    )
            reg = diffusion(lv["disp_grid"])
            for key, value in terms.items():
                total = total + value
                logs[key] = float(value.detach())
            total = total + cfg.lambda_diffusion * reg
            logs[f"diffusion{i + 1}"] = float(reg.detach())
            if not last and moving_seg is not None:
                dense = resize_field(lv["disp_feat"].detach(), tuple(fixed.shape[2:]))
                seg = warp_labels(moving_seg, dense)
        logs["loss"] = float(total.detach())
        return total, logs
