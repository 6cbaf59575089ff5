"""Joint segmentation and motion: JointNet / SegNet, their training, ``train --joint``,
``segment`` and the combination in tracking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from pddreg.cli import main
from pddreg.data import open_dataset
from pddreg.models import PDDNetConfig, load_model, save_model
from pddreg.models.joint import JointNet, JointNetConfig, SegNet, SegNetConfig
from pddreg.train.joint import JointTrainConfig, LabelledView, train_joint, train_segnet

SPEC = "phantom2d:n=6,held_out=2,seed=0,shape=48x64"


def _small(num_labels: int = 4) -> JointNet:
    pdd = PDDNetConfig(ndim=2, radius=2, grid_stride=2, levels=2, feature_kwargs={"channels": 8})
    return JointNet(JointNetConfig(ndim=2, num_labels=num_labels, pdd=pdd, seg_width=8))


def _batch(b: int = 2, shape: tuple[int, int] = (32, 40)):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(b, 1, *shape, generator=g)
    for _ in range(3):
        img = torch.nn.functional.avg_pool2d(img, 5, stride=1, padding=2, count_include_pad=False)
    img = (img - img.amin()) / (img.amax() - img.amin())
    seg = (img * 3.99).long()  # blobs: the labels follow the intensities
    mov = torch.roll(img, 2, dims=2)
    mseg = torch.roll(seg, 2, dims=2)
    return img, mov, seg, mseg


def test_joint_net_shapes_save_load_and_register(tmp_path):
    model = _small().eval()
    f, m, _, _ = _batch()
    prob = model.segment(f)
    assert prob.shape == (2, 4, 32, 40)
    assert torch.allclose(prob.sum(1), torch.ones(()), atol=1e-5)
    disp = model.register(f, m)
    assert torch.equal(disp, model.pdd.register(f, m))
    save_model(model, tmp_path / "j.pt")
    back = load_model(tmp_path / "j.pt")
    assert isinstance(back, JointNet) and back.config.num_labels == 4
    assert torch.allclose(back.segment(f), prob, atol=1e-6)
    seg = SegNet(SegNetConfig(ndim=2, num_labels=3, feature_kwargs={"channels": 8}, seg_width=8))
    save_model(seg, tmp_path / "s.pt")
    assert load_model(tmp_path / "s.pt").segment(f).shape == (2, 3, 32, 40)


def test_joint_loss_terms_and_gradients():
    model = _small()
    f, m, fs, ms = _batch()
    fl, ml = torch.tensor([True, False]), torch.tensor([True, True])
    loss, logs = model.training_loss(f, m, fs, ms, 4, fl, ml)
    assert {"seg", "label1", "label2", "similarity", "consistency"} <= set(logs)
    loss.backward()
    assert model.head.fine[0].weight.grad.abs().sum() > 0
    assert model.pdd.features.body[0].weight.grad.abs().sum() > 0
    # no labels at all: no segmentation or label loss, the similarity and consistency remain
    model.zero_grad()
    _, logs = model.training_loss(f, m, None, None, 4)
    assert "seg" not in logs and "label1" not in logs and "similarity" in logs
    assert "consistency" in logs
    with pytest.raises(ValueError, match="labels"):
        model.training_loss(f, m, fs, ms, 9)


def test_joint_training_fits_a_batch():
    torch.manual_seed(0)
    model = _small()
    f, m, fs, ms = _batch(1, (24, 32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = last = None
    for _ in range(12):
        loss, logs = model.training_loss(f, m, fs, ms, 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = logs["seg"] if first is None else first
        last = logs["seg"]
    assert last < 0.7 * first


def test_train_joint_and_segnet_on_phantoms():
    ds = open_dataset(SPEC)
    cfg = JointTrainConfig(labelled=2, steps=3, batch=2, progress=False)
    seen = []
    model = train_joint(ds, cfg, callback=lambda step, logs: seen.append(logs))
    assert len(seen) == 3 and all(np.isfinite(s["loss"]) for s in seen)
    assert not model.training and model.config.num_labels == ds.num_labels
    seg = train_segnet(ds, cfg)
    assert seg.segment(torch.rand(1, 1, 48, 64)).shape == (1, ds.num_labels, 48, 64)
    view = LabelledView(ds, 2)
    assert view.indices("train") == ds.indices("train")[:2]
    assert view.pairs("train") == [(0, 1), (1, 0)] and view.pairs("test") == ds.pairs("test")
    assert view.num_labels == ds.num_labels


def test_train_joint_segment_register_and_track_commands(tmp_path, capsys):
    model = tmp_path / "joint.pt"
    args = ["train", SPEC, "--joint", "--labelled", "2", "--steps", "2", "--batch", "2"]
    assert main([*args, "-o", str(model), "--device", "cpu"]) == 0
    ds = open_dataset(SPEC)
    img = ds.subject(4).image
    PILImage.fromarray((img * 255).astype(np.uint8)).save(tmp_path / "img.png")
    PILImage.fromarray((ds.subject(5).image * 255).astype(np.uint8)).save(tmp_path / "mov.png")
    out = tmp_path / "seg"
    assert main(["segment", str(tmp_path / "img.png"), "--model", str(model), "-o", str(out)]) == 0
    assert (out / "seg.png").is_file()
    prob = np.load(out / "prob.npy")
    assert prob.shape == (ds.num_labels, 48, 64)
    single = tmp_path / "one.png"
    seg_one = ["segment", str(tmp_path / "img.png"), "--model", str(model), "-o", str(single)]
    assert main(seg_one) == 0
    assert np.asarray(PILImage.open(single)).shape == (48, 64)
    # the joint model registers as a PDD-Net
    reg = ["register", str(tmp_path / "img.png"), str(tmp_path / "mov.png"), "--method", "pdd"]
    assert main([*reg, "--model", str(model), "-o", str(tmp_path / "reg")]) == 0
    # and its segmentation of every frame can be combined with the propagated labels
    PILImage.fromarray(ds.subject(4).labels.astype(np.uint8)).save(tmp_path / "lab.png")
    track = ["track", str(tmp_path / "img.png"), str(tmp_path / "mov.png"), "--seg"]
    track += [str(tmp_path / "lab.png"), "--segment-model", str(model), "--combine", "0.5"]
    assert main([*track, "-o", str(tmp_path / "trk"), "--method", "none", "--no-cycle"]) == 0
    summary = json.loads((tmp_path / "trk" / "summary.json").read_text())
    assert summary["combine"] == 0.5 and summary["segment_model"] == str(model)
    # a registration model cannot segment
    other = tmp_path / "pdd.pt"
    save_model(_small().pdd, other)
    capsys.readouterr()
    assert main(["segment", str(tmp_path / "img.png"), "--model", str(other), "-o", str(out)]) == 2
    assert "cannot segment" in capsys.readouterr().err
