"""MIND-SSC: shapes, range, intensity invariance, shift equivariance, bad input."""

import pytest
import torch
import torch.nn.functional as F

from pddreg.features.mind import MINDSSC, _box_filter, mind_channels, mind_ssc


def _texture(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=g)
    ndim = len(shape)
    pool = F.avg_pool3d if ndim == 3 else F.avg_pool2d
    return pool(x, 3, stride=1, padding=1)


@pytest.mark.parametrize("shape", [(24, 20), (12, 10, 14)])
def test_shape_and_range(shape):
    x = _texture(shape)
    m = mind_ssc(x)
    ndim = len(shape)
    assert m.shape == (1, mind_channels(ndim), *shape)
    assert mind_channels(3) == 12 and mind_channels(2) == 4
    assert m.dtype == x.dtype
    assert torch.all(m > 0) and torch.all(m <= 1)
    # at least one channel per voxel is exactly 1 (the minimum distance)
    assert torch.allclose(m.amax(dim=1), torch.ones(()))


def test_float64_and_integer_input():
    x = (_texture((16, 16)) * 255).to(torch.float64)
    assert mind_ssc(x).dtype == torch.float64
    xi = (_texture((16, 16)) * 255).round().to(torch.int64)
    assert mind_ssc(xi).dtype == torch.float32


@pytest.mark.parametrize("shape", [(24, 20), (12, 10, 14)])
@pytest.mark.parametrize("a,b", [(3.0, 0.7), (-0.5, 2.0), (1e-3, 5.0)])
def test_affine_intensity_invariance(shape, a, b):
    x = _texture(shape, seed=1).double()
    m1 = mind_ssc(x)
    m2 = mind_ssc(a * x + b)
    assert torch.allclose(m1, m2, atol=1e-9)


@pytest.mark.parametrize("shape", [(32, 28), (16, 14, 18)])
def test_shift_equivariance(shape):
    ndim = len(shape)
    x = _texture(shape, seed=2)
    shift = (3, -2, 1)[:ndim]
    xs = torch.roll(x, shifts=shift, dims=tuple(range(2, 2 + ndim)))
    m = mind_ssc(x)
    ms = mind_ssc(xs)
    # compare away from the borders (replicate padding and the roll's wrap-around differ there)
    mr = torch.roll(m, shifts=shift, dims=tuple(range(2, 2 + ndim)))
    inner = (slice(None), slice(None)) + tuple(slice(6, n - 6) for n in shape)
    assert torch.allclose(ms[inner], mr[inner], atol=1e-5)
    # and the unshifted descriptor does not match (the test can fail)
    assert not torch.allclose(ms[inner], m[inner], atol=1e-2)


def test_box_filter_matches_avg_pool():
    x = torch.rand(2, 3, 9, 8, 7, dtype=torch.float64)
    ref = F.avg_pool3d(F.pad(x, [2] * 6, mode="replicate"), 5, stride=1)
    assert torch.allclose(_box_filter(x, 2), ref)
    x2 = torch.rand(1, 2, 9, 8, dtype=torch.float64)
    ref2 = F.avg_pool2d(F.pad(x2, [1] * 4, mode="replicate"), 3, stride=1)
    assert torch.allclose(_box_filter(x2, 1), ref2)
    # bit for bit the padded form summed in window order (training runs depend on the bits)
    x4 = torch.rand(1, 3, 11, 6, 9)
    for r in (1, 2):
        ref4 = x4
        for axis in range(2, 5):
            pad = [0] * 6
            pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = r
            padded = F.pad(ref4, pad, mode="replicate")
            n = ref4.shape[axis]
            acc = padded.narrow(axis, 0, n).clone()
            for j in range(1, 2 * r + 1):
                acc += padded.narrow(axis, j, n)
            ref4 = acc.div_(2 * r + 1)
        assert torch.equal(_box_filter(x4, r), ref4)
    # axes shorter than the window (the shifted views leave the array entirely)
    x3 = torch.rand(1, 2, 1, 2, 5, dtype=torch.float64)
    ref3 = F.avg_pool3d(F.pad(x3, [3] * 6, mode="replicate"), 7, stride=1)
    assert torch.allclose(_box_filter(x3, 3), ref3)


@pytest.mark.parametrize(
    "shape",
    [(1, 12, 19, 23, 17), (2, 4, 70, 33), (1, 1, 40, 3, 130), (1, 2, 1, 9, 300), (3, 1, 2, 50, 2)],
)
def test_box_filter_native_equals_pytorch(monkeypatch, shape):
    """The native kernel (columns split across threads, in-place passes after the first) sums
    in the PyTorch path's order: equal bit for bit, the input untouched."""
    from pddreg.cost import _native

    if not _native.available():
        pytest.skip("native kernels not built")
    x = torch.randn(shape)
    keep = x.clone()
    saved = torch.get_num_threads()
    try:
        for r in (1, 2, 3):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                got = _native.box_filter(x, r)
                with monkeypatch.context() as m:
                    m.setattr(_native, "usable", lambda *a: False)
                    ref = _box_filter(x, r)
                assert torch.equal(got, ref), (r, threads)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(x, keep)
    # the dispatch: float32 CPU tensors of 4096 values and more take the kernel
    assert torch.equal(_box_filter(x, 1), _native.box_filter(x, 1))


def test_constant_image_is_finite():
    m = mind_ssc(torch.full((1, 1, 10, 10, 10), 0.3))
    assert torch.isfinite(m).all() and torch.allclose(m, torch.ones(()))


def test_distinguishes_structures():
    # an edge along axis 0 and an edge along axis 1 give different descriptors at the edge
    x = torch.zeros(1, 1, 20, 20)
    x[:, :, 10:, :] = 1.0
    y = x.transpose(2, 3).contiguous()
    assert not torch.allclose(mind_ssc(x)[..., 10, 10], mind_ssc(y)[..., 10, 10], atol=1e-2)


def test_module_and_batch():
    x = torch.cat([_texture((12, 12, 12), 0), _texture((12, 12, 12), 1)])
    mod = MINDSSC(radius=1, dilation=2)
    m = mod(x)
    assert m.shape == (2, 12, 12, 12, 12)
    # batch elements are processed independently
    assert torch.allclose(m[1:], mind_ssc(x[1:]), atol=1e-6)
    assert "dilation=2" in repr(mod)


@pytest.mark.parametrize(
    "bad",
    [torch.rand(1, 2, 8, 8), torch.rand(8, 8), torch.rand(1, 1, 8), torch.rand(1, 1, 4, 4, 4, 4)],
)
def test_bad_shapes_raise(bad):
    with pytest.raises(ValueError, match="mind_ssc"):
        mind_ssc(bad)


def test_bad_arguments_raise():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="radius"):
        mind_ssc(x, radius=-1)
    with pytest.raises(ValueError, match="dilation"):
        mind_ssc(x, dilation=0)
    with pytest.raises(ValueError, match="Tensor"):
        mind_ssc(x.numpy())
