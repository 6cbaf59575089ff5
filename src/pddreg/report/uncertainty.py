"""The uncertainty outputs of ``pddreg register`` and their picture.

- ``uncertainty.npy`` ``(*S)`` float32 (and ``uncertainty.nii.gz`` for NIfTI fixed images): per
  fixed voxel the expected spread of the displacement in mm (voxels for arrays without a
  spacing), from the displacement probabilities (:mod:`pddreg.optim.uncertainty`);
- ``warped_prob.npy`` ``(K, *S)`` float32 with a moving segmentation (``warped_prob.nii.gz``,
  layout ``(*S, K)``, for NIfTI fixed images): per-label probabilities of the moving labels on
  the fixed grid (soft label transfer);
- ``uncertainty.png``: the fixed image, the uncertainty over it and, with labels, the
  probability of the most likely foreground label (middle slices in 3D).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "plane_aspects",
    "uncertainty_figure",
    "uncertainty_summary",
    "write_uncertainty_outputs",
]


def uncertainty_summary(uncertainty: np.ndarray) -> dict[str, float]:
    """Mean, median and 95th percentile of the uncertainty map (mm; voxels of 1 mm for
    arrays without a spacing)."""
    u = np.asarray(uncertainty, dtype=np.float64)
    return {
        "uncertainty_mean_mm": float(u.mean()),
        "uncertainty_median_mm": float(np.median(u)),
        "uncertainty_p95_mm": float(np.percentile(u, 95)),
    }


def plane_aspects(ndim: int, spacing: Sequence[float] | None) -> list[float]:
    """``imshow`` aspect (row pitch / column pitch) of each plane of
    :func:`pddreg.report.figures.middle_slices` for voxels of ``spacing`` (None: square): a
    CT of 0.6 x 0.6 x 5 mm shows its 48 slices at their 240 mm, not as a strip of 48 rows."""
    if spacing is None or len(spacing) != ndim:
        return [1.0] * (1 if ndim == 2 else 3)
    sp = [float(v) for v in spacing]
    if ndim == 2:
        return [sp[0] / sp[1]]
    out = []
    for axis in range(3):
        rows, cols = (a for a in range(3) if a != axis)
        out.append(sp[rows] / sp[cols])
    return out


def uncertainty_figure(
    fixed: np.ndarray,
    uncertainty: np.ndarray,
    warped_prob: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
) -> Any:
    """A matplotlib Figure: per plane (2D: the image; 3D: the middle slices) the fixed image,
    the uncertainty (mm) over it, and with ``warped_prob`` ``(K, *S)`` the probability of
    the foreground (1 - background) from the soft label transfer; with ``spacing`` (mm per
    axis) every plane at its physical aspect."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .figures import middle_slices

    planes = middle_slices(np.asarray(fixed))
    unc = middle_slices(np.asarray(uncertainty))
    fg = None if warped_prob is None else middle_slices(1.0 - np.asarray(warped_prob)[0])
    cols = 3 if fg is not None else 2
    fig = Figure(figsize=(3.4 * cols, 3.0 * len(planes)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(planes), cols, squeeze=False)
    top = float(np.percentile(uncertainty, 99)) or 1.0
    lo, hi = np.percentile(fixed, [1, 99])
    aspects = plane_aspects(np.asarray(fixed).ndim, spacing)
    for r, ((name, img), (_, u)) in enumerate(zip(planes, unc, strict=True)):
        ax = axes[r][0]
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(f"fixed {name}", fontsize=9)
        ax = axes[r][1]
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        im = ax.imshow(u, cmap="magma", vmin=0, vmax=top, alpha=0.75)
        fig.colorbar(im, ax=ax, shrink=0.8, label="mm")
        ax.set_title("uncertainty (expected spread)", fontsize=9)
        if fg is not None:
            ax = axes[r][2]
            im = ax.imshow(fg[r][1], cmap="viridis", vmin=0, vmax=1)
            fig.colorbar(im, ax=ax, shrink=0.8)
            ax.set_title("soft label transfer: P(foreground)", fontsize=9)
        for ax in axes[r]:
            ax.set_aspect(aspects[r])
            ax.set_axis_off()
    fig.tight_layout()
    return fig


def _nifti(path: Path, data: np.ndarray, like: Any) -> None:
    import nibabel as nib

    affine = like.affine if getattr(like, "affine", None) is not None else np.eye(4)
    tmp = path.with_name(".tmp_" + path.name)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), np.asarray(affine, float)), str(tmp))
    os.replace(tmp, path)


def write_uncertainty_outputs(folder: Path, result: Any, fixed: Any) -> dict[str, float]:
    """Write ``uncertainty.*``, ``warped_prob.*`` and ``uncertainty.png`` of ``result`` into
    ``folder``; returns :func:`uncertainty_summary` for ``metrics.json``."""
    from .figures import save_figure

    unc = np.asarray(result.uncertainty, dtype=np.float32)
    np.save(folder / "uncertainty.npy", unc)
    nifti = getattr(fixed, "kind", "") == "nifti" or unc.ndim == 3
    if nifti:
        _nifti(folder / "uncertainty.nii.gz", unc, fixed)
    prob = result.warped_prob
    if prob is not None:
        prob = np.asarray(prob, dtype=np.float32)
        np.save(folder / "warped_prob.npy", prob)
        if nifti:
            _nifti(folder / "warped_prob.nii.gz", np.moveaxis(prob, 0, -1), fixed)
    spacing = getattr(result, "spacing", None)
    fig = uncertainty_figure(np.asarray(fixed.array), unc, prob, spacing)
    save_figure(fig, folder / "uncertainty.png")
    return uncertainty_summary(unc)
