"""Evaluation metrics: Dice, HD95, SDlogJ, folding fraction, TRE, end-point error.

Inputs may be numpy arrays or torch tensors; results are Python floats, dicts of floats or
numpy arrays. Labels missing from either map score NaN and are left out of the means, as in the
Learn2Reg evaluation. Displacements follow :mod:`pddreg.spatial` (voxel units,
``(ndim, *S)`` or ``(B, ndim, *S)``); distances in mm use the voxel ``spacing``.
"""

from __future__ import annotations

from .deformation import JACOBIAN_CLIP, epe, folding_fraction, jacobian_metrics, sdlogj, tre
from .segmentation import dice, hd95, mean_dice, mean_hd95, nanmean

__all__ = [
    "JACOBIAN_CLIP",
    "dice",
    "epe",
    "folding_fraction",
    "jacobian_metrics",
    "hd95",
    "mean_dice",
    "mean_hd95",
    "nanmean",
    "sdlogj",
    "tre",
]
