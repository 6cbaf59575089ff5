"""Label maps of the synthetic-data engine: random smooth noise labels and anatomy-like labels.

- :func:`noise_labels`: the argmax of ``K`` random smooth fields, each a random mix of up to
  three octaves (a base cell size per map, finer octaves with random per-field weights), so a
  map holds large blobs and small structures side by side (SynthMorph / SynthSeg style).
- :class:`AnatomyPool`: organ label maps of the abdominal phantoms
  (:func:`pddreg.data.phantom.make_phantom`), with the unlabelled tissue split into classes by
  the phantom's own intensities (air/gas, fat, soft tissue, dense/enhanced, bone), so the body
  outline, fat layers, muscles and spine become structures too. 3D volumes serve 3D maps and,
  as slices in any of the three orientations, 2D maps; 2D phantoms (the axial plane) serve 2D
  maps as well. Subjects are made on first use and cached (a small pool, by seed).
- :func:`subdivide`: noise labels inside chosen structures (organs made of several parts).

All labels here are *generation labels* (each gets its own intensity when rendered); the
engine maps them onto the training label values ``[0, num_labels)``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .synth_ops import apply_separable, kernel_matrix, lattice_axis, smooth_field_channels_last

__all__ = ["ANATOMY_LABELS", "AnatomyPool", "noise_labels", "slice_of", "subdivide"]

#: Generation labels of an anatomy map: 0 air/gas, 1..9 the phantom organs
#: (:data:`pddreg.data.phantom.LABEL_NAMES`), then the unlabelled tissue classes.
ANATOMY_LABELS: tuple[str, ...] = (
    "air",
    "liver",
    "spleen",
    "left kidney",
    "right kidney",
    "pancreas",
    "gallbladder",
    "stomach",
    "aorta",
    "inferior vena cava",
    "fat",
    "soft tissue",
    "dense tissue",
    "bone",
)
# thresholds on the phantom image ([0, 1] = -160..240 HU): air < -140 HU, fat < -28 HU,
# soft tissue < 120 HU, dense (enhanced vessels, contrast, cortical rims) < 220 HU, bone above
_TISSUE_EDGES = (0.05, 0.33, 0.70, 0.95)


def noise_labels(
    gen: torch.Generator,
    num: int,
    axes: Sequence[Tensor],
    cells: Sequence[float],
    weights: np.ndarray,
) -> Tensor:
    """Random smooth label map: the argmax of ``num`` multi-octave smooth random fields.

    Args:
        gen: random numbers (on the device of ``axes``).
        num: number of labels (fields).
        axes: coordinates of the canvas per axis (canvas voxels).
        cells: lattice cell size of each octave, coarsest first (canvas voxels).
        weights: ``(num, len(cells))`` weight of each octave in each field.

    Returns:
        ``(*canvas)`` int64 labels in ``[0, num)``.
    """
    dev = axes[0].device
    fine = float(cells[-1])
    f_nodes = [lattice_axis(float(a[0]), float(a[-1]), fine, dev) for a in axes]
    f_mats = [kernel_matrix(a, n, fine) for a, n in zip(axes, f_nodes, strict=True)]
    # a smooth (coarse-octave) input grows by the row sums of the unit-L2 fine kernel
    gain = float(np.prod([float(m.sum(1).mean()) for m in f_mats]))
    w = torch.as_tensor(np.asarray(weights, dtype=np.float32), device=dev)
    shape = [len(n) for n in f_nodes]
    lattice = w[:, -1].view(-1, *[1] * len(axes)) * torch.randn(
        num, *shape, generator=gen, device=dev
    )
    for o, cell in enumerate(cells[:-1]):
        c_nodes = [lattice_axis(float(n[0]), float(n[-1]), float(cell), dev) for n in f_nodes]
        lat = torch.randn(num, *[len(n) for n in c_nodes], generator=gen, device=dev)
        mats = [kernel_matrix(f, c, float(cell)) for f, c in zip(f_nodes, c_nodes, strict=True)]
        coarse = apply_separable(lat, mats)  # at the fine nodes
        lattice = lattice + (w[:, o] / gain).view(-1, *[1] * len(axes)) * coarse
    field = smooth_field_channels_last(lattice, f_mats)  # (*canvas, num)
    return field.argmax(-1)


def subdivide(
    labels: Tensor,
    chosen: Sequence[int],
    first: int,
    parts: int,
    gen: torch.Generator,
    cell: float,
) -> tuple[Tensor, int]:
    """Split each label of ``chosen`` into ``parts`` random smooth noise regions.

    Args:
        labels: ``(*canvas)`` int64 generation labels.
        chosen: label values to split.
        first: the first new label value (new values ``first .. first + len(chosen) * parts``).
        parts: regions per split label.
        gen: random numbers (device of ``labels``).
        cell: noise cell size (canvas voxels).

    Returns:
        ``(labels, count)``: the new map and the number of label values it may hold.
    """
    if not chosen or parts < 2:
        return labels, first
    dev = labels.device
    axes = [torch.arange(s, device=dev, dtype=torch.float32) for s in labels.shape]
    nodes = [lattice_axis(0.0, float(s - 1), cell, dev) for s in labels.shape]
    lat = torch.randn(parts, *[len(n) for n in nodes], generator=gen, device=dev)
    mats = [kernel_matrix(a, n, cell) for a, n in zip(axes, nodes, strict=True)]
    sub = smooth_field_channels_last(lat, mats).argmax(-1)
    table = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long, device=dev)
    for rank, lab in enumerate(chosen):
        if lab < len(table):
            table[lab] = first + rank * parts
    base = table[labels]
    out = torch.where(base >= 0, base + sub, labels)
    return out, first + len(chosen) * parts


class AnatomyPool:
    """Lazily built, cached generation-label maps of phantom subjects (thread-safe).

    Args:
        size: number of subjects (seeds ``seed .. seed + size - 1``).
        seed: first phantom seed (far from the seeds other code uses for phantoms).
        max_side: the phantom's longest axis in voxels (its default aspect is kept: 3D
            ``(96, 80, 128)``, 2D ``(256, 320)``, both isotropic voxels).
        max_side_3d: the same for the 3D subjects, when they differ from the 2D ones (default
            ``max_side``).
    """

    num_labels = len(ANATOMY_LABELS)

    def __init__(self, size: int, seed: int, max_side: int, max_side_3d: int | None = None) -> None:
        if size < 1:
            raise ValueError(f"AnatomyPool: size must be >= 1, got {size}")
        self.size = int(size)
        self.seed = int(seed)
        self.max_side = {2: int(max_side), 3: int(max_side if max_side_3d is None else max_side_3d)}
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()
        self._building: dict[tuple[int, int], threading.Lock] = {}

    def shape(self, ndim: int) -> tuple[int, ...]:
        """Array shape of the subjects of dimension ``ndim``."""
        from pddreg.data.phantom import DEFAULT_SHAPE_2D, DEFAULT_SHAPE_3D

        base = DEFAULT_SHAPE_3D if ndim == 3 else DEFAULT_SHAPE_2D
        f = self.max_side[ndim] / max(base)
        return tuple(max(8, int(round(s * f))) for s in base)

    def labels(self, index: int, ndim: int) -> np.ndarray:
        """Generation labels (uint8, values in ``[0, 14)``) of subject ``index`` (``ndim`` 2 or
        3): organs 1..9 as in the phantom, 0 air/gas and 10..13 the tissue classes."""
        key = (int(index) % self.size, int(ndim))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            build_lock = self._building.setdefault(key, threading.Lock())
        with build_lock:  # one thread builds a subject; others wait for it
            with self._lock:
                hit = self._cache.get(key)
            if hit is None:
                hit = self._build(*key)
                with self._lock:
                    self._cache[key] = hit
        return hit

    def _build(self, index: int, ndim: int) -> np.ndarray:
        from scipy import ndimage

        from pddreg.data.phantom import make_phantom

        image, organs = make_phantom(self.seed + index, ndim=ndim, shape=self.shape(ndim))
        smooth = ndimage.gaussian_filter(image, 0.8, mode="nearest")
        tissue = np.digitize(smooth, _TISSUE_EDGES)  # 0 air, 1 fat, 2 soft, 3 dense, 4 bone
        out = np.where(tissue == 0, 0, tissue + 9)
        out = np.where(organs > 0, organs, out)
        return out.astype(np.uint8)

    def warm_up(self, ndims: Sequence[int] = (2, 3)) -> None:
        """Build every subject now (2D and/or 3D) instead of on first use."""
        for nd in ndims:
            for k in range(self.size):
                self.labels(k, nd)


def slice_of(volume: Tensor, axis: int, fraction: float) -> Tensor:
    """The 2D slice of ``volume`` ``(X, Y, Z)`` across ``axis`` at ``fraction`` of its length."""
    n = volume.shape[axis]
    idx = min(n - 1, max(0, int(math.floor(fraction * n))))
    return volume.select(axis, idx)
