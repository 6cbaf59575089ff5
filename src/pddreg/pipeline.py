"""The steps of one registration of real scans, between the readers and the methods.

::

    fixed (S_f, A_f), moving (S_m, A_m)        index-to-world matrices (pddreg.spatial.world)
      M = inv(A_m) A_f                           fixed voxel -> moving voxel (identity: one grid)
      global stage (pddreg.align)                G: fixed voxel -> moving voxel (M when off)
      working grid W over the fixed extent       isotropic, bounded size; T: W voxel -> fixed voxel
      fixed_w(k)  = fixed(T k)                   anti-aliased
      moving_w(k) = moving(G T k)                anti-aliased, straight from the moving grid
      u_w = deformable(fixed_w, moving_w, masks) working voxels: warped_w(k) = moving_w(k + u_w(k))
      u_f = resize_field(u_w, S_f)               fixed voxels
      d(x) = A (x + u_f(x)) - x,  A = inv(M) G   so that warped(x) = moving(M (x + d(x)))

``d`` is the field every output is made from (``disp.npy``: fixed voxels, in the frame of
``moving_world``; see :mod:`pddreg.spatial.world`). Masks (fixed on the fixed grid, moving on the
moving grid) reach the global and the deformable stage; the moving image's domain always counts
as part of the moving mask, so a cropped field of view does not pull the similarity, and the
deformable stage leaves out a margin along both domains' edges (:data:`DOMAIN_MARGIN`), whose
features come from padding.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import InputError

__all__ = [
    "AFFINE_MODES",
    "DeformableFn",
    "PipelineResult",
    "inside_domain",
    "outside_value",
    "resample",
    "run",
    "work_budget",
]

logger = logging.getLogger(__name__)

AFFINE_MODES = ("auto", "rigid", "affine", "projective", "translation", "off")

#: ``(fixed_w, moving_w, fixed_mask_w, moving_mask_w) -> u_w``: images ``(1, 1, *W)`` in
#: [0, 1], masks ``(1, 1, *W)`` in [0, 1] or None, field ``(1, ndim, *W)`` in working voxels.
DeformableFn = Callable[[Tensor, Tensor, Tensor | None, Tensor | None], Tensor]

#: Largest working grid per dimension: 2D 512x512 pixels; 3D the Learn2Reg AbdomenCTCT grid
#: (192x160x256), whose registration by ``mind`` takes about 5 s on two cores.
MAX_WORK_VOXELS = {2: 512 * 512, 3: 192 * 160 * 256}
#: The working grid holds at most this many times the fixed image's voxels: thick slices are
#: interpolated to isotropic voxels, but not far beyond the information the image carries.
WORK_GROWTH = 1.5
#: Below this fraction of fixed voxels mapped into the moving grid the images do not overlap.
MIN_OVERLAP = 0.01
#: The deformable stage's similarity leaves out this many working voxels (2D, 3D) along the
#: edges of both images' domains (at most an eighth of an axis): the features there are made
#: from padding (replicated edge values), and where anatomy is cut by the field of view (a CT
#: ending in z, a view zoomed out, a large shift) they pulled the field by 2-4 voxels along the
#: edge; the field there now follows its regulariser from the inside. Measured
#: (``benchmarks/bench_capture.py``): 3D chest CT scaled by 1.15, mean EPE 0.99 -> 0.45; the
#: default within 0.5 voxel of the aligned case on 12 of 12 groups (9 before); ``mind`` on
#: ``benchmarks/real.py``'s known fields 1.57 -> 1.16. The features run at half resolution, so
#: their footprint is about 6 working voxels: 5 measured better than 3 in 2D and on cut anatomy
#: in 3D (tests/test_world.py: 0.40 against 0.51 with 4 and 0.64 with 3); 3 was slightly better
#: on real.py's 3D cases (by 0.02-0.1 voxel).
DOMAIN_MARGIN = {2: 5, 3: 5}


def work_budget(shape: Sequence[int]) -> int:
    """The working grid's voxel budget for a fixed image of ``shape``."""
    ndim = len(shape)
    cap = MAX_WORK_VOXELS.get(ndim, MAX_WORK_VOXELS[3])
    return int(min(cap, max(WORK_GROWTH * math.prod(shape), 16**ndim)))


@dataclass
class PipelineResult:
    """What :func:`run` returns.

    Attributes:
        disp: ``(1, ndim, *S_f)`` fixed voxels: ``warped(x) = moving(M (x + disp(x)))``.
        grid_map: ``M`` (fixed voxel -> moving voxel by the headers), ``(ndim + 1, ndim + 1)``.
        total_map: ``G``, the global stage's map (``M`` when it did not run).
        affine: ``A = inv(M) G`` in fixed voxels (the global stage in the frame of
            ``moving_world``), or None when it did not run.
        align: the global stage's result (:class:`pddreg.align.AlignResult`) or None.
        work_shape, work_spacing: the working grid and its voxel size (mm).
        timings: seconds per stage.
    """

    disp: Tensor
    grid_map: np.ndarray
    total_map: np.ndarray
    affine: np.ndarray | None
    align: Any | None
    work_shape: tuple[int, ...]
    work_spacing: tuple[float, ...]
    timings: dict[str, float] = field(default_factory=dict)


def inside_domain(
    coords: Tensor, shape: Sequence[int], margin: Sequence[float] | None = None
) -> Tensor:
    """``(B, 1, *T)`` float: 1 where coordinates ``(B, ndim, *T)`` lie within the voxels of a
    grid of ``shape`` (``[-0.5, S - 0.5]`` per axis), else 0; with ``margin`` (voxels per axis)
    the domain shrinks by that much on each side (by at most an eighth of the axis)."""
    ok = None
    for i, size in enumerate(shape):
        c = coords[:, i]
        m = 0.0 if margin is None else min(float(margin[i]), size / 8.0)
        axis_ok = (c >= m - 0.5) & (c <= size - 0.5 - m)
        ok = axis_ok if ok is None else ok & axis_ok
    assert ok is not None
    return ok.unsqueeze(1).to(coords.dtype)


def outside_value(samples: Tensor, coords: Tensor, shape: Sequence[int], value: float) -> Tensor:
    """``samples`` ``(B, C, *T)`` taken at ``coords`` ``(B, ndim, *T)`` with ``value`` where the
    coordinates leave a grid of ``shape`` (:func:`inside_domain`)."""
    inside = inside_domain(coords, shape)
    return samples * inside + (1.0 - inside) * value


def resample(
    image: Tensor,
    coords: Tensor,
    pitch: Sequence[float] | None = None,
    padding: str = "border",
) -> Tensor:
    """Sample ``image`` ``(1, C, *S)`` at voxel coordinates ``(1, ndim, *T)``, anti-aliased for
    samples ``pitch`` voxels apart along each axis of ``image`` (None or <= 1: plain linear).

    Anti-aliasing: an integer box pooling by ``floor(pitch)`` per axis first (cheap on large
    volumes), then a Gaussian of ``0.5 * sqrt(r^2 - 1)`` pooled voxels for the remaining
    factor ``r``; the coordinates follow the pooled grid (pooled voxel ``j`` is the mean of
    voxels ``j k .. j k + k - 1``, centred at ``j k + (k - 1) / 2``).
    """
    import torch.nn.functional as F

    from .spatial import sample
    from .spatial.filter import gaussian_smooth

    ndim = image.dim() - 2
    if pitch is not None:
        k = [max(1, int(math.floor(p + 1e-6))) for p in pitch]
        if any(v > 1 for v in k):
            pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[ndim - 1]
            image = pool(image, kernel_size=k, stride=k, ceil_mode=True, count_include_pad=False)
            kt = torch.tensor(k, dtype=coords.dtype, device=coords.device).view(
                1, ndim, *[1] * ndim
            )
            coords = (coords - (kt - 1) / 2) / kt
        rest = [p / kk for p, kk in zip(pitch, k, strict=True)]
        sigma = [0.5 * math.sqrt(r * r - 1.0) if r > 1.05 else 0.0 for r in rest]
        if any(v > 0 for v in sigma):
            image = gaussian_smooth(image, sigma)
    return sample(
        image,
        coords.to(image.dtype) if image.is_floating_point() else coords,
        mode="linear",
        padding=padding,
    )


def _is_identity(m: np.ndarray, tol: float = 1e-6) -> bool:
    return bool(np.allclose(m, np.eye(m.shape[0]), atol=tol, rtol=0.0))


def run(
    fixed: Tensor,
    moving: Tensor,
    grid_map: np.ndarray,
    fixed_spacing: Sequence[float],
    moving_spacing: Sequence[float],
    deformable: DeformableFn | None,
    *,
    affine: str = "auto",
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
    names: tuple[str, str] = ("fixed", "moving"),
    max_voxels: int | None = None,
) -> PipelineResult:
    """Global stage, working grid and deformable stage of one registration.

    Args:
        fixed: ``(1, 1, *S_f)`` float, intensities normalised to [0, 1].
        moving: ``(1, 1, *S_m)`` float in [0, 1] on its own grid.
        grid_map: ``M`` ``(ndim + 1, ndim + 1)``: fixed voxel -> moving voxel (world alignment of
            the headers, or the identity for images on one index grid).
        fixed_spacing, moving_spacing: voxel sizes in mm.
        deformable: the method's deformable stage (:data:`DeformableFn`) or None (``none``).
        affine: the global stage: ``"auto"``, ``"rigid"``, ``"affine"``, ``"translation"`` or
            ``"off"`` (:func:`pddreg.align.align`).
        fixed_mask: ``(1, 1, *S_f)`` or None; moving_mask: ``(1, 1, *S_m)`` or None (values in
            [0, 1]; only voxels inside count in the similarity).
        names: file names for the error messages.
        max_voxels: working grid budget (None: :func:`work_budget`).

    Returns:
        :class:`PipelineResult`.

    Raises:
        InputError: the images do not overlap in world space (and no global stage could
            align them).
    """
    from .spatial import apply_matrix, map_coords, resize_field, working_grid, working_to_fixed
    from .spatial.world import overlap_fraction

    if affine not in AFFINE_MODES:
        raise InputError(f"--affine: expected one of {', '.join(AFFINE_MODES)}, got {affine!r}")
    ndim = fixed.dim() - 2
    shape_f = tuple(int(s) for s in fixed.shape[2:])
    shape_m = tuple(int(s) for s in moving.shape[2:])
    dev = fixed.device
    timings: dict[str, float] = {}
    m_map = np.asarray(grid_map, dtype=np.float64)
    overlap = overlap_fraction(m_map, shape_f, shape_m)
    if deformable is None:
        affine = "off"
    if overlap < MIN_OVERLAP and affine == "off":
        raise InputError(
            f"{names[1]}: does not overlap the fixed image {names[0]} in world space (by their "
            "headers); use a global stage (--affine auto) to align their centres, or "
            "--same-grid if the arrays are already aligned"
        )
    if overlap < MIN_OVERLAP:
        logger.warning(
            "%s and %s do not overlap in world space (different scanners or patients?): the "
            "global stage starts from their centres",
            names[0],
            names[1],
        )

    align_result = None
    total = m_map
    if affine != "off":
        from .align import align as global_align

        t0 = time.perf_counter()
        init = torch.as_tensor(m_map, dtype=torch.float64)
        align_result = global_align(
            fixed,
            moving,
            init=init,
            fixed_spacing=tuple(fixed_spacing),
            moving_spacing=tuple(moving_spacing),
            mode=affine,
            fixed_mask=fixed_mask,
            moving_mask=moving_mask,
        )
        total = np.asarray(align_result.matrix, dtype=np.float64)
        timings["global"] = time.perf_counter() - t0
        logger.info(
            "global stage (%s -> %s): %.3f s, similarity %.4f -> %.4f",
            affine,
            align_result.mode,
            timings["global"],
            float(align_result.similarity_before),
            float(align_result.similarity_after),
        )
        if overlap_fraction(total, shape_f, shape_m) < MIN_OVERLAP:
            raise InputError(
                f"{names[1]}: does not overlap the fixed image {names[0]}, even after the "
                "global stage (are these images of the same body part?)"
            )
    a_index = np.linalg.solve(m_map, total)  # inv(M) G

    budget = max_voxels or work_budget(shape_f)
    work_shape, work_spacing = working_grid(shape_f, fixed_spacing, budget)
    if deformable is None:
        disp = map_coords(a_index, shape_f, device=dev) - map_coords(
            np.eye(ndim + 1), shape_f, device=dev
        )
        return PipelineResult(disp, m_map, total, None, None, work_shape, work_spacing, timings)

    t0 = time.perf_counter()
    to_fixed = working_to_fixed(work_shape, shape_f)
    same = work_shape == shape_f and shape_m == shape_f and _is_identity(total)
    # the domains, less DOMAIN_MARGIN working voxels (in mm, then in each grid's voxels)
    margin_mm = DOMAIN_MARGIN[ndim] * float(max(work_spacing))
    grid_w = map_coords(np.eye(ndim + 1), work_shape, device=dev)  # working voxels
    if same:
        fixed_w, moving_w = fixed, moving
        coords_m = grid_w
        fmask_w = fixed_mask
        user_m = None if moving_mask is None else moving_mask.to(fixed.dtype)
    else:
        coords_f = map_coords(to_fixed, work_shape, device=dev)  # working -> fixed voxels
        pitch_f = [w / f for w, f in zip(work_spacing, fixed_spacing, strict=True)]
        fixed_w = resample(fixed, coords_f, pitch_f)
        coords_m = apply_matrix(torch.as_tensor(total), coords_f)
        moving_w = resample(moving, coords_m, _moving_pitch(total @ to_fixed))
        fmask_w = None
        if fixed_mask is not None:
            fmask_w = resample(fixed_mask.to(fixed.dtype), coords_f, padding="zeros").clamp(0, 1)
        user_m = None
        if moving_mask is not None:
            user_m = resample(moving_mask.to(fixed.dtype), coords_m, padding="zeros")
    mmask_w = inside_domain(coords_m, shape_m, [margin_mm / s for s in moving_spacing])
    if user_m is not None:
        mmask_w = mmask_w * user_m
    edge = inside_domain(grid_w, work_shape, [margin_mm / s for s in work_spacing]).to(fixed.dtype)
    fmask_w = edge if fmask_w is None else fmask_w * edge
    timings["resample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    u_w = deformable(fixed_w, moving_w, fmask_w, mmask_w)
    timings["deformable"] = time.perf_counter() - t0
    if tuple(u_w.shape) != (1, ndim, *work_shape):
        raise ValueError(
            f"pipeline: the deformable stage returned a field of shape {tuple(u_w.shape)}, "
            f"expected {(1, ndim, *work_shape)}"
        )
    u_f = resize_field(u_w.to(torch.float32), shape_f) if work_shape != shape_f else u_w
    if _is_identity(a_index):
        disp = u_f
    else:
        x = map_coords(np.eye(ndim + 1), shape_f, device=dev)
        disp = apply_matrix(torch.as_tensor(a_index), x + u_f) - x
    return PipelineResult(
        disp,
        m_map,
        total,
        a_index if align_result is not None else None,
        align_result,
        work_shape,
        work_spacing,
        timings,
    )


def _moving_pitch(matrix: np.ndarray) -> list[float]:
    """For a map from working voxels to moving voxels, the distance in moving voxels between
    neighbouring working samples, per MOVING axis (the largest over the working axes)."""
    n = matrix.shape[0] - 1
    lin = np.abs(matrix[:n, :n])  # rows: moving axes, columns: working axes
    return [float(v) for v in lin.max(axis=1)]
