"""Registration uncertainty: the spread of the displacement probabilities, its map on the fixed
grid, soft label transfer, the register outputs and their TRE with landmarks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from scipy import ndimage

import pddreg
from pddreg.cli import main
from pddreg.cost import displacement_set, prob_variance, soft_field, soft_variance
from pddreg.optim import Posterior, register_mind


def _texture(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.random(shape), 1.5)
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32)


def test_soft_variance_known_answers():
    # flat cost: the uniform distribution over {-r..r} * spacing: variance s^2 r (r + 1) / 3
    r, s = 3, 2.0
    flat = torch.zeros(1, (2 * r + 1) ** 2, 4, 5)
    var = soft_variance(flat, r, s)
    assert var.shape == (1, 2, 4, 5)
    assert torch.allclose(var, torch.full_like(var, s * s * r * (r + 1) / 3), atol=1e-4)
    # one displacement much cheaper than the others: no spread
    peaked = torch.full_like(flat, 50.0)
    peaked[:, 10] = 0.0
    assert float(soft_variance(peaked, r, s).max()) < 1e-6
    # random costs: the chunked variance equals the plain one from the probabilities
    cost = torch.randn(2, 25, 6, 7) * 3
    disps = displacement_set(2, 1.5, 2)
    want = prob_variance(torch.softmax(-cost, 1), disps)
    assert torch.allclose(soft_variance(cost, 2, 1.5, max_memory=2000), want, atol=1e-4)
    # and its mean is the soft field's
    p = torch.softmax(-cost, 1)
    mean = torch.einsum("bl...,li->bi...", p, disps)
    assert torch.allclose(mean, soft_field(cost, 2, 1.5), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 25, \*grid\)"):
        soft_variance(torch.zeros(1, 24, 3, 3), 2)


def test_mind_uncertainty_is_high_where_the_image_is_flat():
    img = _texture((64, 72))
    img[:, 40:] = 0.5  # the right part carries no information
    shifted = np.roll(img, 2, axis=0)
    post = Posterior()
    f = torch.from_numpy(img)[None, None]
    m = torch.from_numpy(shifted)[None, None]
    register_mind(f, m, posterior=post)
    assert post.variance is not None and post.variance.shape == (1, 2, 64, 72)
    assert post.levels == 3 and post.prob is not None
    unc = post.variance.sum(1).sqrt()[0]
    textured, flat = float(unc[8:56, 6:32].mean()), float(unc[8:56, 48:66].mean())
    assert flat > 2 * textured


def test_register_uncertainty_and_soft_label_transfer():
    img = _texture((48, 56), 1)
    seg = np.zeros(img.shape, np.int64)
    seg[10:30, 12:30] = 1
    seg[30:40, 30:50] = 2
    moving = np.roll(img, (2, -1), axis=(0, 1))
    mseg = np.roll(seg, (2, -1), axis=(0, 1))
    plain = pddreg.register(img, moving, method="mind", affine="off", moving_seg=mseg)
    assert plain.uncertainty is None and plain.warped_prob is None
    res = pddreg.register(
        img, moving, method="mind", affine="off", moving_seg=mseg, uncertainty=True
    )
    assert np.array_equal(res.disp, plain.disp)  # recording changes nothing
    assert res.uncertainty.shape == img.shape and np.all(res.uncertainty >= 0)
    prob = res.warped_prob
    assert prob.shape == (3, *img.shape)
    assert np.allclose(prob.sum(0), 1.0, atol=1e-4)
    agree = (prob.argmax(0) == res.warped_seg).mean()
    assert agree > 0.95
    # the soft labels are sharp inside the structures and soft only near their borders
    inner = ndimage.binary_erosion(seg == 1, iterations=3)
    assert prob[1][inner].mean() > 0.9
    # pdd (the shipped 2D weights) records its levels through a forward hook
    res = pddreg.register(
        img, moving, method="pdd", affine="off", moving_seg=mseg, uncertainty=True
    )
    assert res.uncertainty.shape == img.shape and res.warped_prob.shape == (3, *img.shape)
    assert np.isfinite(res.uncertainty).all()


def _png(path: Path, array: np.ndarray, labels: bool = False) -> str:
    data = array.astype(np.uint8) if labels else (array * 255).round().astype(np.uint8)
    PILImage.fromarray(data).save(path)
    return str(path)


def test_register_command_writes_uncertainty_and_tre(tmp_path, capsys):
    img = _texture((48, 56), 2)
    seg = np.zeros(img.shape, np.uint8)
    seg[12:34, 14:40] = 1
    shift = (3, -2)  # moving(y) = fixed(y - shift): fixed x sits at moving x + shift
    moving = ndimage.shift(img, shift, order=1, mode="nearest")
    mseg = ndimage.shift(seg, shift, order=0)
    fixed_pts = np.array([[20.0, 20.0], [30.5, 35.0], [15.0, 40.0]])
    (tmp_path / "f.csv").write_text("i,j\n" + "\n".join(f"{a},{b}" for a, b in fixed_pts))
    moved = fixed_pts + np.array(shift)
    (tmp_path / "m.csv").write_text("\n".join(f"{a},{b}" for a, b in moved))  # no header: voxels
    args = [
        _png(tmp_path / "f.png", img),
        _png(tmp_path / "m.png", moving),
        "--moving-seg",
        _png(tmp_path / "ms.png", mseg, labels=True),
        "--fixed-landmarks",
        str(tmp_path / "f.csv"),
        "--moving-landmarks",
        str(tmp_path / "m.csv"),
        "--affine",
        "off",
    ]
    assert main(["register", *args, "-o", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    for name in ("uncertainty.npy", "uncertainty.png", "warped_prob.npy", "metrics.json"):
        assert (out / name).is_file(), name
    assert np.load(out / "uncertainty.npy").shape == img.shape
    assert np.load(out / "warped_prob.npy").shape == (2, *img.shape)
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["tre_before_mm"] == pytest.approx(np.hypot(*shift), abs=1e-6)
    assert doc["tre_mm"] < 0.5 < doc["tre_before_mm"]
    assert doc["tre"]["landmarks"] == 3 and len(doc["tre"]["per_landmark_after_mm"]) == 3
    assert "TRE" in capsys.readouterr().out
    # without: the files of the earlier run into the same folder are removed
    assert main(["register", *args, "-o", str(out), "--no-uncertainty"]) == 0
    assert not (out / "uncertainty.npy").exists() and not (out / "warped_prob.npy").exists()
    # mismatched landmark files end with one line and exit code 2
    (tmp_path / "m2.csv").write_text("1,2\n3,4\n")
    bad = [*args[:6], "--moving-landmarks", str(tmp_path / "m2.csv")]
    assert main(["register", *bad, "-o", str(tmp_path / "bad")]) == 2
    assert "3 fixed" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_uncertainty_figure_shows_planes_at_their_physical_aspect():
    from pddreg.report.uncertainty import plane_aspects, uncertainty_figure

    assert plane_aspects(3, (0.6, 0.6, 5.0)) == [0.12, 0.12, 1.0]
    assert plane_aspects(3, (2.0, 1.0, 1.0)) == [1.0, 2.0, 2.0]
    assert plane_aspects(2, (1.0, 0.5)) == [2.0]
    assert plane_aspects(3, None) == [1.0, 1.0, 1.0]
    vol = np.random.default_rng(0).random((20, 24, 6)).astype(np.float32)
    fig = uncertainty_figure(vol, vol, spacing=(0.6, 0.6, 5.0))
    aspects = [ax.get_aspect() for ax in fig.axes if ax.images]
    assert aspects[:2] == [0.12, 0.12] and aspects[-1] == 1.0


def test_uncertainty_map_weights_each_axis_by_its_voxel_size():
    from pddreg.optim.uncertainty import uncertainty_map

    var = torch.ones(1, 3, 2, 3, 4)
    var[:, 2] = 4.0  # 2 voxels of spread along the last axis
    assert torch.allclose(uncertainty_map(var), torch.full((1, 1, 2, 3, 4), 6.0**0.5))
    mm = uncertainty_map(var, (0.5, 0.5, 5.0))  # 0.25 + 0.25 + 4 * 25 mm^2
    assert torch.allclose(mm, torch.full((1, 1, 2, 3, 4), 100.5**0.5))
    with pytest.raises(ValueError, match="3 values"):
        uncertainty_map(var, (1.0, 1.0))


def test_register_uncertainty_is_in_mm():
    img = _texture((48, 56), 1)
    moving = np.roll(img, (2, -1), axis=(0, 1))
    vox = pddreg.register(img, moving, method="mind", affine="off", uncertainty=True)
    mm = pddreg.register(
        img, moving, method="mind", affine="off", uncertainty=True, spacing=(2.0, 2.0)
    )
    # the same search on voxels twice as large: the same field in voxels, twice the spread in mm
    assert np.array_equal(vox.disp, mm.disp)
    assert np.allclose(mm.uncertainty, 2.0 * vox.uncertainty, rtol=1e-5, atol=1e-6)


def test_pdd_uncertainty_counts_the_refinement_levels():
    from pddreg.models import pretrained
    from pddreg.optim.uncertainty import record_forward

    img = _texture((48, 56), 1)
    moving = np.roll(img, (2, -1), axis=(0, 1))
    f, m = (torch.from_numpy(x)[None, None] for x in (img, moving))
    net = pretrained(2)
    assert net.config.io_features == "mind" and net.config.io_levels > 0
    network_only, both = Posterior(), Posterior()
    with record_forward(net, network_only, img.shape):
        a = net.register(f, m)
    with record_forward(net, both, img.shape):
        b = net.register(f, m, posterior=both)
    assert torch.equal(a, b)  # recording changes nothing
    assert both.levels == network_only.levels + net.config.io_levels
    # the refinement's spread adds to the network's
    assert bool((both.variance >= network_only.variance - 1e-6).all())
    assert float(both.variance.sum()) > float(network_only.variance.sum())
