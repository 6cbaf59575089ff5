"""pddreg.register (pddreg.api): inputs, validation, dispatch, warped outputs, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pddreg
from pddreg.api import RegistrationResult, compute_metrics, make_register_fn, register
from pddreg.errors import InputError


def _blob_image(shape: tuple[int, ...], centre_shift: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """A smooth bright ellipsoid with an inner core on a textured background, and its labels."""
    grid = np.indices(shape).astype(np.float32)
    centre = np.array([s / 2 + c for s, c in zip(shape, centre_shift, strict=True)])
    radii = np.array([s / 4 for s in shape])
    r = np.sqrt(
        (
            (
                (grid - centre.reshape(-1, *([1] * len(shape))))
                / radii.reshape(-1, *([1] * len(shape)))
            )
            ** 2
        ).sum(0)
    )
    labels = np.zeros(shape, dtype=np.int64)
    labels[r < 1.0] = 1
    labels[r < 0.5] = 2
    rng = np.random.default_rng(0)
    tex = rng.standard_normal(shape).astype(np.float32) * 0.02
    image = 0.2 + 0.5 * (r < 1.0) + 0.3 * (r < 0.5) + tex
    return image.astype(np.float32), labels


def test_none_is_identity_with_metrics():
    f, fs = _blob_image((32, 40), (0, 0))
    m, ms = _blob_image((32, 40), (3, -2))
    res = register(f, m, method="none", fixed_seg=fs, moving_seg=ms)
    assert isinstance(res, RegistrationResult)
    assert res.disp.shape == (2, 32, 40) and not res.disp.any()
    np.testing.assert_allclose(res.warped, m, atol=1e-5)  # original intensities, not normalised
    np.testing.assert_array_equal(res.warped_seg, ms)
    assert res.warped_seg.dtype == np.int64
    mt = res.metrics
    assert mt["mean_dice"] == pytest.approx(mt["mean_dice_before"])
    assert 0 < mt["mean_dice"] < 1
    assert set(mt["dice"]) == {"1", "2"} and mt["folding_fraction"] == 0.0
    assert mt["sdlogj"] == pytest.approx(0.0, abs=1e-6)
    assert res.method == "none" and res.runtime_s >= 0


def test_accepts_tensors_images_and_paths(tmp_path):
    from pddreg.data.io import Image, read_image

    f, _ = _blob_image((16, 20), (0, 0))
    t = register(torch.from_numpy(f), torch.from_numpy(f), method="none")
    assert t.disp.shape == (2, 16, 20) and t.metrics is None and t.warped_seg is None
    img = Image(array=f, spacing=(2.0, 0.5), affine=None, path=None)
    r = register(
        img,
        img,
        method="none",
        fixed_seg=np.zeros_like(f, dtype=np.int64) + 1,
        moving_seg=np.ones((16, 20), dtype=np.int64),
    )
    assert r.spacing == (2.0, 0.5)
    np.save(tmp_path / "f.npy", f)
    p = register(str(tmp_path / "f.npy"), read_image(str(tmp_path / "f.npy")), method="none")
    assert p.disp.shape == (2, 16, 20)
    assert pddreg.register is not None and pddreg.register(f, f, method="none").method == "none"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"moving": np.random.rand(16, 21), "same_grid": True},
            r"moving: shape \(16, 21\) differs from the fixed",
        ),
        ({"moving": np.random.rand(4, 16, 20)}, "moving: the moving image is 3D"),
        ({"fixed": np.full((16, 20), np.nan)}, "fixed: .*(NaN|Inf|finite)"),
        ({"fixed": np.zeros((0, 20))}, "fixed: .*empty"),
        ({"moving_seg": np.full((16, 20), 0.5)}, "moving_seg: .*non-integer"),
        ({"fixed_seg": np.ones((16, 19), dtype=np.int64)}, "fixed_seg: label map shape"),
        ({"fixed_seg": -np.ones((16, 20), dtype=np.int64)}, "fixed_seg: .*negative"),
        ({"method": "deeds"}, "--method: unknown method 'deeds'"),
        ({"fixed": "nothing/here.nii.gz"}, "nothing/here.nii.gz"),
        ({"fixed": [1, 2, 3]}, "fixed: expected a NumPy array"),
        ({"spacing": (1.0, -1.0)}, "spacing"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    f, _ = _blob_image((16, 20), (0, 0))
    args = {"fixed": f, "moving": f + 0.1, "method": "none", **kwargs}
    with pytest.raises(InputError, match=match):
        register(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_requested_without_cuda():
    f, _ = _blob_image((16, 20), (0, 0))
    with pytest.raises(InputError, match="--device"):
        register(f, f, method="none", device="cuda")


def test_compute_metrics_known_boxes():
    a = np.zeros((10, 10), dtype=np.int64)
    b = np.zeros_like(a)
    a[2:6, 2:6] = 1  # 16 pixels
    b[2:6, 4:8] = 1  # 16 pixels, overlap 8
    m = compute_metrics(a, b, b, np.zeros((2, 10, 10), np.float32), spacing=(1.0, 1.0))
    assert m["dice"]["1"] == pytest.approx(0.5)
    assert m["mean_dice"] == pytest.approx(0.5) == m["mean_dice_before"]
    assert m["hd95"]["1"] == pytest.approx(2.0)


@pytest.mark.parametrize("shape", [(48, 56), (24, 28, 32)])
def test_mind_recovers_a_shift(shape):
    shift = (3,) * len(shape)
    f, fs = _blob_image(shape, (0,) * len(shape))
    m, ms = _blob_image(shape, shift)
    res = register(f, m, method="mind", fixed_seg=fs, moving_seg=ms, device="cpu")
    assert res.metrics["mean_dice"] > res.metrics["mean_dice_before"] + 0.1
    inside = fs > 0
    for axis in range(len(shape)):  # moves the right way (accuracy: tests/test_register_known.py)
        assert 1.0 <= np.median(res.disp[axis][inside]) <= shift[axis] + 1.0
    assert res.metrics["folding_fraction"] < 0.01


def test_pdd_pretrained_reduces_dissimilarity():
    f, fs = _blob_image((64, 64), (0, 0))
    m, ms = _blob_image((64, 64), (4, -3))
    res = register(f, m, method="pdd", fixed_seg=fs, moving_seg=ms, device="cpu")
    assert res.disp.shape == (2, 64, 64) and np.isfinite(res.disp).all()
    assert np.mean((res.warped - f) ** 2) < np.mean((m - f) ** 2)
    assert res.metrics["mean_dice"] > res.metrics["mean_dice_before"]


def test_default_is_pdd_with_its_refinement():
    # the default method is the shipped PDD-Net with its MIND-SSC refinement; without the
    # refinement the network's field is coarser (and differs)
    f, fs = _blob_image((48, 56), (0, 0))
    m, ms = _blob_image((48, 56), (3, -2))
    default = register(f, m, device="cpu")
    refined = register(f, m, method="pdd", instance_opt=True, device="cpu")
    alone = register(f, m, method="pdd", instance_opt=False, device="cpu")
    assert np.array_equal(default.disp, refined.disp)
    assert not np.allclose(alone.disp, refined.disp, atol=1e-3)
    # both align the blob (which of the two fits this small synthetic image better is not the
    # point: benchmarks/real.py measures the refinement on real images)
    err = [np.mean((r.warped - f) ** 2) for r in (refined, alone)]
    assert max(err) < 0.25 * np.mean((m - f) ** 2)


def test_pdd_model_path_and_dimension_check(tmp_path):
    from pddreg.models import PDDNet, PDDNetConfig, save_model

    path = tmp_path / "m3.pt"
    save_model(PDDNet(PDDNetConfig(ndim=3)), path)
    f, _ = _blob_image((16, 20), (0, 0))
    with pytest.raises(InputError, match="model is 3D but the images are 2D"):
        register(f, f, method="pdd", model=str(path))
    with pytest.raises(InputError, match="missing.pt"):
        register(f, f, method="pdd", model=str(tmp_path / "missing.pt"))


def test_make_register_fn_shapes():
    fn = make_register_fn("none", 3, device="cpu")
    out = fn(torch.zeros(1, 1, 4, 5, 6), torch.zeros(1, 1, 4, 5, 6))
    assert out.shape == (1, 3, 4, 5, 6) and not out.any()
    with pytest.raises(InputError, match="--method"):
        make_register_fn("x", 2)


def test_import_sets_a_short_openmp_spin_before_torch_loads():
    """``import pddreg`` before torch sets libgomp's spin count (see ``pddreg/__init__``) and
    leaves a wait policy or spin count of the user's alone."""
    import os
    import subprocess
    import sys

    code = (
        "import os, pddreg, sys; "
        "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'), "
        "'torch' in sys.modules)"
    )

    def run(**env: str) -> str:
        base = {
            k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
        }
        out = subprocess.run(
            [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert run() == "1000 None False"
    assert run(OMP_WAIT_POLICY="PASSIVE") == "None PASSIVE False"
    assert run(GOMP_SPINCOUNT="5") == "5 None False"
