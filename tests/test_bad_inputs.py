"""The table of bad inputs: each row through the Python API and through the command line.

Every row must give exit status 2 with ONE line ``pddreg: error: <input>: <problem>`` naming
the input, write nothing (no output folder, no temporary left), and raise
:class:`pddreg.errors.InputError` with the same message from Python. The pairs-file rows
(missing columns, missing files) are in ``tests/test_batch.py``.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from pddreg.api import map_points, register
from pddreg.cli import main
from pddreg.errors import InputError

SHAPE = (40, 48)


def _image(shape=SHAPE, seed=0) -> np.ndarray:
    grid = np.indices(shape).astype(np.float32)
    r = np.sqrt(sum(((g - s / 2) / (s / 4)) ** 2 for g, s in zip(grid, shape, strict=True)))
    noise = np.random.default_rng(seed).random(shape).astype(np.float32) * 0.05
    return (0.2 + 0.6 * (r < 1) + noise).astype(np.float32)


def _labels(shape=SHAPE) -> np.ndarray:
    return (_image(shape) > 0.5).astype(np.int16)


@dataclass
class Case:
    """``register FIXED MOVING [options]`` arguments, and what the one line must contain."""

    args: list[str]
    names: str  # the input named at the start of the message
    problem: str  # words of the problem
    api: dict[str, Any] = field(default_factory=dict)  # register() keywords for the options
    command: str = "register"
    call: Callable[[], Any] | None = None  # Python call, when not register(args[0], args[1])


def _nii(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _png(path: Path, array: np.ndarray) -> str:
    PILImage.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)
    return str(path)


def _cases(tmp: Path) -> dict[str, Case]:
    img = _image()
    fixed = _png(tmp / "fixed.png", img)
    moving = _png(tmp / "moving.png", _image(seed=1))
    fx_nii = _nii(tmp / "fixed.nii.gz", img)
    c: dict[str, Case] = {}

    c["missing file"] = Case([fixed, str(tmp / "missing.png")], "missing.png", "no such file")
    (tmp / "zero.nii.gz").write_bytes(b"")
    c["empty file"] = Case([str(tmp / "zero.nii.gz"), moving], "zero.nii.gz", "cannot read")
    np.save(tmp / "empty.npy", np.zeros((0, 48), np.float32))
    c["empty array"] = Case([str(tmp / "empty.npy"), moving], "empty.npy", "image is empty")
    data = Path(fx_nii).read_bytes()
    (tmp / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    c["truncated nifti"] = Case([str(tmp / "cut.nii.gz"), moving], "cut.nii.gz", "cannot read")
    raw = gzip.decompress(data)
    (tmp / "short.nii").write_bytes(raw[: len(raw) - 400])
    c["truncated nifti data"] = Case([fixed, str(tmp / "short.nii")], "short.nii", "cannot read")
    png = Path(moving).read_bytes()
    (tmp / "cut.png").write_bytes(png[: len(png) // 2])
    c["truncated png"] = Case([fixed, str(tmp / "cut.png")], "cut.png", "cannot read")
    np.save(tmp / "whole.npy", img)
    npy = (tmp / "whole.npy").read_bytes()
    (tmp / "cut.npy").write_bytes(npy[: len(npy) // 2])
    c["truncated npy"] = Case([str(tmp / "cut.npy"), moving], "cut.npy", "cannot read")
    (tmp / "cut.mha").write_text(
        "ObjectType = Image\nNDims = 2\nDimSize = 40 48\nElementType = MET_FLOAT\n"
        "ElementDataFile = LOCAL\nabc"
    )
    c["truncated mha"] = Case([fixed, str(tmp / "cut.mha")], "cut.mha", "cannot read")
    (tmp / "garbage.nii.gz").write_bytes(b"this is not a NIfTI file at all" * 20)
    c["unreadable"] = Case([str(tmp / "garbage.nii.gz"), moving], "garbage.nii.gz", "cannot read")
    (tmp / "folder.png").mkdir()
    c["a folder"] = Case([fixed, str(tmp / "folder.png")], "folder.png", "")
    (tmp / "image.txt").write_text("1 2 3\n")
    c["wrong extension"] = Case([str(tmp / "image.txt"), moving], "image.txt", "unsupported")
    (tmp / "image.nii.gz.bak").write_bytes(data)
    c["wrong extension (backup)"] = Case(
        [fixed, str(tmp / "image.nii.gz.bak")], "image.nii.gz.bak", "unsupported"
    )
    nan = img.copy()
    nan[3, 4] = np.nan
    c["NaN"] = Case([fixed, _nii(tmp / "nan.nii.gz", nan)], "nan.nii.gz", "NaN or Inf")
    inf = img.copy()
    inf[5, 5] = np.inf
    np.save(tmp / "inf.npy", inf)
    c["Inf"] = Case([str(tmp / "inf.npy"), moving], "inf.npy", "NaN or Inf")
    c["constant"] = Case(
        [fixed, _nii(tmp / "flat.nii.gz", np.full(SHAPE, 7.0, np.float32))],
        "flat.nii.gz",
        "constant",
    )
    np.save(tmp / "voxel.npy", np.ones((1, 1), np.float32))
    c["one voxel"] = Case([str(tmp / "voxel.npy"), moving], "voxel.npy", "too small")
    np.save(tmp / "line.npy", _image((1, 48)))
    c["one voxel thick"] = Case([fixed, str(tmp / "line.npy")], "line.npy", "too small")
    from pddreg.models import PDDNet, PDDNetConfig, save_model

    coarse = tmp / "stride4.pt"  # a model whose features are 4x coarser than the image
    save_model(PDDNet(PDDNetConfig(ndim=2)), coarse)
    np.save(tmp / "thin.npy", _image((4, 48)))
    c["too small for the model"] = Case(
        [str(tmp / "thin.npy"), str(tmp / "thin.npy"), "--method", "pdd", "--model", str(coarse)],
        "thin.npy",
        "too small for the pdd model (feature stride 4): it needs at least 5 voxels",
        {"method": "pdd", "model": str(coarse)},
    )
    big = _nii(tmp / "big.nii.gz", _image((96, 96, 96)))
    c["oversized"] = Case(
        [big, big, "--method", "mind", "--max-memory", "64M"],
        "big.nii.gz",
        "needs about",
        {"method": "mind", "max_memory": "64M"},
    )
    c["2D against 3D"] = Case(
        [fixed, _nii(tmp / "vol.nii.gz", _image((20, 24, 28)))], "vol.nii.gz", "3D"
    )
    np.save(tmp / "frac.npy", _labels() * 0.5)
    c["float labels"] = Case(
        [fixed, moving, "--fixed-seg", str(tmp / "frac.npy")],
        "frac.npy",
        "non-integer",
        {"fixed_seg": str(tmp / "frac.npy")},
    )
    np.save(tmp / "neg.npy", _labels().astype(np.int64) - 1)
    c["negative labels"] = Case(
        [fixed, moving, "--moving-seg", str(tmp / "neg.npy")],
        "neg.npy",
        "negative",
        {"moving_seg": str(tmp / "neg.npy")},
    )
    many = np.arange(np.prod(SHAPE), dtype=np.int32).reshape(SHAPE)
    _nii(tmp / "many.nii.gz", many)
    c["many-thousand labels"] = Case(
        [fixed, moving, "--fixed-seg", str(tmp / "many.nii.gz")],
        "many.nii.gz",
        "1919 distinct labels",
        {"fixed_seg": str(tmp / "many.nii.gz")},
    )
    np.save(tmp / "small_seg.npy", _labels((30, 48)))
    c["labels of another shape"] = Case(
        [fixed, moving, "--moving-seg", str(tmp / "small_seg.npy")],
        "small_seg.npy",
        "differs from the image shape",
        {"moving_seg": str(tmp / "small_seg.npy")},
    )
    shifted = np.eye(4)
    shifted[:3, 3] = [5.0, 0.0, 0.0]
    c["labels on another grid"] = Case(
        [fx_nii, fx_nii, "--fixed-seg", _nii(tmp / "seg_grid.nii.gz", _labels(), shifted)],
        "seg_grid.nii.gz",
        "another grid",
        {"fixed_seg": str(tmp / "seg_grid.nii.gz")},
    )
    c["mask on another grid"] = Case(
        [fx_nii, fx_nii, "--moving-mask", _nii(tmp / "mask_grid.nii.gz", _labels(), shifted)],
        "mask_grid.nii.gz",
        "another grid",
        {"moving_mask": str(tmp / "mask_grid.nii.gz")},
    )
    np.save(tmp / "mask_shape.npy", _labels((40, 40)))
    c["mask of another shape"] = Case(
        [fixed, moving, "--fixed-mask", str(tmp / "mask_shape.npy")],
        "mask_shape.npy",
        "differs from the shape",
        {"fixed_mask": str(tmp / "mask_shape.npy")},
    )
    (tmp / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a torch file")
    c["corrupt model"] = Case(
        [fixed, moving, "--method", "pdd", "--model", str(tmp / "corrupt.pt")],
        "corrupt.pt",
        "not a readable model file",
        {"method": "pdd", "model": str(tmp / "corrupt.pt")},
    )
    from pddreg.models import PDDNet, PDDNetConfig, save_model

    torch.manual_seed(0)
    save_model(PDDNet(PDDNetConfig(ndim=3, radius=1, feature_kwargs={"width": 8})), tmp / "m3.pt")
    c["model of the other dimension"] = Case(
        [fixed, moving, "--method", "pdd", "--model", str(tmp / "m3.pt")],
        "m3.pt",
        "the model is 3D but the images are 2D",
        {"method": "pdd", "model": str(tmp / "m3.pt")},
    )
    # landmarks outside the image: mapping points through a saved registration
    reg = tmp / "reg"
    assert main(["register", fixed, moving, "-o", str(reg), "--method", "none"]) == 0
    (tmp / "points.csv").write_text("i,j\n10,10\n45,10\n")
    c["landmarks outside the image"] = Case(
        [str(reg), "--points", str(tmp / "points.csv")],
        "points.csv",
        "point 2 (45.0, 10.0) lies outside the fixed image",
        command="apply",
        call=lambda: map_points(reg, np.array([[10.0, 10.0], [45.0, 10.0]])),
    )
    return c


CASES = [
    "missing file",
    "empty file",
    "empty array",
    "truncated nifti",
    "truncated nifti data",
    "truncated png",
    "truncated npy",
    "truncated mha",
    "unreadable",
    "a folder",
    "wrong extension",
    "wrong extension (backup)",
    "NaN",
    "Inf",
    "constant",
    "one voxel",
    "one voxel thick",
    "too small for the model",
    "oversized",
    "2D against 3D",
    "float labels",
    "negative labels",
    "many-thousand labels",
    "labels of another shape",
    "labels on another grid",
    "mask on another grid",
    "mask of another shape",
    "corrupt model",
    "model of the other dimension",
    "landmarks outside the image",
]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    return tmp, _cases(tmp)


def test_the_table_is_complete(table):
    assert sorted(table[1]) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_through_the_command_line(case, table, capsys):
    tmp, cases = table
    c = cases[case]
    out = tmp / f"out_{CASES.index(case)}"
    capsys.readouterr()
    rc = main([c.command, *c.args[:1], *c.args[1:], "-o", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1, err
    assert err.startswith("pddreg: error: ") and "Traceback" not in err
    first = err[len("pddreg: error: ") :]
    assert c.names in first.split(": ")[0], err  # the input comes first
    assert c.problem in err, err
    assert not out.exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_through_the_python_api(case, table):
    _, cases = table
    c = cases[case]
    if c.call is not None:
        call = c.call
    else:
        kwargs = {"method": "none", "device": "cpu", **c.api}
        call = lambda: register(c.args[0], c.args[1], **kwargs)  # noqa: E731
    with pytest.raises(InputError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    names = c.names if c.command == "register" else "points"
    assert names in message.split(": ")[0], message
    assert c.problem in message, message


NATIVE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import test_bad_inputs as t
from pathlib import Path
from pddreg.cli import main
cases = t._cases(Path({tmp!r}))
for name in ("a folder", "truncated mha"):
    c = cases[name]
    print(main([c.command, *c.args, "-o", {out!r}]), flush=True)
"""


@pytest.mark.slow
def test_what_native_readers_print_does_not_reach_the_terminal(tmp_path):
    """ITK, GDCM and MetaIO print on file descriptor 2 from C++ (pytest's capsys cannot see
    it): in a real process the user still gets exactly one line per bad file."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "native.py"
    tests = str(Path(__file__).parent)
    script.write_text(NATIVE_SCRIPT.format(tests=tests, tmp=str(tmp_path), out=str(tmp_path / "o")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    res = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert res.stdout.splitlines()[-2:] == ["2", "2"], res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 2, res.stderr
    assert all(ln.startswith("pddreg: error: ") for ln in lines), res.stderr
