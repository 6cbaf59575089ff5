"""Pyramids in millimetres and the foreground centre of mass.

Each image is area-downsampled on its own grid by an integer factor per axis, chosen so that
the level's spacing is about a target in mm (never upsampled): a 0.6 x 0.6 x 5 mm CT and a
1 mm isotropic MR reach about the same physical resolution at every level. Voxel ``k`` of a
level with factors ``f`` covers full-resolution voxels ``f k .. f k + f - 1`` (the incomplete
block at the end of an axis is dropped), so it sits at full index ``f k + (f - 1) / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._geometry import diag_h

__all__ = ["Level", "build_pyramid", "centre_of_mass", "foreground", "gaussian_blur"]


@dataclass
class Level:
    """One pyramid level of one image.

    Attributes:
        image: ``(1, 1, *G)`` float, the block means.
        mask: ``(1, 1, *G)`` float in {0, 1} (blocks at least half inside the mask) or None.
        factors: integer factor per axis relative to the full-resolution grid.
        spacing: mm per axis of this level (``full spacing * factors``).
        to_full: ``(ndim+1, ndim+1)`` float64, level index -> full-resolution index.
    """

    image: Tensor
    mask: Tensor | None
    factors: tuple[int, ...]
    spacing: tuple[float, ...]
    to_full: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[2:])


def _block_mean(x: Tensor, ratio: Sequence[int]) -> Tensor:
    """Mean over non-overlapping blocks ``ratio`` of ``(1, C, *S)`` (trailing remainder dropped)."""
    if all(r == 1 for r in ratio):
        return x
    shape = x.shape[2:]
    out = [s // r for s, r in zip(shape, ratio, strict=True)]
    x = x[
        (slice(None), slice(None)) + tuple(slice(0, o * r) for o, r in zip(out, ratio, strict=True))
    ]
    view = [x.shape[0], x.shape[1]]
    for o, r in zip(out, ratio, strict=True):
        view += [o, r]
    x = x.reshape(view)
    dims = tuple(3 + 2 * i for i in range(len(out)))
    return x.mean(dim=dims)


def _level_factors(
    spacing: Sequence[float], shape: Sequence[int], targets: Sequence[float]
) -> list[tuple[int, ...]]:
    """Integer factors per level (targets coarse to fine, mm), each a multiple of the next
    finer one, none larger than the axis."""
    finest: list[tuple[int, ...]] = []
    prev = [1] * len(spacing)
    for h in reversed(targets):
        cur = []
        for s, p, n in zip(spacing, prev, shape, strict=True):
            r = max(1, int(round(h / (p * s))))
            while p * r > n and r > 1:
                r -= 1
            cur.append(p * r)
        finest.append(tuple(cur))
        prev = cur
    return list(reversed(finest))


def build_pyramid(
    image: Tensor, mask: Tensor | None, spacing: Sequence[float], targets: Sequence[float]
) -> list[Level]:
    """Levels of ``image`` ``(1, 1, *S)`` at about ``targets`` mm (coarse to fine), built finest
    first and each coarser one from the previous (block means of block means are exact)."""
    ndim = image.dim() - 2
    factors = _level_factors(spacing, image.shape[2:], targets)
    levels: list[Level] = []
    cur_img, cur_mask, cur_f = image, mask, (1,) * ndim
    for f in reversed(factors):
        ratio = [a // b for a, b in zip(f, cur_f, strict=True)]
        cur_img = _block_mean(cur_img, ratio)
        if cur_mask is not None:
            cur_mask = _block_mean(cur_mask, ratio)
        cur_f = f
        to_full = diag_h(f)
        to_full[:ndim, -1] = torch.tensor([(k - 1) / 2.0 for k in f], dtype=torch.float64)
        m = None if cur_mask is None else (cur_mask >= 0.5).to(cur_img.dtype)
        levels.append(
            Level(
                image=cur_img,
                mask=m,
                factors=tuple(f),
                spacing=tuple(float(s) * k for s, k in zip(spacing, f, strict=True)),
                to_full=to_full,
            )
        )
        cur_mask = None if cur_mask is None else m
    return list(reversed(levels))


def gaussian_blur(x: Tensor, sigmas: Sequence[float]) -> Tensor:
    """Separable Gaussian of ``(1, C, *S)`` with ``sigmas`` voxels per axis (replicate
    borders; axes with sigma < 0.2 are left alone)."""
    for axis, sig in enumerate(sigmas):
        if sig < 0.2 or x.shape[2 + axis] < 2:
            continue
        rad = max(1, int(math.ceil(2.5 * sig)))
        k = torch.arange(-rad, rad + 1, device=x.device, dtype=x.dtype)
        w = torch.exp(-0.5 * (k / sig) ** 2)
        w = w / w.sum()
        moved = x.movedim(2 + axis, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        flat = F.pad(flat, (rad, rad), mode="replicate")
        flat = F.conv1d(flat, w.view(1, 1, -1))
        x = flat.reshape(shape).movedim(-1, 2 + axis)
    return x


def _otsu(values: Tensor, bins: int = 64) -> float:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist = torch.histc(values.float(), bins=bins, min=lo, max=hi).double()
    centres = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centres = (centres[:-1] + centres[1:]) / 2
    w0 = torch.cumsum(hist, 0)
    w1 = w0[-1] - w0
    m0 = torch.cumsum(hist * centres, 0)
    mu0 = m0 / w0.clamp(min=1e-12)
    mu1 = (m0[-1] - m0) / w1.clamp(min=1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(torch.argmax(between[:-1]))]) if bins > 1 else lo


def foreground(level: Level) -> Tensor:
    """Boolean ``(*G)`` foreground of a (coarse) level: voxels that differ from the background
    value (median of the boundary voxels) by more than Otsu's threshold of that difference,
    inside the level's mask. Works for dark and bright backgrounds and any intensity remap that
    keeps the background uniform."""
    img = level.image[0, 0]
    ndim = img.dim()
    inside = torch.ones_like(img, dtype=torch.bool)
    if level.mask is not None:
        inside = level.mask[0, 0] > 0.5
    border = torch.zeros_like(inside)
    for axis in range(ndim):
        if img.shape[axis] > 2:
            idx = [slice(None)] * ndim
            idx[axis] = 0
            border[tuple(idx)] = True
            idx[axis] = -1
            border[tuple(idx)] = True
    sel = border & inside
    if not bool(sel.any()):
        sel = inside
    if not bool(sel.any()):
        return inside
    bg = img[sel].median()
    diff = (img - bg).abs()
    vals = diff[inside]
    thr = _otsu(vals)
    fg = (diff > thr) & inside
    if int(fg.sum()) < max(8, vals.numel() // 100):  # no structure: the whole (masked) image
        return inside
    return fg


def centre_of_mass(level: Level, fg: Tensor) -> Tensor:
    """Centre of the foreground voxels in full-resolution index coordinates, float64 (ndim,)."""
    ndim = fg.dim()
    idx = torch.nonzero(fg).to(torch.float64)
    if idx.numel() == 0:
        k = torch.tensor([(s - 1) / 2.0 for s in fg.shape], dtype=torch.float64)
    else:
        k = idx.mean(dim=0).cpu()
    kh = torch.cat([k, torch.ones(1, dtype=torch.float64)])
    return (level.to_full @ kh)[:ndim]
