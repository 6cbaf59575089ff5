"""Identity grids and the one conversion to ``grid_sample``'s normalised coordinates.

Convention:
    A displacement field is a tensor ``(B, ndim, *spatial)`` in voxel units; component ``i`` is
    the displacement along array axis ``i`` (axis 0 first, not x/y/z reversed). Mapping is
    backward: ``warped(x) = moving(x + u(x))``. Voxel ``j`` along an axis of size ``S`` sits at
    coordinate ``j`` (voxel centres, ``0 .. S - 1``). :func:`voxel_to_normalised` is the only
    place where coordinates are flipped to ``grid_sample``'s reversed order (last axis first) and
    scaled to ``[-1, 1]`` with ``align_corners=True``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

__all__ = ["clear_grid_cache", "identity_grid", "voxel_to_normalised"]


def _shape_tuple(shape: Sequence[int] | torch.Size, fn: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise ValueError(f"{fn}: 'shape' must be a sequence of ints, got {shape!r}") from exc
    if not out or any(s < 1 for s in out):
        raise ValueError(f"{fn}: 'shape' must hold positive sizes, got {out}")
    return out


#: Identity grids kept for reuse: at most this many, and at most this many bytes in all.
GRID_CACHE_ENTRIES = 16
GRID_CACHE_BYTES = 1 << 30

_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_cache_lock = threading.Lock()


def _build_grid(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Built outside inference mode and without autograd so the cached tensor can be used
    # anywhere later (an inference tensor could not be saved for backward).
    with torch.inference_mode(False), torch.no_grad():
        axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def clear_grid_cache() -> None:
    """Forget the cached identity grids (frees their memory)."""
    with _cache_lock:
        _cache.clear()


def identity_grid(
    shape: Sequence[int] | torch.Size,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Voxel coordinates of every voxel of a grid.

    Args:
        shape: spatial shape ``(*S)`` (1, 2 or 3 axes in practice, any number works).
        device, dtype: of the result (default: CPU, float32).

    Returns:
        ``(ndim, *S)`` tensor with ``grid[i, ...]`` the coordinate along array axis ``i``.
        The tensor is cached by ``(shape, device, dtype)`` (least recently used first out,
        :data:`GRID_CACHE_ENTRIES` grids and :data:`GRID_CACHE_BYTES` at most) and shared: do
        not modify it in place.

    Convention: see :mod:`pddreg.spatial` (voxel units, axis order of the array).
    """
    shape_t = _shape_tuple(shape, "identity_grid()")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (shape_t, dev, dtype)
    with _cache_lock:
        grid = _cache.get(key)
        if grid is not None:
            _cache.move_to_end(key)
            return grid
    grid = _build_grid(shape_t, dev, dtype)
    size = grid.numel() * grid.element_size()
    if size <= GRID_CACHE_BYTES // 2:
        with _cache_lock:
            _cache[key] = grid
            total = sum(g.numel() * g.element_size() for g in _cache.values())
            while len(_cache) > GRID_CACHE_ENTRIES or total > GRID_CACHE_BYTES:
                _, old = _cache.popitem(last=False)
                total -= old.numel() * old.element_size()
    return grid


def voxel_to_normalised(coords: torch.Tensor, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """Convert voxel coordinates to the sampling grid that ``F.grid_sample`` expects.

    Args:
        coords: ``(B, ndim, *out)`` voxel coordinates in the array axis order
            (component ``i`` along axis ``i`` of an image of spatial shape ``shape``).
        shape: spatial shape ``(*S)`` of the image that will be sampled, ``len(shape) == ndim``.

    Returns:
        ``(B, *out, ndim)`` normalised coordinates for ``grid_sample(..., align_corners=True)``:
        the last axis is reversed (``x`` = last array axis first) and ``j -> 2 j / (S - 1) - 1``
        so that ``-1`` and ``1`` are the centres of the first and last voxels. An axis of size 1
        maps every coordinate to 0 (its only voxel).

    Convention: this is the single place of the axis flip; see :mod:`pddreg.spatial`.
    """
    shape_t = _shape_tuple(shape, "voxel_to_normalised()")
    ndim = len(shape_t)
    if coords.dim() != ndim + 2 or coords.shape[1] != ndim:
        raise ValueError(
            f"voxel_to_normalised(): 'coords' must have shape (B, {ndim}, *out) for a "
            f"{ndim}-D image, got {tuple(coords.shape)}"
        )
    # j -> 2 j / (S - 1) - 1; an axis of size 1 maps to 0 (its single voxel centre). The
    # components are stacked in reverse: grid_sample reads grid[..., 0] as x, the LAST axis.
    parts = []
    for i in reversed(range(ndim)):
        size = shape_t[i]
        if size > 1:
            parts.append(coords[:, i] * (2.0 / (size - 1)) - 1.0)
        else:
            parts.append(torch.zeros_like(coords[:, i]))
    return torch.stack(parts, dim=-1)
