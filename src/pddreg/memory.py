"""Memory of one registration, estimated before anything large is allocated.

:func:`estimate_registration` predicts the peak memory a registration adds on its device (host
RAM on the CPU, device memory on CUDA), from the shapes alone: the fixed and moving grids, the
working grid of :mod:`pddreg.pipeline` (:func:`pddreg.pipeline.work_budget`,
:func:`pddreg.spatial.working_grid`) and the method's settings (the MIND-SSC levels of
:mod:`pddreg.optim.mindreg`, or a PDD-Net's config). :func:`check_registration` compares it
with a budget (``--max-memory``, default: the memory available) and refuses a pair that cannot
fit with a message naming the memory it needs.

The estimate counts the buffers that dominate, each times a factor measured on the CPU
(``benchmarks/bench_scale.py`` prints estimate and measured peak side by side):

* full-resolution images: the normalised fixed and moving images, the field, the sampling
  coordinates, the warped image and the temporaries of the intensity normalisation;
* the working grid: fixed and moving resampled, masks, coordinates;
* ``mind``: the MIND-SSC features (computation, the fixed, moving and warped maps, pooled and
  box-filtered copies, the lattice copy of the correlation), the largest cost volume of a level
  ``|L| * prod(G)`` floats three times (the cost and two regularisation buffers), one
  correlation chunk and the instance optimisation;
* ``pdd``: the feature net's activations, and every level's raw cost, regularised cost and
  probabilities (kept until the end of the forward pass) plus two regularisation buffers; with
  the refinement on MIND-SSC (the shipped models) each part at least ``mind``'s.

It is an upper bound: on the CPU it was 1.3-2.0 times the measured peak of the registration
call for every size from 64^3 (and 512^2) up to 256^3, with ``mind`` and ``pdd``, and more for
tiny images (a fixed allowance of :data:`OVERHEAD`); the interpreter's own memory is not
counted. A registration keeps its freed buffers for reuse (:mod:`pddreg._heap`), so its peak
is higher (the heap fragments): the estimate was still 1.85x / 1.34x the peak of ``mind`` at
128^3 / 192x160x256, and 1.5x / 1.2x / 2.3x that of ``pdd`` with its refinement at
91x109x91 / 128^3 / 192x160x256. The global stage (:mod:`pddreg.align`) works on coarse grids
and is covered by the margin; on CUDA the factors are not calibrated yet (no GPU was at hand).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .data.io import MIN_EXTENT
from .errors import InputError

__all__ = [
    "MIN_EXTENT",
    "MemoryEstimate",
    "available_memory",
    "check_registration",
    "estimate_registration",
    "format_bytes",
    "parse_memory",
]

logger = logging.getLogger(__name__)

#: Bytes per value (float32 everywhere in registration).
FLOAT = 4

# Measured factors (CPU, torch 2.13, native kernels; see benchmarks/bench_scale.py --memory):
#: floats per fixed voxel at full resolution: the normalised image and the warped image, plus
#: ``FULL_PER_AXIS`` per axis (the field, the sampling coordinates, the field resized from the
#: working grid); ``none`` builds its field from two coordinate grids (``2 * ndim`` more).
FULL_PER_VOXEL = 2.0
FULL_PER_AXIS = 3.0
#: floats per moving voxel: the normalised image and the temporaries of the normalisation.
MOVING_PER_VOXEL = 4.0
#: floats per fixed and per moving voxel for the anti-aliasing prefilter when the working grid
#: differs from the fixed grid (smoothed copies at full resolution).
PREFILTER_PER_VOXEL = 3.0
#: floats per working voxel when the working grid differs from the fixed grid: fixed and moving
#: resampled, masks, plus ``ndim`` for the coordinates (on the fixed grid itself: the masks).
WORK_PER_VOXEL = 6.0
#: MIND-SSC feature maps alive at once (with what the allocator keeps of the temporaries of
#: their computation), in units of one map ``C * prod(F)`` floats, per number of dimensions.
MIND_FEATURE_MAPS = {2: 6.0, 3: 9.0}
#: Cost volumes alive at the peak of a level (the cost and two regularisation buffers).
COST_VOLUMES = 3.0
#: PDD-Net feature net: floats per feature-map value for the activations of the net.
PDD_FEATURE_MAPS = 12.0
#: Allowance for what the factors miss (allocator rounding, small temporaries): the estimate
#: is ``MARGIN`` times the sum of its parts plus ``OVERHEAD`` bytes.
MARGIN = 1.25
OVERHEAD = 16 * 2**20
#: Models other than PDD-Net (e.g. the VoxelMorph-style U-Net): floats per working voxel.
OTHER_MODEL_PER_VOXEL = 160.0

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*")
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


@dataclass(frozen=True)
class MemoryEstimate:
    """What :func:`estimate_registration` returns.

    Attributes:
        total: the estimated peak in bytes.
        parts: bytes per contribution (``images``, ``working``, ``features``, ``cost``, ...).
        work_shape: the working grid the deformable stage runs on.
        method: the method it was made for.
    """

    total: int
    parts: dict[str, int] = field(default_factory=dict)
    work_shape: tuple[int, ...] = ()
    method: str = "mind"

    def describe(self) -> str:
        """``"1.2 GiB (cost volumes 600 MiB, features 400 MiB, ...)"``, largest parts first."""
        parts = sorted(self.parts.items(), key=lambda kv: -kv[1])
        text = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts if v > 0)
        return f"{format_bytes(self.total)} ({text})"


def parse_memory(value: str | int | float) -> int:
    """Bytes from ``"4G"``, ``"512M"``, ``"1.5GB"``, ``"2GiB"``, ``"800k"`` or a number of bytes
    (binary units: 1K = 1024 bytes)."""
    if isinstance(value, bool):
        raise InputError(f"--max-memory: expected a size such as 4G or 512M, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = _SIZE.fullmatch(value)
        if m is None:
            raise InputError(f"--max-memory: expected a size such as 4G or 512M, got {value!r}")
        number, unit = float(m.group(1)), m.group(2).lower()
    if not (math.isfinite(number) and number > 0):
        raise InputError(f"--max-memory: must be a positive size, got {value!r}")
    return int(number * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``1536 -> "1.5 KiB"``, ``3.2e9 -> "3.0 GiB"``."""
    n = float(n)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory(device: Any = None) -> int | None:
    """Bytes a registration may still allocate on ``device``: free device memory on CUDA; on
    the CPU the kernel's ``MemAvailable`` (and the cgroup limit less its usage, where lower).
    None where it cannot be told."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(dev)
        except (RuntimeError, AssertionError):
            return None
        return int(free)
    if dev.type != "cpu":
        return None
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        avail = None
    limit = _read_int("/sys/fs/cgroup/memory.max")
    usage = _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and usage is not None:
        room = max(0, limit - usage)
        avail = room if avail is None else min(avail, room)
    return avail


def _prod(shape: Sequence[int]) -> int:
    return int(math.prod(int(s) for s in shape))


def _ceil_div(shape: Sequence[int], k: int) -> tuple[int, ...]:
    return tuple(max(1, -(-int(s) // int(k))) for s in shape)


def _mind_parts(work_shape: tuple[int, ...]) -> dict[str, int]:
    """Feature, cost-volume and instance-optimisation bytes of ``register_mind`` on ``W``."""
    from .cost._lattice import CORRELATION_CHUNK_BYTES, DEFAULT_MAX_MEMORY, make_plan
    from .features.mind import mind_channels
    from .optim.mindreg import MindConfig, block_capture_level, capture_level

    ndim = len(work_shape)
    cfg = MindConfig().resolved(ndim, work_shape)
    stride = int(cfg.feature_stride or 1)
    fshape = _ceil_div(work_shape, stride)
    channels = mind_channels(ndim)
    fmap = channels * _prod(fshape) * FLOAT
    levels = list(cfg.levels or ())
    extra = capture_level(ndim, fshape, levels)
    block = block_capture_level(ndim, fshape, levels)
    if extra is not None:
        levels.append(extra)
    largest = 0
    if block is not None:
        # block matching: the cost at every pooled voxel, then its windowed mean
        dense = (2 * block.radius + 1) ** ndim * _prod(_ceil_div(fshape, block.pool)) * FLOAT
        largest = int(1.5 * dense)
    for lv in levels:
        pshape = _ceil_div(fshape, lv.pool)
        grid = _ceil_div(pshape, lv.grid_stride)
        volume = (2 * lv.radius + 1) ** ndim * _prod(grid) * FLOAT
        plan = make_plan(grid, pshape, lv.radius, lv.spacing, channels)
        if plan is not None:  # lattice route: a copy of the moving map on the lattice + a chunk
            corr = channels * _prod(plan.nodes) * FLOAT + min(CORRELATION_CHUNK_BYTES, volume)
        else:  # any stride: the moving map at every displaced point (or direct chunks)
            lattice = channels * volume
            corr = int(1.2 * lattice) if lattice <= DEFAULT_MAX_MEMORY else DEFAULT_MAX_MEMORY
        largest = max(largest, int(COST_VOLUMES * volume), volume + corr)
    io = cfg.instance
    io_bytes = 0
    if io is not None and io.iters > 0:
        io_bytes = int(6 * channels * _prod(_ceil_div(fshape, io.pool)) * FLOAT)
    return {
        "features": int(MIND_FEATURE_MAPS[ndim] * fmap),
        "cost volumes": largest,
        "instance optimisation": io_bytes,
    }


def _model_of(model: Any, ndim: int) -> Any:
    """A model object for the estimate: the given one, a saved one (its config only) or the
    shipped one for ``ndim``."""
    from torch import nn

    from . import models

    if isinstance(model, nn.Module):
        return model
    if model is None:
        key: tuple[Any, ...] = ("shipped", ndim)
    else:
        path = os.fspath(model)
        try:
            st = os.stat(path)
            key = (path, st.st_size, st.st_mtime_ns)
        except OSError:
            key = (path,)
    if key not in _MODELS:
        net = models.pretrained(ndim) if model is None else models.load_model(path)
        if len(_MODELS) > 8:
            _MODELS.clear()
        _MODELS[key] = net
    return _MODELS[key]


#: Models read for estimates, by file (path, size, mtime) or ("shipped", ndim).
_MODELS: dict[tuple[Any, ...], Any] = {}


def _pdd_parts(work_shape: tuple[int, ...], model: Any) -> dict[str, int]:
    """Feature-net and cost-volume bytes of a PDD-Net's ``register`` on ``W``."""
    ndim = len(work_shape)
    net = _model_of(model, ndim)
    cfg = getattr(net, "config", None)
    feats = getattr(net, "features", None)
    stride = getattr(feats, "stride", None)
    channels = getattr(feats, "out_channels", None)
    if cfg is None or stride is None or channels is None or not hasattr(cfg, "radius"):
        return {"model": int(OTHER_MODEL_PER_VOXEL * _prod(work_shape) * FLOAT)}
    fshape = _ceil_div(work_shape, int(stride))
    if min(fshape) < 2:
        need = int(stride) + 1
        raise InputError(
            f"the working grid {'x'.join(map(str, work_shape))} is too small for the pdd model "
            f"(feature stride {stride}): it needs at least {need} voxels along every axis"
        )
    fmap = int(channels) * _prod(fshape) * FLOAT
    specs = getattr(cfg, "level_specs", None)
    if specs:  # the levels of discrete_register on the feature map (pooled, then a grid stride)
        levels = [
            (int(sp.get("radius", 3)), int(sp.get("pool", 1)) * int(sp.get("grid_stride", 1)))
            for sp in specs
        ]
    else:
        levels = [(int(cfg.radius), int(cfg.grid_stride))]
        if int(getattr(cfg, "levels", 1)) == 2:
            levels.append((int(cfg.radius2), int(cfg.grid_stride2)))
    volumes = [(2 * r + 1) ** ndim * _prod(_ceil_div(fshape, g)) * FLOAT for r, g in levels]
    parts = {
        "features": int(PDD_FEATURE_MAPS * fmap),
        "cost volumes": int(3 * sum(volumes) + 2 * max(volumes)),
    }
    if getattr(cfg, "instance_opt", False) and getattr(cfg, "io_features", "") == "mind":
        # the refinement on MIND-SSC (pddreg.optim.refine_mind) runs after the network has
        # freed its levels: each part is the larger of the two (it was missing from the
        # estimate: 0.9x the measured peak at 128^3)
        for key, value in _mind_parts(work_shape).items():
            parts[key] = max(parts.get(key, 0), value)
    return parts


def estimate_registration(
    method: str,
    fixed_shape: Sequence[int],
    fixed_spacing: Sequence[float] | None = None,
    moving_shape: Sequence[int] | None = None,
    *,
    model: Any = None,
    masks: bool = False,
) -> MemoryEstimate:
    """The peak memory one registration of ``fixed`` ``(*S_f)`` and ``moving`` ``(*S_m)`` adds.

    Args:
        method: ``"mind"``, ``"pdd"`` or ``"none"``.
        fixed_shape, fixed_spacing: the fixed grid and its voxel size in mm (the working grid
            follows from them, :func:`pddreg.spatial.working_grid`); spacing 1 when None.
        moving_shape: the moving grid (default: the fixed one).
        model: for ``pdd``: a model object or a saved model's path (None: the shipped one).
        masks: masks are given (two more working-grid images).

    Returns:
        :class:`MemoryEstimate` (bytes).

    Raises:
        InputError: a grid too small for the method (``pdd``: fewer than two feature voxels
            along an axis).
    """
    from .pipeline import work_budget
    from .spatial import working_grid

    shape_f = tuple(int(s) for s in fixed_shape)
    shape_m = tuple(int(s) for s in (moving_shape if moving_shape is not None else shape_f))
    ndim = len(shape_f)
    spacing = tuple(fixed_spacing) if fixed_spacing is not None else (1.0,) * ndim
    work_shape, _ = working_grid(shape_f, spacing, work_budget(shape_f))
    per_fixed = FULL_PER_VOXEL + FULL_PER_AXIS * ndim + (2 * ndim if method == "none" else 0)
    images = per_fixed * _prod(shape_f) + MOVING_PER_VOXEL * _prod(shape_m)
    same = tuple(work_shape) == shape_f
    if method != "none" and not same:
        images += PREFILTER_PER_VOXEL * (_prod(shape_f) + _prod(shape_m))
    parts = {"images": int(images * FLOAT)}
    if method != "none":
        per_voxel = (WORK_PER_VOXEL + ndim if not same else 0.0) + (2 if masks else 0)
        parts["working grid"] = int(per_voxel * _prod(work_shape) * FLOAT)
    if method == "mind":
        parts.update(_mind_parts(work_shape))
    elif method == "pdd":
        parts.update(_pdd_parts(work_shape, model))
    total = int(MARGIN * sum(parts.values())) + OVERHEAD
    return MemoryEstimate(total, parts, work_shape, method)


def _too_small(shape: Sequence[int]) -> bool:
    return min(int(s) for s in shape) < MIN_EXTENT


def check_registration(
    method: str,
    fixed_shape: Sequence[int],
    fixed_spacing: Sequence[float] | None = None,
    moving_shape: Sequence[int] | None = None,
    *,
    budget: int | str | None = None,
    device: Any = None,
    model: Any = None,
    masks: bool = False,
    names: tuple[str, str] = ("fixed", "moving"),
) -> MemoryEstimate:
    """Refuse a registration that cannot run, before it allocates anything large.

    Checks that both images have at least :data:`MIN_EXTENT` voxels along every axis and that
    :func:`estimate_registration` fits ``budget`` (bytes or a size such as ``"4G"``; None:
    :func:`available_memory` of ``device``, no check where that is unknown).

    Returns:
        the estimate.

    Raises:
        InputError: naming the image and the problem, e.g. ``"fixed.nii.gz: registering it
        with --method mind needs about 5.1 GiB (...), more than the --max-memory budget of
        4.0 GiB"``.
    """
    shape_f = tuple(int(s) for s in fixed_shape)
    shape_m = tuple(int(s) for s in (moving_shape if moving_shape is not None else shape_f))
    for name, shape in zip(names, (shape_f, shape_m), strict=True):
        if _too_small(shape):
            raise InputError(
                f"{name}: image is too small to register (shape {shape}): it needs at least "
                f"{MIN_EXTENT} voxels along every axis"
            )
    limit = parse_memory(budget) if budget is not None else None
    try:
        est = estimate_registration(
            method, shape_f, fixed_spacing, shape_m, model=model, masks=masks
        )
    except InputError as err:
        if str(err).startswith("the working grid"):
            raise InputError(f"{names[0]}: {err}") from None
        raise
    where = "the --max-memory budget of"
    if limit is None:
        limit = available_memory(device)
        where = f"the memory available on {device or 'cpu'},"
    logger.debug("memory estimate for %s: %s (limit %s)", names[0], est.describe(), limit)
    if limit is not None and est.total > limit:
        grid = "x".join(str(s) for s in est.work_shape)
        raise InputError(
            f"{names[0]}: registering it with --method {method} needs about "
            f"{format_bytes(est.total)} (working grid {grid}: {est.describe().split(' (', 1)[1]}"
            f", more than {where} {format_bytes(limit)}; use a machine with more memory or "
            "crop / downsample the images"
        )
    return est
