"""The native warped-feature SSD of the instance optimisation (``pdd_warp_ssd``): values and
gradients equal PyTorch's ``grid_sample`` path, with and without a moving mask, and
``feature_optimise`` ends where the PyTorch path ends; the native 3D linear sampler of
``pddreg.spatial.sample`` (``pdd_sample3``) gives ``grid_sample``'s values."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from pddreg.cost import _autograd, _native
from pddreg.optim import feature_objective, feature_optimise
from pddreg.optim import instance as inst

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "cc").split()[0]) is None or not _native.available(),
    reason="no C compiler: the PyTorch path is the only one",
)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, *range(2, x.dim()), 1).contiguous()


@pytest.mark.parametrize("shape", [(13, 17), (6, 7, 9), (1, 9), (5, 1, 6)])
@pytest.mark.parametrize("masked", [False, True])
def test_warp_ssd_matches_grid_sample(shape, masked):
    """Displacements up to 4 voxels leave the map on every side (clamped, and zero mask outside),
    in float64 as the reference."""
    gen = torch.Generator().manual_seed(len(shape) + masked)
    nd = len(shape)
    fixed = torch.randn(2, 5, *shape, generator=gen)
    moving = torch.randn(2, 5, *shape, generator=gen)
    mask = (torch.rand(2, 1, *shape, generator=gen) > 0.3).float() if masked else None
    disp = 4 * torch.randn(2, nd, *shape, generator=gen)
    up = torch.rand(2, 1, *shape, generator=gen)  # upstream gradients
    up_mask = torch.rand(2, 1, *shape, generator=gen)

    ref_u = disp.double().requires_grad_(True)
    ref_mask = None if mask is None else mask.double()
    ref_fn = inst._warped_ssd(fixed.double(), moving.double(), ref_mask)
    ref_ssd, ref_mask = ref_fn(ref_u)
    loss = (up * ref_ssd).sum() + (0 if ref_mask is None else (up_mask * ref_mask).sum())
    loss.backward()

    u = disp.clone().requires_grad_(True)
    out = _autograd.warp_ssd(_channels_last(fixed), _channels_last(moving), u, mask)
    ssd, moved = out if masked else (out, None)
    loss = (up * ssd).sum() + (0 if moved is None else (up_mask * moved).sum())
    loss.backward()

    torch.testing.assert_close(ssd.double(), ref_ssd.detach(), rtol=1e-5, atol=1e-4)
    if masked:
        torch.testing.assert_close(moved.double(), ref_mask.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u.grad.double(), ref_u.grad, rtol=1e-4, atol=1e-3)


def test_warp_ssd_not_finite_displacement_reads_nothing():
    """A NaN displacement gives a NaN SSD (as grid_sample) but no crash, and a zero mask."""
    fixed = torch.rand(1, 3, 6, 7)
    disp = torch.zeros(1, 2, 6, 7)
    disp[0, :, 2, 3] = float("nan")
    ssd, _, moved, _ = _native.warp_ssd(
        _channels_last(fixed), _channels_last(fixed), disp, torch.ones(1, 1, 6, 7)
    )
    assert moved[0, 0, 2, 3] == 0 and moved[0, 0, 0, 0] == 1
    assert ssd[0, 0, 0, 0] == 0


@pytest.mark.parametrize("masks", [False, True])
def test_feature_optimise_native_equals_pytorch(monkeypatch, masks):
    """The same Adam run on both paths ends at the same field (3D).  The start is off the
    voxel lattice: at integer positions the gradient of linear interpolation is one-sided and
    grid_sample's normalised coordinates may round to either side (both are subgradients, and
    Adam's first step turns a sign into a full step)."""
    gen = torch.Generator().manual_seed(3)
    shape = (10, 12, 9)
    fm = torch.nn.functional.avg_pool3d(torch.rand(1, 6, *shape, generator=gen), 3, 1, 1)
    true = 1.5 * torch.ones(1, 3, *shape)
    from pddreg.spatial import warp

    ff = warp(fm, true)
    fmask = torch.ones(1, 1, *shape) if masks else None
    mmask = (torch.rand(1, 1, *shape, generator=gen) > 0.1).float() if masks else None
    kw = {"grid_stride": 2, "iters": 20, "fixed_mask": fmask, "moving_mask": mmask}
    init = 0.3 + 0.2 * torch.rand(1, 3, *shape, generator=gen)
    native = feature_optimise(ff, fm, init, **kw)
    monkeypatch.setattr(_native, "supports", lambda *a: False)
    torch_path = feature_optimise(ff, fm, init, **kw)
    torch.testing.assert_close(native, torch_path, rtol=1e-3, atol=1e-3)
    assert (native - true).abs().mean() < (init - true).abs().mean()


def test_feature_objective_is_the_pytorch_reference():
    """The public objective keeps grid_sample (any device and dtype, float64 here)."""
    gen = torch.Generator().manual_seed(4)
    ff, fm = torch.rand(2, 1, 4, 9, 8, generator=gen, dtype=torch.float64)
    params = torch.rand(1, 2, 5, 4, generator=gen, dtype=torch.float64)
    ssd, _ = inst._warped_ssd(ff, fm, None)(inst._dense(params, (9, 8), 1))
    torch.testing.assert_close(feature_objective(ff, fm, params, 0.0), ssd.mean())
    assert feature_objective(ff, fm, params, 0.0).dtype == torch.float64


@pytest.mark.parametrize("shape", [(1, 5), (2, 3), (7, 6, 5), (1, 1, 4)])
def test_box3_backward_is_the_transpose(shape):
    """The hand-written backward of the instance optimisation's box-3 smoothing equals
    autograd through the in-place form, in float64."""
    from pddreg.features.mind import _box_filter

    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, len(shape), *shape, generator=gen, dtype=torch.float64)
    up = torch.rand(2, len(shape), *shape, generator=gen, dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    (up * _box_filter(_box_filter(a, 1), 1)).sum().backward()
    b = x.clone().requires_grad_(True)
    (up * inst._smooth(b, 2)).sum().backward()
    torch.testing.assert_close(inst._smooth(x, 2), _box_filter(_box_filter(x, 1), 1))
    torch.testing.assert_close(b.grad, a.grad)


def test_feature_optimise_native_broadcasts_a_mask_of_batch_one(monkeypatch):
    """Two pairs with one moving mask: as the PyTorch path, which broadcasts it."""
    gen = torch.Generator().manual_seed(6)
    ff, fm = torch.rand(2, 2, 3, 9, 10, generator=gen)
    mask = (torch.rand(1, 1, 9, 10, generator=gen) > 0.2).float()
    init = 0.3 + 0.1 * torch.rand(2, 2, 9, 10, generator=gen)
    native = feature_optimise(ff, fm, init, iters=5, moving_mask=mask)
    monkeypatch.setattr(_native, "supports", lambda *a: False)
    torch.testing.assert_close(native, feature_optimise(ff, fm, init, iters=5, moving_mask=mask))


def _grid_sample_reference(image: torch.Tensor, coords: torch.Tensor, padding: str) -> torch.Tensor:
    """``pddreg.spatial.sample``'s PyTorch path (``grid_sample``), in float64."""
    import torch.nn.functional as F

    from pddreg.spatial.grid import voxel_to_normalised

    b = max(image.shape[0], coords.shape[0])
    img = image.double().expand(b, *image.shape[1:])
    grid = voxel_to_normalised(coords.double().expand(b, *coords.shape[1:]), image.shape[2:])
    return F.grid_sample(img, grid, mode="bilinear", padding_mode=padding, align_corners=True)


@pytest.mark.parametrize("shape", [(7, 9, 8), (1, 6, 5), (4, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_native_sample_matches_grid_sample(shape, padding):
    """3D linear sampling (``pdd_sample3``, what ``spatial.sample`` runs outside autograd) gives
    grid_sample's values: coordinates leaving the volume on every side, size-1 axes, NaN and
    infinite coordinates, a batch of 1 broadcast against 2."""
    from pddreg.spatial import sample, warp

    gen = torch.Generator().manual_seed(sum(shape) + len(padding))
    image = torch.rand(1, 4, *shape, generator=gen)
    coords = torch.stack([torch.rand(2, *shape, generator=gen) * (n + 6) - 3 for n in shape], dim=1)
    coords[0, :, 0, 0, 0] = float("nan")
    coords[1, 1, -1, -1, -1] = float("inf")
    coords[1, 2, 0, -1, 0] = -float("inf")
    ref = _grid_sample_reference(image, coords, padding)
    out = sample(image, coords, padding=padding)
    assert out.dtype == torch.float32 and out.shape == (2, 4, *shape)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5, equal_nan=True)
    # under autograd the PyTorch path runs, with the same values
    with torch.enable_grad():
        img = image.clone().requires_grad_(True)
        diff = sample(img, coords, padding=padding).detach()
    torch.testing.assert_close(out, diff, rtol=0, atol=1e-5, equal_nan=True)
    # warp: displacements of a volume, a batch of 2 images against one field
    disp = 3 * torch.randn(1, 3, *shape, generator=gen)
    images = torch.rand(2, 3, *shape, generator=gen)
    from pddreg.spatial.grid import identity_grid

    grid = identity_grid(shape, "cpu", torch.float32)[None] + disp
    torch.testing.assert_close(
        warp(images, disp, padding=padding).double(),
        _grid_sample_reference(images, grid, padding),
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("masks", [(False, False), (True, False), (False, True), (True, True)])
def test_hand_written_gradient_of_the_objective_is_autograds(stride, masks):
    """The native Adam steps' objective and gradient (the data term by ``pdd_io_grad`` and the
    control grid's passes, the diffusion term inside ``pdd_io_adam``, whose first moment is the
    gradient itself when ``b1 = 0``) equal autograd through the PyTorch objective in float64,
    with and without masks, on the feature grid and on a coarser control grid."""
    gen = torch.Generator().manual_seed(10 + stride)
    shape = (9, 11, 8)
    ff, fm = torch.rand(2, 1, 5, *shape, generator=gen)
    grid = tuple(-(-s // stride) for s in shape)
    params = 0.8 * torch.randn(1, 3, *grid, generator=gen)
    fmask = torch.rand(1, 1, *shape, generator=gen) if masks[0] else None
    mmask = (torch.rand(1, 1, *shape, generator=gen) > 0.2).float() if masks[1] else None
    a = params.double().requires_grad_(True)
    ssd_fn = inst._warped_ssd(ff.double(), fm.double(), None if mmask is None else mmask.double())
    loss = inst._objective(ssd_fn, shape, a, 0.7, 1, None if fmask is None else fmask.double())
    loss.backward()
    raw = inst._native_raw_ssd(ff, fm, mmask)
    data, grad = inst._native_data_term(raw, shape, params, 1, fmask)
    scale = [f / n for f, n in zip(shape, grid, strict=True)]
    weights = [0.7 * 2.0 / (params.numel() // n * (n - 1)) for n in grid]
    moment, second, out = torch.zeros_like(params), torch.zeros_like(params), params.clone()
    squares = [s * s for s in scale]
    _native.io_adam(
        params, grad, moment, second, out, weights, squares, (0.0, 0.999), 0.5, 1e-3, 1e-8
    )
    value = data + 0.7 * float(inst._scaled_diffusion(params, shape))
    assert value == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(moment.double(), a.grad, rtol=1e-4, atol=1e-7)
    assert not torch.equal(out, params)  # the step moved the field
