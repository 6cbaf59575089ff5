"""``pddreg batch``: one folder per pair, a summary table, skipping finished pairs, bad rows,
Learn2Reg json pairs, the model loaded once, and the pairs shared under torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from pddreg.batch import SUMMARY_COLUMNS, read_pairs, run_batch
from pddreg.cli import main
from pddreg.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def scene(shape: tuple[int, ...], shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured disk/ball in [0, 1] and its label map (1 outer, 2 inner), moved on axis 0."""
    grid = np.indices(shape).astype(np.float32)
    centre = np.array([s / 2 for s in shape], np.float32).reshape(-1, *[1] * len(shape))
    centre[0] += shift
    radii = np.array([s / 4 for s in shape], np.float32).reshape(-1, *[1] * len(shape))
    r = np.sqrt((((grid - centre) / radii) ** 2).sum(0))
    labels = (r < 1.0).astype(np.int64) + (r < 0.5).astype(np.int64)
    # a texture that moves with the object, and a little noise of its own per image: with
    # independent noise alone inside the disk, the 1-voxel pair was ill-posed (only the edges
    # agree) and its result hung on float rounding (Dice 0.88 -> 0.75 or 0.996 for the pair
    # scaled by 255 or not)
    rel = grid - centre
    texture = 0.04 * np.sin(0.9 * rel[0] + 0.3 * rel[-1]) * np.cos(0.7 * rel[-1])
    noise = np.random.default_rng(seed).random(shape).astype(np.float32) * 0.01
    image = 0.2 + 0.4 * (r < 1) + 0.3 * (r < 0.5) + texture + noise
    return np.clip(image, 0, 1).astype(np.float32), labels


def png(path: Path, array: np.ndarray, labels: bool = False) -> str:
    data = array.astype(np.uint8) if labels else (array * 255).round().astype(np.uint8)
    PILImage.fromarray(data).save(path)
    return str(path)


def make_pairs(folder: Path, n: int, shape=(40, 48), segs: bool = True) -> list[dict[str, str]]:
    """``n`` PNG pairs (with label maps) in ``folder``; returns the rows of a pairs table."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        f, fs = scene(shape, 0.0, 2 * i)
        m, ms = scene(shape, 1.0 + i % 3, 2 * i + 1)
        row = {
            "fixed": png(folder / f"f{i}.png", f),
            "moving": png(folder / f"m{i}.png", m),
        }
        if segs:
            row["fixed_seg"] = png(folder / f"f{i}_seg.png", fs, labels=True)
            row["moving_seg"] = png(folder / f"m{i}_seg.png", ms, labels=True)
        rows.append(row)
    return rows


def write_table(path: Path, rows: list[dict[str, str]], relative_to: Path | None = None) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            if relative_to is not None:
                r = {k: os.path.relpath(v, relative_to) if v else v for k, v in r.items()}
            w.writerow(r)
    return str(path)


def summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_batch_writes_a_folder_per_pair_a_summary_and_skips_finished_pairs(tmp_path, capsys):
    rows = make_pairs(tmp_path / "data", 3)
    rows[2].pop("fixed_seg")  # a pair without both label maps: no Dice, still registered
    rows[2].pop("moving_seg")
    table = write_table(tmp_path / "pairs.csv", rows, relative_to=tmp_path)  # relative paths
    out = tmp_path / "out"
    assert main(["batch", table, "-o", str(out), "--method", "mind", "--device", "cpu"]) == 0
    assert "3 registered" in capsys.readouterr().out
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["f0__m0", "f1__m1", "f2__m2"]
    for name in folders:
        files = {p.name for p in (out / name).iterdir()}
        assert {"disp.npy", "disp_mm.npy", "transform.json", "metrics.json", "batch.json"} <= files
        assert "warped.png" in files
    assert "warped_seg.png" in {p.name for p in (out / "f0__m0").iterdir()}
    table_rows = summary(out)
    assert [r["status"] for r in table_rows] == ["done"] * 3
    assert list(table_rows[0]) == list(SUMMARY_COLUMNS)
    dice = [float(r["mean_dice"]) for r in table_rows[:2]]
    before = [float(r["mean_dice_before"]) for r in table_rows[:2]]
    assert all(d > b for d, b in zip(dice, before, strict=True))  # the metrics of each pair
    assert table_rows[2]["mean_dice"] == "" and float(table_rows[2]["sdlogj"]) >= 0
    doc = json.loads((out / "summary.json").read_text())
    assert [d["name"] for d in doc] == folders
    # the pair's metrics in the summary are those of its folder
    m0 = json.loads((out / "f0__m0" / "metrics.json").read_text())
    assert doc[0]["mean_dice"] == pytest.approx(m0["mean_dice"])

    # a rerun skips every complete pair (nothing is rewritten)
    stamps = {n: (out / n / "disp.npy").stat().st_mtime_ns for n in folders}
    assert main(["batch", table, "-o", str(out), "--method", "mind", "--device", "cpu"]) == 0
    assert "3 already complete" in capsys.readouterr().out
    assert {n: (out / n / "disp.npy").stat().st_mtime_ns for n in folders} == stamps
    assert [r["status"] for r in summary(out)] == ["skipped"] * 3
    assert summary(out)[0]["mean_dice"] == table_rows[0]["mean_dice"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files

    # other settings: the pairs are made again; an incomplete folder too
    (out / "f1__m1" / "disp.npy").unlink()
    res = run_batch(table, out, method="none", device="cpu", progress=False)
    assert [r["status"] for r in res.rows] == ["done"] * 3
    assert json.loads((out / "f0__m0" / "metrics.json").read_text())["method"] == "none"
    res = run_batch(table, out, method="none", device="cpu", progress=False)
    assert [r["status"] for r in res.rows] == ["skipped"] * 3


def test_batch_reports_bad_rows_and_finishes_the_good_ones(tmp_path, capsys):
    rows = make_pairs(tmp_path / "data", 3, segs=False)
    rows[1]["moving"] = str(tmp_path / "data" / "gone.png")  # a missing file
    nan = np.full((40, 48), 0.5, np.float32)
    nan[:20] = 0.2
    nan[3, 3] = np.nan
    np.save(tmp_path / "data" / "nan.npy", nan)
    rows.append({"fixed": rows[0]["fixed"], "moving": str(tmp_path / "data" / "nan.npy")})
    rows.append({"fixed": rows[0]["fixed"], "moving": ""})  # an empty cell
    table = write_table(tmp_path / "pairs.csv", rows)
    out = tmp_path / "out"
    rc = main(["batch", table, "-o", str(out), "--method", "none", "--device", "cpu"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert len(err) == 3, err
    assert err[0].startswith(f"pddreg: error: {table} row 2: ") and "gone.png" in err[0]
    assert "row 4" in err[1] and "nan.npy" in err[1] and "NaN" in err[1]
    assert "row 5" in err[2] and "'moving' cell is empty" in err[2]
    statuses = [r["status"] for r in summary(out)]
    assert statuses == ["done", "failed", "done", "failed", "failed"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["f0__m0", "f2__m2"]
    assert "gone.png" in summary(out)[1]["error"]


def test_batch_whole_file_problems_exit_2_and_write_nothing(tmp_path, capsys):
    rows = make_pairs(tmp_path / "data", 1, segs=False)
    bad = tmp_path / "cols.csv"
    bad.write_text(f"image,other\n{rows[0]['fixed']},{rows[0]['moving']}\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("fixed,moving\n")
    (tmp_path / "pairs.xlsx").write_text("x")
    good = write_table(tmp_path / "pairs.csv", rows)
    (tmp_path / "broken.pt").write_bytes(b"not a model")
    cases = {
        str(bad): ["no 'fixed' and no 'moving' column"],
        str(tmp_path / "empty.csv"): ["is empty"],
        str(tmp_path / "header.csv"): ["no pairs"],
        str(tmp_path / "pairs.xlsx"): ["unsupported pairs file type"],
        str(tmp_path / "nope.csv"): ["no such pairs file"],
        str(tmp_path / "broken.pt"): ["not a readable model file", "--model"],
        "max-memory": ["--max-memory", "--max-memory"],
    }
    for path, (problem, *flags) in cases.items():
        out = tmp_path / "out"
        args = ["batch", path, "-o", str(out), "--method", "none", "--device", "cpu"]
        if flags == ["--model"]:
            args = ["batch", good, "-o", str(out), "--method", "pdd", "--model", path]
        elif flags:
            args = ["batch", good, "-o", str(out), "--max-memory", "lots"]
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2, path
        assert err.count("\n") == 1 and problem in err, err
        assert not out.exists(), path
    with pytest.raises(InputError, match="no 'fixed'"):
        read_pairs(bad)


def test_learn2reg_json_pairs(tmp_path):
    root = tmp_path / "Task"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    train = []
    for i in range(1, 4):
        img, lab = scene((16, 20, 24), 0.6 * i, i)
        name = f"Task_{i:04d}_0000.nii.gz"
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(root / "imagesTr" / name))
        nib.save(nib.Nifti1Image(lab.astype(np.int16), np.eye(4)), str(root / "labelsTr" / name))
        train.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "training": train,
        "registration_val": [
            {
                "fixed": "./imagesTr/Task_0001_0000.nii.gz",
                "moving": "./imagesTr/Task_0002_0000.nii.gz",
            },
            {
                "fixed": "./imagesTr/Task_0001_0000.nii.gz",
                "moving": "./imagesTr/Task_0003_0000.nii.gz",
            },
        ],
        "registration_test": [
            {
                "fixed": "./imagesTs/Task_0009_0000.nii.gz",
                "moving": "./imagesTs/Task_0008_0000.nii.gz",
            }
        ],
    }
    path = root / "Task_dataset.json"
    path.write_text(json.dumps(meta))
    specs = read_pairs(path, split="val")
    assert [s.name for s in specs] == ["0001_0002", "0001_0003"]
    assert specs[0].fixed_seg is not None and specs[0].fixed_seg.endswith(
        "labelsTr/Task_0001_0000.nii.gz"
    )
    out = tmp_path / "out"
    res = run_batch(root, out, method="none", split="val", device="cpu", progress=False)
    assert [r["status"] for r in res.rows] == ["done", "done"] and not res.errors
    assert (out / "0001_0002" / "disp.nii.gz").is_file()  # the Learn2Reg field layout
    assert res.rows[0]["mean_dice"] is not None
    # the test pair's images are not there: reported, the others still done
    res = run_batch(path, out, method="none", device="cpu", progress=False)
    assert [r["status"] for r in res.rows] == ["skipped", "skipped", "failed"]
    assert "Task_0009_0000.nii.gz: no such file" in res.errors[0]


def test_the_model_is_loaded_once(tmp_path, monkeypatch):
    import pddreg.models as models
    from pddreg.models import PDDNet, PDDNetConfig, save_model

    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    save_model(PDDNet(PDDNetConfig(ndim=2, radius=2, feature_kwargs={"width": 8})), path)
    calls = []
    real = models.load_model

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(models, "load_model", counting)
    table = write_table(tmp_path / "pairs.csv", make_pairs(tmp_path / "data", 3, segs=False))
    res = run_batch(table, tmp_path / "out", method="pdd", model=path, device="cpu", progress=False)
    assert [r["status"] for r in res.rows] == ["done"] * 3
    assert len(calls) == 1


def test_batch_memory_budget_refuses_a_pair_before_allocating(tmp_path):
    rows = make_pairs(tmp_path / "data", 1, segs=False)
    big, _ = scene((96, 96, 96), 0.0, 0)
    nib.save(nib.Nifti1Image(big, np.eye(4)), str(tmp_path / "data" / "big.nii.gz"))
    rows.append({"fixed": str(tmp_path / "data" / "big.nii.gz")} | {"moving": rows[0]["moving"]})
    rows[1]["moving"] = str(tmp_path / "data" / "big.nii.gz")
    table = write_table(tmp_path / "pairs.csv", rows)
    res = run_batch(table, tmp_path / "out", method="mind", max_memory="64M", progress=False)
    assert [r["status"] for r in res.rows] == ["done", "failed"]
    assert "needs about" in res.errors[0] and "64.0 MiB" in res.errors[0]


@pytest.mark.slow
def test_torchrun_shares_the_pairs_and_writes_each_once(tmp_path):
    table = write_table(tmp_path / "pairs.csv", make_pairs(tmp_path / "data", 5, segs=False))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29547",
        "-m",
        "pddreg.cli",
        "batch",
        table,
        "-o",
        str(out),
        "--method",
        "none",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = summary(out)
    assert [r["status"] for r in rows] == ["done"] * 5
    ranks = [int(r["rank"]) for r in rows]
    assert sorted(set(ranks)) == [0, 1] and ranks.count(0) == 3  # pending[rank::2]
    for r in rows:  # the process that wrote the folder is the one the summary names
        assert json.loads((out / r["name"] / "batch.json").read_text())["rank"] == int(r["rank"])
    assert res.stdout.count("5 registered") == 1  # rank 0 reports for all
    # a rerun under torchrun: every pair is complete, every process agrees
    (out / rows[3]["name"] / "disp.npy").unlink()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["status"] for r in summary(out)] == ["skipped"] * 3 + ["done", "skipped"]


def test_landmark_columns_are_accepted(tmp_path, caplog):
    """Landmark columns pass through to register() where it takes them; this version's does
    not, and the batch says so once and registers the pairs."""
    import logging

    from pddreg.api import register

    rows = make_pairs(tmp_path / "data", 2, segs=False)
    for i, r in enumerate(rows):
        for side in ("fixed", "moving"):
            path = tmp_path / "data" / f"{side}{i}.csv"
            path.write_text("i,j\n10,12\n20,30\n")
            r[f"{side}_landmarks"] = str(path)
    table = write_table(tmp_path / "pairs.csv", rows)
    with caplog.at_level(logging.INFO, logger="pddreg.batch"):
        res = run_batch(table, tmp_path / "out", method="none", device="cpu", progress=False)
    assert [r["status"] for r in res.rows] == ["done", "done"]
    import inspect

    if "fixed_landmarks" not in inspect.signature(register).parameters:
        assert caplog.text.count("landmark columns are ignored") == 1
    rows[1]["moving_landmarks"] = str(tmp_path / "data" / "none.csv")  # a missing file
    res = run_batch(write_table(tmp_path / "p2.csv", rows), tmp_path / "o2", method="none")
    assert [r["status"] for r in res.rows] == ["done", "failed"]
    assert "none.csv: no such file (moving_landmarks)" in res.errors[0]
