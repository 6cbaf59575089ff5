import argparse

import numpy as np
import pytest
import torch

from pddreg.models import PDDNet, PDDNetConfig, load_model, save_model
from pddreg.train import TrainConfig, augment_pair, train, validate


class Shapes:
    """Tiny dataset protocol object: a bright disk and a darker square per 64x64 subject, moved
    by up to 6 px between subjects, with their label maps; subjects 8-9 are the validation set."""

    ndim, num_labels = 2, 3

    def __init__(self, n=10, size=64, seed=0):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:size, :size]
        self._subjects = []
        for _ in range(n):
            (cy, cx), (sy, sx) = rng.integers(-6, 7, 2), rng.integers(-6, 7, 2)
            labels = np.zeros((size, size), np.int64)
            labels[(yy - 22 - cy) ** 2 + (xx - 24 - cx) ** 2 < 12**2] = 1
            labels[38 + sy : 56 + sy, 34 + sx : 54 + sx] = 2
            image = np.array([0.1, 0.9, 0.5], np.float32)[labels]
            image += rng.normal(0, 0.03, image.shape).astype(np.float32)
            self._subjects.append((image.clip(0, 1), labels))

    def __len__(self):
        return len(self._subjects)

    def indices(self, split):
        return {"train": list(range(8)), "val": [8, 9]}.get(split, list(range(len(self))))

    def pairs(self, split):
        ids = self.indices(split)
        return [(i, j) for i in ids for j in ids if i != j]

    def subject(self, i):
        from types import SimpleNamespace

        image, labels = self._subjects[i]
        return SimpleNamespace(image=image, labels=labels, spacing=(1.0, 1.0), name=f"s{i}")


@pytest.fixture(scope="module")
def phantoms():
    return Shapes()


def _tiny(**kw):
    return PDDNet(PDDNetConfig(ndim=2, radius=3, feature_kwargs={"width": 16}, **kw))


@pytest.mark.slow
def test_training_lowers_loss_and_raises_dice(phantoms):
    torch.manual_seed(0)
    model = _tiny()
    val = phantoms.pairs("val")
    before = validate(model, phantoms, val, "cpu")
    losses = []
    config = TrainConfig(steps=40, batch=2, lr=5e-3, seed=0, val_every=0, progress=False)
    model = train(
        phantoms, config, model=model, callback=lambda s, logs: losses.append(logs["loss"])
    )
    after = validate(model, phantoms, val, "cpu")
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    assert after > before + 0.02, (before, after)
    assert model.val_dice == pytest.approx(after)


def test_resume_equals_uninterrupted(phantoms, tmp_path):
    base = dict(batch=2, lr=5e-3, seed=1, val_every=0, progress=False, checkpoint_every=3)
    torch.manual_seed(0)
    full = train(
        phantoms, TrainConfig(steps=6, checkpoint=str(tmp_path / "a.ckpt"), **base), model=_tiny()
    )
    torch.manual_seed(0)
    train(
        phantoms, TrainConfig(steps=3, checkpoint=str(tmp_path / "b.ckpt"), **base), model=_tiny()
    )
    torch.manual_seed(123)  # a different global state must not matter after resuming
    resumed = train(
        phantoms,
        TrainConfig(steps=6, checkpoint=str(tmp_path / "b.ckpt"), resume=True, **base),
        model=_tiny(),
    )
    for (name, a), (_, b) in zip(
        full.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # a run without resume from its checkpoint differs (the test can fail)
    torch.manual_seed(0)
    short = train(phantoms, TrainConfig(steps=3, **base), model=_tiny())
    assert not torch.equal(short.alpha, full.alpha)


def test_trained_save_load_identical(phantoms, tmp_path):
    model = train(phantoms, TrainConfig(steps=2, batch=1, val_every=0, progress=False), _tiny())
    save_model(model, tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")
    s = phantoms.subject(0)
    f = torch.as_tensor(s.image)[None, None]
    m = torch.as_tensor(phantoms.subject(1).image)[None, None]
    assert torch.equal(model.register(f, m), again.register(f, m))


def test_augment_pair_keeps_labels_consistent():
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(1, 40, 40, dtype=torch.long)
    labels[:, 10:30, 12:28] = 1
    image = labels.float() * 0.8 + 0.1
    img, lab = augment_pair(image, labels, gen)
    assert img.shape == image.shape and lab.dtype == torch.long
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    # the label map moved with the image: bright pixels are (almost all) labelled 1
    assert ((img > 0.5) == (lab == 1)).float().mean() > 0.97
    assert not torch.equal(lab, labels)  # something changed


def test_config_errors():
    from pddreg.errors import InputError

    with pytest.raises(InputError, match="--steps"):
        TrainConfig(steps=0)
    with pytest.raises(InputError, match="--lr"):
        TrainConfig(lr=-1)
    with pytest.raises(InputError, match="--model"):
        TrainConfig(model="unet")


def test_command_trains_and_writes_model(phantoms, tmp_path, monkeypatch):
    import pddreg.data
    from pddreg.train.command import add_subcommand

    monkeypatch.setattr(pddreg.data, "open_dataset", lambda spec: phantoms)
    parser = argparse.ArgumentParser()
    add_subcommand(parser.add_subparsers())
    out = tmp_path / "model.pt"
    args = parser.parse_args(
        [
            "train",
            "phantom2d",
            "-o",
            str(out),
            "--dim",
            "2",
            "--steps",
            "2",
            "--batch",
            "1",
            "--val-every",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert args.func(args) == 0
    assert isinstance(load_model(out), PDDNet)
    assert (tmp_path / "model.pt.ckpt").is_file()
    bad = parser.parse_args(["train", "phantom2d", "-o", str(out), "--dim", "3"])
    with pytest.raises(pddreg.errors.InputError, match="--dim"):
        bad.func(bad)


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_train import Shapes, _tiny
from pddreg.models import save_model
from pddreg.train import TrainConfig, train
import torch.distributed as dist
torch.manual_seed(0)
model = train(Shapes(), TrainConfig(steps=3, batch=1, val_every=0, progress=False,
              checkpoint={ckpt!r}, checkpoint_every=2, device="cpu"), model=_tiny())
# every rank holds the same weights after synchronised steps
w = torch.cat([p.detach().flatten() for p in model.parameters()])
all_w = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
dist.all_gather(all_w, w)
assert all(torch.equal(all_w[0], x) for x in all_w), "ranks diverged"
if dist.get_rank() == 0:
    save_model(model, {out!r})
dist.barrier()
dist.destroy_process_group()
"""


def _child_errors(stderr: str) -> str:
    """What the ranks themselves printed when they failed (torchrun's summary, which comes
    last, names only the signal)."""
    keep = ("Error", "error", "terminate", "what()", "Traceback", "File ", "abort", "Abort")
    lines = [ln for ln in stderr.splitlines() if any(k in ln for k in keep)]
    return "\n".join(lines[:60])[-6000:] or stderr[-2000:]


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp.py"
    out, ckpt = tmp_path / "m.pt", tmp_path / "m.ckpt"
    tests = str(Path(__file__).parent)
    script.write_text(DDP_SCRIPT.format(tests=tests, ckpt=str(ckpt), out=str(out)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        str(script),
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, _child_errors(res.stderr)
    assert isinstance(load_model(out), PDDNet)
    ck = torch.load(ckpt, weights_only=True)
    assert ck["step"] == 3 and len(ck["generator_states"]) == 2


def test_synth_pairs_deterministic_and_related():
    from pddreg.metrics import mean_dice
    from pddreg.train.synth import SynthConfig, synth_pair

    cfg = SynthConfig(shape=(48, 48), num_labels=6, label_scale=12, max_disp=3, disp_scale=24)
    a = synth_pair(cfg, torch.Generator().manual_seed(5))
    b = synth_pair(cfg, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    fixed, moving, fseg, mseg = a
    assert fixed.shape == (1, 48, 48) and fseg.dtype == torch.long
    assert float(fixed.min()) >= 0 and float(fixed.max()) <= 1
    assert int(fseg.max()) < 6
    # both label maps come from one map deformed a little: they overlap well, unlike another map
    other = synth_pair(cfg, torch.Generator().manual_seed(6))[2]
    assert mean_dice(fseg[0], mseg[0]) > mean_dice(fseg[0], other[0]) + 0.2
