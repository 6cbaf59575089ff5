"""Pictures of a tracked 2D+t sequence: the overlay animation and the per-frame curves.

- :func:`write_animation`: an animated GIF (Pillow's writer) of the frames with the contours of
  the propagated labels drawn over them (one colour per label; optionally a second set, e.g. the
  combination with a segmentation model, dashed in white), the frame number in the corner;
- :func:`curves_figure`: per frame, the area of every label, the cycle error (the consistency
  of registering t -> 0 -> t, when measured) and the registration time.

3D+t sequences show their middle slice along axis 0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LABEL_COLOURS", "contour_overlay", "curves_figure", "write_animation"]

#: RGB colours of labels 1, 2, ... in the animation (then repeated).
LABEL_COLOURS: tuple[tuple[int, int, int], ...] = (
    (60, 230, 60),
    (255, 60, 220),
    (60, 200, 255),
    (255, 200, 40),
    (255, 80, 60),
)


def _plane(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a[a.shape[0] // 2] if a.ndim == 3 else a


def _edges(mask: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` outermost pixel rings of ``mask`` (inside it, so that the contours of two
    touching labels lie side by side instead of over each other)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, iterations=max(1, width), border_value=0)


def contour_overlay(
    frame: np.ndarray,
    seg: np.ndarray,
    vrange: tuple[float, float],
    other: np.ndarray | None = None,
    width: int = 1,
) -> np.ndarray:
    """``(H, W, 3)`` uint8: the frame in grey (``vrange`` mapped to 0-255) with the contour of
    every label of ``seg`` in its :data:`LABEL_COLOURS` colour (and of ``other``, white)."""
    lo, hi = vrange
    grey = np.clip((np.asarray(frame, np.float64) - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = np.repeat((255 * grey).astype(np.uint8)[..., None], 3, axis=2)
    if other is not None:
        for lab in (int(v) for v in np.unique(other) if v > 0):
            edge = _edges(other == lab, width)
            rgb[edge] = (255, 255, 255)
    for lab in (int(v) for v in np.unique(seg) if v > 0):
        rgb[_edges(seg == lab, width)] = LABEL_COLOURS[(lab - 1) % len(LABEL_COLOURS)]
    return rgb


def write_animation(
    path: str | os.PathLike,
    frames: Sequence[Any],
    segs: Sequence[Any],
    *,
    other: Sequence[Any] | None = None,
    fps: float = 15.0,
    scale: int = 1,
    gamma: float = 1.0,
) -> Path:
    """Write the overlay animation as an animated GIF (looping) with Pillow.

    Args:
        path: output file (``.gif``).
        frames: T images ``(*S)``; the grey range is the 0.5-99.5 percentiles over the sequence.
        segs: T label maps ``(*S)`` whose contours are drawn.
        other: optional T label maps drawn in white under ``segs`` (e.g. the propagated labels
            when ``segs`` are their combination with a segmentation model).
        fps: frames per second of the animation.
        scale: integer magnification (nearest neighbour).
        gamma: grey-level gamma (< 1 brightens dark images such as ultrasound).
    """
    from PIL import Image, ImageDraw

    if len(frames) != len(segs) or not frames:
        raise ValueError(
            f"write_animation(): need as many label maps as frames, got {len(segs)} and "
            f"{len(frames)}"
        )
    planes = [_plane(f).astype(np.float32) for f in frames]
    stack = np.stack(planes[:: max(1, len(planes) // 16)])
    lo, hi = (float(v) for v in np.percentile(stack, [0.5, 99.5]))
    hi = hi if hi > lo else lo + 1.0
    images = []
    for t, (img, seg) in enumerate(zip(planes, segs, strict=True)):
        g = np.clip((img - lo) / (hi - lo), 0, 1) ** gamma
        rgb = contour_overlay(
            g,
            _plane(seg),
            (0.0, 1.0),
            None if other is None else _plane(other[t]),
            width=2,
        )
        im = Image.fromarray(rgb)
        if scale > 1:
            im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
        ImageDraw.Draw(im).text((4, 4), f"{t}", fill=(255, 255, 0))
        images.append(im.convert("P", palette=Image.ADAPTIVE, colors=255))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.gif")
    images[0].save(
        tmp,
        save_all=True,
        append_images=images[1:],
        duration=max(1, int(round(1000.0 / fps))),
        loop=0,
        disposal=1,
    )
    os.replace(tmp, out)
    return out


def curves_figure(
    frames: Sequence[dict[str, Any]],
    label_names: dict[int, str] | None = None,
    title: str | None = None,
) -> Any:
    """Per-frame curves of a tracking summary (:func:`pddreg.report.track.track_sequence`'s
    ``frames`` dicts): label areas (pixels), the cycle error t -> 0 -> t (pixels; both modes of
    the summary where present) and the registration time (ms)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = label_names or {}
    t = [f["frame"] for f in frames]
    has_cycle = any(f.get("cycle_error_px") is not None for f in frames)
    rows = 3 if has_cycle else 2
    fig = Figure(figsize=(8, 2.3 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    labels = sorted({int(k) for f in frames for k in f.get("label_voxels", {})})
    for lab in labels:
        area = [f["label_voxels"].get(str(lab), np.nan) for f in frames]
        colour = np.asarray(LABEL_COLOURS[(lab - 1) % len(LABEL_COLOURS)]) / 255
        axes[0].plot(t, area, color=colour, label=names.get(lab, f"label {lab}"))
    axes[0].set_ylabel("area (pixels)")
    axes[0].legend(fontsize=8, loc="best")
    k = 1
    if has_cycle:
        for key, name, style in (
            ("cycle_error_px", "in the labels", "-"),
            ("cycle_error_frame_px", "whole frame", "--"),
        ):
            vals = [np.nan if f.get(key) is None else f[key] for f in frames]
            axes[k].plot(t, vals, style, color="k", label=name)
        axes[k].set_ylabel("cycle error (px)")
        axes[k].legend(fontsize=8, loc="best")
        k += 1
    axes[k].plot(t, [1000 * f.get("runtime_s", np.nan) for f in frames], color="tab:blue")
    axes[k].set_ylabel("registration (ms)")
    axes[k].set_xlabel("frame")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
