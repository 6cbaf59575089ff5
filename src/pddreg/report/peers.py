"""Peer registration tools behind one convention, for benchmarks: ANTsPy SyN, SimpleITK
B-spline and demons, ConvexAdam.

Every wrapper takes NumPy images and returns the displacement in pddreg's convention
(:mod:`pddreg.spatial`): an array ``(ndim, *S_fixed)`` float32 in voxels of the fixed grid,
component ``i`` along array axis ``i``, with ``warped(x) = moving(x + u(x))``. Physical
spacings (mm) are passed to the peers so that anisotropic voxels are handled as such; the result
is converted back to voxels.

The peers are optional (``pip install "pddreg[peers]"``): each is imported when first called,
and a missing one raises :class:`ImportError` saying what to install. :func:`available` tells
without raising. Peers run with ``threads`` threads (ITK's global default) when given.

- :func:`ants_syn`: ``ants.registration(type_of_transform="SyN")`` (affine + SyN, ANTs
  defaults). Inputs may also be :class:`pddreg.data.Image` (their world affines are used, so the
  two images may lie on different grids). The field is read without relying on ANTs' own field
  conventions: images whose values are the fixed grid's voxel coordinates (a linear function of
  the physical position, so linear interpolation is exact) are warped with the forward
  transforms; the result at each fixed voxel is the coordinate it maps to.
- :func:`sitk_bspline`, :func:`sitk_demons`: SimpleITK cubic B-spline (LBFGS2, mean squares)
  and fast symmetric forces demons; one grid for both images.
- :func:`convex_adam`: ConvexAdam with its MIND defaults (3D only, voxels).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "PEERS",
    "ants_syn",
    "available",
    "convex_adam",
    "sitk_bspline",
    "sitk_demons",
]

#: value of the coordinate images outside their box (ANTs' command line takes no NaN)
_OUTSIDE = -1.0e9

#: ITK reads its thread count from this variable (ANTsPy runs ITK in-process).
_ITK_THREADS = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"

_INSTALL = {
    "ants": "ANTsPy (pip install antspyx)",
    "SimpleITK": "SimpleITK (pip install SimpleITK)",
    "convexAdam.convex_adam_MIND": "ConvexAdam (pip install --no-deps convexadam)",
}


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this peer needs {_INSTALL.get(module, module)}, which is not installed ({exc})"
        ) from exc


def available(name: str) -> str | None:
    """None when the peer ``name`` (a key of :data:`PEERS`) can run, else the reason."""
    module = PEERS[name][0]
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError or a broken install
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


@contextlib.contextmanager
def _itk_threads(threads: int | None) -> Iterator[None]:
    """ITK's default thread count set to ``threads`` for the block (None: unchanged)."""
    if threads is None:
        yield
        return
    old = os.environ.get(_ITK_THREADS)
    os.environ[_ITK_THREADS] = str(int(threads))
    sitk = None
    try:
        import SimpleITK as sitk  # noqa: N813

        old_sitk = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    except ImportError:
        pass
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_ITK_THREADS, None)
        else:
            os.environ[_ITK_THREADS] = old
        if sitk is not None:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old_sitk)


def _array(x: Any, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim not in (2, 3):
        raise ValueError(f"'{name}' must be a 2D or 3D image (*S), got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> np.ndarray:
    sp = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.size == 1:
        sp = np.full(ndim, float(sp[0]))
    if sp.size != ndim or not np.all(sp > 0):
        raise ValueError(f"'spacing' must hold {ndim} positive values, got {spacing!r}")
    return sp


# ----------------------------------------------------------------------------- ANTs


def _voxel_to_physical(x: Any, spacing: np.ndarray | None, name: str) -> tuple[np.ndarray, Any]:
    """(array, ``(ndim+1, ndim+1)`` voxel index -> ITK physical (LPS) matrix) of an input."""
    from ..data.io import Image

    if isinstance(x, (str, os.PathLike)):
        from ..data.io import read_image

        x = read_image(os.fspath(x))
    if isinstance(x, Image):
        arr = _array(x.array, name)
        ndim = arr.ndim
        if x.affine is not None and ndim == 3:
            flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # NIfTI RAS world -> ITK LPS
            return arr, flip @ np.asarray(x.affine, dtype=np.float64)
        sp = _spacing(x.spacing or None, ndim)
    else:
        arr = _array(x, name)
        ndim = arr.ndim
        sp = _spacing(spacing, ndim) if spacing is not None else np.ones(ndim)
    matrix = np.eye(ndim + 1)
    matrix[:ndim, :ndim] = np.diag(sp)
    return arr, matrix


def _ants_image(ants: Any, arr: np.ndarray, matrix: np.ndarray) -> Any:
    ndim = arr.ndim
    lin = matrix[:ndim, :ndim]
    sp = np.linalg.norm(lin, axis=0)
    return ants.from_numpy(
        arr,
        origin=tuple(float(v) for v in matrix[:ndim, ndim]),
        spacing=tuple(float(v) for v in sp),
        direction=lin / sp[None, :],
    )


def _corners(shape: Sequence[int], matrix: np.ndarray) -> np.ndarray:
    """Physical positions ``(2**ndim, ndim)`` of the corner voxels of a grid."""
    ndim = len(shape)
    idx = np.stack(np.meshgrid(*[[0.0, n - 1.0] for n in shape], indexing="ij"), axis=-1).reshape(
        -1, ndim
    )
    return idx @ matrix[:ndim, :ndim].T + matrix[:ndim, ndim]


def _coordinate_images(
    ants: Any,
    fixed_shape: Sequence[int],
    fixed_m: np.ndarray,
    moving_shape: Sequence[int],
    moving_m: np.ndarray,
    points: int = 5,
) -> list[Any]:
    """Images (identity direction, covering both grids and one extent around them) whose value
    at physical position ``p`` is the fixed voxel coordinate ``i`` of ``p``, for each axis."""
    ndim = len(fixed_shape)
    corners = np.concatenate([_corners(fixed_shape, fixed_m), _corners(moving_shape, moving_m)])
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    extent = np.maximum(hi - lo, 1.0)
    lo, hi = lo - extent, hi + extent
    step = (hi - lo) / (points - 1)
    axes = [lo[i] + step[i] * np.arange(points) for i in range(ndim)]
    phys = np.stack(np.meshgrid(*axes, indexing="ij"))  # (ndim, P, ..., P)
    inv = np.linalg.inv(fixed_m)
    flat = phys.reshape(ndim, -1)
    index = inv[:ndim, :ndim] @ flat + inv[:ndim, ndim : ndim + 1]  # fixed voxel coordinates
    grid_m = np.eye(ndim + 1)
    grid_m[:ndim, :ndim] = np.diag(step)
    grid_m[:ndim, ndim] = lo
    shape = (points,) * ndim
    return [
        _ants_image(ants, index[i].reshape(shape).astype(np.float32), grid_m) for i in range(ndim)
    ]


def ants_syn(
    fixed: Any,
    moving: Any,
    spacing: float | Sequence[float] | None = None,
    threads: int | None = None,
    type_of_transform: str = "SyN",
    seed: int | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """ANTsPy registration (default ``SyN``: affine initialisation + symmetric normalisation).

    Args:
        fixed, moving: ``(*S)`` NumPy arrays (or tensors) on grids of the given ``spacing`` with
            the same origin (normally one grid), or :class:`pddreg.data.Image` / file paths,
            whose world affines place them (3D; 2D images use their spacing).
        spacing: voxel size per axis in mm for array inputs (default 1).
        threads: ITK threads for the call (None: ITK's default, all cores).
        type_of_transform: any of ``ants.registration``'s (``"SyN"``, ``"Affine"``,
            ``"Translation"``, ``"SyNRA"``, ...).
        seed: ANTs' random seed (``--random-seed``; None: ANTs' default). Results still vary
            a little from run to run with a seed and one thread (fields differ by ~0.3 voxel on
            a small volume; ANTsPy 0.6.3), so ANTs rows are not exactly reproducible.
        **kwargs: passed to ``ants.registration``.

    Returns:
        ``(ndim, *S_fixed)`` float32 displacement in voxels of the fixed grid:
        ``warped(x) = moving_world(x + u(x))`` (``moving(x + u(x))`` on one grid).

    Raises:
        ImportError: ANTsPy is not installed.
    """
    ants = _import("ants")
    f_arr, f_m = _voxel_to_physical(
        fixed, None if spacing is None else np.asarray(spacing), "fixed"
    )
    m_arr, m_m = _voxel_to_physical(
        moving, None if spacing is None else np.asarray(spacing), "moving"
    )
    if f_arr.ndim != m_arr.ndim:
        raise ValueError(f"fixed is {f_arr.ndim}D but moving is {m_arr.ndim}D")
    ndim = f_arr.ndim
    f_img, m_img = _ants_image(ants, f_arr, f_m), _ants_image(ants, m_arr, m_m)
    tmp = tempfile.mkdtemp(prefix="pddreg_ants_")
    config = getattr(ants, "config", None)
    old_seed = getattr(config, "_random_seed", None)
    try:
        if seed is not None and config is not None and hasattr(config, "_random_seed"):
            config._random_seed = int(seed)  # ANTsPy passes it on as --random-seed
        with _itk_threads(threads):
            reg = ants.registration(
                f_img, m_img, type_of_transform=type_of_transform, outprefix=tmp + "/r_", **kwargs
            )
            coords = _coordinate_images(ants, f_arr.shape, f_m, m_arr.shape, m_m)
            mapped = [
                ants.apply_transforms(
                    f_img, c, reg["fwdtransforms"], interpolator="linear", defaultvalue=_OUTSIDE
                ).numpy()
                for c in coords
            ]
    finally:
        if config is not None and hasattr(config, "_random_seed"):
            config._random_seed = old_seed
        shutil.rmtree(tmp, ignore_errors=True)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in f_arr.shape], indexing="ij")
    disp = np.stack([mapped[i] - grid[i] for i in range(ndim)]).astype(np.float32)
    bad = ~np.isfinite(disp) | (np.stack(mapped) <= _OUTSIDE / 2)
    if bad.any():
        logger.warning(
            "ants_syn(): %d field values fell outside the coordinate box; set to 0", bad.sum()
        )
        disp[bad] = 0.0
    return disp


# ----------------------------------------------------------------------------- SimpleITK


def _sitk_image(sitk: Any, arr: np.ndarray, sp: np.ndarray) -> Any:
    img = sitk.GetImageFromArray(arr)  # SimpleITK's x is the array's last axis
    img.SetSpacing(tuple(float(s) for s in sp[::-1]))
    return img


def _sitk_field_to_ours(field: Any, sp: np.ndarray) -> np.ndarray:
    import SimpleITK as sitk  # noqa: N813

    a = sitk.GetArrayFromImage(field)  # array axes as ours, components in x, y, (z) order (mm)
    ndim = a.ndim - 1
    return np.stack([a[..., ndim - 1 - i] / sp[i] for i in range(ndim)]).astype(np.float32)


def sitk_bspline(
    fixed: Any,
    moving: Any,
    spacing: float | Sequence[float] | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """SimpleITK cubic B-spline: mesh 4 per axis refined x2 twice (16 at full resolution),
    shrink 4/2/1 with smoothing 2/1/0, mean squares on a random 20% (2D) / 5% (3D) of the voxels,
    LBFGS2 (50 iterations per level).

    Args:
        fixed, moving: ``(*S)`` images on one grid.
        spacing: voxel size per axis (mm, default 1).
        threads: ITK threads (None: default).

    Returns:
        ``(ndim, *S)`` float32 displacement in voxels, ``warped(x) = moving(x + u(x))``.
    """
    sitk = _import("SimpleITK")
    f_arr, m_arr = _array(fixed, "fixed"), _array(moving, "moving")
    sp = _spacing(spacing, f_arr.ndim)
    with _itk_threads(threads):
        f, m = _sitk_image(sitk, f_arr, sp), _sitk_image(sitk, m_arr, sp)
        ndim = f.GetDimension()
        tx = sitk.BSplineTransformInitializer(f, [4] * ndim, order=3)
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMeanSquares()
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.2 if ndim == 2 else 0.05, seed=0)
        reg.SetOptimizerAsLBFGS2(solutionAccuracy=1e-5, numberOfIterations=50)
        reg.SetInitialTransformAsBSpline(tx, inPlace=True, scaleFactors=[1, 2, 4])
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0])
        reg.SetInterpolator(sitk.sitkLinear)
        out = reg.Execute(f, m)
        field = sitk.TransformToDisplacementField(
            out,
            sitk.sitkVectorFloat64,
            f.GetSize(),
            f.GetOrigin(),
            f.GetSpacing(),
            f.GetDirection(),
        )
    return _sitk_field_to_ours(field, sp)


def sitk_demons(
    fixed: Any,
    moving: Any,
    spacing: float | Sequence[float] | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """SimpleITK fast symmetric forces demons, 3-level pyramid (shrink 4/2/1), 100 iterations
    per level, Gaussian field smoothing sigma 1.5 voxels.

    Args, returns: as :func:`sitk_bspline`.
    """
    sitk = _import("SimpleITK")
    f_arr, m_arr = _array(fixed, "fixed"), _array(moving, "moving")
    sp = _spacing(spacing, f_arr.ndim)
    with _itk_threads(threads):
        f, m = _sitk_image(sitk, f_arr, sp), _sitk_image(sitk, m_arr, sp)
        field = None
        for shrink in (4, 2, 1):
            fs = sitk.Shrink(f, [shrink] * f.GetDimension()) if shrink > 1 else f
            ms = sitk.Shrink(m, [shrink] * m.GetDimension()) if shrink > 1 else m
            demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
            demons.SetNumberOfIterations(100)
            demons.SetSmoothDisplacementField(True)
            demons.SetStandardDeviations(1.5)
            if field is None:
                field = demons.Execute(fs, ms)
            else:
                init = sitk.Resample(
                    field, fs, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID()
                )
                field = demons.Execute(fs, ms, init)
    return _sitk_field_to_ours(field, sp)


# ----------------------------------------------------------------------------- ConvexAdam


def convex_adam(fixed: Any, moving: Any, device: Any = None) -> np.ndarray:
    """ConvexAdam with its MIND defaults (grid 6, search +-4 cells, inverse consistency,
    80 Adam iterations), float32. 3D only, voxels (no spacing).

    Args:
        fixed, moving: ``(*S)`` volumes on one grid.
        device: torch device (default: the CPU).

    Returns:
        ``(3, *S)`` float32 displacement in voxels, ``warped(x) = moving(x + u(x))``.
    """
    import torch

    mod = _import("convexAdam.convex_adam_MIND")
    f_arr, m_arr = _array(fixed, "fixed"), _array(moving, "moving")
    if f_arr.ndim != 3:
        raise ValueError(f"convex_adam(): 3D volumes only, got shape {f_arr.shape}")
    with torch.enable_grad():  # its Adam stage needs autograd
        disp = mod.convex_adam_pt(
            f_arr, m_arr, dtype=torch.float32, device=torch.device(device or "cpu")
        )  # (H, W, D, 3) in voxels, component i along axis i
    disp = disp.detach().cpu().numpy() if isinstance(disp, torch.Tensor) else np.asarray(disp)
    return np.ascontiguousarray(np.moveaxis(disp, -1, 0), dtype=np.float32)


PeerFn = Callable[..., np.ndarray]

#: name -> (module it needs, function, dimensions it supports)
PEERS: dict[str, tuple[str, PeerFn, tuple[int, ...]]] = {
    "ants-syn": ("ants", ants_syn, (2, 3)),
    "sitk-bspline": ("SimpleITK", sitk_bspline, (2, 3)),
    "sitk-demons": ("SimpleITK", sitk_demons, (2, 3)),
    "convexadam": ("convexAdam.convex_adam_MIND", convex_adam, (3,)),
}
