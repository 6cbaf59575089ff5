"""MIND-SSC evaluated at scattered points through a map (no intermediate warped image).

``pddreg.features.mind.mind_ssc(image, radius=0, dilation=d)`` at voxel ``x`` needs only the
image at the ``2 * ndim`` neighbours ``x +- d e_i``: the self-similarity context compares pairs
of neighbours that are not opposite each other. :func:`point_mind` computes exactly that
descriptor at arbitrary points, with the neighbours placed along the FIXED image's axes and
mapped through the current transform into the moving image: the moving image is sampled from
its own grid once per evaluation (never resampled twice), and the descriptor rotates with the
transform (MIND channels computed on the moving grid would not).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from pddreg.features.mind import VARIANCE_CLAMP, neighbour_pairs
from pddreg.spatial import is_projective, sample, voxel_to_normalised

from ._geometry import apply_h

__all__ = ["PointSampler", "neighbour_pairs", "point_mind", "sample_points"]


def sample_points(image: Tensor, coords: Tensor) -> Tensor:
    """Linear samples of ``image`` ``(1, C, *S)`` at ``coords`` ``(..., ndim)`` voxel
    coordinates (border padding); returns ``(C, ...)``."""
    ndim = image.dim() - 2
    lead = coords.shape[:-1]
    flat = coords.reshape(-1, ndim).t().reshape((1, ndim, -1) + (1,) * (ndim - 1))
    out = sample(image, flat.to(image.dtype))
    return out.reshape((image.shape[1],) + tuple(lead))


def normaliser(shape: tuple[int, ...]) -> Tensor:
    """The affine map voxel index -> ``grid_sample`` coordinates of an image of ``shape``
    (float64 ``(ndim+1, ndim+1)``), read off :func:`pddreg.spatial.voxel_to_normalised` (the one
    place of the axis flip) at the origin and the unit vectors."""
    ndim = len(shape)
    pts = torch.cat([torch.zeros(ndim, 1), torch.eye(ndim)], dim=1).double()  # (ndim, ndim+1)
    out = voxel_to_normalised(pts.reshape(1, ndim, ndim + 1, *([1] * (ndim - 1))), shape)
    out = out.reshape(ndim + 1, ndim).t()  # (ndim, ndim+1): images of 0, e_0, e_1, ...
    mat = torch.eye(ndim + 1, dtype=torch.float64)
    mat[:ndim, -1] = out[:, 0]
    mat[:ndim, :ndim] = out[:, 1:] - out[:, :1]
    return mat


class PointSampler:
    """Linear samples (border padding) of ``image`` ``(1, C, *S)`` at affine images of points.

    ``__call__(points, matrix, offsets)``: ``points`` ``(N, ndim)``, ``matrix`` float64
    homogeneous map of the points' frame to voxel indices of the image, ``offsets``
    ``(K, ndim)`` in the points' frame; returns ``(C, N, K)`` samples at
    ``matrix @ (point + offset)``: 3D affine maps through :func:`pddreg.spatial.sample` on the
    voxel indices (its native kernel on the CPU), 2D and homographies by ``grid_sample`` with
    the index -> normalised conversion folded into the matrix (one small matmul per call).
    """

    def __init__(self, image: Tensor) -> None:
        self.image = image
        self.ndim = image.dim() - 2
        self.to_norm = normaliser(tuple(image.shape[2:]))

    def __call__(self, points: Tensor, matrix: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
        """Samples ``(C, N, K)`` and the points' own normalised coordinates ``(N, ndim)``
        (inside the image iff every component is in [-1, 1])."""
        n = self.ndim
        mat = (self.to_norm @ matrix).to(points.device, points.dtype)
        lin, off = mat[:n, :n], mat[:n, -1]
        if is_projective(matrix):  # a homography: every sample through the division
            centre = apply_h(mat, points)
            pts = apply_h(mat, points[:, None, :] + offsets.to(points.dtype)[None])
            k = offsets.shape[0]
        else:
            centre = points @ lin.t() + off  # (N, n), already in grid_sample's (x, y, z) order
            if n == 3:
                # pddreg.spatial.sample on the voxel indices (its native trilinear kernel on
                # the CPU, 3x faster than grid_sample here)
                vm = matrix.to(points.device, points.dtype)
                vox = (points @ vm[:n, :n].t() + vm[:n, -1])[:, None, :] + (
                    offsets.to(points.dtype) @ vm[:n, :n].t()
                )[None]
                k = offsets.shape[0]
                coords = vox.permute(2, 0, 1).reshape(1, n, points.shape[0], k, 1)
                out = sample(self.image, coords)
                return out.reshape(self.image.shape[1], points.shape[0], k), centre
            d = offsets.to(points.dtype) @ lin.t()  # (K, n)
            pts = centre[:, None, :] + d[None]
            k = d.shape[0]
        grid = pts.reshape((1, points.shape[0], k) + (1,) * (n - 2) + (n,))
        out = F.grid_sample(
            self.image,
            grid.to(self.image.dtype),
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        )
        return out.reshape(self.image.shape[1], points.shape[0], k), centre


@lru_cache(maxsize=8)
def _pair_index(ndim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    a, b = neighbour_pairs(ndim)
    return torch.tensor(a, device=device), torch.tensor(b, device=device)


def mind_from_samples(values: Tensor, ndim: int, mean_var: Tensor | None = None) -> Tensor:
    """MIND-SSC (radius 0) from the neighbour samples ``(N, 2 * ndim)`` -> ``(N, C)``.

    ``mean_var``: the mean variance estimate used for the clamp (mind_ssc takes the image
    mean); None: the mean over these points."""
    a, b = _pair_index(ndim, values.device)
    dist = (values.index_select(1, a) - values.index_select(1, b)).square()
    dist = dist - dist.amin(dim=1, keepdim=True)
    var = dist.mean(dim=1, keepdim=True)
    if mean_var is None:
        mean_var = var.mean()
    low = torch.clamp(mean_var * VARIANCE_CLAMP[0], min=torch.finfo(var.dtype).tiny)
    var = torch.maximum(torch.minimum(var, mean_var * VARIANCE_CLAMP[1]), low)
    return torch.exp(-dist / var)


def mind_and_jacobian(
    values: Tensor, grads: Tensor, ndim: int, mean_var: Tensor
) -> tuple[Tensor, Tensor]:
    """MIND-SSC (radius 0) and its gradient with respect to the point position.

    Args:
        values: ``(N, 2 ndim)`` neighbour samples.
        grads: ``(N, 2 ndim, ndim)`` the derivative of each sample with respect to a shift of
            the point (any frame, e.g. mm of the fixed image).
        mean_var: clamp reference (see :func:`mind_from_samples`).

    Returns:
        ``(N, C)`` descriptor and ``(N, C, ndim)`` its derivative (the minimum channel and the
        variance clamp are held fixed, i.e. the gradient almost everywhere).
    """
    a, b = _pair_index(ndim, values.device)
    diff = values.index_select(1, a) - values.index_select(1, b)  # (N, C)
    dist = diff.square()
    dmin, m = dist.min(dim=1, keepdim=True)
    e = dist - dmin
    var = e.mean(dim=1, keepdim=True)
    low = torch.clamp(mean_var * VARIANCE_CLAMP[0], min=torch.finfo(var.dtype).tiny)
    high = mean_var * VARIANCE_CLAMP[1]
    free = ((var > low) & (var < high)).to(var.dtype)
    var = torch.maximum(torch.minimum(var, high), low)
    g = torch.exp(-e / var)
    # d dist_c / d p = 2 diff_c (grad_a - grad_b); the minimum channel's is subtracted
    ddist = (grads.index_select(1, a) - grads.index_select(1, b)).mul_(2.0 * diff[..., None])
    de = ddist.sub_(torch.take_along_dim(ddist, m[..., None], dim=1))
    dvar = de.mean(dim=1, keepdim=True).mul_(free[..., None])
    coef = (g / var)[..., None]
    dg = de.sub_(dvar * (e / var)[..., None]).mul_(coef).neg_()
    return g, dg


def point_mind(
    image: Tensor,
    centres: Tensor,
    steps: Tensor,
    mean_var: Tensor | None = None,
) -> Tensor:
    """MIND-SSC (radius 0) of ``image`` ``(1, 1, *S)`` at scattered points.

    Args:
        image: the image, sampled linearly with border padding (as mind_ssc pads).
        centres: ``(N, ndim)`` voxel coordinates of the points in ``image``.
        steps: ``(ndim, ndim)``: row ``i`` is the neighbour offset ``d e_i`` of the reference
            frame expressed in voxels of ``image`` (identity times ``d`` on the image's own
            grid; the linear part of the map times ``d e_i`` through a transform).
        mean_var: see :func:`mind_from_samples`.

    Returns:
        ``(N, C)`` descriptor, ``C = 2 ndim (ndim - 1)``; on a grid with ``steps = d I`` this
        equals ``mind_ssc(image, radius=0, dilation=d)`` away from the borders.
    """
    ndim = centres.shape[1]
    offsets = torch.stack([s * steps[i] for i in range(ndim) for s in (-1.0, 1.0)])  # (2n, n)
    coords = centres[:, None, :] + offsets[None].to(centres.dtype)
    values = sample_points(image, coords)[0]  # (N, 2n)
    return mind_from_samples(values, ndim, mean_var)
