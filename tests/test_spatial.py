"""Tests of pddreg.spatial: the coordinate convention, warping, composition, Jacobians."""

from __future__ import annotations

import pytest
import torch

from pddreg.spatial import (
    compose,
    diffusion,
    identity_grid,
    jacobian_det,
    resize_field,
    sample,
    voxel_to_normalised,
    warp,
    warp_labels,
)

SHAPES = {2: (9, 11), 3: (6, 7, 8)}


def smooth_field(shape, amplitude=2.0, coarse=3, dtype=torch.float64, batch=1):
    ndim = len(shape)
    small = torch.randn((batch, ndim) + (coarse,) * ndim, dtype=dtype)
    field = torch.nn.functional.interpolate(
        small, size=shape, mode={2: "bilinear", 3: "trilinear"}[ndim], align_corners=True
    )
    return amplitude * field / field.abs().max()


# ---------------------------------------------------------------- grids and the axis flip


def test_identity_grid_values_and_cache():
    g = identity_grid((3, 4))
    assert g.shape == (2, 3, 4)
    assert torch.equal(g[0, :, 0], torch.arange(3.0))
    assert torch.equal(g[1, 0, :], torch.arange(4.0))
    assert identity_grid((3, 4)) is g
    assert identity_grid([3, 4], device="cpu") is g
    g64 = identity_grid((3, 4), dtype=torch.float64)
    assert g64.dtype == torch.float64 and g64 is not g


def test_identity_grid_made_in_inference_mode_still_works_with_autograd():
    with torch.inference_mode():
        identity_grid((5, 5, 5), dtype=torch.float64)
    disp = torch.zeros(1, 3, 5, 5, 5, dtype=torch.float64, requires_grad=True)
    image = torch.rand(1, 1, 5, 5, 5, dtype=torch.float64)
    warp(image, disp * 2).sum().backward()
    assert disp.grad is not None


def test_voxel_to_normalised_flips_axes_and_hits_corners():
    # Two points, (row 0, col 9) and (row 4, col 0), laid out as (B, ndim, 1, 2).
    coords = torch.tensor([[0.0, 4.0], [9.0, 0.0]]).reshape(1, 2, 1, 2)
    norm = voxel_to_normalised(coords, (5, 10))
    assert norm.shape == (1, 1, 2, 2)
    # grid_sample wants (x, y) = (col, row): (1, -1) and (-1, 1)
    assert torch.allclose(norm[0, 0, 0], torch.tensor([1.0, -1.0]))
    assert torch.allclose(norm[0, 0, 1], torch.tensor([-1.0, 1.0]))


def test_voxel_to_normalised_shape_error():
    with pytest.raises(ValueError, match=r"\(B, 2, \*out\)"):
        voxel_to_normalised(torch.zeros(1, 3, 4, 4), (4, 4))


# ---------------------------------------------------------------- warp


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_warp_by_zero_is_identity(ndim, mode):
    image = torch.rand((2, 3) + SHAPES[ndim])
    disp = torch.zeros((2, ndim) + SHAPES[ndim])
    out = warp(image, disp, mode=mode)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert torch.allclose(out, image, atol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_warp_labels_by_zero_is_identity_and_keeps_dtype(ndim, dtype):
    labels = torch.randint(0, 14, (2, 1) + SHAPES[ndim]).to(dtype)
    out = warp_labels(labels, torch.zeros((2, ndim) + SHAPES[ndim]))
    assert out.dtype == dtype
    assert torch.equal(out, labels)


@pytest.mark.parametrize("ndim", [2, 3])
def test_known_translation_matches_roll_on_interior(ndim):
    shape = SHAPES[ndim]
    shift = [2, -1, 3][:ndim]
    image = torch.rand((1, 2) + shape)
    disp = torch.zeros((1, ndim) + shape)
    for i, s in enumerate(shift):
        disp[:, i] = float(s)
    # warped(x) = image(x + s) = roll(image, -s)(x)
    expected = torch.roll(image, shifts=[-s for s in shift], dims=list(range(2, 2 + ndim)))
    inner = (slice(None), slice(None)) + tuple(
        slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, shape, strict=True)
    )
    for mode in ("linear", "nearest"):
        assert torch.allclose(warp(image, disp, mode=mode)[inner], expected[inner], atol=1e-5)
    labels = torch.randint(0, 9, (1, 1) + shape)
    rolled = torch.roll(labels, shifts=[-s for s in shift], dims=list(range(2, 2 + ndim)))
    assert torch.equal(warp_labels(labels, disp)[inner], rolled[inner])


def test_warp_half_voxel_is_average_and_padding_modes():
    image = torch.arange(5.0).view(1, 1, 1, 5)
    disp = torch.zeros(1, 2, 1, 5)
    disp[:, 1] = 0.5
    out = warp(image, disp)
    assert torch.allclose(out[0, 0, 0, :4], torch.tensor([0.5, 1.5, 2.5, 3.5]))
    assert out[0, 0, 0, 4] == 4.0  # border padding repeats the edge
    disp[:, 1] = 1.0
    assert warp(image, disp, padding="zeros")[0, 0, 0, 4] == 0.0


def test_warp_labels_matches_nearest_warp_of_float_labels():
    shape = (12, 13)
    labels = torch.randint(0, 7, (2, 1) + shape)
    disp = smooth_field(shape, amplitude=3.0, dtype=torch.float32, batch=2)
    a = warp_labels(labels, disp)
    b = warp(labels.double(), disp.double(), mode="nearest").round().long()
    assert (a == b).float().mean() > 0.99  # only exact .5 ties may differ


def test_warp_broadcasts_a_batch_of_one_and_allows_other_output_grid():
    image = torch.rand(1, 1, 8, 8)
    disp = torch.zeros(3, 2, 8, 8)
    assert warp(image, disp).shape == (3, 1, 8, 8)
    small = torch.zeros(1, 2, 4, 4)  # output grid of 4x4 reading the top-left of the image
    assert torch.allclose(warp(image, small), image[:, :, :4, :4], atol=1e-6)


def test_warp_bad_shapes_raise_value_error_naming_the_shape():
    with pytest.raises(ValueError, match=r"\(B, 2, \*spatial\)"):
        warp(torch.rand(1, 1, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="integer"):
        warp_labels(torch.rand(1, 1, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="mode"):
        warp(torch.rand(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), mode="cubic")


def test_sample_1d():
    x = torch.arange(10.0).view(1, 1, 10) ** 2
    out = sample(x, torch.tensor([[[0.0, 1.5, 9.0]]]))
    assert torch.allclose(out, torch.tensor([[[0.0, 2.5, 81.0]]]))


@pytest.mark.parametrize("ndim", [2, 3])
def test_gradcheck_warp_image_and_disp(ndim):
    shape = (4, 5) if ndim == 2 else (3, 4, 3)
    image = torch.rand((1, 2) + shape, dtype=torch.float64, requires_grad=True)
    # Non-integer displacements (linear interpolation is not differentiable on the grid).
    disp = (0.3 + 0.4 * torch.rand((1, ndim) + shape, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, d: warp(i, d), (image, disp))


# ---------------------------------------------------------------- compose


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_of_two_shifts_is_their_sum(ndim):
    shape = SHAPES[ndim]
    a = torch.zeros((1, ndim) + shape, dtype=torch.float64)
    b = torch.zeros_like(a)
    for i in range(ndim):
        a[:, i] = 0.5 + i
        b[:, i] = -1.25 + 0.5 * i
    assert torch.allclose(compose(a, b), a + b)


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_matches_warping_twice(ndim):
    shape = (20, 22) if ndim == 2 else (14, 15, 16)
    first = smooth_field(shape, amplitude=3.0, coarse=4)
    second = smooth_field(shape, amplitude=3.0, coarse=4)
    c = compose(first, second)
    grid = identity_grid(shape, dtype=torch.float64)
    margin = (slice(None), slice(None)) + (slice(5, -5),) * ndim
    # A linear image is interpolated exactly, so both sides agree to rounding inside a margin.
    weights = torch.tensor([0.7, -0.4, 0.3][:ndim], dtype=torch.float64)
    linear = torch.einsum("i,i...->...", weights, grid)[None, None]
    twice = warp(warp(linear, first), second)
    once = warp(linear, c)
    assert torch.allclose(twice[margin], once[margin], atol=1e-9)
    assert (first + second - c)[margin].abs().max() > 0.1  # not just the sum of the fields
    # A smooth image: interpolating the intermediate image costs a little accuracy only.
    smooth = torch.sin(grid.sum(0) / 4.0)[None, None]
    err = (warp(warp(smooth, first), second) - warp(smooth, c))[margin].abs()
    assert err.max() < 0.05


# ---------------------------------------------------------------- resize_field


@pytest.mark.parametrize("ndim", [2, 3])
def test_resize_constant_field_scales_vectors(ndim):
    grid = (4, 5, 3)[:ndim]
    target = (8, 15, 12)[:ndim]
    disp = torch.ones((2, ndim) + grid)
    out = resize_field(disp, target)
    assert out.shape == (2, ndim) + target
    for i in range(ndim):
        assert torch.allclose(out[:, i], torch.full_like(out[:, i], target[i] / grid[i]))


def test_resize_follows_coarse_grid_convention():
    # Coarse field u_G(k) = k (coarse voxels) along axis 0; point k sits at fine voxel
    # p = (k + 0.5) * S / G - 0.5, so the fine field is S/G * k = p + 0.5 - 0.5 * S / G.
    g, s = 4, 16
    coarse = torch.zeros(1, 2, g, g)
    coarse[:, 0] = torch.arange(g, dtype=torch.float32).view(g, 1)
    fine = resize_field(coarse, (s, s))
    x = torch.arange(s, dtype=torch.float32)
    inside = slice(2, s - 2)  # beyond the outer control points the field is held constant
    expected = x + 0.5 - 0.5 * s / g
    assert torch.allclose(fine[0, 0, inside, 3], expected[inside], atol=1e-5)
    assert torch.allclose(fine[0, 1], torch.zeros(s, s))


# ---------------------------------------------------------------- Jacobian, diffusion


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_field_jacobian_is_det_of_i_plus_a(ndim):
    shape = SHAPES[ndim]
    a = 0.3 * torch.randn(ndim, ndim, dtype=torch.float64)
    grid = identity_grid(shape, dtype=torch.float64)
    disp = (torch.einsum("ij,j...->i...", a, grid) + 1.7)[None]
    jac = jacobian_det(disp)
    assert jac.shape == (1,) + shape
    expected = torch.det(torch.eye(ndim, dtype=torch.float64) + a)
    assert torch.allclose(jac, expected.expand_as(jac), atol=1e-10)


def test_jacobian_with_spacing_for_a_field_in_mm():
    a = torch.tensor([[0.2, 0.1, 0.0], [0.0, -0.3, 0.2], [0.1, 0.0, 0.1]], dtype=torch.float64)
    spacing = (2.0, 1.0, 0.5)
    grid = identity_grid((5, 6, 7), dtype=torch.float64)
    disp_vox = torch.einsum("ij,j...->i...", a, grid)[None]
    sp = torch.tensor(spacing, dtype=torch.float64).view(1, 3, 1, 1, 1)
    disp_mm = disp_vox * sp
    jac_vox = jacobian_det(disp_vox)
    assert torch.allclose(jacobian_det(disp_mm, spacing=spacing), jac_vox, atol=1e-10)
    # Read as voxel units, the mm field is a different (wrong) transform.
    assert not torch.allclose(jacobian_det(disp_mm), jac_vox, atol=1e-3)


def test_jacobian_detects_folding():
    grid = identity_grid((6, 6), dtype=torch.float64)
    disp = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    disp[:, 0] = -2.0 * grid[0]  # x0 -> -x0: a reflection
    assert torch.allclose(jacobian_det(disp), -torch.ones(1, 6, 6, dtype=torch.float64))


def test_diffusion_known_values_and_gradient():
    disp = torch.full((1, 2, 5, 6), 3.0)
    assert diffusion(disp).item() == 0.0
    grid = identity_grid((5, 6))
    disp = torch.zeros(1, 2, 5, 6)
    disp[:, 0] = 0.5 * grid[1]  # component 0 grows by 0.5 per step along axis 1
    # Axis 1 differences: component 0 is 0.5, component 1 is 0 -> mean of squares 0.125.
    assert diffusion(disp).item() == pytest.approx(0.125)
    d = disp.clone().requires_grad_()
    diffusion(d).backward()
    assert d.grad is not None and torch.isfinite(d.grad).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_warp_labels_onehot_mode(ndim):
    shape = SHAPES[ndim]
    labels = torch.randint(0, 5, (1, 1) + shape) * 3  # values 0, 3, ..., 12
    zero = torch.zeros((1, ndim) + shape)
    assert torch.equal(warp_labels(labels, zero, mode="onehot"), labels)
    shift = zero.clone()
    shift[:, 0] = 1.0
    out = warp_labels(labels, shift, mode="onehot")
    assert out.dtype == labels.dtype
    assert torch.equal(out[:, :, :-1], labels[:, :, 1:])
    # A half-voxel shift of a two-label map keeps only existing labels.
    shift[:, 0] = 0.4
    assert set(warp_labels(labels, shift, mode="onehot").unique().tolist()) <= set(
        labels.unique().tolist()
    )


def test_warp_labels_survives_non_finite_displacements():
    labels = torch.randint(0, 3, (1, 1, 5, 5))
    disp = torch.zeros(1, 2, 5, 5)
    disp[0, 0, 2, 2] = float("nan")
    out = warp_labels(labels, disp)
    assert out[0, 0, 0, 0] == labels[0, 0, 0, 0] and out.shape == labels.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_images_keep_accurate_coordinates(dtype):
    # Half-precision coordinates near 300 would be rounded to multiples of 0.25 or worse.
    image = torch.linspace(0, 1, 400, dtype=torch.float64).view(1, 1, 1, 400)
    disp = torch.zeros(1, 2, 1, 400, dtype=torch.float32)
    disp[:, 1] = 0.1
    expected = warp(image, disp.double())[..., :-1]
    out = warp(image.to(dtype), disp)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(out[..., :-1].double(), expected, atol=tol)


def test_jacobian_matches_numpy_gradient_and_is_differentiable():
    import numpy as np

    disp = smooth_field((7, 6, 5), amplitude=1.5, coarse=4)
    d = disp[0].numpy()
    g = [np.gradient(d[i], axis=k) for i in range(3) for k in range(3)]
    j = np.stack(g).reshape(3, 3, 7, 6, 5) + np.eye(3)[:, :, None, None, None]
    expected = np.linalg.det(np.moveaxis(j, (0, 1), (-2, -1)))
    assert np.allclose(jacobian_det(disp)[0].numpy(), expected, atol=1e-10)
    small = (0.3 * torch.rand(1, 2, 4, 3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(jacobian_det, (small,))


def test_grid_cache_is_bounded():
    from pddreg.spatial import grid as grid_module

    grid_module.clear_grid_cache()
    first = identity_grid((3, 3))
    for n in range(4, 4 + grid_module.GRID_CACHE_ENTRIES + 2):
        identity_grid((n, n))
    assert len(grid_module._cache) == grid_module.GRID_CACHE_ENTRIES
    again = identity_grid((3, 3))
    assert again is not first and torch.equal(again, first)  # evicted, rebuilt
