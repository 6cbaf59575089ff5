"""Figures, the HTML report and 2D+t tracking (pddreg.report.figures / html / track)."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
import torch

from pddreg.errors import InputError
from pddreg.report.figures import (
    figure_to_png,
    four_panel_figure,
    grid_figure,
    jacobian_figure,
    middle_slices,
    save_pair_figures,
)
from pddreg.report.html import ReportFigure, render_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _disc_labels(shape: tuple[int, ...], centre_shift: float = 0.0) -> np.ndarray:
    grid = np.indices(shape).astype(np.float32)
    centre = np.array([s / 2 + centre_shift for s in shape], dtype=np.float32)
    r = np.sqrt(((grid - centre.reshape(-1, *([1] * len(shape)))) ** 2).sum(0))
    labels = np.zeros(shape, dtype=np.int64)
    labels[r < min(shape) / 3] = 1
    labels[r < min(shape) / 6] = 2
    return labels


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    w = int.from_bytes(data[16:20], "big")
    h = int.from_bytes(data[20:24], "big")
    return w, h


# ----------------------------------------------------------------------------- figures
def test_middle_slices_2d_and_3d():
    a = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    planes = middle_slices(a)
    assert [p.shape for _, p in planes] == [(5, 6), (4, 6), (4, 5)]
    np.testing.assert_array_equal(planes[0][1], a[2])
    np.testing.assert_array_equal(planes[2][1], a[:, :, 3])
    field = np.zeros((3, 4, 5, 6))
    assert [p.shape for _, p in middle_slices(field, ndim=3)] == [(3, 5, 6), (3, 4, 6), (3, 4, 5)]
    assert middle_slices(a[0])[0][1].shape == (5, 6)


@pytest.mark.parametrize("shape", [(24, 32), (12, 14, 16)])
def test_four_panel_figure(shape):
    rng = np.random.default_rng(0)
    fixed = rng.random(shape).astype(np.float32)
    seg = _disc_labels(shape)
    fig = four_panel_figure(fixed, fixed * 0.5, fixed, seg, _disc_labels(shape, 1.0), title="t")
    rows = 1 if len(shape) == 2 else 3
    axes = fig.get_axes()
    assert len(axes) == 4 * rows
    titles = [ax.get_title() for ax in axes[:4]]
    assert titles[0].startswith("fixed scan + fixed labels")
    assert titles[1].startswith("moving scan + fixed labels")
    assert titles[2].startswith("fixed scan + warped moving labels")
    assert titles[3].startswith("warped moving scan + fixed labels")
    png = figure_to_png(fig, dpi=40)
    w, h = _png_size(png)
    assert w > h > 0  # four panels side by side
    # no labels at all still draws
    assert len(four_panel_figure(fixed, fixed, fixed).get_axes()) == 4 * rows
    with pytest.raises(ValueError, match=r"\(\*S\)"):
        four_panel_figure(fixed, fixed[:-1], fixed)


def test_grid_figure_draws_lines_at_x_plus_u():
    shape = (16, 20)
    disp = np.zeros((2, *shape), dtype=np.float32)
    disp[0] = 1.5  # all fixed points map 1.5 rows down
    disp[1] = -2.0
    fig = grid_figure(disp, image=np.ones(shape), step=4)
    ax = fig.get_axes()[0]
    lines = ax.get_lines()
    assert len(lines) == len(range(0, 16, 4)) + len(range(0, 20, 4))
    # first horizontal line: row 0 -> y = 1.5, x = cols - 2
    x, y = lines[0].get_data()
    np.testing.assert_allclose(y, 1.5)
    np.testing.assert_allclose(x, np.arange(20) - 2.0)
    # 3D: one panel per middle slice, in-plane components
    fig3 = grid_figure(np.zeros((3, 8, 10, 12), dtype=np.float32), step=2)
    assert len(fig3.get_axes()) == 3
    with pytest.raises(ValueError, match="ndim"):
        grid_figure(np.zeros((2, 4, 4, 4)))


def test_jacobian_figure_reports_folding():
    shape = (20, 20)
    disp = np.zeros((2, *shape), dtype=np.float32)
    # compress strongly along axis 1 in a band -> det J <= 0 there
    disp[1, :, 8:12] = -2.5 * (np.arange(4) - 1.5)[None, :]
    from pddreg.spatial import jacobian_det

    jac = jacobian_det(torch.from_numpy(disp)[None])[0].numpy()
    expected = 100 * float(np.mean(jac <= 0))
    assert expected > 0
    fig = jacobian_figure(disp)
    assert f"{expected:.2f}% folding" in fig._suptitle.get_text()
    assert len(fig.get_axes()) == 2  # map + colour bar
    identity = jacobian_figure(np.zeros((3, 6, 6, 6), dtype=np.float32))
    assert "0.00% folding" in identity._suptitle.get_text()


def test_save_pair_figures(tmp_path):
    shape = (24, 28)
    img = np.random.default_rng(1).random(shape).astype(np.float32)
    seg = _disc_labels(shape)
    paths = save_pair_figures(
        tmp_path, "p0", img, img, img, np.zeros((2, *shape)), seg, seg, title="x"
    )
    assert set(paths) == {"pair", "grid", "jacobian"}
    only = save_pair_figures(tmp_path, "p1", img, img, img, np.zeros((2, *shape)), kinds=("grid",))
    assert list(only) == ["grid"] and not (tmp_path / "p1_pair.png").exists()
    for p in paths.values():
        assert p.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".*tmp"))


# ----------------------------------------------------------------------------- html
def test_report_is_self_contained(tmp_path):
    png = figure_to_png(grid_figure(np.zeros((2, 8, 8))), dpi=30)
    rows = [
        {"method": "none", "dice_mean": 0.41, "time": 0.0},
        {"method": "pdd <b>", "dice_mean": float("nan"), "time": 0.07},
    ]
    path = write_report(
        tmp_path / "r" / "report.html",
        title="T & t",
        table_rows=rows,
        table_text="a  b\n1  2",
        figures=[("Pair 0", [ReportFigure("grid <x>", png)])],
        settings={"seed": 3},
        notes=["note"],
    )
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "T &amp; t" in text and "pdd &lt;b&gt;" in text and "grid &lt;x&gt;" in text
    assert "<td>0.410</td>" in text and "&ndash;" in text  # NaN shown as a dash
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(embedded) == 1 and base64.b64decode(embedded[0]) == png
    assert "http" not in text and "<link" not in text  # nothing external
    assert "seed" in text
    # a figure given as a path is embedded too
    p = tmp_path / "f.png"
    p.write_bytes(png)
    assert base64.b64encode(png).decode() in render_report("x", figures=[ReportFigure("f", p)])


# ----------------------------------------------------------------------------- tracking
def _ssd_shift(fixed: torch.Tensor, moving: torch.Tensor, r: int = 4, margin: int = 16):
    """Oracle for integer translations: the u in [-r, r]^2 with fixed(x) = moving(x + u)
    best on the central region (exhaustive SSD search), as a constant field."""
    f, m = fixed[0, 0], moving[0, 0]
    h, w = f.shape
    best, shift = float("inf"), (0, 0)
    for a in range(-r, r + 1):
        for b in range(-r, r + 1):
            ssd = float(
                ((f[r : h - r, r : w - r] - m[r + a : h - r + a, r + b : w - r + b]) ** 2).sum()
            )
            if ssd < best:
                best, shift = ssd, (a, b)
    disp = torch.zeros((1, 2, h, w))
    disp[0, 0], disp[0, 1] = float(shift[0]), float(shift[1])
    return disp


def _smooth_texture(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))[None, None]
    for _ in range(3):
        noise = torch.nn.functional.avg_pool2d(
            noise, 5, stride=1, padding=2, count_include_pad=False
        )
    out = noise[0, 0].numpy()
    return (out - out.min()) / (out.max() - out.min())


@pytest.mark.parametrize("mode", ["anchored", "sequential"])
def test_track_composes_fields_exactly(mode):
    from pddreg.report.track import track_sequence

    shape = (64, 64)
    base = _smooth_texture(shape, 0)
    seg = _disc_labels(shape)
    step = (1, 2)  # frame t(x) = frame0(x + t*step)
    frames = [np.roll(base, (-t * step[0], -t * step[1]), axis=(0, 1)) for t in range(5)]
    res = track_sequence(frames, seg, _ssd_shift, mode=mode, progress=False)
    assert len(res.segs) == len(res.disps) == len(res.frames) == 5
    np.testing.assert_array_equal(res.segs[0], seg)
    for t in range(1, 5):
        np.testing.assert_allclose(res.disps[t][0], t * step[0], atol=1e-4)
        np.testing.assert_allclose(res.disps[t][1], t * step[1], atol=1e-4)
        expect = np.roll(seg, (-t * step[0], -t * step[1]), axis=(0, 1))
        np.testing.assert_array_equal(res.segs[t][:-10, :-10], expect[:-10, :-10])
        assert res.frames[t]["folding_fraction"] == 0.0
    assert res.frames[4]["mean_displacement_vox"] == pytest.approx(np.hypot(4, 8), abs=1e-3)


def test_track_rejects_bad_input():
    from pddreg.report.track import track_sequence

    a = np.zeros((8, 8), dtype=np.float32)
    with pytest.raises(InputError, match="frames"):
        track_sequence([a], a.astype(np.int64), _ssd_shift)
    with pytest.raises(InputError, match="frame 1"):
        track_sequence([a, a[:-1]], a.astype(np.int64), _ssd_shift)
    with pytest.raises(InputError, match="--mode"):
        track_sequence([a, a], a.astype(np.int64), _ssd_shift, mode="x")
    with pytest.raises(InputError, match="--seg"):
        track_sequence([a, a], np.zeros((4, 4), np.int64), _ssd_shift)


def _moving_sequence(frames: int, shape: tuple[int, int] = (64, 64)):
    """Textured scene whose deformation grows over time (drift + a smooth swirl), true labels."""
    from pddreg.spatial import warp, warp_labels

    tex = _smooth_texture(shape, 3)
    seg0 = _disc_labels(shape)
    base = (0.15 + 0.4 * (seg0 >= 1) + 0.3 * (seg0 == 2) + 0.3 * tex).astype(np.float32)
    g = np.indices(shape).astype(np.float32)
    swirl = np.stack([np.sin(g[1] / 10.0), np.cos(g[0] / 12.0)])
    images, labels = [base], [seg0]
    for t in range(1, frames):
        d = torch.from_numpy(t * (np.array([1.2, -0.8])[:, None, None] + 0.6 * swirl))
        d = d.float()[None]
        images.append(warp(torch.from_numpy(base)[None, None], d)[0, 0].numpy())
        labels.append(warp_labels(torch.from_numpy(seg0)[None, None], d)[0, 0].numpy())
    return images, labels


@pytest.mark.slow
def test_track_modes_compared_on_a_moving_sequence():
    """Both chaining modes beat copying the first labels; anchored (the default) is not worse."""
    from pddreg.metrics import mean_dice
    from pddreg.report.track import track_sequence

    images, truth = _moving_sequence(6)
    scores = {}
    for mode in ("anchored", "sequential"):
        res = track_sequence(
            images, truth[0], method="mind", mode=mode, device="cpu", progress=False
        )
        scores[mode] = float(np.mean([mean_dice(truth[t], res.segs[t]) for t in range(1, 6)]))
    copy = float(np.mean([mean_dice(truth[t], truth[0]) for t in range(1, 6)]))
    print(f"mean Dice over frames: copy {copy:.3f}, {scores}")
    assert scores["anchored"] > copy + 0.1 and scores["sequential"] > copy + 0.1
    assert scores["anchored"] >= scores["sequential"] - 0.01


def test_sequence_figure_picks_evenly_spaced_frames():
    from pddreg.report.figures import sequence_figure

    shape = (12, 16)
    frames = [np.random.default_rng(t).random(shape) for t in range(20)]
    segs = [_disc_labels(shape, t / 10) for t in range(20)]
    fig = sequence_figure(frames, segs, max_frames=5)
    assert [ax.get_title() for ax in fig.get_axes()] == [f"frame {t}" for t in (0, 5, 10, 14, 19)]
    with pytest.raises(ValueError, match="label maps"):
        sequence_figure(frames, segs[:3])
