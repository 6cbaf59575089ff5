"""Training pairs made from real images by known deformations (self-supervised), mixed with the
synthetic pairs of :mod:`pddreg.train.synth_engine`.

A pair is ``fixed = crop o phi`` and ``moving = crop`` for a random crop (at a random zoom) of
a real image, ``phi`` a mild random affine map composed with a smooth random deformation, so the
true field is exactly ``phi(x) - x`` (the pddreg convention: ``fixed(x) = moving(x + u(x))``).
The moving image may go through a random intensity remap (monotonic or not), a gamma, a smooth
bias field and noise, and either image may lose a random box of its field of view: the
features learn real textures and structures under the contrast and acquisition changes that
the synthetic engine models. The pairs carry no labels (one background label); the label
losses then vanish and the end-point error against the true field trains the network.

Everything is random through the caller's ``torch.Generator`` (reproducible), CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MixedDataset", "RealWarpConfig", "real_warp_pair"]


class RealWarpConfig:
    """Settings of :func:`real_warp_pair` (sizes in voxels of the crop, fractions of its
    largest side).

    Attributes:
        shape: crop size.
        zoom: range of the crop's zoom (a crop of ``shape / zoom`` voxels resampled to
            ``shape``).
        max_disp: largest displacement of the smooth deformation (fraction of the extent).
        cells: range of its smoothness scale (control-lattice cells across the extent).
        rotation, scaling, translation: the mild affine part (degrees, fraction, fraction).
        p_remap, p_nonmonotonic, gamma, bias, noise, p_crop: intensity and field-of-view
            changes of the moving image (probabilities, or largest amplitudes).
    """

    def __init__(
        self,
        shape: Sequence[int] = (160, 192),
        zoom: tuple[float, float] = (0.6, 1.4),
        max_disp: float = 0.08,
        cells: tuple[float, float] = (3.0, 8.0),
        rotation: float = 4.0,
        scaling: float = 0.04,
        translation: float = 0.02,
        p_remap: float = 0.5,
        p_nonmonotonic: float = 0.5,
        gamma: float = 0.3,
        bias: float = 0.3,
        noise: float = 0.04,
        p_crop: float = 0.15,
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.zoom = zoom
        self.max_disp = max_disp
        self.cells = cells
        self.rotation = rotation
        self.scaling = scaling
        self.translation = translation
        self.p_remap = p_remap
        self.p_nonmonotonic = p_nonmonotonic
        self.gamma = gamma
        self.bias = bias
        self.noise = noise
        self.p_crop = p_crop


def _u(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _smooth(shape: Sequence[int], channels: int, cells: float, gen: torch.Generator) -> Tensor:
    """``(1, channels, *shape)`` smooth noise of unit-ish amplitude, ``cells`` lattice cells
    across the largest side (linear upsampling of a random lattice)."""
    nd = len(shape)
    step = max(shape) / max(cells, 1.0)
    coarse = [max(2, math.ceil(s / step) + 1) for s in shape]
    x = torch.randn(1, channels, *coarse, generator=gen)
    mode = "bilinear" if nd == 2 else "trilinear"
    return F.interpolate(x, size=tuple(shape), mode=mode, align_corners=True)


def _affine_field(shape: Sequence[int], cfg: RealWarpConfig, gen: torch.Generator) -> Tensor:
    """A mild random affine map about the centre as a displacement ``(1, ndim, *S)``."""
    nd = len(shape)
    a = torch.eye(nd, dtype=torch.float64)
    for i in range(nd):
        for j in range(i + 1, nd):
            t = math.radians(_u(gen, -cfg.rotation, cfg.rotation))
            r = torch.eye(nd, dtype=torch.float64)
            r[i, i] = r[j, j] = math.cos(t)
            r[i, j], r[j, i] = -math.sin(t), math.sin(t)
            a = r @ a
    a = a * torch.tensor([1 + _u(gen, -cfg.scaling, cfg.scaling) for _ in range(nd)])[None]
    centre = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64)
    shift = torch.tensor([_u(gen, -cfg.translation, cfg.translation) * s for s in shape])
    axes = [torch.arange(s, dtype=torch.float64) for s in shape]
    x = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (nd, *S)
    rel = (x - centre.view(nd, *([1] * nd))).reshape(nd, -1)
    mapped = a @ rel + centre[:, None] + shift[:, None]
    return (mapped.reshape(nd, *shape) - x).float()[None]


def _remap(x: Tensor, gen: torch.Generator, nonmonotonic: bool) -> Tensor:
    """A random piecewise-linear intensity curve on ``[0, 1]`` (keeps 0 dark half the time)."""
    knots = 6
    while True:
        v = torch.rand(knots, generator=gen)
        if _u(gen) < 0.5:
            v[0] = 0.0
        if not nonmonotonic:
            v = torch.sort(v, descending=_u(gen) < 0.3).values
        d = torch.sign(torch.diff(v))
        turns = bool((d > 0).any() and (d < 0).any())
        if float(v.max() - v.min()) >= 0.5 and (turns or not nonmonotonic):
            break
    pos = x.clamp(0, 1) * (knots - 1)
    lo = pos.floor().clamp(max=knots - 2).long()
    frac = pos - lo.to(x.dtype)
    return v[lo] * (1 - frac) + v[lo + 1] * frac


def _normalise(x: Tensor) -> Tensor:
    flat = x.flatten()
    k = max(1, flat.numel() // 200)
    lo = flat.kthvalue(k).values
    hi = flat.kthvalue(flat.numel() - k + 1).values
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def _crop_box(x: Tensor, gen: torch.Generator) -> Tensor:
    """Zero a random box covering one side of the image (a cropped field of view)."""
    nd = x.dim() - 2
    axis = int(torch.randint(0, nd, (1,), generator=gen))
    size = x.shape[2 + axis]
    cut = int(size * _u(gen, 0.1, 0.3))
    idx = [slice(None)] * x.dim()
    idx[2 + axis] = slice(0, cut) if _u(gen) < 0.5 else slice(size - cut, size)
    x = x.clone()
    x[tuple(idx)] = 0
    return x


def real_warp_pair(
    image: Tensor, cfg: RealWarpConfig, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """``(fixed (1, *S), moving (1, *S), field (ndim, *S))`` from one real image ``(*R)``
    (float, any range; ``R`` at least about ``shape / zoom``)."""
    shape = cfg.shape
    nd = len(shape)
    zoom = math.exp(_u(gen, math.log(cfg.zoom[0]), math.log(cfg.zoom[1])))
    src = image[None, None].float()
    size = [min(r, max(4, round(s / zoom))) for r, s in zip(image.shape, shape, strict=True)]
    start = [
        int(torch.randint(0, r - c + 1, (1,), generator=gen))
        for r, c in zip(image.shape, size, strict=True)
    ]
    crop = src[
        (slice(None), slice(None), *(slice(a, a + c) for a, c in zip(start, size, strict=True)))
    ]
    mode = "bilinear" if nd == 2 else "trilinear"
    crop = F.interpolate(crop, size=shape, mode=mode, align_corners=False, antialias=nd == 2)
    crop = _normalise(crop)
    from pddreg.spatial import warp

    amp = _u(gen, 0.0, cfg.max_disp) * max(shape)
    smooth = _smooth(shape, nd, _u(gen, *cfg.cells), gen)
    smooth = smooth / smooth.abs().amax().clamp_min(1e-6) * amp
    field = smooth + _affine_field(shape, cfg, gen)
    fixed = warp(crop, field, padding="zeros")
    moving = crop
    if _u(gen) < cfg.p_remap:
        moving = _remap(moving, gen, _u(gen) < cfg.p_nonmonotonic)
    if cfg.gamma:
        moving = moving.clamp(0, 1) ** math.exp(_u(gen, -cfg.gamma, cfg.gamma))
    for which in (0, 1):
        img = fixed if which == 0 else moving
        if cfg.bias:
            img = img * torch.exp(_smooth(shape, 1, 2.0, gen) * _u(gen, 0, cfg.bias) * 0.5)
        if cfg.noise:
            img = img + torch.randn(img.shape, generator=gen) * _u(gen, 0, cfg.noise)
        if _u(gen) < cfg.p_crop:
            img = _crop_box(img, gen)
        if which == 0:
            fixed = _normalise(img)
        else:
            moving = _normalise(img)
    return fixed[0], moving[0], field[0]


class MixedDataset:
    """Synthetic pairs (a :class:`pddreg.train.synth.SynthDataset`) and real-image pairs
    (:func:`real_warp_pair` of ``images``) in the proportion ``p_real``; the trainer's dataset
    interface (``sample_pair(gen, with_field)``, ``indices``, ``pairs``, ``subject``, ...) of
    the synthetic one."""

    def __init__(
        self,
        synth: Any,
        images: Sequence[np.ndarray],
        config: RealWarpConfig,
        p_real: float = 0.5,
    ) -> None:
        if not images:
            raise ValueError("MixedDataset: needs at least one real image")
        self.synth = synth
        self.images = [torch.as_tensor(np.ascontiguousarray(im, dtype=np.float32)) for im in images]
        self.config = config
        self.p_real = float(p_real)
        self.ndim = synth.ndim
        self.num_labels = synth.num_labels
        self.label_names = synth.label_names

    def __len__(self) -> int:
        return len(self.synth)

    def indices(self, split: str) -> list[int]:
        return self.synth.indices(split)

    def pairs(self, split: str) -> list[tuple[int, int]]:
        return self.synth.pairs(split)

    def subject(self, i: int) -> Any:
        return self.synth.subject(i)

    def sample_pair(self, gen: torch.Generator, with_field: bool = False) -> tuple[Tensor, ...]:
        """``(fixed, moving, fixed_seg, moving_seg[, field])`` as the synthetic dataset gives."""
        if _u(gen) >= self.p_real:
            return self.synth.sample_pair(gen, with_field=with_field)
        k = int(torch.randint(0, len(self.images), (1,), generator=gen))
        fixed, moving, field = real_warp_pair(self.images[k], self.config, gen)
        seg = torch.zeros(fixed.shape, dtype=torch.long)
        out = (fixed, moving, seg, seg.clone())
        return (*out, field) if with_field else out

    def close(self) -> None:
        close = getattr(self.synth, "close", None)
        if close is not None:
            close()
