"""2D+t tracking: propagate the first frame's segmentation through a sequence of frames.

Two ways to chain the registrations (``mode``); both keep one field per frame, ``d_t``, that
maps frame ``t``'s grid into frame 0 (``frame_t(x) ~ frame_0(x + d_t(x))``), and warp the first
segmentation ONCE with it (nearest), so labels are never re-interpolated frame after frame:

- ``"anchored"`` (default): frame ``t`` is registered to frame 0 warped by the previous field
  ``d_{t-1}`` (the previous field is the starting point; the residual field ``r`` is small),
  then ``d_t = compose(d_{t-1}, r)``. Every frame is compared with the first frame's own
  intensities, so errors do not accumulate (no drift); large total motion is fine because each
  step only has to find the change since the previous frame.
- ``"sequential"``: frame ``t`` is registered to frame ``t-1`` (``f_t``) and the fields are
  composed, ``d_t = compose(d_{t-1}, f_t)``. It tolerates appearance changes over time better
  but every step's error stays in the chain (drift).
- ``"direct"``: frame ``t`` is registered to frame 0 itself, from scratch (``d_t = r``): no
  chain, so nothing accumulates, but the whole motion since frame 0 must lie within the
  capture range of one registration (about +-14 px with :data:`TRACK_LEVELS_2D`). On the
  real echocardiography cine (``benchmarks/bench_cine.py``) chaining let the field random-walk
  in the speckle (cycle errors growing frame after frame) where ``direct`` stayed consistent;
  a fast instrument that travels far needs a chained mode.

``tests/test_report.py::test_track_modes_compared_on_a_moving_sequence`` compares both on a
synthetic sequence (drift plus a growing smooth swirl, 6 frames, ``mind``): mean Dice over the
frames 0.991 anchored, 0.983 sequential, 0.700 copying the first labels; hence the default.

**Temporal consistency without ground truth** (``cycle=True``): the sequence is also tracked
backwards, frame 0 onto frame ``t`` (``e_t``: frame 0's grid into frame ``t``, chained the same
way), and the cycle ``t -> 0 -> t`` of a pixel ``x``, ``x + d_t(x) + e_t(x + d_t(x))``, should
come back to ``x``: its distance (pixels) averaged over the propagated labels of frame ``t``
(``cycle_error_px``) and over the whole frame (``cycle_error_frame_px``).

**Combination with a segmentation model** (``segmenter``, e.g. a joint segmentation and motion
model, :mod:`pddreg.models.joint`): every frame is also segmented on its own; the label
probabilities of the segmentation and the propagated first labels (one-hot, warped linearly)
are averaged with weight ``combine`` and the most likely label kept.

Frames per second (``fps``) count the forward tracking (registration, composition, warping of
the labels), not reading, writing or the backward pass.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..optim.discrete import LevelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "TRACK_INSTANCE_ITERS",
    "TRACK_LEVELS_2D",
    "TrackResult",
    "track_files",
    "signal_mask",
    "track_sequence",
    "tracking_register_fn",
]

MODES = ("anchored", "sequential", "direct")

RegisterFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``frame (1, 1, *S) in [0, 1] -> label probabilities (1, K, *S)``.
SegmentFn = Callable[[torch.Tensor], torch.Tensor]

#: ``mind`` levels for tracking 2D frames (each registration only finds the change since the
#: previous frame): +-8 px in steps of 2 on a stride-8 grid, +-4 px on stride 4, +-2 px on
#: stride 2, instead of the +-24 px first level and the capture search of a registration of two
#: unrelated images (3D+t keeps the default levels, without the capture search).
TRACK_LEVELS_2D: tuple[LevelConfig, ...] = (
    LevelConfig(pool=1, grid_stride=8, radius=4, spacing=2.0, smooth=2, fixed_sampling="point"),
    LevelConfig(pool=1, grid_stride=4, radius=4, spacing=1.0, smooth=1, fixed_sampling="point"),
    LevelConfig(pool=1, grid_stride=2, radius=2, spacing=1.0, smooth=1, fixed_sampling="point"),
)
#: Instance optimisation steps of ``mind`` in tracking (50 in a registration): most of the time
#: of a 2D frame, with little to gain between neighbouring frames.
TRACK_INSTANCE_ITERS = 10


def tracking_register_fn(
    method: str, ndim: int, model: Any = None, device: Any = None
) -> RegisterFn:
    """The registration of one tracking step: ``(fixed, moving) -> disp`` ``(1, ndim, *S)``.

    ``mind``: :data:`TRACK_LEVELS_2D` in 2D and :data:`TRACK_INSTANCE_ITERS` steps of instance
    optimisation, no capture search; ``pdd``: the network alone (no refinement, no capture
    search: neighbouring frames are near, and the speed is the point); ``none``: as
    :func:`pddreg.api.make_register_fn`.
    """
    from ..api import make_register_fn

    if method == "pdd":
        return make_register_fn(
            method, ndim, model=model, device=device, instance_opt=False, capture=False
        )
    if method != "mind":
        return make_register_fn(method, ndim, model=model, device=device)
    from ..optim import InstanceConfig, MindConfig, register_mind
    from ..optim.mindreg import default_instance

    base = default_instance(ndim)
    instance = InstanceConfig(
        mode=base.mode,
        iters=TRACK_INSTANCE_ITERS,
        lr=base.lr,
        lambda_=base.lambda_,
        grid_stride=base.grid_stride,
        pool=base.pool,
    )
    config = MindConfig(
        capture=False, levels=TRACK_LEVELS_2D if ndim == 2 else None, instance=instance
    )

    def fn(
        fixed: torch.Tensor,
        moving: torch.Tensor,
        fixed_mask: torch.Tensor | None = None,
        moving_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with torch.no_grad():
            return register_mind(
                fixed, moving, config, fixed_mask=fixed_mask, moving_mask=moving_mask
            )

    return fn


#: The signal mask of a sequence (``mask="auto"``): pixels whose mean intensity over the
#: frames, normalised to [0, 1] and smoothed (Gaussian, :data:`SIGNAL_SMOOTH` pixels), exceeds
#: this fraction. Outside (e.g. around the sector of an ultrasound scan) the frames carry no
#: information, and MIND turns their faint noise into random features whose matches would
#: random-walk the field frame after frame.
SIGNAL_THRESHOLD = 0.03
SIGNAL_SMOOTH = 3.0


def signal_mask(frames: Sequence[np.ndarray]) -> np.ndarray | None:
    """``(*S)`` float32 {0, 1}: where the frames carry signal (see :data:`SIGNAL_THRESHOLD`),
    or None where that is (nearly) everywhere."""
    from scipy import ndimage

    from ..data.io import normalise_intensity

    mean = np.mean([normalise_intensity(np.asarray(f)) for f in frames], axis=0)
    mask = ndimage.gaussian_filter(mean, SIGNAL_SMOOTH) > SIGNAL_THRESHOLD
    if mask.mean() > 0.98 or not mask.any():
        return None
    return mask.astype(np.float32)


@dataclass
class TrackResult:
    """Output of :func:`track_sequence`.

    Attributes:
        segs: label maps, one ``(*S)`` int64 per frame (frame 0: the input): the propagated
            labels, or their combination with the segmentation model when one was given.
        disps: fields ``(ndim, *S)`` per frame mapping frame t's grid into frame 0.
        runtime_s: total registration time of the forward tracking.
        frames: per-frame summary dicts (label sizes, displacement size, folding, times and,
            with ``cycle``, the cycle errors).
        fps: frames per second of the forward tracking (registration, composition, warping).
        propagated: with a segmentation model, the propagated labels alone; else None.
        cycle_runtime_s: time of the backward tracking (0 without ``cycle``).
        cpu_s: process CPU time of the forward tracking (all threads; on a shared machine
            ``(T - 1) / cpu_s`` is the steadier throughput figure for one thread).
    """

    segs: list[np.ndarray]
    disps: list[np.ndarray]
    runtime_s: float
    frames: list[dict[str, Any]]
    fps: float = float("nan")
    propagated: list[np.ndarray] | None = None
    cycle_runtime_s: float = 0.0
    cpu_s: float = float("nan")


def track_sequence(
    frames: Sequence[np.ndarray | torch.Tensor],
    first_seg: np.ndarray | torch.Tensor,
    register_fn: RegisterFn | None = None,
    *,
    method: str = "mind",
    mode: str = "anchored",
    model: Any = None,
    device: Any = None,
    progress: bool = True,
    cycle: bool = False,
    segmenter: SegmentFn | None = None,
    combine: float = 0.5,
    mask: Any = "auto",
) -> TrackResult:
    """Propagate ``first_seg`` (labels of ``frames[0]``) through the sequence.

    Args:
        frames: T images ``(*S)`` of one shape (2D, or 3D for 3D+t), first = reference.
        first_seg: integer labels ``(*S)`` of the first frame.
        register_fn: ``(fixed (1,1,*S), moving (1,1,*S)) -> disp (1,ndim,*S)`` on intensities in
            [0, 1]; default :func:`tracking_register_fn` for ``method``.
        method, model, device: used to build the default ``register_fn``.
        mode: ``"anchored"`` or ``"sequential"`` (see the module docstring).
        progress: show a progress bar.
        cycle: also track backwards and measure the cycle error t -> 0 -> t per frame.
        segmenter: ``frame (1,1,*S) -> probabilities (1,K,*S)``; its labels are combined with
            the propagated ones (see the module docstring).
        combine: weight of the segmenter's probabilities in the combination (0..1).
        mask: ``(*S)`` mask of the pixels that count in the similarity (e.g. the sector of an
            ultrasound scan), ``"auto"`` (default: :func:`signal_mask`) or None (everywhere);
            handed to ``register_fn`` as ``fixed_mask`` and ``moving_mask``.
    """
    from ..api import _resolve_device
    from ..data.io import normalise_intensity
    from ..metrics import folding_fraction
    from ..spatial import compose, warp, warp_labels

    if mode not in MODES:
        raise InputError(f"--mode: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if len(frames) < 2:
        raise InputError(f"frames: need at least 2 frames, got {len(frames)}")
    if not 0.0 <= float(combine) <= 1.0:
        raise InputError(f"--combine: must lie in [0, 1], got {combine}")
    arrays = [
        f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f) for f in frames
    ]
    shape = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != shape:
            raise InputError(f"frame {i}: shape {a.shape} differs from frame 0 shape {shape}")
    seg0 = first_seg.detach().cpu().numpy() if isinstance(first_seg, torch.Tensor) else first_seg
    seg0 = np.asarray(seg0).astype(np.int64)
    if seg0.shape != shape:
        raise InputError(f"--seg: label map shape {seg0.shape} differs from frame shape {shape}")
    ndim = len(shape)
    dev = _resolve_device(device)
    if register_fn is None:
        register_fn = tracking_register_fn(method, ndim, model=model, device=dev)

    tensors = [torch.from_numpy(normalise_intensity(a))[None, None].to(dev) for a in arrays]
    first = tensors[0]
    seg0_t = torch.from_numpy(seg0)[None, None].to(dev)
    labels = [int(v) for v in np.unique(seg0) if v > 0]
    zero = torch.zeros((1, ndim, *shape), device=dev)
    if isinstance(mask, str) and mask == "auto":
        mask = signal_mask(arrays)
    masks: dict[str, torch.Tensor] = {}
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
        if tuple(m.shape) != tuple(shape):
            raise InputError(f"mask: shape {tuple(m.shape)} differs from the frames {shape}")
        m = (m != 0).float()[None, None].to(dev)
        masks = {"fixed_mask": m, "moving_mask": m}

    # forward: d_t maps frame t's grid into frame 0
    disp = zero
    fields = [zero]
    times = [0.0]
    segs = [seg0]
    total = 0.0
    wall = time.perf_counter()
    cpu = time.process_time()
    for t in tqdm(range(1, len(arrays)), desc=f"track ({mode})", disable=not progress):
        current = tensors[t]
        start = time.perf_counter()
        with torch.no_grad():
            moving = warp(first, disp) if mode == "anchored" else tensors[t - 1]
        if mode == "direct":
            moving = first
        step = register_fn(current, moving, **masks)
        with torch.no_grad():
            disp = step.to(disp.dtype) if mode == "direct" else compose(disp, step.to(disp.dtype))
            seg = warp_labels(seg0_t, disp)[0, 0].cpu().numpy().astype(np.int64)
        elapsed = time.perf_counter() - start
        total += elapsed
        times.append(elapsed)
        fields.append(disp)
        segs.append(seg)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    fps = (len(arrays) - 1) / max(wall, 1e-9)

    cycle_err: list[tuple[float | None, float | None]] = [(0.0, 0.0)] + [(None, None)] * (
        len(arrays) - 1
    )
    cycle_time = 0.0
    if cycle:
        cycle_time = time.perf_counter()
        back = zero  # e_t: frame 0's grid into frame t
        for t in tqdm(range(1, len(arrays)), desc="cycle", disable=not progress):
            with torch.no_grad():
                if mode == "direct":
                    back = register_fn(first, tensors[t], **masks).to(back.dtype)
                elif mode == "anchored":
                    moving = warp(tensors[t], back)
                    step = register_fn(first, moving, **masks)
                    back = compose(back, step.to(back.dtype))
                else:
                    step = register_fn(tensors[t - 1], tensors[t], **masks)  # t-1 into t
                    back = compose(step.to(back.dtype), back)
                loop = compose(back, fields[t])  # x -> x + d_t(x) -> + e_t(...)
                err = loop.square().sum(1).sqrt()[0].cpu().numpy()
            inside = segs[t] > 0
            cycle_err[t] = (float(err[inside].mean()) if inside.any() else None, float(err.mean()))
        cycle_time = time.perf_counter() - cycle_time

    propagated = None
    if segmenter is not None:
        from ..losses import one_hot

        propagated = segs
        segs = [seg0]
        k0 = int(seg0.max()) + 1
        with torch.no_grad():
            for t in range(1, len(arrays)):
                prob = segmenter(tensors[t]).float()
                k = max(k0, prob.shape[1])
                if prob.shape[1] < k:
                    prob = torch.cat([prob, prob.new_zeros(1, k - prob.shape[1], *shape)], 1)
                soft = warp(one_hot(seg0_t, k), fields[t].to(prob.device))
                mix = float(combine) * prob + (1.0 - float(combine)) * soft
                segs.append(mix.argmax(1)[0].cpu().numpy().astype(np.int64))

    summary = []
    for t in range(len(arrays)):
        d_np = fields[t][0].cpu().numpy()
        fold = 0.0 if t == 0 else folding_fraction(fields[t].cpu())
        info = _frame_summary(t, segs[t], d_np, labels, times[t], fold)
        if cycle:
            info["cycle_error_px"], info["cycle_error_frame_px"] = cycle_err[t]
        summary.append(info)
    return TrackResult(
        segs=segs,
        disps=[f[0].cpu().numpy() for f in fields],
        runtime_s=total,
        frames=summary,
        fps=fps,
        propagated=propagated,
        cycle_runtime_s=cycle_time,
        cpu_s=cpu,
    )


def _frame_summary(
    t: int,
    seg: np.ndarray,
    disp: np.ndarray,
    labels: list[int],
    runtime: float,
    folding: float,
) -> dict[str, Any]:
    mag = np.sqrt((disp.astype(np.float64) ** 2).sum(0))
    return {
        "frame": t,
        "label_voxels": {str(k): int((seg == k).sum()) for k in labels},
        "mean_displacement_vox": float(mag.mean()),
        "max_displacement_vox": float(mag.max()),
        "folding_fraction": float(folding),
        "runtime_s": float(runtime),
    }


def _read_first_seg(
    seg_path: str, shape: tuple[int, ...]
) -> tuple[np.ndarray, dict[int, str], Any]:
    """The first frame's labels from a label image or a polygon file (``.json``)."""
    from ..data.io import read_labels

    if str(seg_path).lower().endswith(".json"):
        from ..data.polygons import rasterise_polygons, read_polygons

        doc = read_polygons(seg_path)
        names = {int(k): str(v) for k, v in (doc.get("labels") or {}).items()}
        return rasterise_polygons(doc, shape), names, None
    seg = read_labels(seg_path)
    if seg.array.shape != shape:
        raise InputError(
            f"{seg_path}: label map shape {seg.array.shape} differs from the frame shape {shape}"
        )
    return seg.array, {}, seg


#: Files ``pddreg track`` owns in its output folder.
TRACK_OUTPUTS = ("seg_*", "disp_*.npy", "summary.json", "track.png", "track.gif", "curves.png")


def track_files(
    frame_paths: Sequence[str],
    seg_path: str,
    out: str | os.PathLike[str],
    *,
    method: str = "mind",
    mode: str = "anchored",
    model: Any = None,
    device: Any = None,
    cycle: bool = True,
    segment_model: Any = None,
    combine: float = 0.5,
    animation: bool = True,
    fps: float = 15.0,
) -> dict[str, Any]:
    """``pddreg track``: read the frames and the first segmentation, write the results to ``out``.

    ``seg_path`` is a label image of the first frame or a polygon file (``.json``,
    :mod:`pddreg.data.polygons`). Writes ``seg_TTTT.<fmt>`` (format of ``seg_path``; PNG for
    polygons of 2D frames), ``disp_TTTT.npy`` (``(ndim, *S)``, frame t -> frame 0) per frame,
    ``summary.json`` (per frame: label sizes, displacement, cycle errors, times; frames per
    second), ``track.png`` (frames with their labels), ``track.gif`` (the overlay animation,
    ``fps`` frames per second) and ``curves.png`` (the per-frame curves); all or nothing (a
    temporary folder moved into place). ``segment_model``: a saved joint segmentation and
    motion model (or the model) whose segmentation of every frame is combined with the
    propagated labels (weight ``combine``). Returns the summary.
    """
    from ..cli import atomic_output_dir, output_suffix
    from ..data.io import check_image, read_image, write_image
    from .cine import curves_figure, write_animation
    from .figures import save_figure, sequence_figure

    images = [read_image(p) for p in frame_paths]
    for p, img in zip(frame_paths, images, strict=True):
        check_image(img.array, p)
        if img.array.shape != images[0].array.shape:
            raise InputError(
                f"{p}: shape {img.array.shape} differs from the first frame "
                f"{frame_paths[0]} shape {images[0].array.shape}"
            )
    seg0, names, _ = _read_first_seg(seg_path, tuple(images[0].array.shape))
    segmenter = None
    if segment_model is not None:
        segmenter = _segmenter(segment_model, device)
    result = track_sequence(
        [img.array for img in images],
        seg0,
        method=method,
        mode=mode,
        model=model,
        device=device,
        cycle=cycle,
        segmenter=segmenter,
        combine=combine,
    )
    errors = [f.get("cycle_error_px") for f in result.frames[1:]]
    errors = [e for e in errors if e is not None]
    summary = {
        "method": method,
        "mode": mode,
        "first_seg": os.fspath(seg_path),
        "label_names": {str(k): v for k, v in names.items()},
        "runtime_s": result.runtime_s,
        "fps": result.fps,
        "cpu_s": result.cpu_s,
        "threads": torch.get_num_threads(),
        "frame_shape": list(images[0].array.shape),
        "cycle": bool(cycle),
        "mean_cycle_error_px": float(np.mean(errors)) if errors else None,
        "cycle_runtime_s": result.cycle_runtime_s,
        "segment_model": None if segment_model is None else os.fspath(segment_model),
        "combine": float(combine) if segment_model is not None else None,
        "frames": [
            {"file": os.fspath(p), **info}
            for p, info in zip(frame_paths, result.frames, strict=True)
        ],
    }
    suffix = output_suffix(seg_path) if not str(seg_path).lower().endswith(".json") else None
    if suffix is None:
        suffix = ".png" if len(images[0].array.shape) == 2 else ".nii.gz"
    with atomic_output_dir(out, TRACK_OUTPUTS) as tmp:
        for t, (s, d) in enumerate(zip(result.segs, result.disps, strict=True)):
            write_image(
                str(tmp / f"seg_{t:04d}{suffix}"),
                s.astype(np.uint8 if s.max() < 256 else np.int32),
                like=images[0],
            )
            np.save(tmp / f"disp_{t:04d}.npy", d)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        frames_np = [img.array for img in images]
        save_figure(sequence_figure(frames_np, result.segs), tmp / "track.png")
        if animation:
            write_animation(
                tmp / "track.gif", frames_np, result.segs, other=result.propagated, fps=fps
            )
        title = f"{method}, {mode}: {result.fps:.1f} frames/s"
        save_figure(curves_figure(result.frames, names, title), tmp / "curves.png")
    logger.info("tracked %d frames in %.1f s -> %s", len(images), result.runtime_s, Path(out))
    return summary


def _segmenter(model: Any, device: Any) -> SegmentFn:
    """``frame -> probabilities`` of a saved joint model (or a model with ``segment``)."""
    from ..api import _resolve_device
    from ..models import load_model

    dev = _resolve_device(device)
    net = (
        load_model(os.fspath(model), map_location=dev)
        if isinstance(model, (str, os.PathLike))
        else model
    )
    if not hasattr(net, "segment"):
        raise InputError(f"--segment-model: {model} is not a segmentation model (no segment())")
    net = net.to(dev).eval()

    def fn(frame: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net.segment(frame)

    return fn
