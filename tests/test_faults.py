"""Faults: SIGKILL during training and during a batch, non-finite losses, NaN fields, failing
renames, and data-parallel training equal to one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from pddreg.cli import main
from pddreg.errors import RegistrationError, TrainingError
from pddreg.models import PDDNet, PDDNetConfig, load_model, save_model
from pddreg.train import TrainConfig, train

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
from test_batch import make_pairs, summary, write_table  # noqa: E402
from test_train import Shapes, _tiny  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _equal_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- SIGKILL, training
TRAIN_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_train import Shapes, _tiny
from pddreg.train import TrainConfig, train
torch.set_num_threads(1)
torch.manual_seed(0)
def slow(step, logs):
    print(f"step {{step}}", flush=True)
    time.sleep(0.2)
train(Shapes(), TrainConfig(**{config!r}, checkpoint={ckpt!r}), model=_tiny(), callback=slow)
print("finished", flush=True)
"""

CONFIG = dict(steps=8, batch=2, lr=5e-3, seed=3, val_every=0, progress=False, checkpoint_every=2)


def _kill_after(cmd: list[str], line: str, timeout: float = 120) -> int:
    """Run ``cmd``, SIGKILL it as soon as it prints ``line``; returns its exit status."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        for out in proc.stdout:
            if out.strip() == line:
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "the child never got there"
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT.format(tests=str(TESTS), config=CONFIG, ckpt=str(ckpt)))
    rc = _kill_after([sys.executable, str(script)], "step 5")
    assert rc == -signal.SIGKILL
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert killed_at == 4  # the last checkpoint before the kill; steps 5.. are lost
    torch.manual_seed(0)
    resumed = train(Shapes(), TrainConfig(**CONFIG, checkpoint=str(ckpt), resume=True), _tiny())
    torch.manual_seed(0)
    full = train(Shapes(), TrainConfig(**CONFIG, checkpoint=str(tmp_path / "b")), _tiny())
    assert _equal_weights(resumed, full)
    assert torch.load(ckpt, weights_only=True)["step"] == CONFIG["steps"]
    # control: without the checkpoint the weights differ (the test can fail)
    torch.manual_seed(0)
    short = train(Shapes(), TrainConfig(**{**CONFIG, "steps": 4}), _tiny())
    assert not _equal_weights(short, full)


# --------------------------------------------------------------------------- SIGKILL, batch
def _read_every_file(folder: Path) -> int:
    """Open every file of a pair folder the way a user would; returns how many."""
    n = 0
    for p in folder.iterdir():
        name = p.name
        if name.endswith(".npy"):
            assert np.all(np.isfinite(np.load(p, allow_pickle=False)))
        elif name.endswith(".nii.gz"):
            assert np.all(np.isfinite(np.asarray(nib.load(str(p)).dataobj)))
        elif name.endswith(".png"):
            with PILImage.open(p) as im:
                im.load()
        elif name.endswith(".json"):
            json.loads(p.read_text())
        else:
            assert p.read_text().strip(), name
        n += 1
    return n


@pytest.mark.slow
def test_batch_killed_with_sigkill_and_rerun_ends_with_every_file_complete(tmp_path, capsys):
    table = write_table(tmp_path / "pairs.csv", make_pairs(tmp_path / "data", 8, (64, 80)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pddreg.cli", "batch", table, "-o", str(out), "--method", "mind"]
    proc = subprocess.Popen([*cmd, "--device", "cpu"], env=ENV, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            done = (
                [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
                if (out.is_dir())
                else []
            )
            if len(done) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == -signal.SIGKILL, "the batch finished before it could be killed"
    before = {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert 2 <= len(before) < 8
    assert not (out / "summary.csv").exists()
    assert main([*cmd[3:], "--device", "cpu"]) == 0
    capsys.readouterr()
    rows = summary(out)
    assert len(rows) == 8
    assert {r["name"] for r in rows if r["status"] == "skipped"} == before
    assert all(r["status"] in ("skipped", "done") for r in rows)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    for r in rows:
        assert _read_every_file(out / r["name"]) >= 7


# --------------------------------------------------------------------------- non-finite
class Poisoned(Shapes):
    """Shapes whose ``bad``-th training pair has a NaN in its fixed image."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad, self.calls = bad, 0

    def sample_pair(self, gen):
        self.calls += 1
        i = int(torch.randint(0, 8, (1,), generator=gen))
        j = (i + 1 + int(torch.randint(0, 7, (1,), generator=gen))) % 8
        f, m = self.subject(i), self.subject(j)
        fi = torch.as_tensor(f.image)[None].clone()
        if self.calls == self.bad:
            fi[0, 5, 5] = float("nan")
        return (
            fi,
            torch.as_tensor(m.image)[None],
            torch.as_tensor(f.labels)[None],
            torch.as_tensor(m.labels)[None],
        )


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, capsys
):
    conf = dict(steps=6, batch=1, lr=5e-3, seed=2, val_every=0, progress=False, augment=False)
    ckpt = tmp_path / "run.ckpt"
    torch.manual_seed(0)
    with pytest.raises(TrainingError) as err:
        train(
            Poisoned(bad=4), TrainConfig(**conf, checkpoint=str(ckpt), checkpoint_every=2), _tiny()
        )
    text = str(err.value)
    assert "training stopped at step 4 of 6: the " in text
    assert "the loss is nan (not finite)" in text or "is not finite" in text  # loss or gradient
    assert f"{ckpt} (step 2) is the last good state and is kept" in text and "--resume" in text
    ck = torch.load(ckpt, weights_only=True)
    assert ck["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
    torch.manual_seed(0)
    clean = train(Poisoned(bad=0), TrainConfig(**{**conf, "steps": 2}), _tiny())
    assert all(torch.equal(ck["state_dict"][k], v) for k, v in clean.state_dict().items())

    # the command line: one line, exit status 2, no model file
    import pddreg.data

    monkeypatch.setattr(pddreg.data, "open_dataset", lambda spec: Poisoned(bad=3))
    out = tmp_path / "model.pt"
    args = ["train", "shapes", "-o", str(out), "--steps", "5", "--batch", "1", "--lr", "5e-3"]
    args += ["--checkpoint-every", "1", "--val-every", "0", "--no-augment", "--device", "cpu"]
    assert main(args) == 2
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and line.startswith("pddreg: error: training stopped at step 3")
    assert "(step 2) is the last good state" in line
    assert not out.exists() and torch.load(f"{out}.ckpt", weights_only=True)["step"] == 2


class _NaNModel(torch.nn.Module):
    """A model whose fields are NaN (as a broken model's would be on the PyTorch path)."""

    config = PDDNetConfig(ndim=2)

    def register(self, fixed, moving, **kwargs):
        return torch.full((fixed.shape[0], 2, *fixed.shape[2:]), float("nan"))


def test_a_nan_field_is_never_returned(tmp_path, capsys):
    from pddreg.api import register

    pair = make_pairs(tmp_path / "data", 1, segs=False)[0]
    with pytest.raises(RegistrationError, match="m0.png: the pdd registration to .*f0.png "):
        register(pair["fixed"], pair["moving"], method="pdd", model=_NaNModel(), device="cpu")
    # a model file with NaN weights is refused when it is read
    torch.manual_seed(0)
    net = PDDNet(PDDNetConfig(ndim=2, radius=2, feature_kwargs={"width": 8}))
    with torch.no_grad():
        net.alpha.fill_(float("nan"))
    path = tmp_path / "diverged.pt"
    save_model(net, path)
    out = tmp_path / "out"
    args = ["register", pair["fixed"], pair["moving"], "-o", str(out), "--method", "pdd"]
    assert main([*args, "--model", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diverged.pt: the model's weights hold NaN/Inf" in err
    assert not out.exists()


def test_outputs_reach_their_names_only_by_rename(tmp_path, monkeypatch, capsys):
    """Files are written under temporary names: when the final rename fails, OUT holds
    nothing (and no temporary is left)."""
    pair = make_pairs(tmp_path / "data", 1, segs=False)[0]
    out = tmp_path / "out"
    real = os.replace

    def failing(src, dst):
        if Path(dst) == out:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    rc = main(["register", pair["fixed"], pair["moving"], "-o", str(out), "--method", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "No space left on device" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- DDP = one process
DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_train import Shapes, _tiny
from pddreg.models import save_model
from pddreg.train import TrainConfig, train
import torch.distributed as dist
torch.manual_seed(0)
model = train(Shapes(), TrainConfig(**{config!r}, device="cpu"), model=_tiny())
if dist.get_rank() == 0:
    save_model(model, {out!r})
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one_process_with_the_global_batch(tmp_path):
    conf = dict(steps=4, batch=1, lr=5e-3, seed=5, val_every=0, progress=False)
    script, out = tmp_path / "ddp.py", tmp_path / "ddp.pt"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS), config=conf, out=str(out)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", "29563", str(script)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = load_model(out).state_dict()
    torch.manual_seed(0)
    one = train(Shapes(), TrainConfig(**{**conf, "batch": 2}), _tiny()).state_dict()
    torch.manual_seed(0)
    half = train(Shapes(), TrainConfig(**conf), _tiny()).state_dict()  # batch 1: not the same
    worst = max(float((ddp[k] - one[k]).abs().max()) for k in ddp if ddp[k].is_floating_point())
    other = max(float((ddp[k] - half[k]).abs().max()) for k in ddp if ddp[k].is_floating_point())
    assert worst < 1e-5, worst
    assert other > 1e-3, other
