"""Tests of pddreg.metrics on analytic cases (answers derived by hand in each test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pddreg.errors import InputError
from pddreg.metrics import (
    dice,
    epe,
    folding_fraction,
    hd95,
    mean_dice,
    mean_hd95,
    sdlogj,
    tre,
)
from pddreg.spatial import identity_grid


def two_boxes(n=10, shift=3, axis=0, size=32, ndim=2, label=1):
    """Two n^ndim boxes at corner 10, the second shifted by `shift` voxels along `axis`."""
    a = np.zeros((size,) * ndim, dtype=np.int64)
    b = np.zeros_like(a)
    box = tuple(slice(10, 10 + n) for _ in range(ndim))
    a[box] = label
    moved = list(box)
    moved[axis] = slice(10 + shift, 10 + shift + n)
    b[tuple(moved)] = label
    return a, b


def box_surface_distances(n, s, h_shift, h_other):
    """Hand derivation for two n x n squares offset by s along one axis (s < n).

    Distances from the boundary voxels of the first square to the boundary of the second, with
    voxel sizes h_shift along the offset axis and h_other across it:
    - the leading edge (n voxels) lies s voxels before the second square's edge: s * h_shift;
    - the trailing edge lies inside the second square: its two corners sit on the second
      square's sides (0); voxel c (1..n-2) is min(c, n-1-c) * h_other from a side, or
      s * h_shift from the far edge, whichever is nearer;
    - each side has n-2 voxels between the corners; the one at row r (1..n-2) is on the second
      square's side when r >= s (0), else (s - r) * h_shift from its corner.
    By symmetry the reverse direction gives the same multiset.
    """
    d = [s * h_shift] * n
    d += [0.0, 0.0] + [min(min(c, n - 1 - c) * h_other, s * h_shift) for c in range(1, n - 1)]
    side = [0.0 if r >= s else (s - r) * h_shift for r in range(1, n - 1)]
    d += side + side
    assert len(d) == 4 * n - 4
    return d


# ---------------------------------------------------------------- Dice


def test_dice_two_offset_boxes_2d_and_3d():
    a, b = two_boxes(n=10, shift=3)
    # overlap 7 x 10 = 70 voxels of 100 each: 2 * 70 / 200
    assert dice(a, b) == {1: pytest.approx(2 * 70 / 200)}
    a3, b3 = two_boxes(n=6, shift=2, axis=2, ndim=3, size=20)
    # overlap 6 * 6 * 4 = 144 of 216 each
    assert dice(a3, b3)[1] == pytest.approx(2 * 144 / 432)
    assert dice(a, a)[1] == 1.0


def test_dice_missing_label_is_nan_and_excluded_from_mean():
    a, b = two_boxes(n=10, shift=3)
    a[0:4, 0:4] = 2  # label 2 only in a
    a[28:30, 28:30] = 5
    b[28:30, 28:30] = 5  # label 5 identical in both
    d = dice(a, b)
    assert set(d) == {1, 2, 5}
    assert math.isnan(d[2])
    assert d[5] == 1.0
    assert mean_dice(a, b) == pytest.approx((0.7 + 1.0) / 2)
    assert math.isnan(dice(a, b, labels=[7])[7])
    assert math.isnan(mean_dice(np.zeros((4, 4), int), np.zeros((4, 4), int)))


def test_dice_accepts_torch_and_float_labels_and_rejects_fractions():
    a, b = two_boxes()
    ta, tb = torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]
    assert dice(ta, tb) == dice(a, b)
    assert dice(a.astype(np.float32), b) == dice(a, b)
    with pytest.raises(ValueError, match="integer"):
        dice(a + 0.5, b)
    with pytest.raises(ValueError, match="same shape"):
        dice(a, b[:-1])


def test_dice_large_label_values_use_the_slow_path_correctly():
    a, b = two_boxes(label=5_000_000)
    assert dice(a, b)[5_000_000] == pytest.approx(0.7)


# ---------------------------------------------------------------- HD95


@pytest.mark.parametrize(
    "axis, spacing",
    [(0, (1.0, 1.0)), (0, (2.5, 1.0)), (1, (2.5, 1.0)), (0, (0.7, 1.3))],
)
def test_hd95_two_offset_boxes_anisotropic(axis, spacing):
    n, s = 10, 3
    a, b = two_boxes(n=n, shift=s, axis=axis)
    h_shift, h_other = spacing[axis], spacing[1 - axis]
    expected = float(np.percentile(box_surface_distances(n, s, h_shift, h_other), 95))
    got = hd95(a, b, spacing=spacing)
    assert got[1] == pytest.approx(expected)
    # More than 5% of the boundary (the leading edge) lies at the full offset s * h_shift.
    assert expected == pytest.approx(s * h_shift)
    # Classic Hausdorff: the largest boundary distance.
    full = hd95(a, b, spacing=spacing, percentile=100)[1]
    assert full == pytest.approx(max(box_surface_distances(n, s, h_shift, h_other)))


def test_hd95_3d_cube_offset_along_last_axis():
    a, b = two_boxes(n=8, shift=2, axis=2, ndim=3, size=24)
    # The leading face (64 of 8^3 - 6^3 = 296 boundary voxels, > 5%) is 2 voxels of 3 mm away,
    # and no boundary voxel is farther than that.
    assert hd95(a, b, spacing=(1.0, 1.0, 3.0))[1] == pytest.approx(6.0)
    assert hd95(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None])[1] == 2.0


def test_hd95_missing_label_nan_and_identical_maps_zero():
    a, b = two_boxes()
    a[0:3, 0:3] = 4
    h = hd95(a, b)
    assert math.isnan(h[4])
    assert mean_hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, a) == {1: 0.0, 4: 0.0}


def test_hd95_label_touching_the_border():
    a = np.zeros((12, 12), dtype=np.int64)
    b = np.zeros_like(a)
    a[:, :4] = 1  # a band on the left border
    b[:, :6] = 1
    # a's right edge (column 3) is 2 voxels from b's (column 5); the border columns coincide.
    assert hd95(a, b, percentile=100)[1] == pytest.approx(2.0)


# ---------------------------------------------------------------- SDlogJ, folding, EPE


def test_sdlogj_zero_and_affine_fields_are_zero():
    assert sdlogj(np.zeros((2, 8, 9))) == 0.0
    a = torch.tensor([[0.1, 0.2], [0.0, -0.2]])
    disp = torch.einsum("ij,j...->i...", a, identity_grid((8, 9)))
    assert sdlogj(disp) == pytest.approx(0.0, abs=1e-6)


def test_sdlogj_quadratic_field_with_mask():
    # u_0 = c * x0^2 / 2 has J = 1 + c * x0 (central differences are exact inside).
    c, shape = 0.05, (12, 7)
    grid = identity_grid(shape, dtype=torch.float64)
    disp = torch.zeros((1, 2) + shape, dtype=torch.float64)
    disp[:, 0] = c * grid[0] ** 2 / 2
    mask = np.zeros(shape, dtype=bool)
    mask[1:-1] = True
    x0 = np.arange(1, shape[0] - 1, dtype=np.float64)
    expected = np.log(1 + c * x0).std()  # the same value for each of the 7 columns
    assert sdlogj(disp, mask=mask) == pytest.approx(expected, rel=1e-6)
    assert sdlogj(disp, mask=np.zeros(shape)) != sdlogj(disp, mask=np.zeros(shape))  # NaN


def test_sdlogj_clips_folding():
    disp = np.zeros((2, 6, 6))
    disp[0] = -2.0 * np.arange(6)[:, None]  # J = -1 everywhere: clipped to 1e-9 -> constant
    assert sdlogj(disp) == pytest.approx(0.0)


def test_folding_fraction_known_region():
    shape = (8, 10)
    disp = np.zeros((2,) + shape)
    # u_0 = -2 x0 on columns 0..2: J = 1 - 2 = -1 there and 1 elsewhere (du_0/dx1 * du_1/dx0 = 0)
    disp[0, :, :3] = -2.0 * np.arange(8)[:, None]
    assert folding_fraction(disp) == pytest.approx(3 / 10)
    assert folding_fraction(np.zeros((3, 4, 4, 4))) == 0.0


def test_epe_constant_fields_and_spacing():
    a = np.zeros((2, 5, 5))
    b = np.zeros((2, 5, 5))
    b[0], b[1] = 3.0, 4.0
    assert epe(a, b) == pytest.approx(5.0)
    assert epe(torch.from_numpy(a)[None], torch.from_numpy(b)[None]) == pytest.approx(5.0)
    assert epe(a, b, spacing=(2.0, 0.5)) == pytest.approx(math.hypot(6.0, 2.0))


# ---------------------------------------------------------------- TRE


def test_tre_anisotropic_spacing_and_known_shift():
    shape = (10, 12, 14)
    pf = np.array([[2.0, 3.0, 4.0], [5.5, 6.0, 7.25]])
    pm = pf + np.array([2.0, 0.0, 1.0])
    zero = np.zeros((3,) + shape)
    # No displacement: the error is the landmark offset, (2 voxels * 2.5 mm, 0, 1 * 1.5 mm).
    assert np.allclose(tre(pf, pm, zero, spacing=(2.5, 1.0, 1.5)), math.hypot(5.0, 1.5))
    shift = zero.copy()
    shift[0], shift[2] = 2.0, 1.0
    assert np.allclose(tre(pf, pm, shift, spacing=(2.5, 1.0, 1.5)), 0.0)


def test_tre_interpolates_a_linear_field_exactly():
    a = torch.tensor([[0.1, -0.05], [0.02, 0.2]], dtype=torch.float64)
    disp = torch.einsum("ij,j...->i...", a, identity_grid((9, 9), dtype=torch.float64))
    pf = np.array([[1.3, 2.7], [7.9, 0.4]])
    pm = pf + pf @ a.numpy().T  # x + A x
    assert np.allclose(tre(pf, pm, disp[None]), 0.0, atol=1e-12)


def test_tre_bad_landmarks_raise_input_error_naming_them():
    zero = np.zeros((2, 5, 5))
    with pytest.raises(InputError, match="points_fixed"):
        tre(np.array([[1.0, 9.0]]), np.array([[1.0, 1.0]]), zero)
    with pytest.raises(InputError, match="points_moving"):
        tre(np.array([[1.0, 1.0]]), np.array([[1.0, 1.0], [2.0, 2.0]]), zero)
    with pytest.raises(InputError, match="points_fixed"):
        tre(np.array([1.0, 1.0]), np.array([1.0, 1.0]), zero)


def test_dice_label_lost_by_warping_scores_zero_with_reference():
    from pddreg.metrics import dice, mean_dice

    fixed = np.zeros((10, 10), np.int64)
    fixed[2:5, 2:5] = 1
    fixed[6:9, 6:9] = 2
    moving = fixed.copy()
    warped = fixed.copy()
    warped[warped == 2] = 0  # label 2 shrunk away by the registration
    assert math.isnan(dice(fixed, warped)[2])  # without the moving map: unknown, left out
    scored = dice(fixed, warped, reference=moving)
    assert scored[2] == 0.0 and scored[1] == 1.0
    assert mean_dice(fixed, warped) == 1.0
    # a label that the moving map never had stays NaN
    moving_without_2 = moving.copy()
    moving_without_2[moving_without_2 == 2] = 0
    assert math.isnan(dice(fixed, warped, reference=moving_without_2)[2])


def test_jacobian_metrics_equal_the_two_metrics():
    from pddreg.metrics import folding_fraction, jacobian_metrics, sdlogj

    d = torch.randn(2, 3, 10, 12, 9, generator=torch.Generator().manual_seed(3)) * 0.7
    mask = np.random.default_rng(1).random((10, 12, 9)) > 0.4
    for m in (None, mask):
        both = jacobian_metrics(d, m)
        assert both["sdlogj"] == sdlogj(d, m)
        assert both["folding_fraction"] == folding_fraction(d, m)
        assert 0.0 < both["folding_fraction"] < 1.0
