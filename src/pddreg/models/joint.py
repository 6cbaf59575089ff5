"""Joint segmentation and motion (after Qin et al., MICCAI 2018): one feature encoder shared by
a segmentation head and the PDD-Net registration.

The PDD-Net's learned feature net (:class:`pddreg.models.PDDNet`) computes the features of both
images for the correlation; :class:`SegHead` turns the same features (upsampled to the image,
with the image itself) into label logits. Training (:meth:`JointNet.training_loss`, driven by
:func:`pddreg.train.joint.train_joint`) uses few labelled images and many unlabelled ones:

- **segmentation** of the labelled images (cross-entropy + soft Dice);
- **registration** of labelled pairs with PDD-Net's label loss, of all pairs with the MIND
  similarity of the warped moving image;
- **consistency**: the moving image's segmentation (its labels where known, else the head's
  prediction) warped by the field against the fixed image's (labels or prediction), which lets
  registration teach the segmentation of unlabelled images and the segmentation guide the
  registration of unlabelled pairs.

``model.register`` is the PDD-Net's (so ``--method pdd --model joint.pt`` works everywhere);
``model.segment(image)`` gives label probabilities. Shapes: images ``(B, 1, *S)`` in [0, 1],
label maps ``(B, 1, *S)`` int64, logits/probabilities ``(B, K, *S)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pddreg.features.nets import layer

from .pdd import PDDNet, PDDNetConfig

__all__ = ["JointNet", "JointNetConfig", "SegHead", "SegNet", "SegNetConfig"]


@dataclass
class JointNetConfig:
    """Configuration of :class:`JointNet` (saved with the weights).

    Attributes:
        ndim: 2 or 3.
        num_labels: label classes including background 0.
        pdd: the PDD-Net's configuration (:class:`pddreg.models.PDDNetConfig` fields).
        seg_width: channels of the segmentation head.
        seg_weight: weight of the supervised segmentation loss.
        label_weight: weight of PDD-Net's label loss on labelled pairs.
        similarity_weight: weight of the MIND similarity of the warped moving image.
        consistency_weight: weight of the warped-segmentation consistency.
    """

    ndim: int = 2
    num_labels: int = 2
    pdd: dict[str, Any] = field(default_factory=dict)
    seg_width: int = 32
    seg_weight: float = 1.0
    label_weight: float = 1.0
    similarity_weight: float = 1.0
    consistency_weight: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.pdd, PDDNetConfig):
            self.pdd = asdict(self.pdd)
        self.pdd = {**dict(self.pdd), "ndim": int(self.ndim)}
        if int(self.num_labels) < 2:
            raise ValueError(f"JointNetConfig: num_labels must be >= 2, got {self.num_labels}")


def _block(ndim: int, cin: int, cout: int) -> list[nn.Module]:
    return [
        layer("conv", ndim)(cin, cout, 3, padding=1),
        layer("instance", ndim)(cout, affine=True),
        nn.PReLU(cout),
    ]


class SegHead(nn.Module):
    """Label logits from strided features and the image.

    ``(features (B, C, *F), image (B, 1, *S)) -> logits (B, K, *S)``: two convolutions on the
    features, linear upsampling to half the image resolution, the image (area-downsampled)
    concatenated, one more convolution, a 1x1 convolution to ``K`` classes and linear
    upsampling of the logits to ``S`` (the full-resolution convolutions cost 4x more for little
    gain on the lecture's stride-4 features).
    """

    def __init__(self, ndim: int, channels: int, num_labels: int, width: int = 32) -> None:
        super().__init__()
        self.ndim = ndim
        self.coarse = nn.Sequential(*_block(ndim, channels, width), *_block(ndim, width, width))
        self.fine = nn.Sequential(
            *_block(ndim, width + 1, width // 2),
            layer("conv", ndim)(width // 2, num_labels, 1),
        )

    def forward(self, features: Tensor, image: Tensor) -> Tensor:
        mode = "trilinear" if self.ndim == 3 else "bilinear"
        half = tuple(-(-int(s) // 2) for s in image.shape[2:])
        x = F.interpolate(self.coarse(features), size=half, mode=mode, align_corners=False)
        pool = F.adaptive_avg_pool3d if self.ndim == 3 else F.adaptive_avg_pool2d
        x = self.fine(torch.cat([x, pool(image.to(x.dtype), half)], 1))
        return F.interpolate(x, size=image.shape[2:], mode=mode, align_corners=False)


def _seg_loss(logits: Tensor, seg: Tensor) -> Tensor:
    """Cross-entropy + (1 - mean soft Dice over the foreground labels)."""
    ce = F.cross_entropy(logits, seg[:, 0])
    prob = torch.softmax(logits, 1)
    onehot = F.one_hot(seg[:, 0], logits.shape[1]).movedim(-1, 1).to(prob.dtype)
    dims = tuple(range(2, prob.dim()))
    inter = (prob * onehot).sum(dims)
    total = prob.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1e-3) / (total + 1e-3)
    return ce + (1.0 - dice[:, 1:].mean())


def _soft_sse(pred: Tensor, target: Tensor) -> Tensor:
    """Class-weighted squared error of two probability maps ``(B, K, *S)`` (the weighting of
    :func:`pddreg.losses.warped_label_loss`)."""
    from pddreg.losses.functional import class_weights

    weights = class_weights(pred.detach(), target.detach())
    err = (pred - target).square().mean(dim=[0, *range(2, pred.dim())])
    return (err * weights.to(err)).sum() / weights.sum().to(err)


class JointNet(nn.Module):
    """A PDD-Net whose feature net also feeds a segmentation head (see the module)."""

    def __init__(self, config: JointNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else JointNetConfig()
        self.pdd = PDDNet(PDDNetConfig(**config.pdd))
        channels = int(getattr(self.pdd.features, "out_channels", 0) or 0)
        if channels <= 0:
            with torch.no_grad():
                probe = torch.zeros((1, 1, *([32] * config.ndim)))
                channels = int(self.pdd.features(probe).shape[1])
        self.head = SegHead(config.ndim, channels, config.num_labels, config.seg_width)

    def segment_logits(self, image: Tensor) -> Tensor:
        """``(B, 1, *S) -> (B, K, *S)`` logits."""
        return self.head(self.pdd.features(image), image)

    @torch.no_grad()
    def segment(self, image: Tensor) -> Tensor:
        """``(B, 1, *S)`` in [0, 1] -> label probabilities ``(B, K, *S)`` (eval, no grad)."""
        was = self.training
        self.eval()
        try:
            return torch.softmax(self.segment_logits(image), 1)
        finally:
            self.train(was)

    def forward(self, fixed: Tensor, moving: Tensor, **kwargs: Any) -> dict[str, Any]:
        """The PDD-Net's output dict (see :class:`pddreg.models.PDDNet`)."""
        return self.pdd(fixed, moving, **kwargs)

    def register(self, fixed: Tensor, moving: Tensor, **kwargs: Any) -> Tensor:
        """The PDD-Net's :meth:`~pddreg.models.PDDNet.register`."""
        return self.pdd.register(fixed, moving, **kwargs)

    def training_loss(
        self,
        fixed: Tensor,
        moving: Tensor,
        fixed_seg: Tensor | None,
        moving_seg: Tensor | None,
        num_labels: int,
        fixed_labelled: Tensor | None = None,
        moving_labelled: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Joint loss of a batch of pairs (see the module).

        Args:
            fixed, moving: ``(B, 1, *S)`` images.
            fixed_seg, moving_seg: ``(B, 1, *S)`` int64 labels (anything where not labelled),
                or None (no labels at all).
            num_labels: the label count of the data (must not exceed ``config.num_labels``).
            fixed_labelled, moving_labelled: ``(B,)`` bool, which images' labels may be used
                (default: all when the label maps are given).

        Returns:
            ``(loss, logs)``.
        """
        from pddreg.losses import diffusion, nonlocal_label_loss, similarity_loss
        from pddreg.losses import one_hot as onehot_fn
        from pddreg.spatial import resize_field, warp, warp_labels

        cfg = self.config
        k = cfg.num_labels
        if num_labels > k:
            raise ValueError(f"JointNet: data has {num_labels} labels, the model {k}")
        b = fixed.shape[0]
        dev = fixed.device
        none = torch.zeros(b, dtype=torch.bool, device=dev)
        fl = (
            none if fixed_seg is None else (fixed_labelled if fixed_labelled is not None else ~none)
        )
        ml = (
            none
            if moving_seg is None
            else (moving_labelled if moving_labelled is not None else ~none)
        )
        fl, ml = fl.to(dev).bool(), ml.to(dev).bool()
        out = self.pdd(fixed, moving)
        feat_f, feat_m = out["features"]
        logs: dict[str, float] = {}
        total = fixed.new_zeros(())

        def add(name: str, value: Tensor, weight: float) -> None:
            nonlocal total
            if weight:
                total = total + weight * value
            logs[name] = float(value.detach())

        # segmentation of the labelled images (both sides of the pairs)
        logits_f = self.head(feat_f, fixed) if cfg.seg_weight or cfg.consistency_weight else None
        logits_m = self.head(feat_m, moving) if cfg.seg_weight or cfg.consistency_weight else None
        if cfg.seg_weight and logits_f is not None and logits_m is not None:
            parts = []
            if fl.any():
                parts.append(_seg_loss(logits_f[fl], fixed_seg[fl]))  # type: ignore[index]
            if ml.any():
                parts.append(_seg_loss(logits_m[ml], moving_seg[ml]))  # type: ignore[index]
            if parts:
                add("seg", torch.stack(parts).mean(), cfg.seg_weight)
        # registration: label loss of labelled pairs, per level
        both = fl & ml
        if both.any() and cfg.label_weight:
            seg = moving_seg[both]  # type: ignore[index]
            fseg = fixed_seg[both]  # type: ignore[index]
            for i, lv in enumerate(out["levels"]):
                if "residual" in lv:  # the levels of discrete_register (level_specs)
                    from pddreg.losses import warped_label_loss

                    lab = warped_label_loss(lv["disp_feat"][both], fseg, seg, num_labels)
                    add(f"label{i + 1}", lab, cfg.label_weight)
                    continue
                lab = nonlocal_label_loss(
                    lv["prob"][both],
                    fseg,
                    seg,
                    num_labels,
                    lv["radius"],
                    lv["spacing"],
                    moving_shape=lv["feature_shape"],
                )
                grid = lv["disp_grid"][both]
                from pddreg.losses import warped_label_loss

                lab = lab + warped_label_loss(grid, fseg, seg, num_labels)
                add(f"label{i + 1}", lab, cfg.label_weight)
                if i < len(out["levels"]) - 1:
                    dense = resize_field(lv["disp_feat"][both].detach(), tuple(fixed.shape[2:]))
                    seg = warp_labels(moving_seg[both], dense)  # type: ignore[index]
        # registration of every pair: image similarity of the warped moving image
        if cfg.similarity_weight:
            add("similarity", similarity_loss(fixed, moving, out["disp"]), cfg.similarity_weight)
        # consistency of the segmentations through the field (pairs with an unlabelled image)
        some = ~both
        if cfg.consistency_weight and some.any() and logits_f is not None and logits_m is not None:
            pf = torch.softmax(logits_f[some], 1)
            pm = torch.softmax(logits_m[some], 1)
            if fixed_seg is not None:
                gt = onehot_fn(fixed_seg[some].clamp(0, k - 1), k, pf.dtype)
                pf = torch.where(fl[some].view(-1, *([1] * (pf.dim() - 1))), gt, pf)
            if moving_seg is not None:
                gt = onehot_fn(moving_seg[some].clamp(0, k - 1), k, pm.dtype)
                pm = torch.where(ml[some].view(-1, *([1] * (pm.dim() - 1))), gt, pm)
            warped = warp(pm, out["disp"][some], padding="border")
            add("consistency", _soft_sse(warped, pf), cfg.consistency_weight)
        for i, lv in enumerate(out["levels"]):
            reg = diffusion(lv["disp_grid"] if "disp_grid" in lv else lv["residual"])
            add(f"diffusion{i + 1}", reg, self.pdd.config.lambda_diffusion)
        logs["loss"] = float(total.detach())
        return total, logs


@dataclass
class SegNetConfig:
    """Configuration of :class:`SegNet`: the feature net and head of a :class:`JointNet`
    (same sizes), trained for segmentation alone (the baseline of the joint model)."""

    ndim: int = 2
    num_labels: int = 2
    features: str = "lecture"
    feature_kwargs: dict[str, Any] = field(default_factory=dict)
    seg_width: int = 32


class SegNet(nn.Module):
    """Segmentation only: a PDD-Net feature net + :class:`SegHead` (no registration)."""

    def __init__(self, config: SegNetConfig | None = None) -> None:
        super().__init__()
        from pddreg.features.nets import build_feature_net

        self.config = config = config if config is not None else SegNetConfig()
        self.features = build_feature_net(config.features, config.ndim, **config.feature_kwargs)
        channels = int(getattr(self.features, "out_channels", 0) or 0)
        self.head = SegHead(config.ndim, channels, config.num_labels, config.seg_width)

    def segment_logits(self, image: Tensor) -> Tensor:
        return self.head(self.features(image), image)

    @torch.no_grad()
    def segment(self, image: Tensor) -> Tensor:
        was = self.training
        self.eval()
        try:
            return torch.softmax(self.segment_logits(image), 1)
        finally:
            self.train(was)

    def training_loss(self, image: Tensor, seg: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss = _seg_loss(self.segment_logits(image), seg)
        return loss, {"seg": float(loss.detach()), "loss": float(loss.detach())}
