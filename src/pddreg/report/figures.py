"""Pictures of a registration (matplotlib, Agg; no pyplot state): the lecture's four-panel
figure, a deformation grid and a Jacobian-determinant map. 3D inputs show their middle slices
(one row per axis).

Convention: images and label maps are ``(*S)`` arrays, fields ``(ndim, *S)`` in voxel units with
``warped(x) = moving(x + u(x))`` (:mod:`pddreg.spatial`). The grid picture draws the fixed grid's
lines at their positions ``x + u(x)`` in the moving image.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import ListedColormap, TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = [
    "figure_to_png",
    "four_panel_figure",
    "grid_figure",
    "jacobian_figure",
    "label_colormap",
    "middle_slices",
    "save_figure",
    "save_pair_figures",
    "sequence_figure",
]

_AXIS_NAMES = ("axis 0", "axis 1", "axis 2")
_PANEL_WIDTH = 3.2  # inches per panel


def _np(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def middle_slices(array: np.ndarray, ndim: int | None = None) -> list[tuple[str, np.ndarray]]:
    """The 2D planes to show of an image ``(*S)``: itself in 2D, the three middle slices in 3D.

    Args:
        array: ``(*S)`` or, for a field, ``(C, *S)`` with ``ndim`` given (slices keep C first).
        ndim: spatial dimensions (default: ``array.ndim``).

    Returns:
        list of (name, plane) where plane is ``(H, W)`` (or ``(C, H, W)``).
    """
    ndim = array.ndim if ndim is None else ndim
    lead = array.ndim - ndim
    if ndim == 2:
        return [("", array)]
    if ndim != 3:
        raise ValueError(f"middle_slices(): expected 2 or 3 spatial axes, got {ndim}")
    shape = array.shape[lead:]
    out = []
    for axis in range(3):
        index = [slice(None)] * array.ndim
        index[lead + axis] = shape[axis] // 2
        out.append((f"{_AXIS_NAMES[axis]} = {shape[axis] // 2}", array[tuple(index)]))
    return out


def label_colormap(num_labels: int) -> ListedColormap:
    """A qualitative colour map for labels ``0..num_labels`` (0 is drawn transparent)."""
    tab20 = matplotlib.colormaps["tab20"].colors
    base = tab20[0::2] + tab20[1::2]  # ten distinct hues first, then their light variants
    colours = [(0.0, 0.0, 0.0, 0.0)] + [(*base[i % len(base)][:3], 1.0) for i in range(num_labels)]
    return ListedColormap(colours)


def _display_range(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _show(
    ax: Any,
    image: np.ndarray,
    labels: np.ndarray | None,
    num_labels: int,
    title: str,
    vrange: tuple[float, float],
) -> None:
    ax.imshow(image, cmap="gray", vmin=vrange[0], vmax=vrange[1], interpolation="nearest")
    if labels is not None and num_labels > 0:
        cmap = label_colormap(num_labels)
        ax.imshow(
            np.ma.masked_equal(labels, 0),
            cmap=cmap,
            vmin=-0.5,
            vmax=num_labels + 0.5,
            alpha=0.35,
            interpolation="nearest",
        )
        present = [int(v) for v in np.unique(labels) if v > 0]
        for lab in present:
            ax.contour(
                (labels == lab).astype(np.float32),
                levels=[0.5],
                colors=[cmap(lab)],
                linewidths=0.8,
            )
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def four_panel_figure(
    fixed: Any,
    moving: Any,
    warped: Any,
    fixed_seg: Any = None,
    warped_seg: Any = None,
    title: str | None = None,
) -> Figure:
    """The lecture's four panels of one registered pair.

    Panels: fixed scan + fixed labels; moving scan + fixed labels (the misalignment before);
    fixed scan + warped moving labels; warped moving scan + fixed labels (the alignment after).
    3D volumes give one row per axis (middle slices).

    Args:
        fixed, moving, warped: images ``(*S)``; ``warped`` is the moving image warped onto the
            fixed grid.
        fixed_seg, warped_seg: label maps ``(*S)`` or None (then no overlay in those panels).
        title: figure title.
    """
    fixed, moving, warped = _np(fixed), _np(moving), _np(warped)
    fixed_seg, warped_seg = _np(fixed_seg), _np(warped_seg)
    if not (fixed.shape == moving.shape == warped.shape):
        raise ValueError(
            "four_panel_figure(): fixed, moving and warped must share one shape (*S), got "
            f"{fixed.shape}, {moving.shape}, {warped.shape}"
        )
    num_labels = 0
    for seg in (fixed_seg, warped_seg):
        if seg is not None:
            if seg.shape != fixed.shape:
                raise ValueError(
                    f"four_panel_figure(): label maps must have shape {fixed.shape}, "
                    f"got {seg.shape}"
                )
            num_labels = max(num_labels, int(seg.max(initial=0)))
    rows = middle_slices(fixed)
    fig = Figure(figsize=(4 * _PANEL_WIDTH, len(rows) * _PANEL_WIDTH * _aspect(rows[0][1]) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 4, squeeze=False)
    f_sl = middle_slices(fixed)
    m_sl = middle_slices(moving)
    w_sl = middle_slices(warped)
    fs_sl = middle_slices(fixed_seg) if fixed_seg is not None else [("", None)] * len(rows)
    ws_sl = middle_slices(warped_seg) if warped_seg is not None else [("", None)] * len(rows)
    vr_f = _display_range(fixed)
    vr_m = _display_range(moving)
    for r, (name, _) in enumerate(rows):
        suffix = f"\n{name}" if name else ""
        f2, m2, w2, fs2, ws2 = f_sl[r][1], m_sl[r][1], w_sl[r][1], fs_sl[r][1], ws_sl[r][1]
        _show(axes[r, 0], f2, fs2, num_labels, "fixed scan + fixed labels" + suffix, vr_f)
        _show(axes[r, 1], m2, fs2, num_labels, "moving scan + fixed labels" + suffix, vr_m)
        _show(axes[r, 2], f2, ws2, num_labels, "fixed scan + warped moving labels" + suffix, vr_f)
        _show(axes[r, 3], w2, fs2, num_labels, "warped moving scan + fixed labels" + suffix, vr_m)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _aspect(plane: np.ndarray) -> float:
    h, w = plane.shape[-2:]
    return float(h) / float(max(w, 1))


def grid_figure(
    disp: Any,
    image: Any = None,
    step: int | None = None,
    title: str | None = None,
) -> Figure:
    """The fixed grid's lines drawn at their mapped positions ``x + u(x)`` (deformation grid).

    Args:
        disp: field ``(ndim, *S)`` in voxels.
        image: optional background ``(*S)`` (e.g. the moving image, in which the lines land).
        step: spacing of the drawn lines in voxels (default: about 32 lines across).
        title: figure title.

    3D: one panel per middle slice, drawn with the in-plane components of the field.
    """
    disp = _np(disp).astype(np.float32)
    ndim = disp.shape[0]
    if disp.ndim != ndim + 1 or ndim not in (2, 3):
        raise ValueError(f"grid_figure(): 'disp' must have shape (ndim, *S), got {disp.shape}")
    image = _np(image)
    planes = middle_slices(disp, ndim=ndim)
    img_planes = middle_slices(image) if image is not None else [("", None)] * len(planes)
    fig = Figure(figsize=(len(planes) * 4.2, 4.2 * _aspect(planes[0][1]) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(planes), squeeze=False)[0]
    for i, (name, plane) in enumerate(planes):
        in_plane = [a for a in range(ndim) if ndim == 2 or a != i]
        ua, ub = plane[in_plane[0]], plane[in_plane[1]]
        h, w = ua.shape
        s = step or max(2, int(round(max(h, w) / 32)))
        ax = axes[i]
        if img_planes[i][1] is not None:
            vr = _display_range(img_planes[i][1])
            ax.imshow(img_planes[i][1], cmap="gray", vmin=vr[0], vmax=vr[1], alpha=0.6)
        rows = np.arange(h, dtype=np.float32)[:, None]
        cols = np.arange(w, dtype=np.float32)[None, :]
        y = rows + ua
        x = cols + ub
        for r in range(0, h, s):
            ax.plot(x[r, :], y[r, :], color="tab:red", linewidth=0.6)
        for c in range(0, w, s):
            ax.plot(x[:, c], y[:, c], color="tab:red", linewidth=0.6)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_aspect("equal")
        ax.set_axis_off()
        mag = np.sqrt(ua**2 + ub**2)
        ax.set_title(
            (name + "\n" if name else "") + f"in-plane |u| max {mag.max():.1f} vox",
            fontsize=9,
        )
    fig.suptitle(title or "deformation grid (fixed grid mapped by x + u(x))", fontsize=10)
    fig.tight_layout()
    return fig


def jacobian_figure(disp: Any, title: str | None = None) -> Figure:
    """Jacobian determinant of ``x -> x + u(x)``: diverging colours centred at 1, folds in black.

    Args:
        disp: field ``(ndim, *S)`` in voxels (the determinant does not depend on the spacing).
        title: figure title.
    """
    from ..spatial import jacobian_det

    d = _np(disp).astype(np.float32)
    ndim = d.shape[0]
    if d.ndim != ndim + 1 or ndim not in (2, 3):
        raise ValueError(f"jacobian_figure(): 'disp' must have shape (ndim, *S), got {d.shape}")
    jac = jacobian_det(torch.from_numpy(d)[None])[0].cpu().numpy()
    folding = float(np.mean(jac <= 0))
    logj = np.log(np.clip(jac, 1e-9, 1e9))
    planes = middle_slices(jac)
    fig = Figure(figsize=(len(planes) * 4.2 + 0.8, 4.2 * _aspect(planes[0][1]) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(planes), squeeze=False)[0]
    spread = float(np.percentile(np.abs(jac - 1.0), 99.5)) if jac.size else 0.0
    spread = min(max(spread, 0.05), 1.0)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=1.0 - spread, vmax=1.0 + spread)
    im = None
    for ax, (name, plane) in zip(axes, planes, strict=True):
        im = ax.imshow(plane, cmap="RdBu_r", norm=norm, interpolation="nearest")
        folds = plane <= 0
        if folds.any():
            ax.imshow(
                np.ma.masked_where(~folds, np.ones_like(plane)),
                cmap=ListedColormap([(0.0, 0.0, 0.0, 1.0)]),
                interpolation="nearest",
            )
        ax.set_title(name or "det J", fontsize=9)
        ax.set_axis_off()
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="det J (folds J <= 0 in black)")
    fig.suptitle(
        title
        or f"Jacobian determinant: {100 * folding:.2f}% folding, SDlogJ {float(np.std(logj)):.3f}",
        fontsize=10,
    )
    return fig


def sequence_figure(
    frames: Sequence[Any],
    segs: Sequence[Any],
    max_frames: int = 8,
    title: str | None = None,
) -> Figure:
    """Frames of a sequence with their (propagated) label maps, up to ``max_frames`` evenly
    spaced ones in a row; 3D frames show their middle slice along axis 0.

    Args:
        frames: T images ``(*S)``.
        segs: T label maps ``(*S)``.
    """
    if len(frames) != len(segs) or not frames:
        raise ValueError(
            f"sequence_figure(): need as many label maps as frames, got {len(segs)} and "
            f"{len(frames)}"
        )
    picks = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round())
    planes = [
        (middle_slices(_np(frames[int(t)]))[0][1], middle_slices(_np(segs[int(t)]))[0][1])
        for t in picks
    ]
    num_labels = max(int(s.max(initial=0)) for _, s in planes)
    fig = Figure(figsize=(len(planes) * 2.6, 2.6 * _aspect(planes[0][0]) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(planes), squeeze=False)[0]
    vrange = _display_range(np.stack([p for p, _ in planes]))
    for ax, t, (image, seg) in zip(axes, picks, planes, strict=True):
        _show(ax, image, seg, num_labels, f"frame {int(t)}", vrange)
    fig.suptitle(title or "labels propagated from frame 0", fontsize=10)
    fig.tight_layout()
    return fig


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Write a figure as PNG (atomically: a temporary file, then ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(figure_to_png(fig, dpi=dpi))
    os.replace(tmp, path)
    return path


def save_pair_figures(
    out_dir: str | os.PathLike[str],
    prefix: str,
    fixed: Any,
    moving: Any,
    warped: Any,
    disp: Any,
    fixed_seg: Any = None,
    warped_seg: Any = None,
    title: str | None = None,
    kinds: Sequence[str] = ("pair", "grid", "jacobian"),
) -> dict[str, Path]:
    """Write ``<prefix>_pair.png`` (four panels), ``<prefix>_grid.png`` (deformation grid over
    the moving image) and ``<prefix>_jacobian.png``, or the subset named in ``kinds``.

    Returns:
        dict kind -> path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = {
        "pair": lambda: four_panel_figure(
            fixed, moving, warped, fixed_seg, warped_seg, title=title
        ),
        "grid": lambda: grid_figure(
            disp, image=moving, title=f"{title}: deformation grid" if title else None
        ),
        "jacobian": lambda: jacobian_figure(disp),
    }
    unknown = set(kinds) - set(makers)
    if unknown:
        raise ValueError(f"save_pair_figures(): unknown kinds {sorted(unknown)}")
    return {k: save_figure(makers[k](), out / f"{prefix}_{k}.png") for k in kinds}
