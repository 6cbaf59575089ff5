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

``tests/test_report.py::test_track_modes_compared_on_a_moving_sequence`` compares both on a
synthetic sequence (drift plus a growing smooth swirl, 6 frames, ``mind``): mean Dice over the
frames 0.991 anchored, 0.983 sequential, 0.700 copying the first labels; hence the default.
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

logger = logging.getLogger(__name__)

__all__ = ["MODES", "TrackResult", "track_files", "track_sequence"]

MODES = ("anchored", "sequential")

RegisterFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrackResult:
    """Output of :func:`track_sequence`.

    Attributes:
        segs: propagated label maps, one ``(*S)`` int64 per frame (frame 0: the input).
        disps: fields ``(ndim, *S)`` per frame mapping frame t's grid into frame 0.
        runtime_s: total registration time.
        frames: per-frame summary dicts (label sizes, displacement size, folding).
    """

    segs: list[np.ndarray]
    disps: list[np.ndarray]
    runtime_s: float
    frames: list[dict[str, Any]]


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
) -> TrackResult:
    """Propagate ``first_seg`` (labels of ``frames[0]``) through the sequence.

    Args:
        frames: T images ``(*S)`` of one shape (2D, or 3D for 3D+t), first = reference.
        first_seg: integer labels ``(*S)`` of the first frame.
        register_fn: ``(fixed (1,1,*S), moving (1,1,*S)) -> disp (1,ndim,*S)`` on intensities in
            [0, 1]; default :func:`pddreg.api.make_register_fn` for ``method``.
        method, model, device: used to build the default ``register_fn``.
        mode: ``"anchored"`` or ``"sequential"`` (see the module docstring).
        progress: show a progress bar.
    """
    from ..api import _resolve_device, make_register_fn
    from ..data.io import normalise_intensity
    from ..metrics import folding_fraction
    from ..spatial import compose, warp, warp_labels

    if mode not in MODES:
        raise InputError(f"--mode: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if len(frames) < 2:
        raise InputError(f"frames: need at least 2 frames, got {len(frames)}")
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
        register_fn = make_register_fn(method, ndim, model=model, device=dev)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(normalise_intensity(a))[None, None].to(dev)

    first = tensor(arrays[0])
    seg0_t = torch.from_numpy(seg0)[None, None].to(dev)
    disp = torch.zeros((1, ndim, *shape), device=dev)
    previous = first
    segs, disps = [seg0], [disp[0].cpu().numpy()]
    labels = [int(v) for v in np.unique(seg0) if v > 0]
    summary = [_frame_summary(0, seg0, disps[0], labels, 0.0, 0.0)]
    total = 0.0
    for t in tqdm(range(1, len(arrays)), desc=f"track ({mode})", disable=not progress):
        current = tensor(arrays[t])
        with torch.no_grad():
            moving = warp(first, disp) if mode == "anchored" else previous
        start = time.perf_counter()
        step = register_fn(current, moving)
        elapsed = time.perf_counter() - start
        total += elapsed
        with torch.no_grad():
            disp = compose(disp, step.to(disp.dtype))
            seg = warp_labels(seg0_t, disp)[0, 0].cpu().numpy().astype(np.int64)
        d_np = disp[0].cpu().numpy()
        segs.append(seg)
        disps.append(d_np)
        summary.append(_frame_summary(t, seg, d_np, labels, elapsed, folding_fraction(disp.cpu())))
        previous = current
    return TrackResult(segs=segs, disps=disps, runtime_s=total, frames=summary)


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


def track_files(
    frame_paths: Sequence[str],
    seg_path: str,
    out: str | os.PathLike[str],
    *,
    method: str = "mind",
    mode: str = "anchored",
    model: Any = None,
    device: Any = None,
) -> dict[str, Any]:
    """``pddreg track``: read the frames and the first segmentation, write the results to ``out``.

    Writes ``seg_TTTT.<fmt>`` (format of ``seg_path``), ``disp_TTTT.npy`` (``(ndim, *S)``, frame
    t -> frame 0) per frame, ``summary.json`` and ``track.png`` (frames with their propagated
    labels); all or nothing (a temporary folder moved into place). Returns the summary.
    """
    from ..cli import atomic_output_dir, output_suffix
    from ..data.io import check_image, read_image, read_labels, write_image
    from .figures import save_figure, sequence_figure

    images = [read_image(p) for p in frame_paths]
    for p, img in zip(frame_paths, images, strict=True):
        check_image(img.array, p)
        if img.array.shape != images[0].array.shape:
            raise InputError(
                f"{p}: shape {img.array.shape} differs from the first frame "
                f"{frame_paths[0]} shape {images[0].array.shape}"
            )
    seg = read_labels(seg_path)
    if seg.array.shape != images[0].array.shape:
        raise InputError(
            f"{seg_path}: label map shape {seg.array.shape} differs from the frame shape "
            f"{images[0].array.shape}"
        )
    result = track_sequence(
        [img.array for img in images],
        seg.array,
        method=method,
        mode=mode,
        model=model,
        device=device,
    )
    summary = {
        "method": method,
        "mode": mode,
        "first_seg": os.fspath(seg_path),
        "runtime_s": result.runtime_s,
        "frames": [
            {"file": os.fspath(p), **info}
            for p, info in zip(frame_paths, result.frames, strict=True)
        ],
    }
    suffix = output_suffix(seg_path)
    with atomic_output_dir(out, ("seg_*", "disp_*.npy", "summary.json", "track.png")) as tmp:
        for t, (s, d) in enumerate(zip(result.segs, result.disps, strict=True)):
            write_image(str(tmp / f"seg_{t:04d}{suffix}"), s, like=images[0])
            np.save(tmp / f"disp_{t:04d}.npy", d)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        save_figure(
            sequence_figure([img.array for img in images], result.segs),
            tmp / "track.png",
        )
    logger.info("tracked %d frames in %.1f s -> %s", len(images), result.runtime_s, Path(out))
    return summary
