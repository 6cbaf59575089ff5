"""Synthetic training pairs from random label maps and random contrasts (SynthMorph idea).

A pair is made from one random smooth label map ``L`` (argmax of smooth random noise):
``fixed labels = L o phi_F`` and ``moving labels = L o phi_M`` with random smooth
deformations, and each image is rendered from its labels with a random intensity per label
(independent for the two images half of the time: random contrasts), blur, a smooth
multiplicative bias field and noise. Features trained on such pairs never see real anatomy,
so they cannot overfit to it; they learn contrast-robust edges and blobs that work on real images.

Everything here is random through a ``torch.Generator`` (reproducible by seed) and runs on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from pddreg.data import Subject

__all__ = ["SynthConfig", "SynthDataset", "smooth_noise", "synth_pair"]


@dataclass
class SynthConfig:
    """Settings of the generator.

    Attributes:
        shape: image size.
        num_labels: labels of the random label maps (0 included).
        label_scale: size in voxels of the noise cells that make the label blobs.
        max_disp: largest displacement (voxels) of the random deformations, per image.
        disp_scale: size in voxels of the cells of the random deformations.
        same_contrast: probability that both images share their intensity per label.
        noise: largest standard deviation of the additive Gaussian noise.
        bias: largest amplitude of the log bias field.
        blur: largest Gaussian blur sigma (voxels).
    """

    shape: tuple[int, ...] = (192, 192)
    num_labels: int = 16
    label_scale: float = 24.0
    max_disp: float = 10.0
    disp_scale: float = 48.0
    same_contrast: float = 0.5
    noise: float = 0.05
    bias: float = 0.3
    blur: float = 1.5


def smooth_noise(
    shape: Sequence[int], channels: int, cell: float, gen: torch.Generator, batch: int = 1
) -> Tensor:
    """Smooth random field ``(batch, channels, *shape)``, unit-ish std: Gaussian noise on a
    lattice of ``cell``-voxel cells, cubic-ish upsampled (linear of a 2x finer, blurred lattice)."""
    ndim = len(shape)
    coarse = [max(2, math.ceil(s / cell) + 1) for s in shape]
    x = torch.randn(batch, channels, *coarse, generator=gen)
    mode = "bilinear" if ndim == 2 else "trilinear"
    return F.interpolate(x, size=tuple(shape), mode=mode, align_corners=True)


def _gauss_blur(x: Tensor, sigma: float) -> Tensor:
    if sigma < 0.3:
        return x
    ndim = x.dim() - 2
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    conv = F.conv2d if ndim == 2 else F.conv3d
    c = x.shape[1]
    for axis in range(ndim):
        shape = [c, 1] + [1] * ndim
        shape[2 + axis] = k.numel()
        pad = [0, 0] * ndim
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = r
        x = conv(F.pad(x, pad, mode="replicate"), k.view(shape), groups=c)
    return x


def _random_field(cfg: SynthConfig, gen: torch.Generator) -> Tensor:
    """Smooth random displacement ``(1, ndim, *shape)`` with max magnitude about ``max_disp``."""
    ndim = len(cfg.shape)
    u = smooth_noise(cfg.shape, ndim, cfg.disp_scale, gen)
    amp = cfg.max_disp * float(torch.rand(1, generator=gen))
    return u * (amp / u.abs().amax().clamp_min(1e-6))


def _render(labels: Tensor, table: Tensor, cfg: SynthConfig, gen: torch.Generator) -> Tensor:
    """Image ``(1, 1, *S)`` in [0, 1] from labels ``(1, 1, *S)`` and intensities ``table (K,)``."""
    img = table[labels]
    img = _gauss_blur(img, cfg.blur * float(torch.rand(1, generator=gen)))
    bias = smooth_noise(cfg.shape, 1, max(cfg.shape) / 3, gen)
    img = img * torch.exp(cfg.bias * float(torch.rand(1, generator=gen)) * bias)
    img = img + cfg.noise * float(torch.rand(1, generator=gen)) * torch.randn(
        img.shape, generator=gen
    )
    lo, hi = img.amin(), img.amax()
    return ((img - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def synth_pair(cfg: SynthConfig, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pair ``(fixed, moving, fixed_seg, moving_seg)``, each ``(1, *shape)``
    (images float32 in [0, 1], labels int64 in ``[0, num_labels)``)."""
    from pddreg.spatial import warp_labels

    noise = smooth_noise(cfg.shape, cfg.num_labels, cfg.label_scale, gen)
    base = noise.argmax(1, keepdim=True)  # (1, 1, *S)
    segs = [warp_labels(base, _random_field(cfg, gen)) for _ in range(2)]
    table = torch.rand(cfg.num_labels, generator=gen)
    tables = [table, table]
    if float(torch.rand(1, generator=gen)) >= cfg.same_contrast:
        tables[1] = torch.rand(cfg.num_labels, generator=gen)
    images = [_render(s, t, cfg, gen) for s, t in zip(segs, tables, strict=True)]
    return images[0][0], images[1][0], segs[0][0], segs[1][0]


class SynthDataset:
    """A registration dataset of synthetic pairs, usable by :func:`pddreg.train.train`.

    Training draws fresh pairs with :meth:`sample_pair`; ``subject(2p)`` and ``subject(2p + 1)``
    form the fixed validation pair ``p`` (``pairs("val")``), generated from ``seed + p``.
    """

    def __init__(self, config: SynthConfig | None = None, val_pairs: int = 4, seed: int = 0):
        self.config = config if config is not None else SynthConfig()
        self.ndim = len(self.config.shape)
        self.num_labels = self.config.num_labels
        self.label_names = [f"label{i}" for i in range(self.num_labels)]
        self._val = [self._val_pair(seed + 100_000 + p) for p in range(val_pairs)]

    def _val_pair(self, seed: int) -> tuple[Tensor, ...]:
        return synth_pair(self.config, torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return 2 * len(self._val)

    def indices(self, split: str) -> list[int]:
        # training pairs are drawn on the fly; these indices only satisfy the dataset protocol
        return list(range(len(self))) if split in ("train", "val", "all") else []

    def pairs(self, split: str) -> list[tuple[int, int]]:
        if split not in ("val", "all"):
            return []
        return [(2 * p, 2 * p + 1) for p in range(len(self._val))]

    def subject(self, i: int) -> Subject:
        """Subject ``i`` of the validation pairs (a :class:`pddreg.data.Subject`)."""
        from pddreg.data import Subject

        fixed, moving, fseg, mseg = self._val[i // 2]
        image, labels = (fixed, fseg) if i % 2 == 0 else (moving, mseg)
        return Subject(
            image=image[0].numpy(),
            labels=labels[0].numpy(),
            spacing=(1.0,) * self.ndim,
            name=f"synth{i}",
        )

    def sample_pair(self, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A fresh random training pair ``(fixed, moving, fixed_seg, moving_seg)``, ``(1, *S)``."""
        return synth_pair(self.config, gen)
