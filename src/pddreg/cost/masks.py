"""Masks in the cost volume: only fixed points inside the fixed mask, displaced into the moving
mask, keep their data cost; every other entry gets a neutral cost (the mean of the valid ones),
so that the regulariser (and the prior) fill it in from the neighbours."""

from __future__ import annotations

import torch

from .correlation import correlation

__all__ = ["mask_cost", "valid_weights"]


def valid_weights(
    fixed_weight: torch.Tensor | None,
    moving_mask: torch.Tensor | None,
    radius: int,
    spacing: float,
    grid: tuple[int, ...],
    *,
    max_memory: int | None = None,
) -> torch.Tensor | None:
    """Weight in [0, 1] of every cost entry ``(B, |L|, *G)`` (or ``(B, 1, *G)``), or None.

    Args:
        fixed_weight: ``(B, 1, *G)`` fixed mask at the control points (area fraction inside),
            or None.
        moving_mask: ``(B, 1, *P)`` moving mask on the moving feature map, or None; the entry of
            control point ``k`` and displacement ``d`` is weighted by ``moving_mask(p_k + d)``
            (linear, 0 outside the map), exactly where :func:`correlation` samples the moving
            features.
        radius, spacing: the displacement set.
        grid: the control grid ``G``.
    """
    weight = None
    if moving_mask is not None:
        b = moving_mask.shape[0]
        ones = torch.ones((b, 1, *grid), dtype=moving_mask.dtype, device=moving_mask.device)
        # (1 - m(p_k + d))^2 is the SSD of a constant 1 against the mask: 1 - m for a binary mask.
        out = correlation(
            ones, moving_mask, radius, spacing, padding="zeros", max_memory=max_memory
        )
        weight = (1.0 - out).clamp_(0.0, 1.0)
    if fixed_weight is not None:
        fw = fixed_weight.to(weight.dtype if weight is not None else fixed_weight.dtype)
        weight = fw if weight is None else weight * fw
    return weight


def mask_cost(cost: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``weight * cost + (1 - weight) * neutral`` with ``neutral`` the weighted mean cost per
    batch element; ``cost`` ``(B, |L|, *G)``, ``weight`` broadcastable (None: unchanged)."""
    if weight is None:
        return cost
    dims = tuple(range(1, cost.dim()))
    w = weight.to(cost.dtype).expand_as(cost)
    total = w.sum(dims, keepdim=True).clamp_min(1e-6)
    neutral = (w * cost).sum(dims, keepdim=True) / total
    return torch.lerp(neutral.expand_as(cost), cost, w)
