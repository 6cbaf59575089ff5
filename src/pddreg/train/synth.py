"""Synthetic training pairs from random label maps and random contrasts (SynthMorph idea).

A pair is made from one random smooth label map ``L`` (argmax of smooth random noise):
``fixed labels = L o phi_F`` and ``moving labels = L o phi_M`` with random smooth
deformations, and each image is rendered from its labels with a random intensity per label
(independent for the two images half of the time: random contrasts), blur, a smooth
multiplicative bias field and noise. Features trained on such pairs never see real anatomy,
so they cannot overfit to it; they learn contrast-robust edges and blobs that work on real images.

Everything here is random through a ``torch.Generator`` (reproducible by seed) and runs on CPU.

This is the simple generator. The full engine (SynthMorph-like label maps and anatomy, affine
and diffeomorphic deformations with their ground-truth field, acquisition effects, fields of
view, 2D and 3D, CPU or CUDA, background prefetching) is :mod:`pddreg.train.synth_engine`;
:class:`SynthDataset` serves either, chosen by its config type.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from pddreg.errors import InputError

if TYPE_CHECKING:
    from pddreg.data import Subject

    from .synth_engine import SynthEngineConfig, SynthPair

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

    Args:
        config: a :class:`SynthConfig` (the simple generator of :func:`synth_pair`) or a
            :class:`pddreg.train.synth_engine.SynthEngineConfig` (the full engine, with
            ground-truth fields, anatomy maps and acquisition effects).
        val_pairs: number of fixed validation pairs.
        seed: seed of the validation pairs.
        device: engine configs only: where pairs are made (default CPU).
        prefetch: engine configs only: pairs made ahead on background workers (0: none; see
            :class:`pddreg.train.prefetch.Prefetcher`: the pairs are the same either way).
        workers, executor: background workers and their kind. ``"thread"`` (default) shares
            the engine and its phantom cache; with the CPU otherwise idle (GPU training) one
            thread made 2D batches of 4 pairs while a 60 ms step ran (wait 1.5-2 ms per step
            instead of 70 ms). ``"process"`` workers make pairs on CPU (as a CPU engine with
            one thread does), each builds its own phantom cache, and a script using them needs
            the ``if __name__ == "__main__":`` guard of the ``spawn`` start method.
    """

    def __init__(
        self,
        config: SynthConfig | SynthEngineConfig | None = None,
        val_pairs: int = 4,
        seed: int = 0,
        device: torch.device | str | None = None,
        prefetch: int = 0,
        workers: int = 1,
        executor: str = "thread",
    ):
        from .synth_engine import SynthEngine, SynthEngineConfig

        self.config = config if config is not None else SynthConfig()
        self.ndim = len(self.config.shape)
        self.num_labels = self.config.num_labels
        self.label_names = [f"label{i}" for i in range(self.num_labels)]
        self.engine = (
            SynthEngine(self.config, device) if isinstance(self.config, SynthEngineConfig) else None
        )
        self._prefetcher = None
        if prefetch > 0:
            if self.engine is None:
                raise InputError("SynthDataset: prefetch needs a SynthEngineConfig")
            from .prefetch import Prefetcher

            if executor == "process":
                from .synth_engine import _init_worker, _worker_pair

                self._prefetcher = Prefetcher(
                    _worker_pair, prefetch, workers, "process", _init_worker, (self.config,)
                )
            else:
                engine = self.engine
                self._prefetcher = Prefetcher(
                    lambda s: engine.pair(s, with_field=True), prefetch, workers, executor
                )
        self._val = [self._val_pair(seed + 100_000 + p) for p in range(val_pairs)]

    def _val_pair(self, seed: int) -> tuple[Tensor, ...]:
        if self.engine is not None:
            return self.engine.pair(seed, with_field=True).to("cpu").as_tuple(with_field=True)
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

        fixed, moving, fseg, mseg = self._val[i // 2][:4]
        image, labels = (fixed, fseg) if i % 2 == 0 else (moving, mseg)
        return Subject(
            image=image[0].numpy(),
            labels=labels[0].numpy(),
            spacing=(1.0,) * self.ndim,
            name=f"synth{i}",
        )

    def val_field(self, p: int) -> Tensor:
        """Ground-truth displacement ``(ndim, *S)`` of validation pair ``p`` (engine configs):
        ``warped(x) = subject(2p + 1)(x + field(x))`` matches ``subject(2p)``."""
        if self.engine is None:
            raise InputError("SynthDataset.val_field: needs a SynthEngineConfig")
        return self._val[p][4]

    def sample(self, gen: torch.Generator) -> SynthPair:
        """A fresh random :class:`pddreg.train.synth_engine.SynthPair` (engine configs): one
        draw from ``gen``; with ``prefetch`` made ahead, else now."""
        if self.engine is None:
            raise InputError("SynthDataset.sample: needs a SynthEngineConfig")
        if self._prefetcher is not None:
            return self._prefetcher.next(gen).to(self.engine.device)
        return self.engine.sample(gen, with_field=True)

    def sample_pair(self, gen: torch.Generator, with_field: bool = False) -> tuple[Tensor, ...]:
        """A fresh random training pair ``(fixed, moving, fixed_seg, moving_seg)``, ``(1, *S)``,
        plus the ground-truth field ``(ndim, *S)`` with ``with_field`` (engine configs)."""
        if self.engine is None:
            if with_field:
                raise InputError("SynthDataset.sample_pair: with_field needs a SynthEngineConfig")
            return synth_pair(self.config, gen)
        if self._prefetcher is not None:
            return self.sample(gen).as_tuple(with_field)
        return self.engine.sample(gen, with_field=with_field).as_tuple(with_field)

    def close(self) -> None:
        """Stop the prefetch workers (if any)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
