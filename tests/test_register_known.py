"""register_mind recovers known translations and smooth deformations (2D and 3D).

The moving image is a smooth random texture (several scales, like tissue); the fixed image is
the moving one warped by a known field with :func:`pddreg.spatial.warp`, so the exact answer is
that field. End-point errors are measured away from the border (where content left the image).
"""

import pytest
import torch
import torch.nn.functional as F

from pddreg.optim import MindConfig, default_levels, register_mind
from pddreg.spatial import jacobian_det, warp


def _smooth(x, k, passes=3):
    nd = x.dim() - 2
    pool = F.avg_pool3d if nd == 3 else F.avg_pool2d
    for _ in range(passes):
        x = pool(F.pad(x, [k // 2] * (2 * nd), mode="replicate"), k, stride=1)
    return x


def texture(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 1, *shape)
    for k, w in ((3, 0.3), (7, 1.0), (15, 1.0)):
        s = _smooth(torch.randn(1, 1, *shape, generator=g), k)
        x = x + w * s / s.std()
    return (x - x.min()) / (x.max() - x.min())


def smooth_field(shape, amp, seed=1, ctrl=4):
    g = torch.Generator().manual_seed(seed)
    nd = len(shape)
    c = torch.randn(1, nd, *([ctrl] * nd), generator=g)
    u = F.interpolate(c, size=shape, mode="bicubic" if nd == 2 else "trilinear", align_corners=True)
    return u * (amp / u.norm(dim=1).max())


def constant_field(shape, t):
    nd = len(shape)
    return torch.tensor(t, dtype=torch.float32).view(1, nd, *([1] * nd)).expand(1, nd, *shape)


def _check(shape, u, margin, max_epe=0.5, seed=0):
    moving = texture(shape, seed)
    fixed = warp(moving, u)
    disp = register_mind(fixed, moving)
    assert disp.shape == (1, len(shape), *shape)
    inner = (slice(None),) + tuple(slice(margin, s - margin) for s in shape)
    err = (disp - u).norm(dim=1)[inner].mean().item()
    before = u.norm(dim=1)[inner].mean().item()
    folding = (jacobian_det(disp) <= 0).float().mean().item()
    assert err < max_epe, f"mean EPE {err:.3f} (before {before:.3f})"
    assert folding < 0.01, f"folding {folding:.4f}"
    return err


def test_identical_images_give_small_field():
    x = texture((96, 80), seed=3)
    disp = register_mind(x, x)
    assert disp.norm(dim=1).mean() < 0.3


def test_translation_2d():
    shape = (128, 112)
    _check(shape, constant_field(shape, (9.0, -6.0)), margin=16)


def test_translation_2d_at_capture_range():
    # the first level covers +-24 px per axis; a shift of (15, -10) px (18 px) is recovered
    shape = (160, 144)
    lv = default_levels(2)[0]
    assert lv.radius * lv.spacing >= 15
    _check(shape, constant_field(shape, (15.0, -10.0)), margin=28)


def test_smooth_deformation_2d():
    shape = (128, 112)
    _check(shape, smooth_field(shape, amp=10.0), margin=14)


@pytest.mark.slow
def test_translation_3d():
    shape = (48, 40, 56)
    _check(shape, constant_field(shape, (5.0, -4.0, 3.0)), margin=9)


@pytest.mark.slow
def test_smooth_deformation_3d():
    shape = (48, 40, 56)
    _check(shape, smooth_field(shape, amp=5.0, seed=2), margin=8)


def test_batch_and_dtype():
    shape = (64, 56)
    moving = torch.cat([texture(shape, 0), texture(shape, 1)])
    u = constant_field(shape, (3.0, 2.0))
    fixed = warp(moving, u)
    disp = register_mind(fixed, moving, MindConfig())
    assert disp.shape == (2, 2, *shape) and disp.dtype == torch.float32
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    assert (disp - u)[inner].norm(dim=1).mean() < 0.5


def test_bad_inputs_raise():
    x = torch.rand(1, 1, 32, 32)
    with pytest.raises(ValueError, match="register_mind"):
        register_mind(x, torch.rand(1, 1, 32, 30))
    with pytest.raises(ValueError, match="register_mind"):
        register_mind(torch.rand(32, 32), torch.rand(32, 32))
    with pytest.raises(ValueError, match="register_mind"):
        register_mind(torch.rand(1, 2, 32, 32), torch.rand(1, 2, 32, 32))
