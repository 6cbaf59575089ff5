"""Loss functions (pure). Shapes: images ``(B, 1, *S)``, label maps ``(B, 1, *S)`` int64,
fields ``(B, ndim, *S)`` in voxels, probabilities ``(B, |L|, *G)``.

Convention (see :mod:`pddreg.spatial`): ``warped(x) = moving(x + u(x))``; a coarse grid of
size ``G`` inside a grid of size ``S`` puts point ``k`` at voxel ``(k + 0.5) * S / G - 0.5``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pddreg.spatial import diffusion

__all__ = [
    "batch_reduction",
    "class_weights",
    "diffusion",
    "nonlocal_label_loss",
    "one_hot",
    "similarity_loss",
    "warped_label_loss",
]

#: Frequencies below this are clamped before inversion, so a class of a few voxels cannot
#: dominate the loss (weight at most 1 / MIN_FREQUENCY relative to a class covering everything).
MIN_FREQUENCY = 1e-3


def one_hot(seg: Tensor, num_labels: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot encoding ``(B, 1, *S)`` integer labels -> ``(B, num_labels, *S)`` of ``dtype``."""
    if seg.dim() < 3 or seg.shape[1] != 1:
        raise ValueError(
            f"one_hot(): 'seg' must have shape (B, 1, *spatial), got {tuple(seg.shape)}"
        )
    seg = seg.long()
    if seg.numel():
        lo, hi = (int(v) for v in torch.aminmax(seg))
        if lo < 0 or hi >= num_labels:
            raise ValueError(
                f"one_hot(): labels must lie in [0, {num_labels - 1}], got [{lo}, {hi}]"
            )
    # scatter straight into (B, K, *S) of dtype (F.one_hot makes an int64 (B, *S, K) first)
    out = torch.zeros(seg.shape[0], num_labels, *seg.shape[2:], dtype=dtype, device=seg.device)
    return out.scatter_(1, seg, 1)


def _area(x: Tensor, shape: Sequence[int]) -> Tensor:
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    pool = F.adaptive_avg_pool2d if x.dim() == 4 else F.adaptive_avg_pool3d
    return pool(x, tuple(int(s) for s in shape))


_BATCH_REDUCTION: contextvars.ContextVar[Callable[[Tensor], Tensor] | None] = (
    contextvars.ContextVar("pddreg_batch_reduction", default=None)
)


@contextlib.contextmanager
def batch_reduction(fn: Callable[[Tensor], Tensor] | None) -> Iterator[None]:
    """Within the block, batch statistics of the losses (the class frequencies of
    :func:`class_weights`) are passed through ``fn`` (None: unchanged).

    Data-parallel training passes the mean over the processes, so that every process weights
    its classes by the frequencies of the global batch, as one process with the whole batch
    would (each process must then call the losses the same number of times).
    """
    token = _BATCH_REDUCTION.set(fn)
    try:
        yield
    finally:
        _BATCH_REDUCTION.reset(token)


def class_weights(*onehots: Tensor) -> Tensor:
    """Weights ``(K,)`` inverse to the class frequencies in ``onehots`` (each ``(B, K, *S)``).

    Frequencies are clamped at :data:`MIN_FREQUENCY`; weights are scaled to sum to ``K``.
    No gradient flows through them. Inside :func:`batch_reduction` the frequencies are those
    of the global batch.
    """
    with torch.no_grad():
        freq = torch.stack([o.float().mean(dim=[0, *range(2, o.dim())]) for o in onehots]).mean(0)
        reduce = _BATCH_REDUCTION.get()
        if reduce is not None:
            freq = reduce(freq)
        w = 1.0 / freq.clamp_min(MIN_FREQUENCY)
        return w * (w.numel() / w.sum())


def _weighted_sse(pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """Mean over batch and voxels of ``sum_c w_c (pred_c - target_c)^2 / sum_c w_c``."""
    err = (pred - target).square().mean(dim=[0, *range(2, pred.dim())])  # (K,)
    return (err * weights.to(err)).sum() / weights.sum().to(err)


def nonlocal_label_loss(
    prob: Tensor,
    fixed_seg: Tensor,
    moving_seg: Tensor,
    num_labels: int,
    radius: int,
    spacing: float = 1.0,
    moving_shape: Sequence[int] | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """The PDD-Net non-local label loss.

    The moving one-hot labels, area-downsampled to ``moving_shape`` (the grid whose voxels the
    displacement set is expressed in: the moving feature map; default the control grid), are
    sampled at every displaced position ``p_k + d_l`` of each control point and weighted by the
    probabilities (:func:`pddreg.cost.expected_values`); the result is compared with the fixed
    one-hot labels area-downsampled to the control grid by a class-weighted squared error
    (weights inverse to the class frequencies, :func:`class_weights`).

    Args:
        prob: ``(B, |L|, *G)`` displacement probabilities (sum to 1 over dim 1).
        fixed_seg, moving_seg: ``(B, 1, *S)`` integer label maps.
        num_labels: number of labels including background 0.
        radius, spacing: the displacement set of ``prob`` (:func:`pddreg.cost.displacement_set`).
        moving_shape: size of the moving grid the displacements refer to.
        weights: ``(num_labels,)`` class weights; default inverse frequency.

    Returns:
        scalar loss, differentiable w.r.t. ``prob``.
    """
    from pddreg.cost import expected_values

    grid = prob.shape[2:]
    if moving_shape is None:
        moving_shape = grid
    fixed_oh = _area(one_hot(fixed_seg, num_labels, prob.dtype), grid)
    moving_oh = _area(one_hot(moving_seg, num_labels, prob.dtype), moving_shape)
    if weights is None:
        weights = class_weights(fixed_oh, moving_oh)
    expected = expected_values(moving_oh, prob, radius, spacing, padding="border")
    return _weighted_sse(expected, fixed_oh, weights)


def warped_label_loss(
    disp: Tensor,
    fixed_seg: Tensor,
    moving_seg: Tensor,
    num_labels: int,
    weights: Tensor | None = None,
) -> Tensor:
    """Plain label loss: the moving one-hot warped (linear) by ``disp`` against the fixed one-hot.

    ``disp`` ``(B, ndim, *G)`` may be coarser than the label maps ``(B, 1, *S)``: the label
    maps are then area-downsampled to ``G`` (the field is in voxels of ``G``).
    Class-weighted squared error as :func:`nonlocal_label_loss`.
    """
    from pddreg.spatial import warp

    grid = disp.shape[2:]
    fixed_oh = _area(one_hot(fixed_seg, num_labels, disp.dtype), grid)
    moving_oh = _area(one_hot(moving_seg, num_labels, disp.dtype), grid)
    if weights is None:
        weights = class_weights(fixed_oh, moving_oh)
    warped = warp(moving_oh, disp, mode="linear", padding="border")
    return _weighted_sse(warped, fixed_oh, weights)


def similarity_loss(fixed: Tensor, moving: Tensor, disp: Tensor) -> Tensor:
    """MIND-SSC SSD between the fixed image and the moving image warped by ``disp``.

    For unlabelled training. ``fixed``, ``moving``: ``(B, 1, *S)``; ``disp``: ``(B, ndim, *S)``.
    The moving descriptors are computed once and warped (linear), which is differentiable in
    ``disp``; returns the mean over channels and voxels.
    """
    from pddreg.features.mind import mind_ssc
    from pddreg.spatial import warp

    with torch.no_grad():
        mf = mind_ssc(fixed)
        mm = mind_ssc(moving)
    return (mf - warp(mm, disp, mode="linear", padding="border")).square().mean()
