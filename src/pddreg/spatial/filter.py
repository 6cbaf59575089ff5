"""Separable Gaussian smoothing (the anti-aliasing of :func:`pddreg.pipeline.resample`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["gaussian_smooth"]

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
