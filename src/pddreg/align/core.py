"""Global alignment: translation, rigid or affine, robust to large motion and to contrast.

Pipeline (one dimension-generic path for 2D and 3D):

1. Both images are area-downsampled on their own grids to about the same millimetre spacings
   (:mod:`._pyramid`); the search level has about ``search_size`` voxels along the fixed
   image's longest physical extent, each finer level half its spacing (2D has one coarser,
   refinement-only level). Every level is slightly blurred (half its spacing).
2. Coarse exhaustive search (:mod:`._search`): for every rotation of a set (2D: an angle range;
   3D: a lattice of rotation vectors inside a ball), then for isotropic scales around the best
   rotations, all translations at once by FFT-based masked SSD of MIND-SSC features, around
   the initial map and the map that aligns the foreground centres of mass (two scans with
   unrelated world origins need the latter).
3. The search candidates, the initial map and the centre-aligned map are ranked by their
   cost; the best few get a few Levenberg-Marquardt steps (:mod:`._refine`) with the coarse
   model (similarity, or rigid / translation) on the coarsest level; the best of these are
   refined up to the search level (then with the final model) and one level finer, where the
   best is chosen and refined on the remaining levels.
4. ``mode="auto"`` uses the affine model and keeps the result only when it lowers the
   similarity against the initial map by a margin and moves the points by at least a voxel of
   the finest level; otherwise the initial map is returned (``"identity"``).

The transform is parametrised in the fixed image's physical frame (mm) about the fixed
foreground's centre of mass, so rigid means rigid in mm for anisotropic voxels; the result is
the full index map ``init @ inv(S_f) @ T @ S_f`` (fixed voxel index -> moving voxel index).
The similarity is the mean squared difference of MIND-SSC descriptors (per channel; lower is
better), which is robust to contrast changes, including non-monotonic ones.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ._geometry import about, apply_h, decompose, diag_h, translation_h
from ._pyramid import build_pyramid, centre_of_mass, foreground, gaussian_blur
from ._refine import LevelProblem, evaluate, make_problem, refine
from ._search import rotation_set, search

__all__ = ["AlignConfig", "AlignResult", "align"]

logger = logging.getLogger(__name__)

_MODES = ("translation", "rigid", "affine", "projective", "auto")


@dataclass
class AlignConfig:
    """Settings of :func:`align`. Dicts are keyed by the number of spatial dimensions; the
    defaults were chosen on known-answer cases made from real 2D and 3D images
    (``benchmarks/bench_align.py``).

    Pyramid (levels in mm, each image area-downsampled on its own grid):
        search_size: voxels along the fixed image's longest physical extent at the search
            level (2D 64, 3D 20; at least 24 on 3D grids whose longest axis has fewer than
            96 voxels, ``small_grid``). Against 24 at 91x109x91 the search
            level is 15x18x15 voxels instead of 22x27x22 and its FFTs 30x32x30 instead of
            40x48x40: search 0.5 -> 0.2 s of the stage's 0.8-1.0 s, at equal capture
            (``benchmarks/bench_capture.py``) and equal or lower EPE (``benchmarks/real.py``).
            On small grids the integer block factors round that level down to about 16
            voxels, which lost a 32^3 volume turned by 10 degrees and a 40x40x20 one of
            1 x 1 x 3 mm (0.79 voxel, 0.95 mm against 0.7).
        small_grid: per dimension ``(voxels, size)``: grids whose longest axis has fewer
            than ``voxels`` voxels search at no fewer than ``size`` (see ``search_size``).
        coarser: refinement-only levels coarser than the search level (2D 1, 3D 0).
        levels: the search level and the finer ones, each halving the spacing (2D 3, 3D 2: a
            third 3D level cost half the time for 0.02 voxel of a rotated, shifted brain MR
            volume, which the deformable stage refines anyway); levels that would not be
            coarser than the image are dropped. An int applies to both.
        blur: Gaussian blur of both images per level, sigma as a fraction of the level
            spacing, (levels up to the search level, finer levels): wider basins, less noise.
    Search (rotations x translations by FFT, MIND-SSC features):
        rotation_range_deg, rotation_step_deg: 2D angles ``-range..range``; 3D rotation
            vectors on a cubic lattice of ``step`` inside a ball of radius ``range``
            (2D 45 / 5 degrees: 19 angles; 3D 35 / 11.7 degrees: 93 rotations. With 17.5
            degrees (33 rotations) the nearest lattice rotation of a remapped abdominal volume
            turned by 30 degrees about an oblique axis, shifted by 25 % and scaled by 1.15 was
            14 degrees off and its search lost it: 10 voxels of global error against 1.4, for
            0.2 s more per call; a lattice of 35 / 3 degrees (123 rotations, reaching 35 along
            the axes) lost another remapped abdominal case, -20 degrees + 15 % + 0.9: 7.3).
        translation_range: translations searched on either side of the base map, as a
            fraction of the fixed field of view (the initial map and the map aligning the
            foreground centres of mass are both covered).
        merge_windows: one search window covers both base maps when they are at most this
            many translation ranges apart along every axis (cheaper than two windows).
        min_overlap: translations whose overlap covers less than this fraction of the fixed
            (masked) voxels are rejected.
        scales, scale_rotations: second search stage for the similarity/affine models: these
            isotropic scales around the best ``scale_rotations`` rotations (2D 6, 3D 8: with 2
            and 4 a remapped brain slice scaled by 1.15 and a remapped abdominal volume turned
            by 20 degrees, shifted and scaled by 0.9 kept a wrong rotation, whose unscaled
            match had ranked higher; ``benchmarks/bench_capture.py``).
        keep: search candidates kept (besides the initial and the centre-aligned map).
        search_mind_radius: MIND-SSC patch radius of the search features (2D 1, 3D 0).
        search_channels: the search features are projected onto this many principal
            components of the fixed features (fewer FFTs; None: all).
    Refinement (Levenberg-Marquardt on pointwise MIND-SSC, see :mod:`._refine`):
        dilation: MIND-SSC neighbour distance in level voxels.
        max_points: fixed points per level (a fixed random subset of the masked voxels),
            (levels up to the search level, finer levels).
        coarse_model: model of the coarse levels for ``"affine"``/``"auto"`` (``"similarity"``:
            rigid plus isotropic scale); ``"rigid"`` and ``"translation"`` use their own.
        final_from: first level refined with the final model (0: the coarsest).
        screened: starts (after ranking all by their cost) refined at the coarsest level for
            ``coarse_iterations`` steps (2D 4, 3D 6); ``finalists``: the best of these refined
            up to the search level and one level finer, where the best is chosen (2D 2, 3D 3;
            coarse levels of remapped CT can prefer a wrong pose).
        iterations, mid_iterations: steps at the search and finest levels / at levels in
            between.
        method: Jacobian of the Gauss-Newton steps, ``"esm"`` (fixed and moving descriptor
            gradients) or ``"ic"`` (fixed gradients only: faster, less precise across
            contrasts); ``screen_method``: the same for the screening steps.
        rtol: a level stops when the predicted decrease of its cost is below this fraction
            (levels before the finest, the finest).
    Projective (2D: photographs under a change of viewpoint, a homography):
        projective: per dimension, whether ``auto`` tries a homography after the affine map
            (2D True, 3D False): the affine result refined from the search level to the finest
            with the perspective row free (inverse-compositional steps) ...
        tilts, tilt_rotations: the homography also starts from a second search, with the
            best ``tilt_rotations`` linear maps of the first tilted by these amounts (the
            image edges scaled by ``1 -+ t``) along each axis and diagonal.
        projective_margin: ... and kept where its finest-level cost is below ``(1 -
            projective_margin)`` times the affine one. On ``benchmarks/bench_viewpoint.py``
            (six real photographs under tilts whose corners move 5-20 % of the width) the
            homography was kept and ended the default registration within 0.6 px mean EPE in
            24 of 24 cases (affine only: 0.25-35 px; without the tilted search 21 of 24: it
            lost the strongest tilts); on the 2D known-answer cases of ``benchmarks/real.py``
            and the 60 2D cases of ``benchmarks/bench_capture.py`` (smooth fields and affine
            maps) it was never kept. A margin of 0.03 kept it on some of those and moved their
            EPE by -0.09..+0.55 px.
    Auto:
        margin, margin_abs: ``auto`` keeps the affine result only when its similarity is below
            ``(1 - margin) * before`` and ``before - margin_abs`` (a margin of 0.02 kept affine
            maps that gained 2-8 % on smooth deformations of real.py's known cases, and the
            deformable stage then lost the borders the map moved out of view: Middlebury
            Urban2 0.21 -> 0.98 px, 3D chest CT 0.41 -> 0.46 voxels) ...
        far_motion, far_margin: a map that moves the fixed points by at least ``far_motion``
            of the finest level's longest axis on average (the deformable stage's capture
            range, ``pddreg.optim.mindreg.CAPTURE_FRACTION``) needs only ``far_margin``: on
            ``bench_capture.py`` a remapped 2D chest CT shifted by 25 % gained 6.9 % with the
            right map (0.27 of the axis; EPE 7.9 voxels without it, 0.66 with it), while the
            maps fitted to real.py's smooth known fields (gains up to 9.4 %, left to the
            deformable stage) moved the points by at most 0.045 of the axis, and the misaligned
            capture cases by 0.06 (scalings, gains of 16-66 %) to 0.32.
        min_motion: ... and when it moves the fixed points by at least this many voxels of
            the finest level on average (smaller motions are left to the deformable stage).
    Finalists:
        same_pose: finalists that map the fixed points of the next finer level within this
            many of its voxels (mean) of a better one are the same pose: only the better one
            is refined there (3D: their refinement on the finer level was a third of the
            stage).
        seed: seed of the point subsets (results are deterministic).
        threads: PyTorch intra-op threads during the call (restored afterwards; None: leave
            the setting alone). The stage runs many small ops: on a machine with more runnable
            processes than cores, every parallel region waits for a descheduled thread, and 2
            threads were 15-35x slower than 1 here (load 3-5 on 2 cores).
    """

    search_size: dict[int, int] = field(default_factory=lambda: {2: 64, 3: 20})
    small_grid: dict[int, tuple[int, int]] = field(default_factory=lambda: {3: (96, 24)})
    coarser: dict[int, int] = field(default_factory=lambda: {2: 1, 3: 0})
    levels: dict[int, int] = field(default_factory=lambda: {2: 3, 3: 2})
    blur: dict[int, tuple[float, float]] = field(
        default_factory=lambda: {2: (0.5, 0.5), 3: (0.5, 0.5)}
    )
    rotation_range_deg: dict[int, float] = field(default_factory=lambda: {2: 45.0, 3: 35.0})
    rotation_step_deg: dict[int, float] = field(default_factory=lambda: {2: 5.0, 3: 11.7})
    translation_range: float = 0.35
    merge_windows: float = 0.5
    min_overlap: float = 0.25
    scales: tuple[float, ...] = (0.87, 0.93, 1.07, 1.15)
    scale_rotations: dict[int, int] = field(default_factory=lambda: {2: 6, 3: 8})
    keep: int = 4
    search_mind_radius: dict[int, int] = field(default_factory=lambda: {2: 1, 3: 0})
    search_channels: int | None = 6
    dilation: int = 2
    max_points: dict[int, tuple[int, int]] = field(
        default_factory=lambda: {2: (2000, 8000), 3: (2500, 10000)}
    )
    coarse_model: str = "similarity"
    final_from: int = 0
    screened: dict[int, int] = field(default_factory=lambda: {2: 4, 3: 6})
    coarse_iterations: int = 8
    finalists: dict[int, int] = field(default_factory=lambda: {2: 2, 3: 3})
    iterations: int = 30
    mid_iterations: int = 10
    method: str = "esm"
    screen_method: str = "esm"
    rtol: tuple[float, float] = (1e-3, 1e-5)
    projective: dict[int, bool] = field(default_factory=lambda: {2: True, 3: False})
    projective_margin: float = 0.25
    tilts: tuple[float, ...] = (0.2, 0.4)
    tilt_rotations: int = 3
    margin: float = 0.10
    far_motion: float = 0.15
    far_margin: float = 0.05
    margin_abs: float = 1e-4
    min_motion: float = 1.0
    same_pose: float = 0.5
    seed: int = 0
    threads: int | None = None


def _distinct_linears(cands: list, ndim: int) -> list[Tensor]:
    """The linear parts of the candidates (their bases are translations), best first, each
    once."""
    out: list[Tensor] = []
    for c in cands:
        lin = c.transform[:ndim, :ndim]
        if not any(torch.allclose(lin, o, atol=1e-9) for o in out):
            out.append(lin)
    return out


def _tilt_rows(ndim: int, half: Sequence[float], tilts: Sequence[float]) -> list[Tensor]:
    """Perspective rows ``v`` (per mm) of tilts about the centre: ``1 + v . (p - c)`` reaches
    ``1 +- t`` at the edge of the field of view (``half``: half extents in mm), along each
    axis and each diagonal, for every ``t`` of ``tilts``."""
    out = []
    for t in tilts:
        for signs in itertools.product((-1.0, 0.0, 1.0), repeat=ndim):
            if any(signs):
                norm = math.sqrt(sum(abs(x) for x in signs))
                v = [x * t / (norm * h) for x, h in zip(signs, half, strict=True)]
                out.append(torch.tensor(v, dtype=torch.float64))
    return out


def _per_dim(value: int | dict[int, int], ndim: int) -> int:
    return int(value[ndim]) if isinstance(value, dict) else int(value)


@dataclass
class AlignResult:
    """Result of :func:`align`.

    Attributes:
        matrix: ``(ndim+1, ndim+1)`` float64 CPU, the full map fixed voxel index -> moving voxel
            index (``init`` included).
        mode: the model used: ``"identity"`` (auto kept the initial map), ``"translation"``,
            ``"rigid"`` or ``"affine"``.
        similarity_before, similarity_after: mean squared MIND-SSC difference (per channel)
            over the fixed (masked) points of the finest level for the initial map and for the
            result; fixed points mapped outside the moving image or mask count as an unrelated
            pair. Lower is better.
        parameters: the correction ``T`` in the fixed physical frame (mm) about ``centre_mm``:
            ``translation_mm``, ``rotation_deg`` (2D: angle; 3D: rotation vector),
            ``rotation_angle_deg``, ``scales``, ``shear``, ``centre_mm``, ``matrix_mm``.
        runtime_s: wall time of the call.
    """

    matrix: Tensor
    mode: str
    similarity_before: float
    similarity_after: float
    parameters: dict
    runtime_s: float


def _check(
    fixed: Tensor,
    moving: Tensor,
    init: Tensor | None,
    fixed_spacing: Sequence[float] | None,
    moving_spacing: Sequence[float] | None,
    mode: str,
    fixed_mask: Tensor | None,
    moving_mask: Tensor | None,
) -> int:
    fn = "align()"
    for name, x in (("fixed", fixed), ("moving", moving)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{fn}: '{name}' must be a torch.Tensor of shape (1, 1, *S)")
        if x.dim() not in (4, 5) or x.shape[0] != 1 or x.shape[1] != 1:
            raise ValueError(
                f"{fn}: '{name}' must have shape (1, 1, *S) with 2 or 3 spatial dims, "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{fn}: '{name}' must be floating point, got {x.dtype}")
        if min(x.shape[2:]) < 2:
            raise ValueError(
                f"{fn}: '{name}' needs at least 2 voxels per axis, got {tuple(x.shape)}"
            )
    ndim = fixed.dim() - 2
    if moving.dim() != fixed.dim():
        raise ValueError(
            f"{fn}: 'moving' must have shape (1, 1, *Sm) with {ndim} spatial dims like 'fixed', "
            f"got {tuple(moving.shape)}"
        )
    if init is not None:
        if not isinstance(init, Tensor) or tuple(init.shape) != (ndim + 1, ndim + 1):
            shape = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
            raise ValueError(f"{fn}: 'init' must have shape ({ndim + 1}, {ndim + 1}), got {shape}")
        if not torch.isfinite(init).all() or abs(float(torch.det(init.double()))) < 1e-12:
            raise ValueError(
                f"{fn}: 'init' must be a finite invertible ({ndim + 1}, {ndim + 1}) matrix"
            )
    for name, sp in (("fixed_spacing", fixed_spacing), ("moving_spacing", moving_spacing)):
        if sp is not None:
            vals = list(sp)
            if len(vals) != ndim or not all(float(v) > 0 and math.isfinite(float(v)) for v in vals):
                raise ValueError(
                    f"{fn}: '{name}' must hold {ndim} positive spacings (mm), got {sp!r}"
                )
    if mode not in _MODES:
        raise ValueError(f"{fn}: 'mode' must be one of {_MODES}, got {mode!r}")
    for name, msk, ref in (("fixed_mask", fixed_mask, fixed), ("moving_mask", moving_mask, moving)):
        if msk is not None:
            if not isinstance(msk, Tensor) or tuple(msk.shape) != tuple(ref.shape):
                shape = tuple(msk.shape) if isinstance(msk, Tensor) else type(msk).__name__
                raise ValueError(
                    f"{fn}: '{name}' must have shape {tuple(ref.shape)} (1, 1, *S) like its image, "
                    f"got {shape}"
                )
    return ndim


def _distinct(
    finals: list[tuple[Tensor, float]], problem: LevelProblem, tol: float
) -> list[tuple[Tensor, float]]:
    """``finals`` (transform, cost), best first, less those that map ``problem``'s fixed points
    within ``tol`` voxels of its level (mean distance) of a better one."""
    pts = problem.points.double()
    step = torch.tensor(problem.spacing, dtype=torch.float64, device=pts.device)
    kept: list[tuple[Tensor, float, Tensor]] = []
    for t, c in sorted(finals, key=lambda tc: tc[1]):
        moved = apply_h(t, pts)
        if all(float(((moved - q) / step).norm(dim=1).mean()) > tol for _, _, q in kept):
            kept.append((t, c, moved))
    return [(t, c) for t, c, _ in kept]


def _mask(m: Tensor | None, like: Tensor) -> Tensor | None:
    if m is None:
        return None
    return (m.to(like.device) > 0.5).to(like.dtype) if m.dtype != torch.bool else m.to(like)


def align(
    fixed: Tensor,
    moving: Tensor,
    init: Tensor | None = None,
    fixed_spacing: Sequence[float] | None = None,
    moving_spacing: Sequence[float] | None = None,
    mode: str = "auto",
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
    config: AlignConfig | None = None,
) -> AlignResult:
    """Find the translation, rigid or affine map that aligns ``moving`` to ``fixed``.

    Args:
        fixed: ``(1, 1, *S)`` float, intensities normalised to [0, 1]; 2D or 3D.
        moving: ``(1, 1, *Sm)`` float [0, 1] on its own grid (``Sm`` may differ from ``S``).
        init: ``(ndim+1, ndim+1)`` homogeneous map fixed voxel index -> moving voxel index (e.g.
            the world alignment ``inv(A_m) @ A_f``); None: identity.
        fixed_spacing, moving_spacing: mm per array axis (None: 1).
        mode: ``"translation"``, ``"rigid"``, ``"affine"`` or ``"auto"`` (affine, kept only
            when it beats the initial map by a margin).
        fixed_mask: ``(1, 1, *S)`` bool/float: only these fixed voxels count.
        moving_mask: ``(1, 1, *Sm)``: mapped points must fall inside it (and inside the moving
            image).
        config: :class:`AlignConfig` (None: defaults).

    Returns:
        :class:`AlignResult`; ``matrix`` maps fixed voxel indices to moving voxel indices:
        ``moving_index = matrix @ [fixed_index, 1]``, so ``warped(x) = moving(matrix x)``.

    Convention: array axis order (axis 0 first), voxel centres at integer indices, as in
    :mod:`pddreg.spatial`; device and dtype follow ``fixed``.
    """
    t0 = time.perf_counter()
    ndim = _check(fixed, moving, init, fixed_spacing, moving_spacing, mode, fixed_mask, moving_mask)
    cfg = config or AlignConfig()
    if cfg.coarse_model not in ("translation", "rigid", "similarity", "affine"):
        raise ValueError(f"align(): unknown coarse_model {cfg.coarse_model!r}")
    if cfg.method not in ("esm", "ic", "fc") or cfg.screen_method not in ("esm", "ic", "fc"):
        raise ValueError("align(): method and screen_method must be 'esm', 'ic' or 'fc'")
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    try:
        return _align(
            fixed,
            moving,
            init,
            fixed_spacing,
            moving_spacing,
            mode,
            fixed_mask,
            moving_mask,
            cfg,
            ndim,
            t0,
        )
    finally:
        if cfg.threads is not None:
            torch.set_num_threads(threads)


def _map(fn: Callable[[Any], Any], items: Sequence[Any], device: torch.device) -> list[Any]:
    """``[fn(x) for x in items]``; on the CPU with two or more intra-op threads, the items run
    on that many Python threads with one intra-op thread each (the refinements are chains of
    small ops, too small for PyTorch's own threads: on 2 cores the stage took as long with 2
    threads as with 1). Each item's result is what it gives alone, up to the summation order
    of PyTorch's reductions."""
    threads = torch.get_num_threads()
    workers = min(threads, len(items))
    if device.type != "cpu" or workers < 2:
        return [fn(x) for x in items]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, "pddreg-align") as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)


def _align(
    fixed: Tensor,
    moving: Tensor,
    init: Tensor | None,
    fixed_spacing: Sequence[float] | None,
    moving_spacing: Sequence[float] | None,
    mode: str,
    fixed_mask: Tensor | None,
    moving_mask: Tensor | None,
    cfg: AlignConfig,
    ndim: int,
    t0: float,
) -> AlignResult:
    dev = fixed.device
    dtype = fixed.dtype if fixed.dtype in (torch.float32, torch.float64) else torch.float32
    fixed = fixed.to(dtype)
    moving = moving.to(dev, dtype)
    sf = tuple(float(v) for v in (fixed_spacing or [1.0] * ndim))
    sm = tuple(float(v) for v in (moving_spacing or [1.0] * ndim))
    m0 = torch.eye(ndim + 1, dtype=torch.float64) if init is None else init.detach().double().cpu()
    fmask = _mask(fixed_mask, fixed)
    mmask = _mask(moving_mask, moving)

    with torch.no_grad():
        # pyramids in mm: `coarser` refinement-only levels, the search level, finer levels
        extent = max(n * s for n, s in zip(fixed.shape[2:], sf, strict=True))
        size = cfg.search_size[ndim]
        small, small_size = cfg.small_grid.get(ndim, (0, 0))
        if max(fixed.shape[2:]) < small:
            size = max(size, small_size)
        h0 = extent / size
        targets = [
            h0 * 2.0 ** (cfg.coarser[ndim] - k)
            for k in range(cfg.coarser[ndim] + _per_dim(cfg.levels, ndim))
        ]
        times = {"start": time.perf_counter()}
        fpyr = build_pyramid(fixed, fmask, sf, targets)
        mpyr = build_pyramid(moving, mmask, sm, targets)
        search_level = cfg.coarser[ndim]
        # drop duplicate fine levels (small images)
        keep_idx = list(range(search_level + 1)) + [
            i for i in range(search_level + 1, len(fpyr)) if fpyr[i].factors != fpyr[i - 1].factors
        ]
        fpyr = [fpyr[i] for i in keep_idx]
        mpyr = [mpyr[i] for i in keep_idx]

        s_f = diag_h(sf)
        phys_to_moving = m0 @ torch.linalg.inv(s_f)  # fixed mm -> moving full index
        # centre: fixed foreground centre of mass (mm)
        f_fg = foreground(fpyr[search_level])
        centre = centre_of_mass(fpyr[search_level], f_fg) * torch.tensor(sf, dtype=torch.float64)
        m_fg = foreground(mpyr[search_level])
        m_centre = centre_of_mass(mpyr[search_level], m_fg)  # moving full index
        # centre-of-mass base: translate so that the fixed centre maps onto the moving centre
        com_mm = torch.linalg.solve(
            phys_to_moving, torch.cat([m_centre, torch.ones(1, dtype=torch.float64)])
        )[:ndim]
        ident = torch.eye(ndim + 1, dtype=torch.float64)
        com_base = translation_h(com_mm - centre)

        def blurred(level, i):
            sigma = cfg.blur[ndim][0 if i <= search_level else 1] * targets[keep_idx[i]]  # mm
            if sigma <= 0:
                return level
            sig = [sigma / s for s in level.spacing]
            return replace(level, image=gaussian_blur(level.image, sig))

        times["pyramid"] = time.perf_counter()
        problems: list[LevelProblem | None] = [
            make_problem(
                blurred(fl, i),
                blurred(ml, i),
                sf,
                phys_to_moving,
                centre,
                cfg.max_points[ndim][0 if i <= search_level else 1],
                cfg.dilation,
                cfg.seed + i,
            )
            for i, (fl, ml) in enumerate(zip(fpyr, mpyr, strict=True))
        ]
        if problems[search_level] is None:
            raise ValueError("align(): no fixed voxels to compare (empty fixed_mask?)")
        finest = max(i for i, p in enumerate(problems) if p is not None)

        if mode == "translation":
            coarse_mode = "translation"
        elif mode == "rigid":
            coarse_mode = "rigid"
        else:
            coarse_mode = cfg.coarse_model
        final_mode = "affine" if mode in ("auto", "projective") else mode

        # coarse search around the initial map and the centre-aligned map: one window that
        # covers both when they are close, else one window each
        lvl = fpyr[search_level]
        step = torch.tensor([lvl.spacing[i] for i in range(ndim)], dtype=torch.float64)
        shift = (com_mm - centre) / step  # level voxels
        reach = torch.tensor([cfg.translation_range * s for s in lvl.shape], dtype=torch.float64)
        extra = None
        if not bool((shift.abs() > cfg.merge_windows * reach).any()):
            bases = [translation_h((com_mm - centre) / 2)]
            extra = [int(math.ceil(abs(float(v)) / 2)) for v in shift]
        else:
            bases = [ident, com_base]
        rotations = (
            [torch.eye(ndim, dtype=torch.float64)]
            if coarse_mode == "translation"
            else rotation_set(ndim, cfg.rotation_range_deg[ndim], cfg.rotation_step_deg[ndim])
        )
        times["problems"] = time.perf_counter()
        args = (fpyr[search_level], mpyr[search_level], sf, phys_to_moving, bases)
        kw = dict(
            centre=centre,
            translation_range=cfg.translation_range,
            min_overlap=cfg.min_overlap,
            mind_radius=cfg.search_mind_radius[ndim],
            channels=cfg.search_channels,
            extra=extra,
        )
        cands = search(*args, rotations, keep=max(cfg.keep, cfg.scale_rotations[ndim]), **kw)
        if coarse_mode in ("similarity", "affine") and cfg.scales:
            # second stage: scales around the best rotations
            seen: list[int] = []
            for c in cands:
                if c.linear_index not in seen:
                    seen.append(c.linear_index)
            linears = [
                rotations[i] * s for i in seen[: cfg.scale_rotations[ndim]] for s in cfg.scales
            ]
            cands = sorted(
                cands + search(*args, linears, keep=cfg.keep, **kw), key=lambda c: c.score
            )
        cands = cands[: cfg.keep]
        times["search"] = time.perf_counter()
        starts = [ident, com_base] + [c.transform for c in cands]

        def run(
            t: Tensor, c: float, levels: range, model: str, iters: int, method: str | None = None
        ) -> tuple[Tensor, float]:
            for i in levels:
                if problems[i] is not None:
                    rtol = cfg.rtol[1] if i == finest else cfg.rtol[0]
                    t, c = refine(
                        problems[i], t, model, iters, method=method or cfg.method, rtol=rtol
                    )
            return t, c

        # screening: the cost of every start, a few steps of the coarse model on the coarsest
        # level for the most promising; the best of these continue to the search level
        # (coarse model, then the final model from final_from)
        first = next(i for i, p in enumerate(problems) if p is not None)
        initial = [evaluate(problems[first], s)[0][0] for s in starts]
        screened = sorted(range(len(starts)), key=lambda k: initial[k])[: cfg.screened[ndim]]
        scored = _map(
            lambda k: run(
                starts[k],
                initial[k],
                range(first, first + 1),
                coarse_mode,
                cfg.coarse_iterations,
                cfg.screen_method,
            ),
            screened,
            dev,
        )
        order = sorted(range(len(scored)), key=lambda k: scored[k][1])[: cfg.finalists[ndim]]
        first_final = max(first, min(cfg.final_from, search_level))

        def finalist(k: int) -> tuple[Tensor, float]:
            t, c = run(*scored[k], range(first, search_level + 1), coarse_mode, cfg.iterations)
            if final_mode != coarse_mode:
                t, c = run(t, c, range(first_final, search_level + 1), final_mode, cfg.iterations)
            return t, c

        finals = _map(finalist, order, dev)
        # with several finalists, each is refined on the next finer level and compared there
        # (coarse levels can prefer a wrong pose, e.g. a remapped CT at 11 mm)
        start_fine = search_level + 1
        if len(finals) > 1 and start_fine < len(problems) and problems[start_fine] is not None:
            finals = _distinct(finals, problems[start_fine], cfg.same_pose)
        if len(finals) > 1 and start_fine < len(problems):
            iters = cfg.iterations if start_fine == finest else cfg.mid_iterations
            finals = _map(
                lambda tc: run(*tc, range(start_fine, start_fine + 1), final_mode, iters),
                finals,
                dev,
            )
            start_fine += 1
        transform = min(finals, key=lambda tc: tc[1])[0]
        # the finer levels with the final model
        for i in range(start_fine, len(problems)):
            iters = cfg.iterations if i == finest else cfg.mid_iterations
            transform, _ = run(transform, math.inf, range(i, i + 1), final_mode, iters)
        after = evaluate(problems[finest], transform)[0][0]
        used = final_mode
        if mode == "projective" or (mode == "auto" and cfg.projective.get(ndim, False)):
            # the homography from the affine map and from the other starts (a strong
            # perspective leaves the affine map far off): each refined on the levels up to the
            # search level, the best of them on the finer ones; kept by its margin (always for
            # "projective")
            coarse: list[tuple[Tensor, float]] = []
            starts_p = [transform] + [t for t, _ in finals] + [t for t, _ in scored]
            # and the search once more with the best linear maps tilted (a strong viewpoint
            # change lies outside the basin of every affine start)
            half = [(n - 1) * h / 2.0 for n, h in zip(fixed.shape[2:], sf, strict=True)]
            tilted = []
            for lin in _distinct_linears(cands, ndim)[: cfg.tilt_rotations]:
                for v in _tilt_rows(ndim, half, cfg.tilts):
                    tilt = torch.eye(ndim + 1, dtype=torch.float64)
                    tilt[ndim, :ndim] = v
                    tilt = translation_h(centre) @ tilt @ translation_h(-centre)
                    tilted.append(about(lin, centre) @ tilt)
            if tilted:
                starts_p += [c.transform for c in search(*args, tilted, keep=cfg.keep, **kw)]
            for start in starts_p:
                coarse.append(
                    run(start, math.inf, range(first, search_level + 1), "projective", 10, "ic")
                )
            proj = min(coarse, key=lambda tc: tc[1])[0]
            for i in range(search_level + 1, len(problems)):
                iters = cfg.iterations if i == finest else cfg.mid_iterations
                proj, _ = run(proj, math.inf, range(i, i + 1), "projective", iters, "ic")
            proj = proj / proj[-1, -1]
            cost = evaluate(problems[finest], proj)[0][0]
            # a homography whose last coordinate varies by more than 4x over the fixed
            # image (or changes sign) is degenerate: a horizon inside the field of view
            corners = torch.cartesian_prod(
                *[
                    torch.tensor([0.0, (n - 1) * h], dtype=torch.float64)
                    for n, h in zip(fixed.shape[2:], sf, strict=True)
                ]
            ).reshape(-1, ndim)
            w = corners @ proj[-1, :ndim] + proj[-1, -1]
            sane = bool((w > 0).all()) and float(w.max() / w.min()) < 4.0
            logger.debug(
                "align: homography cost %.4g (affine %.4g), last coordinate %.3g..%.3g",
                cost,
                after,
                float(w.min()),
                float(w.max()),
            )
            if sane and (mode == "projective" or cost < (1.0 - cfg.projective_margin) * after):
                transform, after, used = proj, cost, "projective"
        times["refine"] = time.perf_counter()
        before = evaluate(problems[finest], ident)[0][0]
        if mode == "auto":
            fine = problems[finest]
            pts = fine.points.double()
            moved = apply_h(transform, pts)
            step = torch.tensor(fine.spacing, dtype=torch.float64, device=pts.device)
            motion = float(((moved - pts) / step).norm(dim=1).mean())
            # beyond the deformable stage's reach a smaller gain suffices (the similarity of a
            # remapped contrast gains little even from the right map)
            reach = motion / max(fpyr[finest].shape)  # of the finest level's longest axis
            margin = cfg.far_margin if reach >= cfg.far_motion else cfg.margin
            better = after < (1.0 - margin) * before and after < before - cfg.margin_abs
            logger.debug(
                "align: auto: gain %.1f %%, motion %.2f voxels (%.3f of the finest level's axis)",
                100.0 * (1.0 - after / max(before, 1e-12)),
                motion,
                reach,
            )
            if not better or motion < cfg.min_motion:
                transform, after, used = ident, before, "identity"

    matrix = m0 @ torch.linalg.inv(s_f) @ transform @ s_f
    runtime = time.perf_counter() - t0
    keys = list(times)
    logger.debug(
        "align: %s, similarity %.4g -> %.4g, %s, total %.3f s",
        used,
        before,
        after,
        ", ".join(f"{b} {times[b] - times[a]:.3f} s" for a, b in zip(keys, keys[1:], strict=False)),
        runtime,
    )
    return AlignResult(
        matrix=matrix,
        mode=used,
        similarity_before=float(before),
        similarity_after=float(after),
        parameters=decompose(transform, centre),
        runtime_s=runtime,
    )
