"""Separable Gaussian smoothing, and the anti-aliasing it gives resampling onto coarser grids."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["antialias_sigma", "gaussian_smooth"]

#: Kernel half-width in standard deviations.
TRUNCATE = 2.5


def gaussian_smooth(x: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Smooth ``(B, C, *S)`` with a separable Gaussian (``sigma`` in voxels, one per axis or one
    for all; axes with ``sigma < 0.2`` are left alone), replicate borders, same shape/dtype."""
    ndim = x.dim() - 2
    if ndim not in (1, 2, 3):
        raise ValueError(
            f"gaussian_smooth(): 'x' must be (B, C, *S) with 1-3 spatial axes, got {tuple(x.shape)}"
        )
    sig = [float(sigma)] * ndim if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    if len(sig) != ndim:
        raise ValueError(f"gaussian_smooth(): need {ndim} sigmas, got {len(sig)}")
    conv = (F.conv1d, F.conv2d, F.conv3d)[ndim - 1]
    c = x.shape[1]
    for axis, s in enumerate(sig):
        if s < 0.2 or x.shape[2 + axis] == 1:
            continue
        r = max(1, min(int(math.ceil(TRUNCATE * s)), x.shape[2 + axis] - 1))
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / s) ** 2)
        k = k / k.sum()
        shape = [c, 1] + [1] * ndim
        shape[2 + axis] = k.numel()
        pad = [0, 0] * ndim
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = r
        x = conv(F.pad(x, pad, mode="replicate"), k.view(shape).expand(c, *shape[1:]), groups=c)
    return x


def antialias_sigma(src_spacing: Sequence[float], dst_spacing: Sequence[float]) -> list[float]:
    """Gaussian sigma per source axis (voxels of the source) before sampling it at a coarser
    pitch: ``0.5 * sqrt(r^2 - 1)`` with ``r = dst / src`` (0 where the target is not coarser),
    which makes the total blur of a ``src``-voxel about half a ``dst``-voxel."""
    dst = list(dst_spacing)
    if len(dst) == 1:
        dst = dst * len(src_spacing)
    out = []
    for s, d in zip(src_spacing, dst, strict=True):
        r = float(d) / float(s)
        out.append(0.5 * math.sqrt(r * r - 1.0) if r > 1.05 else 0.0)
    return out
