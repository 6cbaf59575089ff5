"""From a regularised cost volume to probabilities and a displacement field."""

from __future__ import annotations

import torch

from . import _autograd, _native
from ._lattice import DEFAULT_MAX_MEMORY, checkpointed, wants_checkpoint
from .correlation import _check_radius_spacing, displacement_set

__all__ = ["expected_displacement", "probabilities", "probabilities_and_field", "soft_field"]


def _shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def probabilities(cost: torch.Tensor) -> torch.Tensor:
    """``softmax(-cost, dim=1)``: (B, |L|, *G) -> (B, |L|, *G) (temperature folded in cost)."""
    if not isinstance(cost, torch.Tensor) or cost.dim() < 3:
        got = _shape_str(cost) if isinstance(cost, torch.Tensor) else type(cost).__name__
        raise ValueError(f"probabilities(): 'cost' must have shape (B, |L|, *grid), got {got}")
    if _native.usable(cost):
        return _native.probabilities(cost.contiguous())
    if _native.supports(cost):  # autograd: native backward
        return _autograd.probabilities_and_field(cost, None)[0]
    return torch.softmax(-cost, dim=1)


def expected_displacement(prob: torch.Tensor, displacements: torch.Tensor) -> torch.Tensor:
    """``sum_l prob[:, l] * displacements[l]``: (B, |L|, *G), (|L|, ndim) -> (B, ndim, *G)."""
    if not isinstance(prob, torch.Tensor) or prob.dim() < 3:
        got = _shape_str(prob) if isinstance(prob, torch.Tensor) else type(prob).__name__
        raise ValueError(
            f"expected_displacement(): 'prob' must have shape (B, |L|, *grid), got {got}"
        )
    nd = prob.dim() - 2
    nl = prob.shape[1]
    if displacements.shape != (nl, nd):
        raise ValueError(
            f"expected_displacement(): 'displacements' must have shape ({nl}, {nd}), "
            f"got {_shape_str(displacements)}"
        )
    B = prob.shape[0]
    d = displacements.to(device=prob.device, dtype=prob.dtype)
    out = torch.matmul(d.t(), prob.reshape(B, nl, -1))
    return out.view(B, nd, *prob.shape[2:])


def probabilities_and_field(
    cost: torch.Tensor, displacements: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``prob = probabilities(cost)`` and ``expected_displacement(prob, displacements)`` at once.

    On float32 CPU tensors (with or without autograd) one native pass computes both and one
    native backward takes the gradients of both (the gradient of the field never becomes a
    separate volume); elsewhere it is the two functions.

    Args:
        cost: (B, |L|, *G) regularised cost.
        displacements: (|L|, ndim) displacement set (no gradient).

    Returns:
        ``(prob (B, |L|, *G), field (B, ndim, *G))``.
    """
    if not isinstance(cost, torch.Tensor) or cost.dim() < 3:
        got = _shape_str(cost) if isinstance(cost, torch.Tensor) else type(cost).__name__
        raise ValueError(
            f"probabilities_and_field(): 'cost' must have shape (B, |L|, *grid), got {got}"
        )
    nd = cost.dim() - 2
    if displacements.shape != (cost.shape[1], nd):
        raise ValueError(
            f"probabilities_and_field(): 'displacements' must have shape ({cost.shape[1]}, {nd}),"
            f" got {_shape_str(displacements)}"
        )
    if nd <= 3 and _native.supports(cost) and not displacements.requires_grad:
        prob, field = _autograd.probabilities_and_field(cost, displacements)
        assert prob is not None and field is not None
        return prob, field
    prob = probabilities(cost)
    return prob, expected_displacement(prob, displacements)


def _soft_block(cost: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.matmul(d, torch.softmax(-cost, dim=1))


def soft_field(
    cost: torch.Tensor,
    radius: int,
    spacing: float = 1.0,
    *,
    max_memory: int | None = None,
) -> torch.Tensor:
    """Fused ``expected_displacement(softmax(-cost, 1), displacement_set(radius, spacing))``.

    Works on chunks of control points so that no more than one chunk of probabilities exists
    at a time.

    Args:
        cost: (B, |L|, *G) regularised cost (``|L| = (2r+1)**ndim``).
        radius, spacing: the displacement set of ``cost``.
        max_memory: chunk bound in bytes (default 256 MiB).

    Returns:
        (B, ndim, *G) expected displacement in voxels of the moving map.
    """
    fn = "soft_field()"
    _check_radius_spacing(fn, radius, spacing)
    if not isinstance(cost, torch.Tensor) or cost.dim() < 3:
        got = _shape_str(cost) if isinstance(cost, torch.Tensor) else type(cost).__name__
        raise ValueError(f"{fn}: 'cost' must have shape (B, |L|, *grid), got {got}")
    nd = cost.dim() - 2
    nl = (2 * radius + 1) ** nd
    if cost.shape[1] != nl:
        raise ValueError(
            f"{fn}: 'cost' must have shape (B, {nl}, *grid) for radius {radius} in {nd}D, "
            f"got {_shape_str(cost)}"
        )
    B = cost.shape[0]
    grid = cost.shape[2:]
    disps = displacement_set(radius, spacing, nd, device=cost.device, dtype=cost.dtype)
    flat = cost.reshape(B, nl, -1)
    K = flat.shape[2]
    if nd <= 3 and _native.usable(cost):
        out = cost.new_empty(B, nd, *grid)
        _native.soft_field(flat.contiguous(), disps, out)
        return out
    if nd <= 3 and _native.supports(cost):  # autograd: native backward
        return _autograd.probabilities_and_field(cost, disps, prob=False)[1]
    d = disps.t()
    budget = min(max_memory or DEFAULT_MAX_MEMORY, 4 * 2**20)
    kc = max(1, budget // (3 * B * nl * cost.element_size()))
    ckpt = wants_checkpoint(cost.numel() * cost.element_size(), cost)
    if torch.is_grad_enabled() and cost.requires_grad and not ckpt:
        kc = K  # small: one plain autograd chunk
    parts = []
    for x in flat.split(kc, 2):
        parts.append(checkpointed(_soft_block, x, d, enabled=ckpt))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
    return out.view(B, nd, *grid)
