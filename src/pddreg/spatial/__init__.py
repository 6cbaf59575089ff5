"""The coordinate convention of pddreg, identity grids, warping, composition and Jacobians.

Convention:
    * A displacement field is a tensor ``(B, ndim, *spatial)`` in **voxel units**; component
      ``i`` is the displacement along array axis ``i`` (axis 0 first, not x/y/z reversed).
    * Mapping is backward: ``warped(x) = moving(x + u(x))``; voxel ``j`` sits at coordinate ``j``.
    * The flip to ``grid_sample``'s reversed, normalised order happens only in
      :func:`voxel_to_normalised`, with ``align_corners=True`` (samples at voxel centres).
    * Coarse grids (control points, strided feature maps) relate to a grid of size ``S`` as
      ``F.interpolate(..., align_corners=False)`` does: point ``k`` of a grid of size ``G`` sits
      at voxel ``(k + 0.5) * S / G - 0.5``; :func:`resize_field` follows this and scales the
      vectors by ``S / G`` per axis.
    * Label maps stay integer and are warped by nearest neighbour (:func:`warp_labels`).
    * Device and dtype follow the inputs; identity grids are cached by (shape, device, dtype).
    * ``compose(first, second)`` gives ``c`` with ``warp(warp(m, first), second) == warp(m, c)``.
"""

from __future__ import annotations

from .field import diffusion, field_gradient, jacobian_det
from .grid import clear_grid_cache, identity_grid, voxel_to_normalised
from .transform import compose, resize_field, sample, warp, warp_labels

__all__ = [
    "clear_grid_cache",
    "compose",
    "diffusion",
    "field_gradient",
    "identity_grid",
    "jacobian_det",
    "resize_field",
    "sample",
    "voxel_to_normalised",
    "warp",
    "warp_labels",
]
