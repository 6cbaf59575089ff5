"""The ``pddreg`` command: ``register`` on 2D PNG and 3D NIfTI pairs, bad input, ``track``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

from pddreg.cli import main

AFFINE = np.diag([1.5, 1.0, 2.0, 1.0])
AFFINE[:3, 3] = [10.0, -5.0, 3.0]


def _scene(shape: tuple[int, ...], shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float image in [0, 1] (textured ellipsoid) and int labels, the centre shifted on axis 0."""
    grid = np.indices(shape).astype(np.float32)
    centre = np.array([s / 2 for s in shape], dtype=np.float32)
    centre[0] += shift
    radii = np.array([s / 4 for s in shape], dtype=np.float32)
    r = np.sqrt(
        (
            ((grid - centre.reshape(-1, *[1] * len(shape))) / radii.reshape(-1, *[1] * len(shape)))
            ** 2
        ).sum(0)
    )
    labels = (r < 1.0).astype(np.int64) + (r < 0.5).astype(np.int64)
    noise = np.random.default_rng(seed).random(shape).astype(np.float32) * 0.05
    image = np.clip(0.2 + 0.4 * (r < 1.0) + 0.3 * (r < 0.5) + noise, 0, 1)
    return image, labels


def _png(path: Path, array: np.ndarray, labels: bool = False) -> str:
    data = array.astype(np.uint8) if labels else (array * 255).round().astype(np.uint8)
    PILImage.fromarray(data).save(path)
    return str(path)


def _nii(path: Path, array: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return str(path)


@pytest.fixture
def png_pair(tmp_path):
    f, fs = _scene((40, 48), 0.0, 0)
    m, ms = _scene((40, 48), 3.0, 1)
    return {
        "fixed": _png(tmp_path / "fixed.png", f),
        "moving": _png(tmp_path / "moving.png", m),
        "fixed_seg": _png(tmp_path / "fixed_seg.png", fs, labels=True),
        "moving_seg": _png(tmp_path / "moving_seg.png", ms, labels=True),
    }


@pytest.fixture
def nii_pair(tmp_path):
    f, fs = _scene((20, 24, 28), 0.0, 0)
    m, ms = _scene((20, 24, 28), 2.0, 1)
    return {
        "fixed": _nii(tmp_path / "fixed.nii.gz", (f * 1000 - 500).astype(np.float32)),
        "moving": _nii(tmp_path / "moving.nii.gz", (m * 1000 - 500).astype(np.float32)),
        "fixed_seg": _nii(tmp_path / "fixed_seg.nii.gz", fs.astype(np.int16)),
        "moving_seg": _nii(tmp_path / "moving_seg.nii.gz", ms.astype(np.int16)),
    }


def _register_args(pair: dict[str, str], out: Path, *extra: str, segs: bool = True) -> list[str]:
    args = ["register", pair["fixed"], pair["moving"], "-o", str(out), *extra]
    if segs:
        args += ["--fixed-seg", pair["fixed_seg"], "--moving-seg", pair["moving_seg"]]
    return args


def test_register_png_pair_writes_documented_files(png_pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_register_args(png_pair, out, "--method", "mind", "--device", "cpu")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    stage = {"affine.txt", "affine.tfm"} if metrics["affine_mode"] != "off" else set()
    if metrics["affine_mode"] == "projective":  # ITK has no homography file: the .txt only
        stage = {"affine.txt"}
    assert {p.name for p in out.iterdir()} == {
        "disp.npy",
        "disp_mm.npy",
        "disp_itk.nii.gz",
        "metrics.json",
        "transform.json",
        "warped.png",
        "warped_seg.png",
        "uncertainty.npy",
        "uncertainty.png",
        "warped_prob.npy",
        *stage,
    }
    disp = np.load(out / "disp.npy")
    assert disp.shape == (2, 40, 48) and disp.dtype == np.float32
    warped = np.asarray(PILImage.open(out / "warped.png"))
    assert warped.shape == (40, 48) and warped.dtype == np.uint8
    wseg = np.asarray(PILImage.open(out / "warped_seg.png"))
    assert set(np.unique(wseg)) <= {0, 1, 2}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "mind"
    assert metrics["mean_dice"] > metrics["mean_dice_before"]
    assert set(metrics["dice"]) == {"1", "2"}
    assert "mean Dice" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp left


def test_register_nifti_pair_writes_documented_files(nii_pair, tmp_path):
    out = tmp_path / "res"
    assert main(_register_args(nii_pair, out, "--method", "none")) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "disp.nii.gz",
        "disp.npy",
        "disp_itk.nii.gz",
        "disp_mm.npy",
        "metrics.json",
        "transform.json",
        "warped.nii.gz",
        "warped_seg.nii.gz",
    ]
    assert np.load(out / "disp.npy").shape == (3, 20, 24, 28)
    field = nib.load(str(out / "disp.nii.gz"))
    assert field.shape == (20, 24, 28, 3)  # Learn2Reg layout
    np.testing.assert_allclose(field.affine, AFFINE)
    warped = nib.load(str(out / "warped.nii.gz"))
    np.testing.assert_allclose(warped.affine, AFFINE)
    moving = nib.load(nii_pair["moving"]).get_fdata()
    np.testing.assert_allclose(warped.get_fdata(), moving, atol=1e-3)  # none: identity, HU kept
    wseg = np.asarray(nib.load(str(out / "warped_seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(wseg, np.asarray(nib.load(nii_pair["moving_seg"]).dataobj))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["spacing"] == [1.5, 1.0, 2.0]
    assert metrics["mean_dice"] == pytest.approx(metrics["mean_dice_before"])


def test_register_3d_mind_improves_dice(nii_pair, tmp_path):
    out = tmp_path / "mind"
    assert main(_register_args(nii_pair, out, "--method", "mind")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mean_dice"] > metrics["mean_dice_before"]


def test_rerun_into_existing_out_replaces_and_drops_stale_files(png_pair, tmp_path):
    out = tmp_path / "out"
    assert main(_register_args(png_pair, out, "--method", "none")) == 0
    (out / "mine.txt").write_text("user file")
    assert main(_register_args(png_pair, out, "--method", "none", segs=False)) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "disp.npy",
        "disp_itk.nii.gz",
        "disp_mm.npy",
        "metrics.json",
        "mine.txt",
        "transform.json",
        "warped.png",
    ]


@pytest.mark.slow
def test_register_via_subprocess(png_pair, tmp_path):
    out = tmp_path / "sub"
    cmd = [sys.executable, "-m", "pddreg.cli", *_register_args(png_pair, out, "--method", "none")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "disp.npy").exists() and (out / "metrics.json").exists()
    bad = [
        sys.executable,
        "-m",
        "pddreg.cli",
        "register",
        png_pair["fixed"],
        "nope.png",
        "-o",
        str(tmp_path / "bad"),
    ]
    proc = subprocess.run(bad, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("pddreg: error: nope.png")
    assert "Traceback" not in proc.stderr and not (tmp_path / "bad").exists()


def _bad_inputs(tmp_path: Path, png_pair: dict[str, str], nii_pair: dict[str, str]):
    f, fs = _scene((40, 48), 0.0)
    nan = f.copy()
    nan[3, 4] = np.nan
    inf = f.copy()
    inf[5, 5] = np.inf
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "inf.npy", inf)
    np.save(tmp_path / "empty.npy", np.zeros((0, 48), np.float32))
    np.save(tmp_path / "fixed.npy", f)
    np.save(tmp_path / "small.npy", f[:-2])
    np.save(tmp_path / "frac_seg.npy", fs * 0.5)
    (tmp_path / "garbage.nii.gz").write_bytes(b"this is not a nifti file")
    fx = png_pair["fixed"]
    return {
        "different ndim": ([fx, nii_pair["moving"]], nii_pair["moving"]),
        "different shape": (
            [str(tmp_path / "fixed.npy"), str(tmp_path / "small.npy"), "--same-grid"],
            "small.npy",
        ),
        "nan": ([str(tmp_path / "nan.npy"), str(tmp_path / "fixed.npy")], "nan.npy"),
        "inf": ([str(tmp_path / "fixed.npy"), str(tmp_path / "inf.npy")], "inf.npy"),
        "missing": ([fx, str(tmp_path / "missing.png")], "missing.png"),
        "unreadable": ([str(tmp_path / "garbage.nii.gz"), fx], "garbage.nii.gz"),
        "empty": ([str(tmp_path / "empty.npy"), str(tmp_path / "fixed.npy")], "empty.npy"),
        "non-integer labels": (
            [
                str(tmp_path / "fixed.npy"),
                str(tmp_path / "fixed.npy"),
                "--moving-seg",
                str(tmp_path / "frac_seg.npy"),
            ],
            "frac_seg.npy",
        ),
        "label shape": (
            [fx, png_pair["moving"], "--fixed-seg", str(tmp_path / "small.npy")],
            "small.npy",
        ),
    }


CASES = [
    "different ndim",
    "different shape",
    "nan",
    "inf",
    "missing",
    "unreadable",
    "empty",
    "non-integer labels",
    "label shape",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(case, png_pair, nii_pair, tmp_path, capsys):
    files, name = _bad_inputs(tmp_path, png_pair, nii_pair)[case]
    out = tmp_path / "never"
    rc = main(["register", *files[:2], "-o", str(out), "--method", "none", *files[2:]])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1, err
    assert err.startswith("pddreg: error: ") and name in err, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_usage_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["register", "a.png"])
    assert exc.value.code == 2
    assert "-o" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["register", "a.png", "b.png", "-o", str(tmp_path), "--method", "deeds"])
    capsys.readouterr()
    import torch

    if not torch.cuda.is_available():
        rc = main(["--device", "cuda", "register", "a.png", "b.png", "-o", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("pddreg: error: --device") and err.count("\n") == 1


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("register", "track", "demo"):
        assert cmd in text


def test_track_command(tmp_path, capsys):
    frames = []
    for t in range(4):
        img, seg = _scene((40, 48), 1.5 * t, seed=t)
        frames.append(_png(tmp_path / f"frame{t}.png", img))
        if t == 0:
            _png(tmp_path / "seg0.png", seg, labels=True)
    out = tmp_path / "track"
    args = ["track", *frames, "--seg", str(tmp_path / "seg0.png"), "-o", str(out)]
    assert main([*args, "--method", "none"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [f"seg_{t:04d}.png" for t in range(4)]
        + [f"disp_{t:04d}.npy" for t in range(4)]
        + ["summary.json", "track.png", "track.gif", "curves.png"]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert [f["frame"] for f in summary["frames"]] == [0, 1, 2, 3]
    assert summary["fps"] > 0 and summary["frames"][2]["cycle_error_px"] == 0.0  # none: 0
    assert summary["frames"][3]["file"] == frames[3]
    capsys.readouterr()
    # a frame of another shape: one line, nothing written
    PILImage.fromarray(np.zeros((10, 10), np.uint8) + 7).save(tmp_path / "odd.png")
    rc = main(
        [
            "track",
            frames[0],
            str(tmp_path / "odd.png"),
            "--seg",
            str(tmp_path / "seg0.png"),
            "-o",
            str(tmp_path / "t2"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "odd.png" in err and err.count("\n") == 1
    assert not (tmp_path / "t2").exists()
