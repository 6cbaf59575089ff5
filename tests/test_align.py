"""Global alignment stage (pddreg.align): known maps recovered in 2D and 3D, contrast changes,
masks, anisotropic voxels, non-overlapping initial maps, auto keeps identical images, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pddreg.align import AlignConfig, AlignResult, align
from pddreg.align._features import point_mind
from pddreg.align._geometry import about, decompose, rotation_matrix, rotation_vector
from pddreg.features.mind import mind_ssc
from pddreg.spatial import identity_grid


class Scene:
    """An analytic test scene in mm: an ellipsoidal body with Gaussian blobs of both signs,
    dark background; :meth:`render` evaluates it on any grid, exactly."""

    def __init__(self, extent_mm, seed=0, n=14, size=(0.03, 0.07)):
        gen = torch.Generator().manual_seed(seed)
        self.ndim = len(extent_mm)
        self.extent = torch.tensor(extent_mm, dtype=torch.float64)
        self.centres = (torch.rand(n, self.ndim, generator=gen, dtype=torch.float64) - 0.5) * 0.5
        rand = torch.rand(n, self.ndim, generator=gen, dtype=torch.float64)
        self.sigmas = size[0] + size[1] * rand
        self.amps = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.3) * 0.8

    def __call__(self, mm):  # (N, ndim) -> (N,)
        rel = mm / self.extent - 0.5
        body = ((rel / 0.38).square().sum(1) < 1).double()
        d = ((rel[:, None] - self.centres[None]) / self.sigmas[None]).square().sum(2)
        return body * (0.35 + (self.amps[None] * torch.exp(-0.5 * d)).sum(1))

    def render(self, shape, spacing, mm_map=None):
        """``(1, 1, *shape)`` image whose voxel ``y`` shows the scene at ``inv(mm_map)(S y)``
        (``mm_map``: fixed mm -> this image's mm; None: identity), averaged across the voxel
        along axes coarser than 1.5 mm (a slice profile, as scanners do)."""
        ndim = len(shape)
        sp = torch.tensor(spacing, dtype=torch.float64)
        base = identity_grid(shape, dtype=torch.float64).reshape(ndim, -1).t() * sp
        subs = [torch.linspace(-0.33, 0.33, 3) * s if s > 1.5 else torch.zeros(1) for s in spacing]
        offsets = torch.cartesian_prod(*subs).reshape(-1, ndim).double()
        img = torch.zeros(base.shape[0], dtype=torch.float64)
        for off in offsets:
            pts = base + off
            if mm_map is not None:
                inv = torch.linalg.inv(mm_map)
                pts = pts @ inv[:ndim, :ndim].t() + inv[:ndim, -1]
            img += self(pts) / offsets.shape[0]
        return (img.reshape(shape) / 1.2).clamp(0, 1).float()[None, None]


def affine_mm(ndim, angles_deg, scales, shift_frac, extent_mm):
    """Homogeneous fixed mm -> moving mm map about the field-of-view centre."""
    ext = torch.tensor(extent_mm, dtype=torch.float64)
    lin = rotation_matrix([math.radians(a) for a in angles_deg], ndim) @ torch.diag(
        torch.tensor(scales, dtype=torch.float64)
    )
    return about(lin, ext / 2, torch.tensor(shift_frac, dtype=torch.float64) * ext)


def index_map(mm, fixed_spacing, moving_spacing=None):
    """fixed index -> moving index of a fixed mm -> moving mm map."""
    sf = torch.diag(torch.tensor([*fixed_spacing, 1.0], dtype=torch.float64))
    sm = torch.diag(torch.tensor([*(moving_spacing or fixed_spacing), 1.0], dtype=torch.float64))
    return torch.linalg.inv(sm) @ mm @ sf


def pair(scene, shape, angles, scales, shift, spacing=None, moving_spacing=None, moving_shape=None):
    """Fixed, moving and the true index map of a known motion of ``scene``."""
    ndim = len(shape)
    spacing = spacing or (1.0,) * ndim
    moving_spacing = moving_spacing or spacing
    mm = affine_mm(ndim, angles, scales, shift, scene.extent.tolist())
    fixed = scene.render(shape, spacing)
    moving = scene.render(moving_shape or shape, moving_spacing, mm)
    return fixed, moving, index_map(mm, spacing, moving_spacing)


def epe(found: torch.Tensor, true: torch.Tensor, fixed: torch.Tensor, mask=None) -> float:
    """Mean end-point error (voxels) over the fixed foreground."""
    ndim = true.shape[0] - 1
    fg = fixed[0, 0] > 0.05
    if mask is not None:
        fg &= mask
    pts = torch.nonzero(fg).double().t()
    diff = (found[:ndim, :ndim] - true[:ndim, :ndim]) @ pts + (found[:ndim, -1:] - true[:ndim, -1:])
    return float(diff.norm(dim=0).mean())


SCENE_2D = Scene((64.0, 80.0), seed=1)
SCENE_3D = Scene((32.0, 32.0, 32.0), seed=2, n=18)
EYE3 = torch.eye(3, dtype=torch.float64)
EYE4 = torch.eye(4, dtype=torch.float64)


FIXED_2D = SCENE_2D.render((64, 80), (1.0, 1.0))
FIXED_3D = SCENE_3D.render((32, 32, 32), (1.0, 1.0, 1.0))


def test_point_mind_matches_mind_ssc():
    img = torch.rand(1, 1, 12, 14, 10)
    ref = mind_ssc(img, radius=0, dilation=2)
    pts = identity_grid((12, 14, 10)).reshape(3, -1).t()
    inner = ((pts >= 2) & (pts <= torch.tensor([9.0, 11.0, 7.0]))).all(1)
    got = point_mind(img, pts[inner], 2.0 * torch.eye(3))
    assert torch.allclose(got, ref.reshape(12, -1).t()[inner], atol=1e-4)


def test_rotation_parametrisation_round_trip():
    w = torch.tensor([0.3, -0.2, 0.4], dtype=torch.float64)
    rot = rotation_matrix(w, 3)
    assert torch.allclose(rot @ rot.t(), EYE3, atol=1e-12)
    assert torch.allclose(rotation_vector(rot), w, atol=1e-10)
    zero = torch.zeros(3, dtype=torch.float64)
    par = decompose(about(rot * 1.1, zero), zero)
    assert par["scales"] == pytest.approx([1.1] * 3, abs=1e-9)
    assert par["rotation_angle_deg"] == pytest.approx(math.degrees(float(w.norm())), abs=1e-6)


@pytest.mark.parametrize("mode", ["affine", "auto"])
def test_2d_rotation_translation_scale(mode):
    fixed, moving, true = pair(SCENE_2D, (64, 80), [25.0], [1.1, 1.1], [0.15, -0.12])
    res = align(fixed, moving, mode=mode)
    assert isinstance(res, AlignResult)
    assert res.mode == "affine"
    assert epe(EYE3, true, fixed) > 10
    assert epe(res.matrix, true, fixed) < 0.5
    assert res.similarity_after < res.similarity_before
    assert res.matrix.dtype == torch.float64 and res.matrix.shape == (3, 3)
    assert res.parameters["rotation_angle_deg"] == pytest.approx(25.0, abs=1.0)
    assert res.parameters["scales"] == pytest.approx([1.1, 1.1], abs=0.03)


def test_2d_rigid_stays_rigid():
    fixed, moving, true = pair(SCENE_2D, (64, 80), [-30.0], [1.0, 1.0], [-0.1, 0.2])
    res = align(fixed, moving, mode="rigid")
    lin = res.matrix[:2, :2]
    assert res.mode == "rigid"
    assert torch.allclose(lin @ lin.t(), torch.eye(2, dtype=torch.float64), atol=1e-9)
    assert epe(res.matrix, true, fixed) < 0.5


def test_2d_translation_mode():
    fixed, moving, true = pair(SCENE_2D, (64, 80), [0.0], [1.0, 1.0], [0.2, -0.2])
    res = align(fixed, moving, mode="translation")
    assert res.mode == "translation"
    assert torch.equal(res.matrix[:2, :2], torch.eye(2, dtype=torch.float64))
    assert epe(res.matrix, true, fixed) < 0.3


def test_2d_non_monotonic_contrast():
    fixed, moving, true = pair(SCENE_2D, (64, 80), [20.0], [0.9, 0.9], [0.1, 0.15])
    moving = 0.5 - 0.5 * torch.cos(3 * math.pi * moving)  # dark -> dark, grey -> bright, ...
    moving = moving + 0.02 * torch.randn(moving.shape, generator=torch.Generator().manual_seed(0))
    res = align(fixed, moving.clamp(0, 1), mode="auto")
    assert res.mode == "affine"
    assert epe(res.matrix, true, fixed) < 1.0


@pytest.mark.parametrize("mode", ["affine", "rigid"])
def test_3d_rotation_translation(mode):
    axis = torch.tensor([1.0, -0.5, 0.7])
    angles = (axis / axis.norm() * 25.0).tolist()
    scales = [1.08, 1.08, 1.08] if mode == "affine" else [1.0, 1.0, 1.0]
    fixed, moving, true = pair(SCENE_3D, (32, 32, 32), angles, scales, [0.15, -0.1, 0.12])
    res = align(fixed, moving, mode=mode)
    assert res.mode == mode
    assert epe(EYE4, true, fixed) > 5
    assert epe(res.matrix, true, fixed) < 0.7
    if mode == "rigid":
        lin = res.matrix[:3, :3]
        assert torch.allclose(lin @ lin.t(), EYE3, atol=1e-9)


def test_identical_images_auto_identity():
    init = EYE3.clone()
    res = align(FIXED_2D, FIXED_2D.clone(), init=init)
    assert res.mode == "identity"
    assert torch.equal(res.matrix, init)
    assert res.similarity_after == res.similarity_before
    res3 = align(FIXED_3D, FIXED_3D.clone())
    assert res3.mode == "identity"
    assert torch.equal(res3.matrix, EYE4)
    # affine mode on identical images stays at the identity too
    res_aff = align(FIXED_2D, FIXED_2D.clone(), mode="affine")
    assert epe(res_aff.matrix, EYE3, FIXED_2D) < 0.05


def test_small_shift_auto_keeps_initial_map():
    """A motion well inside the deformable stage's capture range (a fraction of a voxel) is
    left to it: auto returns the initial map."""
    fixed, moving, _ = pair(SCENE_2D, (64, 80), [0.0], [1.0, 1.0], [0.004, -0.003])
    assert align(fixed, moving).mode == "identity"


def test_anisotropic_spacing_rigid_in_mm():
    """Voxels of 1 x 1 x 3 mm: a rigid motion in mm is not rigid in index space; the rigid
    result must be orthogonal in mm and match the true map."""
    spacing = (1.0, 1.0, 3.0)
    scene = Scene((40.0, 40.0, 60.0), seed=4, n=14, size=(0.06, 0.08))
    motion = ([12.0, 0.0, 8.0], [1.0] * 3, [0.1, -0.08, 0.05])
    fixed, moving, true = pair(scene, (40, 40, 20), *motion, spacing)
    res = align(fixed, moving, fixed_spacing=spacing, moving_spacing=spacing, mode="rigid")
    s = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    lin_mm = (s @ res.matrix @ torch.linalg.inv(s))[:3, :3]
    lin = res.matrix[:3, :3]
    assert torch.allclose(lin_mm @ lin_mm.t(), EYE3, atol=1e-9)
    assert not torch.allclose(lin @ lin.t(), EYE3, atol=1e-2)  # not rigid in index space
    pts = torch.nonzero(fixed[0, 0] > 0.05).double().t()
    err = s @ (res.matrix - true)
    err_mm = (err[:3, :3] @ pts + err[:3, 3:]).norm(dim=0)
    assert float(err_mm.mean()) < 0.7
    # 20 slices of 3 mm pin the angle loosely: 14.3 degrees from a 17.5-degree search lattice,
    # 13.3 from the 11.7-degree one and from 8.75, 13.1 from 11.67 (0.33-0.40 mm mean error)
    assert res.parameters["rotation_angle_deg"] == pytest.approx(math.hypot(12.0, 8.0), abs=1.5)


def test_fixed_mask_ignores_occluder():
    fixed, moving, true = pair(SCENE_2D, (64, 80), [15.0], [1.0, 1.0], [0.1, 0.1])
    mask = torch.ones_like(fixed, dtype=torch.bool)
    mask[..., :, 48:] = False
    # a bright occluder in the moving image over the part of the scene the mask leaves out
    corner = true @ torch.tensor([32.0, 66.0, 1.0], dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(80), indexing="ij")
    blob = ((yy - corner[0]).square() + (xx - corner[1]).square() < 14**2).float()
    occluded = torch.maximum(moving, blob[None, None])
    res = align(fixed, occluded, fixed_mask=mask, mode="affine")
    assert epe(res.matrix, true, fixed, mask[0, 0]) < 0.6


def test_moving_mask_excludes_corruption():
    fixed, moving, true = pair(SCENE_2D, (64, 80), [-15.0], [1.0, 1.0], [-0.1, 0.1])
    bad = torch.zeros_like(moving, dtype=torch.bool)
    bad[..., :, :30] = True
    noise = torch.rand(moving.shape, generator=torch.Generator().manual_seed(1))
    corrupted = torch.where(bad, noise, moving)
    res = align(fixed, corrupted, moving_mask=~bad, mode="affine")
    assert epe(res.matrix, true, fixed) < 0.8


def test_non_overlapping_init_recovered_by_centres():
    """The initial map sends the fixed image far outside the moving one (unrelated world
    origins, as for two CTs of different patients): the centre-aligned candidate recovers it."""
    fixed, moving, true = pair(
        SCENE_3D, (32, 32, 32), [0.0, 10.0, 0.0], [1.0] * 3, [0.05, 0.0, -0.05]
    )
    init = EYE4.clone()
    init[:3, 3] = torch.tensor([90.0, -70.0, 120.0], dtype=torch.float64)
    grid = identity_grid((32, 32, 32), dtype=torch.float64).reshape(3, -1)
    mapped = init[:3, :3] @ grid + init[:3, 3:]
    assert bool(((mapped < 0) | (mapped > 31)).any(0).all())  # no overlap at all
    res = align(fixed, moving, init=init, mode="auto")
    assert res.mode == "affine"
    assert epe(res.matrix, true, fixed) < 0.7
    assert res.parameters["translation_mm"][0] == pytest.approx(-90.0, abs=6.0)


def test_grids_and_spacings_differ():
    """Moving on its own grid (another size and voxel size) with the world map as init."""
    moving_spacing = (1.25, 0.8)
    fixed, moving, true = pair(
        SCENE_2D, (64, 80), [10.0], [1.0, 1.0], [0.06, -0.05], (1.0, 1.0), moving_spacing, (56, 96)
    )
    init = index_map(EYE3, (1.0, 1.0), moving_spacing)  # the world map without the motion
    res = align(fixed, moving, init=init, fixed_spacing=(1.0, 1.0), moving_spacing=moving_spacing)
    assert res.mode == "affine"
    assert epe(init, true, fixed) > 3
    assert epe(res.matrix, true, fixed) < 0.5


def test_float64_and_config():
    fixed, moving, true = pair(SCENE_2D, (64, 80), [8.0], [1.0, 1.0], [0.05, 0.05])
    threads = torch.get_num_threads()
    cfg = AlignConfig(levels=2, threads=1)
    res = align(fixed.double(), moving.double(), mode="rigid", config=cfg)
    assert torch.get_num_threads() == threads  # restored
    assert epe(res.matrix, true, fixed) < 0.6
    assert res.runtime_s > 0
    with pytest.raises(ValueError, match="coarse_model"):
        align(fixed, moving, config=AlignConfig(coarse_model="spline"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fixed=torch.rand(1, 64, 80), moving=FIXED_2D), r"\(1, 1, \*S\)"),
        (dict(fixed=FIXED_2D, moving=FIXED_3D), r"\(1, 1, \*Sm\)"),
        (dict(fixed=FIXED_2D, moving=FIXED_2D, init=torch.eye(4)), r"\(3, 3\)"),
        (dict(fixed=FIXED_2D, moving=FIXED_2D, mode="similarity"), "mode"),
        (dict(fixed=FIXED_2D, moving=FIXED_2D, fixed_spacing=(1.0,)), "2 positive"),
        (
            dict(fixed=FIXED_2D, moving=FIXED_2D, fixed_mask=torch.ones(1, 1, 64, 81)),
            r"\(1, 1, 64, 80\)",
        ),
        (
            dict(fixed=FIXED_2D, moving=FIXED_2D, moving_mask=torch.ones(64, 80)),
            r"\(1, 1, 64, 80\)",
        ),
        (
            dict(fixed=FIXED_2D, moving=FIXED_2D, fixed_mask=torch.zeros(1, 1, 64, 80)),
            "fixed_mask",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        align(**kwargs)


def _homography_pair(shape=(96, 120)):
    """A 2D view of SCENE_2D-like content through a homography (fixed mm -> moving mm): the
    fixed image, the moving image, the true index map (spacing 1)."""
    scene = Scene((float(shape[0]), float(shape[1])), seed=3, n=20)
    h = affine_mm(2, [8.0], [0.95, 1.05], [0.05, -0.04], list(map(float, shape)))
    h[2, :2] = torch.tensor([0.0035, -0.0025], dtype=torch.float64)
    fixed = scene.render(shape, (1.0, 1.0))
    pts = identity_grid(shape, dtype=torch.float64).reshape(2, -1).t()
    inv = torch.linalg.inv(h)
    q = pts @ inv[:2, :2].t() + inv[:2, -1]
    q = q / (pts @ inv[2, :2] + inv[2, 2])[:, None]
    moving = (scene(q).reshape(shape) / 1.2).clamp(0, 1).float()[None, None]
    return fixed, moving, h


def _epe_h(found, true, fixed):
    from pddreg.align._geometry import apply_h

    pts = torch.nonzero(fixed[0, 0] > 0.05).double()
    return float((apply_h(found, pts) - apply_h(true, pts)).norm(dim=1).mean())


def test_2d_homography_auto_projective():
    fixed, moving, true = _homography_pair()
    assert _epe_h(EYE3, true, fixed) > 5
    res = align(fixed, moving, mode="auto")
    assert res.mode == "projective"
    assert abs(float(res.matrix[2, 0])) > 1e-3  # a perspective row
    assert _epe_h(res.matrix, true, fixed) < 0.5
    # the affine map alone stays several voxels off: what the perspective row buys
    aff = align(fixed, moving, mode="affine")
    assert aff.mode == "affine" and torch.equal(aff.matrix[2], EYE3[2])
    assert _epe_h(aff.matrix, true, fixed) > 1.5
    assert res.parameters["perspective"][:2] == pytest.approx(res.matrix[2, :2].tolist())


def test_projective_off_by_config():
    fixed, moving, _ = _homography_pair()
    res = align(fixed, moving, mode="auto", config=AlignConfig(projective={2: False, 3: False}))
    assert res.mode == "affine"


_FRAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "middlebury_frames"


@pytest.mark.skipif(not (_FRAMES / "Hydrangea").is_dir(), reason="no real data here")
def test_strong_viewpoint_change_needs_the_tilted_search():
    """A real photograph under a strong tilt (the image edges scaled by about 1.8 against
    each other): no affine start lies in the homography's basin; the tilted search finds it."""
    import importlib.util

    import numpy as np
    from PIL import Image

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_viewpoint.py"
    spec = importlib.util.spec_from_file_location("bench_viewpoint", bench)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    img = np.asarray(Image.open(_FRAMES / "Hydrangea" / "frame10.png").convert("L"), np.float32)
    fixed, true, valid = mod.homography_case(img, 0.15, seed=5)
    f = torch.from_numpy(fixed / 255.0)[None, None]
    m = torch.from_numpy(img / 255.0)[None, None]
    pts = torch.from_numpy(np.argwhere(valid)[::97].astype(np.float64))
    truth = pts + torch.from_numpy(true[:, valid][:, ::97].T.astype(np.float64))

    def err(res):
        from pddreg.align._geometry import apply_h

        return float((apply_h(res.matrix, pts) - truth).norm(dim=1).mean())

    res = align(f, m, mode="auto")
    assert res.mode == "projective" and err(res) < 1.0
    plain = align(f, m, mode="auto", config=AlignConfig(tilts=()))
    assert err(plain) > 5.0


def test_point_sampler_native_matches_grid_sample(monkeypatch):
    """The global stage's 3D point samples on the native trilinear kernel equal grid_sample's
    (points mapped partly outside the volume: border padding)."""
    import pddreg.align._features as AF
    import pddreg.spatial.transform as T

    gen = torch.Generator().manual_seed(3)
    image = torch.rand(1, 2, 9, 11, 10, generator=gen)
    points = torch.rand(50, 3, generator=gen) * torch.tensor([12.0, 14.0, 13.0]) - 1.5
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] += 0.05 * torch.randn(3, 3, generator=gen).double()
    matrix[:3, 3] = torch.tensor([0.5, -0.7, 0.3], dtype=torch.float64)
    offsets = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, -1, 0], [0, 0, 2]])
    sampler = AF.PointSampler(image)
    native, centre = sampler(points, matrix, offsets)
    monkeypatch.setattr(T, "_native_sample", lambda *a: None)  # grid_sample instead
    ref, centre_ref = sampler(points, matrix, offsets)
    assert native.shape == ref.shape == (2, 50, 4)
    torch.testing.assert_close(native, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(centre, centre_ref)


def test_finalists_of_one_pose_are_refined_once():
    from types import SimpleNamespace

    from pddreg.align.core import _distinct

    pts = torch.rand(200, 3, dtype=torch.float64) * 50
    problem = SimpleNamespace(points=pts, spacing=(2.0, 2.0, 2.0))
    eye = torch.eye(4, dtype=torch.float64)
    near = eye.clone()
    near[0, 3] = 0.6  # 0.3 voxel of the level
    far = eye.clone()
    far[1, 3] = 4.0  # 2 voxels
    kept = _distinct([(near, 0.2), (far, 0.3), (eye, 0.1)], problem, 0.5)
    assert [c for _, c in kept] == [0.1, 0.3]  # best first; ``near`` is ``eye``'s pose
    assert len(_distinct([(near, 0.2), (eye, 0.1)], problem, 0.25)) == 2


REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


@pytest.mark.skipif(not (REAL / "ct_chest_2subjects").is_dir(), reason="no real data here")
def test_auto_keeps_a_far_map_with_a_small_gain(monkeypatch):
    """``bench_capture.py --quick``'s remapped chest CT slice shifted by a quarter of the field
    of view: the right affine map gains only 6.9 % of the MIND similarity (below ``margin``)
    but moves the points by 0.27 of the axis, beyond the deformable stage's reach; ``auto``
    keeps it (``far_margin``) and the registration ends within a voxel (7.9 without it)."""
    import argparse
    import sys

    import numpy as np

    import pddreg
    from pddreg.metrics import epe as field_epe

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_capture as bc

    args = argparse.Namespace(data=REAL, quick=True, dims=[2, 3])
    srcs = bc.capture_sources(args)
    k = next(i for i, s in enumerate(srcs) if s.vol.name == "chest CT" and s.vol.ndim == 2)
    deform = bc.source_deform(srcs[k], k, 0.04)
    case = bc.capture_case(srcs[k], k, deform, bc.Misalignment(shift=0.25), True, 0.01)["case"]
    res = pddreg.register(case.fixed, case.moving, uncertainty=False)
    assert res.affine_mode == "affine"
    assert field_epe(np.asarray(res.disp), case.disp, case.mask) < 1.0
    # without the rule (far_margin = margin) the map is rejected
    import pddreg.align.core as core

    monkeypatch.setattr(core, "AlignConfig", lambda: AlignConfig(far_margin=AlignConfig().margin))
    assert pddreg.register(case.fixed, case.moving, uncertainty=False).affine_mode == "identity"
