"""The spread of the displacement probabilities: per control point variance over the set ``L``.

The regularised cost of a level gives, for every control point ``k``, a probability for every
displacement ``d`` of the set: ``P(k, d) = softmax(-cost)``. Its mean is the soft field
(:func:`pddreg.cost.soft_field`); its variance per axis, ``E[d_i^2] - E[d_i]^2``, says how sure
the search is: small where one displacement clearly wins (textured structures), large where the
cost is flat (homogeneous regions, outside the field of view) and the field only follows the
regularisation. The uncertainty outputs of ``pddreg register`` are made from it.
"""

from __future__ import annotations

import torch

from ._lattice import DEFAULT_MAX_MEMORY
from .correlation import _check_radius_spacing, displacement_set

__all__ = ["prob_variance", "soft_variance"]


def _shape_str(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return "(" + ", ".join(str(s) for s in t.shape) + ")"
    return type(t).__name__


def _moments(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``p`` (B, |L|, K) probabilities, ``d`` (ndim, |L|) -> variance (B, ndim, K)."""
    mean = torch.matmul(d, p)
    second = torch.matmul(d * d, p)
    return (second - mean * mean).clamp_min_(0.0)


def prob_variance(prob: torch.Tensor, displacements: torch.Tensor) -> torch.Tensor:
    """Per-axis variance of the displacement under ``prob``.

    Args:
        prob: ``(B, |L|, *G)`` probabilities (summing to 1 over dim 1).
        displacements: ``(|L|, ndim)`` the displacement of every label.

    Returns:
        ``(B, ndim, *G)`` variance in squared units of ``displacements``.
    """
    if not isinstance(prob, torch.Tensor) or prob.dim() < 3:
        raise ValueError(
            f"prob_variance(): 'prob' must have shape (B, |L|, *grid), got {_shape_str(prob)}"
        )
    nd = prob.dim() - 2
    nl = prob.shape[1]
    if tuple(displacements.shape) != (nl, nd):
        raise ValueError(
            f"prob_variance(): 'displacements' must have shape ({nl}, {nd}), "
            f"got {_shape_str(displacements)}"
        )
    d = displacements.to(device=prob.device, dtype=prob.dtype).t()
    out = _moments(prob.reshape(prob.shape[0], nl, -1), d)
    return out.view(prob.shape[0], nd, *prob.shape[2:])


def soft_variance(
    cost: torch.Tensor,
    radius: int,
    spacing: float = 1.0,
    *,
    max_memory: int | None = None,
) -> torch.Tensor:
    """Per-axis variance of the displacement under ``softmax(-cost)`` (the companion of
    :func:`pddreg.cost.soft_field`), computed on chunks of control points.

    Args:
        cost: ``(B, |L|, *G)`` regularised cost, ``|L| = (2 radius + 1) ** ndim``.
        radius, spacing: the displacement set of ``cost``.
        max_memory: chunk bound in bytes (default 256 MiB; at most 4 MiB are used per chunk).

    Returns:
        ``(B, ndim, *G)`` variance in squared voxels of the moving map (no gradient).
    """
    fn = "soft_variance()"
    _check_radius_spacing(fn, radius, spacing)
    if not isinstance(cost, torch.Tensor) or cost.dim() < 3:
        raise ValueError(f"{fn}: 'cost' must have shape (B, |L|, *grid), got {_shape_str(cost)}")
    nd = cost.dim() - 2
    nl = (2 * radius + 1) ** nd
    if cost.shape[1] != nl:
        raise ValueError(
            f"{fn}: 'cost' must have shape (B, {nl}, *grid) for radius {radius} in {nd}D, "
            f"got {_shape_str(cost)}"
        )
    B = cost.shape[0]
    d = displacement_set(radius, spacing, nd, device=cost.device, dtype=cost.dtype).t()
    flat = cost.detach().reshape(B, nl, -1)
    budget = min(max_memory or DEFAULT_MAX_MEMORY, 4 * 2**20)
    kc = max(1, budget // (3 * B * nl * cost.element_size()))
    with torch.no_grad():
        parts = [_moments(torch.softmax(-x, dim=1), d) for x in flat.split(kc, 2)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
    return out.view(B, nd, *cost.shape[2:])
