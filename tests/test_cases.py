"""Known-answer cases (pddreg.data.cases): fields, warping, remaps, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pddreg.data import cases as C
from pddreg.metrics import folding_fraction
from pddreg.spatial import warp


def _lengths(disp, spacing=None):
    sp = np.ones(disp.shape[0]) if spacing is None else np.asarray(spacing)
    return np.sqrt(((disp * sp.reshape((-1,) + (1,) * (disp.ndim - 1))) ** 2).sum(axis=0))


def _disc(shape, radius, hole=0.0):
    g = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    r = np.sqrt(sum(x**2 for x in g))
    img = (r < radius).astype(np.float32)
    img[r < hole] = 0.0
    return img


@pytest.mark.parametrize("shape", [(40, 52), (20, 24, 16)])
def test_random_field_amplitude_seed_and_smoothness(shape):
    d = C.random_field(shape, amplitude=3.0, scale=12.0, seed=4)
    assert d.shape == (len(shape), *shape) and d.dtype == np.float32
    assert _lengths(d).max() == pytest.approx(3.0, rel=1e-4)
    np.testing.assert_array_equal(d, C.random_field(shape, 3.0, 12.0, seed=4))
    assert not np.allclose(d, C.random_field(shape, 3.0, 12.0, seed=5))
    assert folding_fraction(d) == 0.0
    # every component varies (isotropic noise), and slowly: neighbours differ by far less than
    # the amplitude
    for i in range(len(shape)):
        assert d[i].std() > 0.1
        assert np.abs(np.diff(d[i], axis=i)).max() < 0.5


def test_random_field_spacing_in_physical_units():
    sp = (1.0, 2.5)
    d = C.random_field((30, 20), amplitude=4.0, scale=10.0, seed=0, spacing=sp)
    assert _lengths(d, sp).max() == pytest.approx(4.0, rel=1e-4)


@pytest.mark.parametrize("shape,spacing", [((16, 20), (1.0, 1.0)), ((10, 12, 8), (0.5, 1.0, 3.0))])
def test_affine_field_translation_only_is_the_translation(shape, spacing):
    t = np.array([2.0, -3.0, 1.5][: len(shape)])
    d = C.affine_field(shape, rotation=0.0, translation=t, spacing=spacing)
    want = (t / np.asarray(spacing)).reshape((-1,) + (1,) * len(shape))
    np.testing.assert_allclose(d, np.broadcast_to(want, d.shape), atol=1e-5)


def test_affine_field_rotation_and_scaling():
    shape = (21, 31)
    centre = np.array([10.0, 15.0])
    d = C.affine_field(shape, rotation=90.0)
    # the centre stays; voxel centre + (1, 0) maps to centre + (0, 1) (axis 0 towards axis 1)
    np.testing.assert_allclose(d[:, 10, 15], 0.0, atol=1e-5)
    np.testing.assert_allclose(np.array([11, 15]) + d[:, 11, 15], centre + [0, 1], atol=1e-5)
    s = C.affine_field(shape, scaling=1.1)
    np.testing.assert_allclose(s[:, 0, 0], 0.1 * (np.array([0, 0]) - centre), atol=1e-5)
    # a rotation preserves lengths: |x + u - c| == |x - c|
    g = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    c = centre.reshape(2, 1, 1)
    np.testing.assert_allclose(
        np.linalg.norm(g + C.affine_field(shape, rotation=23.0) - c, axis=0),
        np.linalg.norm(g - c, axis=0),
        atol=1e-4,
    )
    three = C.affine_field((9, 10, 11), rotation=(0.0, 0.0, 30.0))
    np.testing.assert_allclose(three, C.affine_field((9, 10, 11), rotation=30.0), atol=1e-5)


def test_warp_image_is_pddreg_convention_with_zero_padding():
    rng = np.random.default_rng(0)
    img = rng.random((12, 14)).astype(np.float32)
    d = C.affine_field(img.shape, translation=(2.0, -3.0))
    out = C.warp_image(img, d)
    # fixed(x) = image(x + t): fixed[i, j] = image[i + 2, j - 3]
    np.testing.assert_allclose(out[:-2, 3:], img[2:, :-3], atol=1e-6)
    assert np.abs(out[-2:, :]).max() < 1e-5 and np.abs(out[:, :3]).max() < 1e-5
    inside = C.in_domain(d)
    assert inside[:-2, 3:].all() and not inside[-2:, :].any() and not inside[:, :3].any()


def test_compose_fields_of_translations_and_warps():
    shape = (24, 26)
    a = C.affine_field(shape, translation=(1.0, 2.0))
    b = C.affine_field(shape, translation=(-3.0, 0.5))
    np.testing.assert_allclose(C.compose_fields(a, b), a + b, atol=1e-5)
    img = np.asarray(_disc(shape, 9.0), dtype=np.float32)
    r = C.random_field(shape, 2.0, 10.0, seed=1)
    rot = C.affine_field(shape, rotation=10.0)
    c = C.compose_fields(r, rot)
    two = C.warp_image(C.warp_image(img, r), rot)
    inner = (slice(6, -6),) * 2
    np.testing.assert_allclose(C.warp_image(img, c)[inner], two[inner], atol=0.1)


def test_remap_is_non_monotonic_reproducible_and_keeps_zero():
    ramp = np.tile(np.linspace(0.0, 1.0, 200, dtype=np.float32), (3, 1))
    for seed in range(5):
        out = C.remap_intensity(ramp, seed=seed, normalise=False)[0]
        steps = np.diff(out)
        assert (steps > 1e-6).any() and (steps < -1e-6).any(), seed
        assert out[0] == 0.0 and np.ptp(out) >= 0.6 - 1e-6
    np.testing.assert_array_equal(
        C.remap_intensity(ramp, seed=3, noise=0.05), C.remap_intensity(ramp, seed=3, noise=0.05)
    )
    assert not np.allclose(C.remap_intensity(ramp, seed=3), C.remap_intensity(ramp, seed=4))
    noisy = C.remap_intensity(ramp, seed=3, noise=0.05) - C.remap_intensity(ramp, seed=3)
    assert 0.03 < noisy.std() < 0.07


def test_otsu_and_object_mask_fill_holes():
    values = np.concatenate([np.full(500, 0.1), np.full(300, 0.8)])
    assert 0.1 < C.otsu_threshold(values) <= 0.8
    img = _disc((40, 40), 14.0, hole=5.0) * 0.8 + 0.05
    img[2, 2] = 0.9  # a speck outside: not the largest component
    mask = C.object_mask(img)
    np.testing.assert_array_equal(mask, _disc((40, 40), 14.0) > 0)
    assert C.object_mask(img, threshold=None).all()
    vol = np.stack([_disc((24, 24), 8.0, hole=3.0)] * 6, axis=-1)
    vol[:, :, 0] = 0  # the hole is open at one end of the volume: closed in-plane
    mask3 = C.object_mask(vol)
    assert mask3[12, 12, 3] and not mask3[0, 0, 3]


def test_object_mask_with_field_is_carried_and_cut_to_the_domain():
    img = _disc((30, 30), 12.0)
    d = C.affine_field(img.shape, translation=(10.0, 0.0))
    mask = C.object_mask(img, d)
    np.testing.assert_array_equal(
        mask, (C.warp_image(img, d, mode="nearest") > 0.5) & C.in_domain(d)
    )
    assert not mask[-10:].any() and mask.sum() > 0


@pytest.mark.parametrize("shape", [(36, 40), (18, 20, 16)])
def test_make_case_true_field_warps_source_onto_fixed(shape):
    img = _disc(shape, min(shape) / 3) * 0.7 + 0.1 * np.random.default_rng(0).random(shape)
    d = C.compose_fields(C.random_field(shape, 2.0, 8.0, seed=2), C.affine_field(shape, 8.0))
    case = C.make_case(img, d, name="x")
    with torch.no_grad():
        warped = warp(torch.from_numpy(case.moving)[None, None], torch.from_numpy(case.disp)[None])
    inside = case.mask
    assert inside.sum() > 0.1 * inside.size
    np.testing.assert_allclose(warped[0, 0].numpy()[inside], case.fixed[inside], atol=1e-5)
    remapped = C.make_case(img, d, remap=True, seed=1)
    np.testing.assert_array_equal(remapped.fixed, case.fixed)
    assert remapped.remapped and not np.allclose(remapped.moving, case.moving)
    np.testing.assert_array_equal(remapped.mask, case.mask)
    with pytest.raises(ValueError, match=r"\(ndim, \*S\)"):
        C.make_case(img, d[:, :-1])


def test_rotation_matrix_about_an_axis():
    np.testing.assert_allclose(
        C.rotation_matrix(3, 25.0, axis=(0, 0, 2)), C.rotation_matrix(3, 25.0), atol=1e-12
    )
    r = C.rotation_matrix(3, 30.0, axis=(1, 1, 2))
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    np.testing.assert_allclose(r @ np.array([1, 1, 2]), [1, 1, 2], atol=1e-12)  # the axis stays
    assert np.degrees(np.arccos((np.trace(r) - 1) / 2)) == pytest.approx(30.0)
    shape = (8, 9, 10)
    np.testing.assert_allclose(
        C.affine_field(shape, matrix=C.rotation_matrix(3, 12.0)),
        C.affine_field(shape, rotation=12.0),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="not both"):
        C.affine_field(shape, rotation=5.0, matrix=np.eye(3))


def test_make_case_with_a_given_source_mask():
    shape = (30, 34)
    img = _disc(shape, 11.0) + 0.05
    d = C.affine_field(shape, translation=(6.0, 0.0))
    given = np.zeros(shape, dtype=bool)
    given[5:20, 5:25] = True
    case = C.make_case(img, d, source_mask=given)
    np.testing.assert_array_equal(case.mask, C.carry_mask(given, d))
    # fixed(x) = source(x + 6 e0): the mask moves by -6 along axis 0
    assert case.mask[0:14, 5:25].all() and not case.mask[14:].any()
    with pytest.raises(ValueError, match="source_mask"):
        C.make_case(img, d, source_mask=given[:-1])
