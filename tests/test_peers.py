"""Peer wrappers (pddreg.report.peers) return fields in pddreg's convention: a known translation
of a blob comes back with the right sign, axis order and units (voxels, anisotropic spacing)."""

from __future__ import annotations

import numpy as np
import pytest

from pddreg.report import peers


def _blobs(shape, shift, spacing, n=6, seed=0):
    """Gaussian blobs of random sizes and places; ``shift`` (voxels) moves all of them."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(k) * s for k, s in zip(shape, spacing, strict=True)], indexing="ij")
    extent = np.array(shape) * np.array(spacing)
    out = np.zeros(shape)
    for _ in range(n):
        c = rng.uniform(0.3, 0.7, len(shape)) * extent + np.asarray(shift) * np.asarray(spacing)
        sigma = rng.uniform(2.0, 5.0)
        r2 = sum((x - ci) ** 2 for x, ci in zip(g, c, strict=True))
        out += rng.uniform(0.5, 1.0) * np.exp(-r2 / (2 * sigma**2))
    return out.astype(np.float32)


def test_ants_syn_recovers_translation_2d_anisotropic():
    pytest.importorskip("ants")
    shape, spacing, t = (40, 48), (1.0, 1.5), np.array([3.0, -2.0])  # t in voxels
    fixed = _blobs(shape, (0.0, 0.0), spacing)
    moving = _blobs(shape, t, spacing)  # fixed(x) = moving(x + t)
    disp = peers.ants_syn(fixed, moving, spacing=spacing, threads=1, seed=1)
    assert disp.shape == (2, *shape) and disp.dtype == np.float32
    core = fixed > 0.3
    np.testing.assert_allclose([disp[i][core].mean() for i in range(2)], t, atol=0.3)


def test_ants_world_coordinates_on_different_grids_3d():
    pytest.importorskip("ants")
    from pddreg.data import Image

    # fixed: axes 0 and 1 run towards -x and -y in the world (as in many CT headers)
    f_aff = np.diag([-1.0, -1.5, 2.0, 1.0])
    f_aff[:3, 3] = (20.0, 30.0, -10.0)
    shape_f = (24, 22, 14)
    centre_f = np.array([11.0, 10.0, 7.0])  # blob centre, fixed voxels
    centre_w = f_aff[:3, :3] @ centre_f + f_aff[:3, 3]
    shift_w = np.array([2.0, -3.0, 4.0])  # the moving content sits this far away in the world
    m_aff = np.diag([1.2, 1.2, 2.5, 1.0])
    m_aff[:3, 3] = (-15.0, -5.0, -20.0)
    shape_m = (30, 32, 18)

    def image(shape, aff, centre_world):
        g = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
        w = g @ aff[:3, :3].T + aff[:3, 3]
        r2 = ((w - centre_world) ** 2).sum(-1)
        lobe = ((w - centre_world - (3.0, 3.0, 3.0)) ** 2).sum(-1)
        return (np.exp(-r2 / 50.0) + 0.5 * np.exp(-lobe / 12.0)).astype(np.float32)

    fixed = Image(image(shape_f, f_aff, centre_w), (1.0, 1.5, 2.0), f_aff)
    moving = Image(image(shape_m, m_aff, centre_w + shift_w), (1.2, 1.2, 2.5), m_aff)
    disp = peers.ants_syn(fixed, moving, threads=1, type_of_transform="Translation", seed=1)
    assert disp.shape == (3, *shape_f)
    want = np.linalg.solve(f_aff[:3, :3], shift_w)  # world shift in fixed voxels
    core = fixed.array > 0.3
    np.testing.assert_allclose([disp[i][core].mean() for i in range(3)], want, atol=0.4)


def test_sitk_demons_recovers_translation():
    pytest.importorskip("SimpleITK")
    shape, spacing, t = (40, 48), (1.0, 1.5), np.array([2.0, -1.5])
    fixed = _blobs(shape, (0.0, 0.0), spacing)
    moving = _blobs(shape, t, spacing)
    disp = peers.sitk_demons(fixed, moving, spacing=spacing, threads=1)
    core = fixed > 0.3
    np.testing.assert_allclose([disp[i][core].mean() for i in range(2)], t, atol=0.4)


def test_missing_peer_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ants", None)  # makes `import ants` fail
    with pytest.raises(ImportError, match="antspyx"):
        peers.ants_syn(np.zeros((8, 8)), np.zeros((8, 8)))
    assert peers.available("ants-syn") is not None
