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
    * World coordinates (images on different grids) are in :mod:`pddreg.spatial.world`: an
      index-to-world matrix per image, ``M = inv(A_m) A_f`` from fixed to moving voxels, and
      ``warped(x) = moving(M (x + d(x)))`` with ``d`` in fixed voxels.
"""

from __future__ import annotations

from .field import diffusion, field_gradient, jacobian_det
from .grid import clear_grid_cache, identity_grid, voxel_to_normalised
from .transform import compose, resize_field, sample, sample_labels, warp, warp_labels
from .world import (
    apply_matrix,
    field_to_world,
    grid_map,
    is_projective,
    map_coords,
    matrix_field,
    overlap_fraction,
    spacing_of,
    to_lps,
    working_grid,
    working_to_fixed,
)

__all__ = [
    "apply_matrix",
    "clear_grid_cache",
    "compose",
    "diffusion",
    "field_gradient",
    "field_to_world",
    "grid_map",
    "is_projective",
    "identity_grid",
    "jacobian_det",
    "map_coords",
    "matrix_field",
    "overlap_fraction",
    "resize_field",
    "sample",
    "sample_labels",
    "spacing_of",
    "to_lps",
    "voxel_to_normalised",
    "warp",
    "warp_labels",
    "working_grid",
    "working_to_fixed",
]
