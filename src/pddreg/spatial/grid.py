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

import functools
from collections.abc import Sequence

import torch

__all__ = ["identity_grid", "voxel_to_normalised"]


def _shape_tuple(shape: Sequence[int] | torch.Size, fn: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise ValueError(f"{fn}: 'shape' must be a sequence of ints, got {shape!r}") from exc
    if not out or any(s < 1 for s in out):
        raise ValueError(f"{fn}: 'shape' must hold positive sizes, got {out}")
    return out


@functools.lru_cache(maxsize=64)
def _cached_grid(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Built outside inference mode and without autograd so the cached tensor can be used
    # anywhere later (an inference tensor could not be saved for backward).
    with torch.inference_mode(False), torch.no_grad():
        axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    return grid


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
        The tensor is cached by ``(shape, device, dtype)`` and shared: do not modify it in place.

    Convention: see :mod:`pddreg.spatial` (voxel units, axis order of the array).
    """
    shape_t = _shape_tuple(shape, "identity_grid()")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _cached_grid(shape_t, dev, dtype)


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
    sizes = torch.tensor(shape_t, device=coords.device, dtype=coords.dtype)
    # Axis of size 1: scale 0 puts every point on the single voxel centre.
    scale = torch.where(sizes > 1, 2.0 / (sizes - 1).clamp(min=1), torch.zeros_like(sizes))
    offset = torch.where(sizes > 1, -torch.ones_like(sizes), torch.zeros_like(sizes))
    view = (1, ndim) + (1,) * ndim
    norm = coords * scale.view(view) + offset.view(view)
    norm = norm.movedim(1, -1)
    # grid_sample reads grid[..., 0] as x (the LAST array axis): reverse the component order.
    return norm.flip(-1)
