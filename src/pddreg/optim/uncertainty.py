"""Registration uncertainty from the displacement probabilities, and soft label transfer.

A discrete registration computes, for every control point of every level, a probability for
every displacement of its set (``P = softmax(-cost)``). :class:`Posterior` collects what the
outputs need from them (pass one to :func:`pddreg.optim.discrete_register` or
:func:`pddreg.optim.register_mind`, or read a PDD-Net's ``"levels"`` with
:func:`posterior_from_levels`):

- the per-axis **variance** of the displacement of every level, brought to the image grid and
  summed over the levels (the levels refine one another, so their uncertainties add up as those
  of independent steps would): ``uncertainty = sqrt(sum_i s_i^2 var_i)``, the expected spread
  of the displacement in mm for a voxel size ``s`` (voxels with ``s = 1``;
  :func:`uncertainty_map`);
- the **probabilities of the last level** on a grid ``R`` over the image extent (about the size
  of its control grid) with its displacement set in image voxels, for **soft label transfer**
  (:func:`soft_label_transfer`): at each point the moving one-hot labels are sampled at every
  displacement of the set and weighted by its probability, as the non-local label loss of
  PDD-Net does (:func:`pddreg.losses.nonlocal_label_loss`), the distribution recentred on the
  final field (which instance optimisation may have moved).

Convention: fields and variances ``(B, ndim, *S)`` in voxels (squared voxels), component ``i``
along array axis ``i``; a grid ``G`` inside ``S`` puts point ``k`` at ``(k + 0.5) * S / G - 0.5``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Posterior",
    "posterior_from_levels",
    "posterior_outputs",
    "record_forward",
    "soft_label_transfer",
    "uncertainty_map",
    "variance_to_grid",
]


def _interp(x: Tensor, size: Sequence[int]) -> Tensor:
    """Linear ``align_corners=False`` resampling of ``(B, C, *S)`` to ``size`` (no scaling)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    mode = "trilinear" if x.dim() == 5 else "bilinear"
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def _axis_points(n_out: int, scale: float, dtype: torch.dtype, device: Any) -> Tensor:
    """``(r + 0.5) * scale - 0.5`` for ``r = 0 .. n_out - 1``."""
    return (torch.arange(n_out, dtype=dtype, device=device) + 0.5) * scale - 0.5


def _mesh(axes: Sequence[Tensor]) -> Tensor:
    """``(1, ndim, *R)`` coordinates from one vector per axis."""
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


@dataclass
class Posterior:
    """The displacement probabilities of one discrete registration, as its outputs need them.

    Attributes:
        keep_prob: keep the last level's probabilities (for :func:`soft_label_transfer`).
        variance: ``(B, ndim, *S)`` per-axis variance of the displacement on the image grid
            (squared image voxels), summed over the levels; None before a level ran.
        prob: ``(B, |L|, *R)`` the last level's probabilities on a grid ``R`` over the image
            extent, or None.
        offsets: ``(|L|, ndim)`` the last level's displacement set in image voxels, or None.
        levels: number of levels recorded.
    """

    keep_prob: bool = True
    variance: Tensor | None = None
    prob: Tensor | None = None
    offsets: Tensor | None = None
    levels: int = 0

    def add_level(
        self,
        cost: Tensor | None,
        radius: int,
        spacing: float,
        pshape: Sequence[int],
        padded: Sequence[int],
        shape: Sequence[int],
        prob: Tensor | None = None,
    ) -> None:
        """Record one level.

        Args:
            cost: ``(B, |L|, *G)`` regularised cost (``P = softmax(-cost)``), or None when
                ``prob`` is given.
            radius, spacing: the level's displacement set, in voxels of its map ``P``.
            pshape: the level's map ``P`` (feature map pooled by the level's factor).
            padded: ``P`` padded at the end of each axis, which the control grid ``G`` covers
                (``pshape`` when not padded).
            shape: the image grid ``S`` (``P`` covers the same extent).
            prob: ``(B, |L|, *G)`` probabilities instead of ``cost``.
        """
        from pddreg.cost import displacement_set, prob_variance, soft_variance

        src = cost if cost is not None else prob
        if src is None:
            raise ValueError("Posterior.add_level(): give 'cost' or 'prob'")
        ndim = src.dim() - 2
        pshape = tuple(int(s) for s in pshape)
        padded = tuple(int(s) for s in padded)
        shape = tuple(int(s) for s in shape)
        gshape = tuple(int(s) for s in src.shape[2:])
        disps = displacement_set(radius, spacing, ndim, device=src.device, dtype=torch.float32)
        with torch.no_grad():
            if cost is not None:
                var = soft_variance(cost.float(), radius, spacing)
            else:
                assert prob is not None
                var = prob_variance(prob.float(), disps)
            # G covers the padded map: up to it, crop to P, then to S (like the level's field)
            var = _interp(var, padded)
            if padded != pshape:
                var = var[(slice(None), slice(None), *(slice(0, s) for s in pshape))]
            var = _interp(var, shape)
            ratio = torch.tensor(
                [s / p for s, p in zip(shape, pshape, strict=True)], device=var.device
            )
            var = var * (ratio**2).view(1, ndim, *([1] * ndim))
            self.variance = var if self.variance is None else self.variance + var
            self.levels += 1
            if self.keep_prob:
                p = torch.softmax(-cost.float(), dim=1) if cost is not None else prob.float()
                # R: about the control grid, over the unpadded map's (= the image's) extent
                rshape = [
                    max(1, round(g * q / d)) for g, q, d in zip(gshape, pshape, padded, strict=True)
                ]
                axes = [
                    _axis_points(r, (q / r) * (g / d), p.dtype, p.device)
                    for r, q, g, d in zip(rshape, pshape, gshape, padded, strict=True)
                ]
                from pddreg.spatial import sample

                coords = _mesh(axes).expand(p.shape[0], *([-1] * (ndim + 1)))
                p = sample(p, coords, mode="linear", padding="border")
                self.prob = p / p.sum(1, keepdim=True).clamp_min(1e-12)
                self.offsets = disps * ratio.view(1, ndim)

    def select(self, take: Tensor, other: Posterior) -> Posterior:
        """Per batch element, ``other`` where ``take`` ``(B,)`` is True, else ``self``."""

        def pick(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            if a is None or b is None or a.shape != b.shape:
                return b if a is None else a
            return torch.where(take.view(-1, *([1] * (a.dim() - 1))).to(a.device), b, a)

        out = Posterior(keep_prob=self.keep_prob)
        out.variance = pick(self.variance, other.variance)
        out.prob = pick(self.prob, other.prob)
        out.offsets = self.offsets if self.offsets is not None else other.offsets
        out.levels = max(self.levels, other.levels)
        return out

    def update(self, other: Posterior) -> None:
        """Take over everything ``other`` recorded."""
        self.variance, self.prob, self.offsets = other.variance, other.prob, other.offsets
        self.levels = other.levels


def posterior_from_levels(
    levels: Sequence[dict[str, Any]], shape: Sequence[int], keep_prob: bool = True
) -> Posterior:
    """A :class:`Posterior` from a PDD-Net's ``out["levels"]`` (each with ``"prob"``
    ``(B, |L|, *G)``, ``"radius"``, ``"spacing"`` and ``"feature_shape"`` ``F``; the control
    grid covers ``F``, or ``"padded"`` where the level padded it) for images of ``shape``."""
    post = Posterior(keep_prob=keep_prob)
    for lv in levels:
        fshape = tuple(int(s) for s in lv["feature_shape"])
        padded = tuple(int(s) for s in lv.get("padded", fshape))
        post.add_level(
            None, int(lv["radius"]), float(lv["spacing"]), fshape, padded, shape, prob=lv["prob"]
        )
    return post


def variance_to_grid(variance: Tensor, shape: Sequence[int]) -> Tensor:
    """A per-axis variance ``(B, ndim, *W)`` (squared voxels of ``W``) on a grid ``shape``
    covering the same extent (the working grid -> the fixed grid): resampled linearly and
    rescaled to squared voxels of ``shape``."""
    ndim = variance.dim() - 2
    src = tuple(variance.shape[2:])
    shape = tuple(int(s) for s in shape)
    if src == shape:
        return variance
    ratio = torch.tensor(
        [t / s for s, t in zip(src, shape, strict=True)],
        dtype=variance.dtype,
        device=variance.device,
    )
    return _interp(variance, shape) * (ratio**2).view(1, ndim, *([1] * ndim))


def uncertainty_map(variance: Tensor, spacing: Sequence[float] | None = None) -> Tensor:
    """``sqrt(sum_i s_i^2 var_i)``: ``(B, ndim, *S)`` -> ``(B, 1, *S)``, the expected spread
    (root mean square distance from the mean) of the displacement; ``variance`` per axis in
    voxels, ``spacing`` ``s`` in mm per axis (None: 1, the spread in voxels). On anisotropic
    voxels only the spread in mm means one thing: a variance of one voxel^2 along 5 mm slices is
    25 times one along 1 mm."""
    var = variance.clamp_min(0)
    if spacing is not None:
        ndim = var.shape[1]
        if len(spacing) != ndim:
            raise ValueError(
                f"uncertainty_map(): 'spacing' must hold {ndim} values, got {tuple(spacing)}"
            )
        sq = torch.tensor([float(v) ** 2 for v in spacing], dtype=var.dtype, device=var.device)
        var = var * sq.view(1, ndim, *([1] * (var.dim() - 2)))
    return var.sum(1, keepdim=True).sqrt()


def soft_label_transfer(
    posterior: Posterior,
    disp: Tensor,
    moving_seg: Tensor,
    num_labels: int,
    grid_map: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    label_chunk: int = 8,
) -> Tensor:
    """Per-label probabilities of the moving labels on the fixed grid.

    At the points of the posterior's grid ``R`` (over the fixed extent), the moving one-hot
    labels are sampled (linear, 0 outside the moving image) at ``x + disp(x) + d_l - E[d]`` for
    every displacement ``d_l`` of the last level and weighted by its probability ``P_l(x)``
    (the non-local label loss's expected labels, centred on the final field); the result is
    resampled linearly to the fixed grid, the part falling outside the moving image counted as
    background.

    Args:
        posterior: a :class:`Posterior` with ``prob`` (batch 1), recorded on a grid ``W``
            covering the fixed extent (the working grid; offsets in voxels of ``W``).
        disp: ``(1, ndim, *S)`` the final field in fixed voxels.
        moving_seg: ``(1, 1, *S_m)`` integer labels of the moving image.
        num_labels: number of labels including background 0.
        grid_map: ``M`` fixed voxel -> moving voxel (identity: one grid).
        affine: ``A`` the global stage in fixed voxels (``disp = A (x + u) - x``), whose linear
            part maps the offsets; None: none.
        label_chunk: labels sampled at a time (bounds the memory of the one-hot).

    Returns:
        ``(1, num_labels, *S)`` float32 probabilities summing to 1 over dim 1.
    """
    from pddreg.spatial import apply_matrix, sample

    if posterior.prob is None or posterior.offsets is None or posterior.variance is None:
        raise ValueError("soft_label_transfer(): the posterior holds no probabilities")
    prob = posterior.prob[:1].float()
    ndim = disp.shape[1]
    shape = tuple(int(s) for s in disp.shape[2:])
    rshape = tuple(int(s) for s in prob.shape[2:])
    wshape = tuple(int(s) for s in posterior.variance.shape[2:])
    dev = disp.device
    prob = prob.to(dev)
    to_fixed = torch.tensor([s / w for s, w in zip(shape, wshape, strict=True)], device=dev)
    offsets = posterior.offsets.to(dev).float() * to_fixed.view(1, ndim)
    if affine is not None:
        lin = torch.as_tensor(np.asarray(affine)[:ndim, :ndim], dtype=torch.float32, device=dev)
        offsets = offsets @ lin.T
    axes = [_axis_points(r, s / r, torch.float32, dev) for r, s in zip(rshape, shape, strict=True)]
    x = _mesh(axes)
    base = x + _interp(disp.float(), rshape)
    mean = torch.einsum("bl...,li->bi...", prob, offsets)
    m = np.eye(ndim + 1) if grid_map is None else np.asarray(grid_map, dtype=np.float64)
    seg = moving_seg.to(dev).long()
    out = torch.zeros((1, num_labels, *rshape), device=dev)
    with torch.no_grad():
        for start in range(0, num_labels, label_chunk):
            labels = torch.arange(start, min(num_labels, start + label_chunk), device=dev)
            # contiguous once: a label map read from a file may be a transposed view, which
            # every one of the samples below would otherwise copy (3D: about 1 s)
            onehot = (seg == labels.view(1, -1, *([1] * ndim))).float().contiguous()
            acc = torch.zeros((1, len(labels), *rshape), device=dev)
            for lab in range(offsets.shape[0]):
                delta = offsets[lab].view(1, ndim, *([1] * ndim)) - mean
                coords = apply_matrix(m, base + delta)
                acc += prob[:, lab : lab + 1] * sample(onehot, coords, padding="zeros")
            out[:, start : start + len(labels)] = acc
            del onehot
        out[:, 0] += (1.0 - out.sum(1)).clamp_min(0.0)
        out = _interp(out, shape).clamp_min(0.0)
        return out / out.sum(1, keepdim=True).clamp_min(1e-12)


@contextmanager
def record_forward(
    net: torch.nn.Module, posterior: Posterior, shape: Sequence[int]
) -> Iterator[None]:
    """While active, every forward pass of the PDD-Nets inside ``net`` (``net`` itself where
    it holds none) records its levels' probabilities into ``posterior`` (images of ``shape``),
    through a forward hook: ``net.register`` is used unchanged."""
    from pddreg.models.pdd import PDDNet

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, dict) and output.get("levels"):
            posterior.update(posterior_from_levels(output["levels"], shape, posterior.keep_prob))

    targets = [m for m in net.modules() if isinstance(m, PDDNet)] or [net]
    handles = [m.register_forward_hook(hook) for m in targets]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def posterior_outputs(
    posterior: Posterior,
    disp: Tensor,
    moving_seg: Tensor | None = None,
    grid_map: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The uncertainty map and the soft label transfer of a registration on the fixed grid.

    Args:
        posterior: recorded on the working grid ``W`` (covering the fixed extent).
        disp: ``(1, ndim, *S)`` the final field in fixed voxels.
        moving_seg: ``(1, 1, *S_m)`` integer moving labels, or None (no label transfer).
        grid_map: ``M`` fixed voxel -> moving voxel (None: one grid).
        affine: the global stage ``A`` in fixed voxels (its linear part maps the variances and
            the offsets), or None.
        spacing: the fixed grid's voxel size in mm per axis (None: the spread in voxels).

    Returns:
        ``(uncertainty (*S) float32 in mm (voxels without spacing), warped_prob (K, *S)
        float32 or None)``.
    """
    if posterior.variance is None:
        raise ValueError("posterior_outputs(): the posterior recorded no level")
    shape = tuple(int(s) for s in disp.shape[2:])
    ndim = len(shape)
    var = variance_to_grid(posterior.variance[:1].to(disp.device).float(), shape)
    if affine is not None:  # diagonal of A diag(var) A^T
        lin = torch.as_tensor(np.asarray(affine)[:ndim, :ndim], dtype=var.dtype, device=var.device)
        var = torch.einsum("ij,bj...->bi...", lin**2, var)
    unc = uncertainty_map(var, spacing)[0, 0].cpu().numpy().astype(np.float32)
    prob = None
    if moving_seg is not None and posterior.prob is not None:
        k = int(moving_seg.max()) + 1 if moving_seg.numel() else 1
        prob = soft_label_transfer(posterior, disp, moving_seg, k, grid_map, affine)
        prob = prob[0].cpu().numpy().astype(np.float32)
    return unc, prob
