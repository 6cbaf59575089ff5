"""Overlap and surface-distance metrics between two label maps (Dice, HD95).

Both maps are integer label maps of the same shape (numpy or torch). Label 0 is background and
is not scored unless asked for. A label missing from either map scores NaN and is left out of
the means (as in the Learn2Reg evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from ._convert import pair_of_label_maps, resolve_labels, spacing_tuple

__all__ = ["dice", "hd95", "mean_dice", "mean_hd95", "nanmean"]

_BINCOUNT_MAX = 1 << 20


def nanmean(values: dict[int, float] | Sequence[float]) -> float:
    """Mean of the finite entries (NaN when there is none), without a RuntimeWarning."""
    vals = list(values.values()) if isinstance(values, dict) else list(values)
    finite = [v for v in vals if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _counts(x: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(x.ravel(), minlength=size)


def dice(
    a: Any, b: Any, labels: Sequence[int] | None = None, *, reference: Any = None
) -> dict[int, float]:
    """Dice overlap ``2 |A ∩ B| / (|A| + |B|)`` per label.

    Args:
        a, b: label maps of one shape, e.g. the fixed segmentation and the warped moving one.
        labels: labels to score (default: every non-zero label present in either map).
        reference: optional label map ``b`` was made from (the moving segmentation before
            warping, any shape). A label present in ``a`` and in ``reference`` but lost from
            ``b`` (a registration that shrank it away) then scores 0, not NaN.

    Returns:
        ``{label: dice}``; NaN where the label is missing from ``a`` or from ``b`` (unless
        ``reference`` shows it was lost, see above).
    """
    lost: set[int] = set()
    if reference is not None:
        ref = reference.detach().cpu().numpy() if hasattr(reference, "detach") else reference
        lost = {int(v) for v in np.unique(np.asarray(ref))}
    la, lb = pair_of_label_maps(a, b, "dice()")
    wanted = resolve_labels(la, lb, labels)
    if not wanted:
        return {}
    lo = min(la.min(initial=0), lb.min(initial=0))
    hi = max(la.max(initial=0), lb.max(initial=0), max(wanted))
    if lo >= 0 and hi < _BINCOUNT_MAX:
        size = int(hi) + 1
        count_a, count_b = _counts(la, size), _counts(lb, size)
        count_ab = _counts(la[la == lb], size)

        def stats(v: int) -> tuple[int, int, int]:
            if v < 0:
                return 0, 0, 0
            return int(count_a[v]), int(count_b[v]), int(count_ab[v])
    else:

        def stats(v: int) -> tuple[int, int, int]:
            ma, mb = la == v, lb == v
            return int(ma.sum()), int(mb.sum()), int(np.logical_and(ma, mb).sum())

    out: dict[int, float] = {}
    for v in wanted:
        na, nb, nab = stats(v)
        if na > 0 and nb == 0 and v in lost:
            out[v] = 0.0
        else:
            out[v] = math.nan if na == 0 or nb == 0 else 2.0 * nab / (na + nb)
    return out


def mean_dice(a: Any, b: Any, labels: Sequence[int] | None = None) -> float:
    """Mean of :func:`dice` over the labels present in both maps (NaN if there is none)."""
    return nanmean(dice(a, b, labels))


def _spatial(la: np.ndarray, lb: np.ndarray, spacing: Any) -> tuple[np.ndarray, np.ndarray]:
    """Drop leading axes of size 1 (batch/channel) down to the spatial axes."""
    target = len(spacing) if spacing is not None and not np.isscalar(spacing) else 2
    while la.ndim > target and la.shape[0] == 1:
        la, lb = la[0], lb[0]
    return la, lb


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour outside it (the image border counts as
    outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _directed_percentile(
    surf_from: np.ndarray, surf_to: np.ndarray, spacing: tuple[float, ...], q: float
) -> float:
    """q-th percentile of the distances from ``surf_from`` voxels to the nearest ``surf_to``."""
    dist_to = ndimage.distance_transform_edt(~surf_to, sampling=spacing)
    return float(np.percentile(dist_to[surf_from], q))


def _boxes(labels: np.ndarray) -> list[tuple[slice, ...] | None] | None:
    """Bounding boxes of labels 1..max (None when labels are negative or huge)."""
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= _BINCOUNT_MAX:
        return None
    return list(ndimage.find_objects(labels))


def _box_of(
    boxes: list[tuple[slice, ...] | None] | None, v: int, arr: np.ndarray
) -> tuple[slice, ...] | None:
    if boxes is not None and v >= 1:
        return boxes[v - 1] if v <= len(boxes) else None
    nz = np.nonzero(arr == v)
    if nz[0].size == 0:
        return None
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)


def hd95(
    a: Any,
    b: Any,
    spacing: Sequence[float] | float | None = None,
    labels: Sequence[int] | None = None,
    percentile: float = 95.0,
) -> dict[int, float]:
    """Robust (95th percentile) Hausdorff distance between label surfaces, in mm.

    Surface voxels are the voxels of a label with a face-neighbour outside it (or on the image
    border). For each label the Euclidean distances from every surface voxel of ``a`` to the
    nearest surface voxel of ``b`` and back are computed with
    ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)`` inside the bounding box of
    both labels; the result is the larger of the two directed percentiles (the robust Hausdorff
    distance of the Learn2Reg evaluation, without surfel-area weights).

    Args:
        a, b: label maps of one shape ``(*S)`` (leading axes of size 1 are dropped).
        spacing: voxel size per axis in mm (default 1: the result is in voxels).
        labels: labels to score (default: every non-zero label present in either map).
        percentile: 95 for HD95, 100 for the classic Hausdorff distance.

    Returns:
        ``{label: distance}``; NaN where the label is missing from ``a`` or from ``b``.
    """
    la, lb = pair_of_label_maps(a, b, "hd95()")
    la, lb = _spatial(la, lb, spacing)
    sp = spacing_tuple(spacing, la.ndim)
    boxes_a, boxes_b = _boxes(la), _boxes(lb)
    out: dict[int, float] = {}
    for v in resolve_labels(la, lb, labels):
        box_a, box_b = _box_of(boxes_a, v, la), _box_of(boxes_b, v, lb)
        if box_a is None or box_b is None:
            out[v] = math.nan
            continue
        # Work inside the union of both bounding boxes plus one voxel: every surface voxel lies
        # there and the margin is background, so the erosion is unchanged.
        box = tuple(
            slice(max(min(p.start, q.start) - 1, 0), min(max(p.stop, q.stop) + 1, n))
            for p, q, n in zip(box_a, box_b, la.shape, strict=True)
        )
        sa, sb = _surface(la[box] == v), _surface(lb[box] == v)
        out[v] = max(
            _directed_percentile(sa, sb, sp, percentile),
            _directed_percentile(sb, sa, sp, percentile),
        )
    return out


def mean_hd95(
    a: Any,
    b: Any,
    spacing: Sequence[float] | float | None = None,
    labels: Sequence[int] | None = None,
) -> float:
    """Mean of :func:`hd95` over the labels present in both maps (NaN if there is none)."""
    return nanmean(hd95(a, b, spacing=spacing, labels=labels))
