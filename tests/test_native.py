"""pddreg.cost._native: the compiled CPU kernels agree with the PyTorch code they replace, and
everything still works where they cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from pddreg.cost import (
    DEFAULT_ALPHA,
    _native,
    correlation,
    meanfield,
    minconv,
    probabilities,
    regularise,
    soft_field,
)

needs_native = pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "cc").split()[0]) is None or not _native.available(),
    reason="no C compiler: the PyTorch kernels are the only path",
)


def torch_path(monkeypatch, fn, *args, **kwargs):
    """fn(*args, **kwargs) with the native kernels switched off."""
    with monkeypatch.context() as m:
        m.setenv("PDDREG_NATIVE", "0")
        assert not _native.available()
        return fn(*args, **kwargs)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-6) -> bool:
    return bool((a - b).abs().max() <= rel * b.abs().max().clamp_min(1e-12))


# (shape of a cost volume (B, n**nd, *G), n): 1D..3D, batch 2, grids not a multiple of the
# kernels' vector width, a grid smaller than one vector, a large radius
COST_CASES = [
    ((1, 7, 40), 7),
    ((2, 121, 13, 17), 11),
    ((1, 25, 3, 70), 5),
    ((2, 125, 6, 7, 9), 5),
    ((1, 3375, 5, 4, 33), 15),
    ((1, 9**3, 2, 3, 2), 9),
    ((1, 27, 1, 5, 9), 3),  # a grid axis of length 1
    ((2, 1, 4, 6), 1),  # radius 0
]


def test_available_where_a_compiler_is():
    if shutil.which(os.environ.get("CC", "cc").split()[0]) is None:
        pytest.skip("no C compiler here")
    assert _native.available()


@needs_native
@pytest.mark.parametrize("shape,n", COST_CASES)
def test_minconv_and_meanfield_match_torch(monkeypatch, shape, n):
    torch.manual_seed(0)
    x = torch.rand(shape) * 5
    assert close(minconv(x), torch_path(monkeypatch, minconv, x))
    assert close(meanfield(x), torch_path(monkeypatch, meanfield, x))


@needs_native
@pytest.mark.parametrize("shape,n", COST_CASES)
@pytest.mark.parametrize("alpha", [DEFAULT_ALPHA, [0.3, 0.8, 0.2, 1.1, 1.7, 5.0]])
def test_regularise_matches_torch(monkeypatch, shape, n, alpha):
    torch.manual_seed(1)
    x = torch.rand(shape) * 3
    a = torch.tensor(alpha)
    assert close(regularise(x, a), torch_path(monkeypatch, regularise, x, a))


@needs_native
@pytest.mark.parametrize("shape,n", COST_CASES)
def test_soft_field_matches_torch(monkeypatch, shape, n):
    torch.manual_seed(2)
    x = torch.rand(shape) * 20  # peaked probabilities: exp over a wide range
    r = (n - 1) // 2
    for spacing in (1.0, 0.5):
        ours = soft_field(x, r, spacing)
        ref = torch_path(monkeypatch, soft_field, x, r, spacing)
        assert (ours - ref).abs().max() < 2e-5 * r * spacing + 1e-6


@needs_native
@pytest.mark.parametrize("shape,n", COST_CASES)
def test_probabilities_match_torch(monkeypatch, shape, n):
    torch.manual_seed(5)
    x = torch.rand(shape) * 30 - 5
    ours = probabilities(x)
    ref = torch_path(monkeypatch, probabilities, x)
    assert (ours - ref).abs().max() < 1e-6
    assert torch.allclose(ours.sum(1), torch.ones(()), atol=1e-5)


@needs_native
@pytest.mark.parametrize(
    "fixed,moving,radius,spacing",
    [
        ((1, 3, 19), (1, 3, 38), 3, 1.0),
        ((2, 8, 10, 12), (2, 8, 20, 24), 4, 1.0),
        ((1, 5, 9, 11), (1, 5, 9, 11), 2, 2.0),
        ((1, 16, 12, 10, 9), (1, 16, 12, 10, 9), 3, 1.0),
        ((1, 4, 6, 7, 8), (1, 4, 12, 14, 16), 2, 0.5),
        ((2, 6, 5, 6, 17), (2, 6, 10, 12, 34), 5, 1.0),
        ((1, 4, 5, 6, 37), (1, 4, 5, 6, 37), 2, 1.0),  # unit lattice steps: vector paths
        ((1, 6, 7, 40), (1, 6, 7, 40), 3, 1.0),
        ((1, 5, 9, 12), (1, 5, 9, 12), 1, 1.0),
        ((2, 4, 9, 11), (2, 4, 25, 31), 3, 0.7),  # no common lattice step: product lattice
        ((1, 3, 7, 5, 6), (1, 3, 20, 14, 17), 2, 1.3),
    ],
)
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_correlation_matches_torch(monkeypatch, fixed, moving, radius, spacing, padding):
    torch.manual_seed(3)
    ff = torch.rand(fixed)
    fm = torch.rand(moving)
    ours = correlation(ff, fm, radius, spacing, padding=padding)
    ref = torch_path(monkeypatch, correlation, ff, fm, radius, spacing, padding=padding)
    assert ours.shape == ref.shape
    assert close(ours, ref, 2e-5)  # the PyTorch direct path interpolates in another order


@needs_native
def test_non_contiguous_inputs_and_autograd_use_the_right_path(monkeypatch):
    torch.manual_seed(4)
    x = torch.rand(1, 10, 11, 121).permute(0, 3, 1, 2)  # (1, 121, 10, 11), not contiguous
    assert close(regularise(x), torch_path(monkeypatch, regularise, x))
    xg = x.detach().clone().requires_grad_()  # autograd: the native backward, gradients flow
    regularise(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()  # values: test_native_backward
    xd = x.double()  # float64: the PyTorch path
    assert regularise(xd).dtype == torch.float64


def test_without_a_compiler_everything_falls_back(tmp_path):
    """No compiler and an empty cache: the kernels are unavailable, results still come."""
    code = textwrap.dedent(
        """
        import torch
        from pddreg.cost import _native, correlation, regularise, soft_field
        assert not _native.available()
        c = regularise(correlation(torch.rand(1, 4, 6, 7), torch.rand(1, 4, 6, 7), 2))
        print(tuple(soft_field(c, 2).shape))
        """
    )
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), PDDREG_CACHE_DIR=str(tmp_path))
    env.pop("PDDREG_NATIVE", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(1, 2, 6, 7)"
    assert not list(tmp_path.glob("*.so"))


@needs_native
def test_a_broken_cache_file_is_rebuilt(tmp_path):
    code = textwrap.dedent(
        """
        from pddreg.cost import _native
        print(_native.available())
        """
    )
    env = dict(os.environ, PDDREG_CACHE_DIR=str(tmp_path))
    env.pop("PDDREG_NATIVE", None)
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.stdout.strip() == "True", first.stderr
    (so,) = tmp_path.glob("_native-*.so")
    so.write_bytes(b"not a shared library")
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert again.stdout.strip() == "True", again.stderr
    assert so.read_bytes()[:4] == b"\x7fELF" or sys.platform != "linux"


@needs_native
def test_concurrent_callers_get_their_own_results(monkeypatch):
    """Two Python threads regularising different volumes at once (shared worker pool)."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(6)
    xs = [torch.rand(1, 125, 9, 10, 11) * (k + 1) for k in range(4)]
    refs = [torch_path(monkeypatch, regularise, x) for x in xs]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(regularise, xs))
    for out, ref in zip(outs, refs, strict=True):
        assert close(out, ref)


@needs_native
def test_a_folder_others_can_write_is_not_used(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    code = "from pddreg.cost import _native; print(_native.available())"
    env = dict(os.environ, PDDREG_CACHE_DIR=str(shared))
    env.pop("PDDREG_NATIVE", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.stdout.strip() == "False", res.stderr
    assert not list(shared.glob("*.so"))
