"""pddreg.cost: agreement with the lecture's F.unfold formulation, known shifts, exactness of the
min-convolution, chunking, gradients and shape errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pddreg.cost import (
    DEFAULT_ALPHA,
    correlation,
    displacement_set,
    expected_displacement,
    expected_values,
    meanfield,
    minconv,
    minconv_exact,
    probabilities,
    regularise,
    soft_field,
)
from pddreg.errors import InputError


def gradcheck(fn, inputs):
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


# --------------------------------------------------------------------------------------------
# The lecture's 2D reference, written from the seed's lines (features at the grid resolution,
# spacing 1, batch 1).


def lecture_ssd(feat_fixed: torch.Tensor, feat_mov: torch.Tensor, disp_range: int) -> torch.Tensor:
    disp_hw = (disp_range - 1) // 2
    B, C, H, W = feat_fixed.size()
    feat_mov_unfold = F.unfold(feat_mov.transpose(1, 0), (disp_range, disp_range), padding=disp_hw)
    ssd = ((feat_fixed.view(C, 1, -1) - feat_mov_unfold) ** 2).sum(0)
    return ssd.view(1, disp_range**2, H, W)


def lecture_ops():
    pad1 = nn.ReplicationPad2d(5)
    pad2 = nn.ReplicationPad2d(6)
    avg1 = nn.AvgPool2d(5, stride=1)
    max1 = nn.MaxPool2d(3, stride=1)
    minconv_ = nn.Sequential(pad1, avg1, avg1, max1)
    meanfield_ = nn.Sequential(pad2, avg1, avg1, avg1)
    return minconv_, meanfield_


def lecture_minconv(ssd: torch.Tensor, disp_range: int) -> torch.Tensor:
    """Returns the lecture's (1, H*W, dr, dr) layout permuted back to (1, dr*dr, H, W)."""
    mc, _ = lecture_ops()
    _, _, H, W = ssd.shape
    x = ssd.permute(0, 2, 3, 1).reshape(1, -1, disp_range, disp_range)
    ssd_minconv = -mc(-x)
    return ssd_minconv.permute(0, 2, 3, 1).reshape(1, -1, H, W)


def lecture_meanfield(x: torch.Tensor) -> torch.Tensor:
    _, mf = lecture_ops()
    return mf(x)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


# --------------------------------------------------------------------------------------------
# Lecture equality


@pytest.mark.parametrize("disp_range", [5, 11])
def test_correlation_matches_lecture(disp_range):
    ff = torch.rand(1, 12, 14, 11)
    fm = torch.rand(1, 12, 14, 11)
    ref = lecture_ssd(ff, fm, disp_range)
    ours = correlation(ff, fm, (disp_range - 1) // 2)
    assert ours.shape == ref.shape
    assert rel(ours, ref) < 1e-4


def test_minconv_meanfield_match_lecture():
    dr = 11
    ssd = lecture_ssd(torch.rand(1, 8, 13, 10), torch.rand(1, 8, 13, 10), dr)
    ref_mc = lecture_minconv(ssd, dr)
    assert rel(minconv(ssd), ref_mc) < 1e-4
    ref_mf = lecture_meanfield(ref_mc)
    assert rel(meanfield(ref_mc), ref_mf) < 1e-4
    with torch.no_grad():  # inference path
        assert rel(meanfield(minconv(ssd)), ref_mf) < 1e-4


@pytest.mark.parametrize("grad", [False, True])
def test_whole_chain_matches_lecture(grad):
    dr = 11
    ff = torch.rand(1, 16, 12, 15)
    fm = torch.rand(1, 16, 12, 15)
    alpha = torch.tensor([0.7, 1.3, 0.4, 0.9, 1.1, 2.5])

    def r(x):
        return lecture_meanfield(lecture_minconv(x, dr))

    ssd = lecture_ssd(ff, fm, dr)
    c1 = alpha[0] * ssd + alpha[1] * r(ssd)
    ref = alpha[5] * (alpha[2] * ssd + alpha[3] * c1 + alpha[4] * r(c1))
    with torch.set_grad_enabled(grad):
        ours = regularise(correlation(ff.requires_grad_(grad), fm, 5), alpha)
    assert rel(ours, ref) < 1e-4
    ref_p = torch.softmax(-ref, 1)
    assert float((probabilities(ours) - ref_p).abs().max().detach()) < 1e-4


# --------------------------------------------------------------------------------------------
# Known shifts, sub-voxel spacing, strided grids, chunking


def smooth_features(shape, channels=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, channels, *shape, generator=g)
    for _ in range(2):  # smooth so that linear interpolation is meaningful
        x = F.avg_pool2d(x, 3, 1, 1) if len(shape) == 2 else F.avg_pool3d(x, 3, 1, 1)
    return (x - x.amin()) / (x.amax() - x.amin())


@pytest.mark.parametrize("ndim", [2, 3])
def test_argmin_at_known_shift(ndim):
    shape = (20, 18) if ndim == 2 else (12, 11, 10)
    shift = (2, -1) if ndim == 2 else (1, -2, 2)
    moving = smooth_features(shape)
    # fixed(x) = moving(x + shift)  =>  the best displacement is +shift
    fixed = torch.roll(moving, shifts=tuple(-s for s in shift), dims=tuple(range(2, 2 + ndim)))
    r = 3
    cost = correlation(fixed, moving, r, padding="border")
    disps = displacement_set(r, 1.0, ndim)
    best = disps[cost.argmin(1)]  # (1, *G, ndim)
    inner = tuple(slice(3, s - 3) for s in shape)  # away from the roll's wrap-around
    got = best[(0, *inner)].reshape(-1, ndim)
    assert (got == torch.tensor(shift, dtype=got.dtype)).all()


def test_subvoxel_spacing_and_strided_grid_against_grid_sample():
    """Half-voxel spacing, a coarse grid (G < S) with the align_corners=False positions."""
    moving = smooth_features((16, 12), channels=4).double()
    G = (8, 6)
    fixed = torch.rand(1, 4, *G, dtype=torch.float64)
    r, spacing = 2, 0.5
    cost = correlation(fixed, moving, r, spacing)
    disps = displacement_set(r, spacing, 2, dtype=torch.float64)
    # independent reference: grid_sample at p_k + d (p_k = (k + 0.5) * S / G - 0.5)
    pk = [
        (torch.arange(g, dtype=torch.float64) + 0.5) * s / g - 0.5
        for g, s in zip(G, (16, 12), strict=True)
    ]
    py, px = torch.meshgrid(*pk, indexing="ij")
    ref = torch.empty_like(cost)
    for l, d in enumerate(disps):
        y, x = py + d[0], px + d[1]
        grid = torch.stack([2 * x / 11 - 1, 2 * y / 15 - 1], -1)[None]
        w = F.grid_sample(moving, grid, align_corners=True, padding_mode="zeros")
        ref[:, l] = ((w - fixed) ** 2).sum(1)
    assert torch.allclose(cost, ref, atol=1e-10)


def test_subvoxel_spacing_finds_half_voxel_shift():
    """A shift of 1.5 voxels is found exactly with spacing 0.5 (linear features)."""
    ramp = torch.linspace(0, 1, 16, dtype=torch.float64)
    y, x = torch.meshgrid(ramp, ramp, indexing="ij")
    moving = torch.stack([y, x, y * x, (y + x) / 2])[None]  # bilinear -> exact interpolation
    h = 1.0 / 15
    fixed = torch.stack([y + 1.5 * h, x - 0.5 * h, (y + 1.5 * h) * (x - 0.5 * h), 0 * y])[None]
    fixed[:, 3] = (fixed[:, 0] + fixed[:, 1]) / 2
    cost = correlation(fixed, moving, 4, 0.5, padding="border")
    best = displacement_set(4, 0.5, 2, dtype=torch.float64)[cost.argmin(1)][0, 4:-4, 4:-4]
    assert torch.allclose(best.reshape(-1, 2), torch.tensor([1.5, -0.5], dtype=torch.float64))


@pytest.mark.parametrize(
    "G,S,spacing,padding",
    [
        ((6, 5, 4), (6, 5, 4), 1.0, "zeros"),
        ((4, 4, 3), (8, 8, 6), 1.0, "border"),
        ((4, 3, 5), (8, 6, 10), 2.0, "zeros"),
        ((5, 4, 3), (5, 4, 3), 0.37, "zeros"),  # no small common step: direct path
    ],
)
def test_chunked_equals_unchunked_3d(G, S, spacing, padding):
    ff = torch.rand(2, 3, *G, dtype=torch.float64)
    fm = torch.rand(2, 3, *S, dtype=torch.float64)
    full = correlation(ff, fm, 2, spacing, padding=padding)
    tiny = correlation(ff, fm, 2, spacing, padding=padding, max_memory=2000)
    with torch.no_grad():
        tiny_ng = correlation(ff, fm, 2, spacing, padding=padding, max_memory=2000)
    assert torch.allclose(full, tiny, atol=1e-12)
    assert torch.allclose(full, tiny_ng, atol=1e-12)
    # and the regulariser / soft field with a tiny budget
    assert torch.allclose(regularise(full), regularise(full, max_memory=500), atol=1e-10)
    with torch.no_grad():
        assert torch.allclose(regularise(full), regularise(full, max_memory=500), atol=1e-10)
    assert torch.allclose(soft_field(full, 2, spacing), soft_field(full, 2, spacing, max_memory=9))


def test_displacement_set_order():
    d = displacement_set(1, 0.5, 2)
    assert d.shape == (9, 2)
    assert d[0].tolist() == [-0.5, -0.5] and d[1].tolist() == [-0.5, 0.0]  # axis 0 slowest
    assert displacement_set(7, 1.0, 3).shape == (3375, 3)


# --------------------------------------------------------------------------------------------
# Min-convolution: exact against brute force, approximate against exact


def brute_minconv(cost: torch.Tensor, weight: float, spacing: float) -> torch.Tensor:
    nd = cost.dim() - 2
    n = round(cost.shape[1] ** (1 / nd))
    d = displacement_set((n - 1) // 2, spacing, nd, dtype=cost.dtype)
    pen = weight * ((d[:, None, :] - d[None, :, :]) ** 2).sum(-1)  # (L_out, L_in)
    flat = cost.reshape(cost.shape[0], cost.shape[1], -1)
    out = (flat[:, None, :, :] + pen[None, :, :, None]).amin(2)
    return out.view(cost.shape)


@pytest.mark.parametrize("ndim,weight,spacing", [(2, 0.3, 1.0), (3, 0.05, 1.0), (2, 2.0, 0.5)])
def test_minconv_exact_equals_brute_force(ndim, weight, spacing):
    r = 3 if ndim == 2 else 2
    G = (5, 4) if ndim == 2 else (3, 3, 2)
    cost = torch.rand(2, (2 * r + 1) ** ndim, *G, dtype=torch.float64) * 3
    ours = minconv_exact(cost, weight, spacing)
    assert torch.allclose(ours, brute_minconv(cost, weight, spacing), atol=1e-12)
    assert (ours <= cost + 1e-12).all()
    chunked = minconv_exact(cost, weight, spacing, max_memory=100)
    assert torch.allclose(ours, chunked)


def test_minconv_exact_of_parabola_and_zero_weight():
    # a parabola a*d^2 min-convolved with w*d^2 gives (a*w/(a+w)) d^2 (at the lattice points
    # the minimiser may be off-lattice, so compare against brute force and the bound)
    r = 5
    d = displacement_set(r, 1.0, 1, dtype=torch.float64)[:, 0]
    cost = (2.0 * d**2).view(1, -1, 1)
    out = minconv_exact(cost, 2.0)
    # min_q 2 q^2 + 2 (p - q)^2: q = p/2 gives p^2 for even p; odd p lands at q = (p +- 1)/2
    assert torch.allclose(out.view(-1), d**2 + (d.abs() % 2), atol=1e-12)
    zero = minconv_exact(cost, 0.0)
    assert torch.allclose(zero, torch.zeros_like(zero))


def test_minconv_approx_close_to_exact():
    """On SSD costs of smooth features the lecture's approximation stays near the exact one."""
    ff = smooth_features((10, 9), channels=12, seed=1)
    fm = smooth_features((10, 9), channels=12, seed=2)
    cost = correlation(ff, fm, 5)
    approx = minconv(cost)
    from pddreg.cost import EXACT_WEIGHT

    exact = minconv_exact(cost, EXACT_WEIGHT)
    scale = float(cost.std())
    assert float((approx - exact).abs().mean()) < 0.5 * scale
    # both are smoothing lower-envelope-like operators: not above the raw cost by much
    assert float((exact - cost).amax()) <= 1e-6


# --------------------------------------------------------------------------------------------
# Gradients (float64, tiny inputs)


def test_gradcheck_correlation_both_inputs():
    ff = torch.rand(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    fm = torch.rand(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b: correlation(a, b, 1, 0.5), (ff, fm))
    assert gradcheck(lambda a, b: correlation(a, b, 1, padding="border", max_memory=64), (ff, fm))
    f3 = torch.rand(1, 2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    m3 = torch.rand(1, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b: correlation(a, b, 1), (f3, m3))


def test_gradcheck_regularise_cost_and_alpha():
    cost = torch.rand(1, 9, 3, 4, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(DEFAULT_ALPHA, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda c, a: regularise(c, a), (cost, alpha))
    assert gradcheck(
        lambda c, a: regularise(c, a, use_meanfield=False, max_memory=64), (cost, alpha)
    )


def test_gradcheck_soft_field_and_expected_values():
    cost = torch.rand(1, 9, 3, 2, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda c: soft_field(c, 1, 2.0, max_memory=10), (cost,))
    prob = torch.softmax(torch.rand(1, 9, 3, 2, dtype=torch.float64), 1).requires_grad_()
    values = torch.rand(1, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda p, v: expected_values(v, p, 1, 1.0), (prob, values))


def test_expected_values_against_loop():
    values = torch.rand(2, 3, 8, 6, dtype=torch.float64)
    prob = torch.softmax(torch.rand(2, 25, 4, 3, dtype=torch.float64) * 4, 1)
    ours = expected_values(values, prob, 2, 1.0, padding="border")
    # reference: a weighted sum of shifted samples (grid_sample with border padding)
    G, S = (4, 3), (8, 6)
    pk = [
        (torch.arange(g, dtype=torch.float64) + 0.5) * s / g - 0.5
        for g, s in zip(G, S, strict=True)
    ]
    py, px = torch.meshgrid(*pk, indexing="ij")
    ref = torch.zeros(2, 3, *G, dtype=torch.float64)
    for l, d in enumerate(displacement_set(2, 1.0, 2, dtype=torch.float64)):
        y, x = py + d[0], px + d[1]
        grid = torch.stack([2 * x / 5 - 1, 2 * y / 7 - 1], -1)[None].expand(2, -1, -1, -1)
        w = F.grid_sample(values, grid, align_corners=True, padding_mode="border")
        ref += prob[:, l : l + 1] * w
    assert torch.allclose(ours, ref, atol=1e-12)
    assert torch.allclose(ours, expected_values(values, prob, 2, max_memory=100), atol=1e-12)
    # one-hot labels: probabilities of labels sum to one
    lab = F.one_hot(torch.randint(0, 3, (2, 8, 6)), 3).permute(0, 3, 1, 2).double()
    assert torch.allclose(expected_values(lab, prob, 2).sum(1), torch.ones(2, *G).double())


def test_soft_field_matches_unfused():
    cost = torch.rand(2, 125, 3, 4, 2) * 5
    ref = expected_displacement(probabilities(cost), displacement_set(2, 1.5, 3))
    assert ref.shape == (2, 3, 3, 4, 2)
    assert torch.allclose(soft_field(cost, 2, 1.5), ref, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Shapes and errors


def test_shapes_2d_3d():
    for shape in [(7, 5), (4, 3, 5)]:
        nd = len(shape)
        ff = torch.rand(2, 3, *shape)
        c = correlation(ff, torch.rand(2, 3, *shape), 2)
        assert c.shape == (2, 5**nd, *shape)
        for op in (minconv, meanfield, regularise):
            assert op(c).shape == c.shape
        assert minconv_exact(c, 0.1).shape == c.shape
        assert soft_field(c, 2).shape == (2, nd, *shape)


def test_bad_shapes_raise_with_expected_shape():
    c = torch.rand(1, 24, 4, 4)
    for op in (minconv, regularise, lambda x: minconv_exact(x, 1.0)):
        with pytest.raises(ValueError, match=r"\(B, \(2r\+1\)\*\*2, \*grid\)"):
            op(c)
    with pytest.raises(ValueError, match=r"\(B, 25, \*grid\)"):
        soft_field(torch.rand(1, 9, 4, 4), 2)
    with pytest.raises(ValueError, match=r"\(1, 3, \*spatial\)"):
        correlation(torch.rand(1, 3, 4, 4), torch.rand(1, 2, 4, 4), 1)
    with pytest.raises(ValueError, match=r"\(B, C, \*grid\)"):
        correlation(torch.rand(3, 4), torch.rand(3, 4), 1)
    with pytest.raises(ValueError, match=r"\(6,\)"):
        regularise(torch.rand(1, 9, 4, 4), torch.ones(5))
    with pytest.raises(ValueError, match=r"\(9, 2\)"):
        expected_displacement(torch.rand(1, 9, 4, 4), torch.rand(9, 3))
    with pytest.raises(ValueError, match=r"\(B, 9, \*grid\)"):
        expected_values(torch.rand(1, 2, 4, 4), torch.rand(1, 8, 4, 4), 1)


def test_bad_arguments_raise_input_error():
    ff = torch.rand(1, 2, 4, 4)
    for kwargs in ({"radius": -1}, {"radius": 1, "spacing": 0.0}, {"radius": 1.5}):
        with pytest.raises(InputError, match="correlation"):
            correlation(ff, ff, **kwargs)
    with pytest.raises(InputError, match="padding"):
        correlation(ff, ff, 1, padding="reflect")
    with pytest.raises(InputError, match="weight"):
        minconv_exact(torch.rand(1, 9, 2, 2), -1.0)


def test_all_combinations_small_sizes_against_direct():
    """Odd grid sizes, G < S with non-integer strides, every padding: tiled == direct."""
    import sys

    cc = sys.modules["pddreg.cost.correlation"]
    for G, S, sp, pad in itertools.product(
        [(3, 5)], [(3, 5), (7, 9), (6, 11)], [1.0, 0.5, 2.0], ["zeros", "border"]
    ):
        ff = torch.rand(1, 2, *G, dtype=torch.float64)
        fm = torch.rand(1, 2, *S, dtype=torch.float64)
        a = correlation(ff, fm, 2, sp, padding=pad)
        b = cc._correlation_direct(ff, fm, 2, sp, pad, 10**8)
        assert torch.allclose(a, b, atol=1e-12), (G, S, sp, pad)


def test_checkpointed_gradients_equal_plain(monkeypatch):
    """Large volumes recompute chunks in backward; gradients are the same as plain autograd."""
    import sys

    lattice = sys.modules["pddreg.cost._lattice"]
    grads = []
    for threshold in (10**12, 0):
        monkeypatch.setattr(lattice, "CHECKPOINT_BYTES", threshold)
        g = torch.Generator().manual_seed(3)
        ff = torch.rand(2, 3, 5, 4, 3, dtype=torch.float64, generator=g).requires_grad_()
        fm = torch.rand(2, 3, 5, 4, 3, dtype=torch.float64, generator=g).requires_grad_()
        a = torch.tensor(DEFAULT_ALPHA, dtype=torch.float64, requires_grad=True)
        cost = regularise(correlation(ff, fm, 1, max_memory=3000), a, max_memory=2000)
        disp = soft_field(cost, 1, max_memory=500)
        lab = expected_values(fm, probabilities(cost), 1, max_memory=500)
        (disp.square().sum() + lab.sum()).backward()
        grads.append((ff.grad, fm.grad, a.grad))
    for x, y in zip(grads[0], grads[1], strict=True):
        assert torch.allclose(x, y, atol=1e-10)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_device_dtype_follow_inputs_and_radius_zero(device):
    for dtype in (torch.float32, torch.float64):
        ff = torch.rand(1, 3, 6, 5, device=device, dtype=dtype)
        fm = torch.rand(1, 3, 12, 10, device=device, dtype=dtype)
        c = correlation(ff, fm, 1, 0.5)
        assert c.device.type == device and c.dtype == dtype
        r = regularise(c)
        assert r.dtype == dtype and soft_field(r, 1, 0.5).dtype == dtype
        p = probabilities(r)
        assert expected_values(fm, p, 1, 0.5).shape == (1, 3, 6, 5)
    # radius 0: a single displacement, the SSD at the point itself
    ff = torch.rand(1, 2, 4, 4, device=device)
    c0 = correlation(ff, ff, 0)
    assert c0.shape == (1, 1, 4, 4) and float(c0.abs().max()) < 1e-5
    assert torch.equal(soft_field(c0, 0), torch.zeros(1, 2, 4, 4, device=device))
