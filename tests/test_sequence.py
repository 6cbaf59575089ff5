"""The sequence phantom, polygon segmentations, and tracking: cycle error, the direct mode,
the signal mask, the combination with a segmentation, the animation and the curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from pddreg.data.polygons import rasterise_polygons, read_polygons
from pddreg.data.sequence import SEQUENCE_LABELS, SequenceDataset, make_sequence
from pddreg.errors import InputError
from pddreg.report.track import signal_mask, track_sequence, tracking_register_fn


def _dice(a: np.ndarray, b: np.ndarray, lab: int) -> float:
    x, y = a == lab, b == lab
    return float(2 * (x & y).sum() / max(1, x.sum() + y.sum()))


def test_sequence_phantom_moves_as_documented():
    images, labels = make_sequence(8, (64, 72), seed=3)
    again, _ = make_sequence(8, (64, 72), seed=3)
    assert images.shape == labels.shape == (8, 64, 72) and np.array_equal(images, again)
    assert images.dtype == np.float32 and 0 <= images.min() and images.max() <= 1
    assert SEQUENCE_LABELS == ("background", "heart", "instrument")
    for t in range(8):
        assert set(np.unique(labels[t])) == {0, 1, 2}
    centre = [np.argwhere(labels[t] == 2).mean(0) for t in range(8)]
    steps = [np.linalg.norm(centre[t + 1] - centre[t]) for t in range(7)]
    assert min(steps) > 2.0  # the instrument moves fast
    pool = [((labels[t] == 0) & (images[t] < 0.2)).sum() for t in range(8)]
    assert max(pool) > 1.2 * min(pool)  # the heart beats (its dark blood pool changes)
    with pytest.raises(InputError):
        make_sequence(1)
    ds = SequenceDataset([3, 4], frames=8, shape=(64, 72))
    assert len(ds) == 16 and ds.indices("train")[:2] == [0, 8] and ds.num_labels == 3
    assert np.array_equal(ds.subject(2).image, images[2]) and len(ds.pairs("train")) == 2 * 56


def test_one_step_registration_beats_copying_the_previous_frame():
    """The lecture's baseline (the previous frame's segmentation as it is) against the same
    segmentation warped by the tracking registration of frame t onto frame t-1."""
    from pddreg.data.io import normalise_intensity
    from pddreg.spatial import warp_labels

    images, truth = make_sequence(6, (72, 84), seed=1)
    fn = tracking_register_fn("mind", 2)
    copy, warped = {1: [], 2: []}, {1: [], 2: []}
    for t in range(1, 6):
        f = torch.from_numpy(normalise_intensity(images[t]))[None, None]
        m = torch.from_numpy(normalise_intensity(images[t - 1]))[None, None]
        seg = warp_labels(torch.from_numpy(truth[t - 1])[None, None], fn(f, m))[0, 0].numpy()
        for lab in (1, 2):
            copy[lab].append(_dice(truth[t], truth[t - 1], lab))
            warped[lab].append(_dice(truth[t], seg, lab))
    for lab in (1, 2):
        assert np.mean(warped[lab]) > np.mean(copy[lab]) + 0.03, lab
    assert np.mean(warped[2]) > np.mean(copy[2]) + 0.2  # the fast instrument


def test_polygons_rasterise(tmp_path):
    doc = {
        "shape": [20, 30],
        "polygons": [
            {"label": 2, "points": [[2, 2], [2, 12], [12, 12], [12, 2]]},
            {"label": 1, "points": [[5, 5], [5, 9], [9, 9], [9, 5]]},
        ],
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    seg = rasterise_polygons(read_polygons(path))
    assert seg.shape == (20, 30)
    assert (seg == 1).sum() == 25 and (seg == 2).sum() == 121 - 25  # inclusive pixel centres
    assert seg[7, 7] == 1 and seg[3, 3] == 2 and seg[15, 20] == 0
    with pytest.raises(InputError, match="shape"):
        rasterise_polygons(read_polygons(path), (10, 10))
    path.write_text(json.dumps({"polygons": [{"label": 0, "points": [[0, 0], [1, 1], [2, 0]]}]}))
    with pytest.raises(InputError, match="label"):
        read_polygons(path)


def _shift_oracle(fixed, moving, fixed_mask=None, moving_mask=None, r=4):
    """The integer shift u with fixed(x) = moving(x + u), as a constant field (SSD search)."""
    f, m = fixed[0, 0], moving[0, 0]
    h, w = f.shape
    best, shift = float("inf"), (0, 0)
    for a in range(-r, r + 1):
        for b in range(-r, r + 1):
            ssd = float(((f[r:-r, r:-r] - m[r + a : h - r + a, r + b : w - r + b]) ** 2).sum())
            if ssd < best:
                best, shift = ssd, (a, b)
    return torch.tensor(shift, dtype=torch.float32).view(1, 2, 1, 1).expand(1, 2, h, w).clone()


@pytest.mark.parametrize("mode", ["anchored", "sequential", "direct"])
def test_cycle_error_of_exact_shifts_is_zero(mode):
    rng = np.random.default_rng(0)
    base = torch.nn.functional.avg_pool2d(
        torch.from_numpy(rng.random((1, 1, 48, 48)).astype(np.float32)), 5, 1, 2
    )[0, 0].numpy()
    frames = [np.roll(base, (-t, -t), axis=(0, 1)) for t in range(4)]
    seg = np.zeros((48, 48), np.int64)
    seg[16:32, 16:32] = 1
    res = track_sequence(frames, seg, _shift_oracle, mode=mode, cycle=True, progress=False)
    for t in range(1, 4):
        assert res.frames[t]["cycle_error_px"] == pytest.approx(0.0, abs=1e-4)
        np.testing.assert_allclose(res.disps[t], t, atol=1e-4)
    assert res.fps > 0 and res.cycle_runtime_s > 0


def test_signal_mask_and_combination_with_a_segmenter():
    frames = [np.zeros((40, 48), np.float32) for _ in range(3)]
    for f in frames:
        f[8:32, 10:40] = np.random.default_rng(0).random((24, 30))
    mask = signal_mask(frames)
    assert mask is not None and mask[20, 25] == 1 and mask[2, 2] == 0
    assert signal_mask([np.random.default_rng(1).random((20, 20)) for _ in range(2)]) is None
    truth = np.zeros((40, 48), np.int64)
    truth[12:20, 14:30] = 1

    def oracle(frame):  # a perfect segmentation of every frame
        return (
            torch.nn.functional.one_hot(torch.from_numpy(truth), 2).permute(2, 0, 1)[None].float()
        )

    def zero(fixed, moving, fixed_mask=None, moving_mask=None):
        assert fixed_mask is not None and fixed_mask.shape == fixed.shape
        return torch.full((1, 2, 40, 48), 3.0)  # a wrong field: the propagation alone fails

    res = track_sequence(frames, truth, zero, segmenter=oracle, combine=0.7, progress=False)
    assert res.propagated is not None and not np.array_equal(res.propagated[2], truth)
    assert np.array_equal(res.segs[2], truth)
    with pytest.raises(InputError, match="combine"):
        track_sequence(frames, truth, zero, combine=1.5)


def test_track_command_writes_animation_and_curves(tmp_path):
    from pddreg.cli import main

    images, labels = make_sequence(4, (48, 56), seed=0)
    paths = []
    for t, img in enumerate(images):
        paths.append(str(tmp_path / f"f{t}.png"))
        PILImage.fromarray((img * 255).astype(np.uint8)).save(paths[-1])
    doc = {"shape": [48, 56], "labels": {"1": "box"}}
    doc["polygons"] = [{"label": 1, "points": [[10, 10], [10, 30], [30, 30], [30, 10]]}]
    (tmp_path / "seg.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    args = ["track", *paths, "--seg", str(tmp_path / "seg.json"), "-o", str(out)]
    assert main([*args, "--method", "mind", "--mode", "direct"]) == 0
    gif = PILImage.open(out / "track.gif")
    assert gif.n_frames == 4 and gif.size == (56, 48)
    assert (out / "curves.png").is_file() and (out / "seg_0003.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "direct" and summary["label_names"] == {"1": "box"}
    assert summary["mean_cycle_error_px"] is not None and summary["fps"] > 0
    first = np.asarray(PILImage.open(out / "seg_0000.png"))
    assert (first == 1).sum() == 21 * 21
