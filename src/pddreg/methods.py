"""The registration methods of ``register`` / ``pddreg register`` and the default one (a module
without heavy imports, so that the command line can name them before loading PyTorch)."""

from __future__ import annotations

__all__ = ["DEFAULT_METHOD", "METHODS"]

#: ``pdd``: the learned PDD-Net (its field refined on MIND-SSC by default), ``mind``: the
#: training-free MIND-SSC discrete registration, ``none``: the images as their headers place
#: them.
METHODS = ("pdd", "mind", "none")

#: The method when none is named: the one that measures best on ``benchmarks/real.py``
#: (known-answer mean end-point error 0.88 voxels for ``pdd`` with its refinement, 1.19 for
#: ``mind``, 2.78 for ANTs SyN), on ``benchmarks/bench_capture.py`` (12 of 12 groups within 0.5
#: voxel of the aligned case against 7 for ``mind``, mean misaligned 0.41 against 0.52 voxels)
#: and on ``benchmarks/bench_viewpoint.py`` (at most 0.36 px against 0.64).
DEFAULT_METHOD = "pdd"
