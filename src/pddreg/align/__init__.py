"""Global alignment stage: translation, rigid or affine maps between two images.

:func:`align` returns the full map fixed voxel index -> moving voxel index (an
``(ndim+1, ndim+1)`` homogeneous float64 matrix) found by a coarse exhaustive search over
rotations and translations (FFT-based masked SSD of MIND-SSC features) followed by
Gauss-Newton refinement on a millimetre pyramid. See :mod:`pddreg.align.core`.

Convention: array axis order, voxel centres at integer indices (:mod:`pddreg.spatial`);
transforms are rigid/affine in the fixed image's physical frame (mm).
"""

from __future__ import annotations

from .core import AlignConfig, AlignResult, align

__all__ = ["AlignConfig", "AlignResult", "align"]
