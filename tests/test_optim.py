"""Instance optimisation (cost volume and feature SSD) and the generic discrete registration."""

import pytest
import torch
import torch.nn.functional as F

from pddreg.cost import correlation, regularise, soft_field
from pddreg.features.mind import mind_ssc
from pddreg.optim import (
    InstanceConfig,
    LevelConfig,
    MindConfig,
    cost_objective,
    discrete_register,
    feature_objective,
    feature_optimise,
    instance_optimise,
    refine_mind,
    register_mind,
)
from pddreg.optim.instance import _lattice_view
from pddreg.spatial import resize_field, warp


def _texture(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 1, *shape)
    nd = len(shape)
    pool = F.avg_pool3d if nd == 3 else F.avg_pool2d
    for k in (3, 7):
        s = torch.randn(1, 1, *shape, generator=g)
        for _ in range(3):
            s = pool(F.pad(s, [k // 2] * (2 * nd), mode="replicate"), k, stride=1)
        x = x + s / s.std()
    return (x - x.min()) / (x.max() - x.min())


def _known_pair(shape=(64, 56), t=(2.6, -1.7)):
    moving = _texture(shape)
    nd = len(shape)
    u = torch.tensor(t).view(1, nd, *([1] * nd)).expand(1, nd, *shape)
    return warp(moving, u), moving, torch.tensor(t)


def test_instance_optimise_lowers_objective_and_epe():
    fixed, moving, t = _known_pair()
    ff, fm = mind_ssc(fixed), mind_ssc(moving)
    grid = (16, 14)
    radius = 4
    fg = F.interpolate(ff, size=grid, mode="bilinear", align_corners=False)
    cost = correlation(fg, fm, radius, 1.0, padding="border")
    # a deliberately poor start: the soft-argmin at a low temperature (shrunk towards 0)
    init = soft_field(regularise(cost * 0.5), radius, 1.0)
    refined = instance_optimise(cost, init, radius, 1.0, lambda_=0.5, iters=60, lr=0.1)
    assert refined.shape == init.shape and not refined.requires_grad
    lattice, _, _ = _lattice_view(cost, radius)
    lattice = lattice / lattice.abs().mean()
    before = cost_objective(lattice, init, radius, 1.0, 0.5).item()
    after = cost_objective(lattice, refined, radius, 1.0, 0.5).item()
    assert after < before
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    epe0 = (init - t.view(1, 2, 1, 1))[inner].norm(dim=1).mean()
    epe1 = (refined - t.view(1, 2, 1, 1))[inner].norm(dim=1).mean()
    assert epe1 <= epe0 + 1e-3
    assert epe1 < 1.0


def test_instance_optimise_zero_iters_and_bad_shapes():
    cost = torch.rand(1, 9, 4, 5)
    init = torch.zeros(1, 2, 4, 5)
    assert torch.equal(instance_optimise(cost, init, 1, iters=0), init)
    with pytest.raises(ValueError, match="instance_optimise"):
        instance_optimise(cost, torch.zeros(1, 2, 4, 4), 1)
    with pytest.raises(ValueError, match="labels"):
        instance_optimise(torch.rand(1, 10, 4, 5), init, 1)


def test_instance_optimise_3d_runs():
    cost = torch.rand(1, 27, 3, 4, 5)
    init = torch.zeros(1, 3, 3, 4, 5)
    out = instance_optimise(cost, init, 1, 2.0, iters=5)
    assert out.shape == init.shape and out.abs().max() <= 2.0


def test_feature_optimise_lowers_objective_and_epe():
    fixed, moving, t = _known_pair()
    ff, fm = mind_ssc(fixed), mind_ssc(moving)
    init = torch.zeros(1, 2, *ff.shape[2:])
    init[:, 0] = 2.0  # rough start, 1.7 px off
    out = feature_optimise(ff, fm, init, grid_stride=2, lambda_=1.0, iters=60, lr=0.5)
    assert out.shape == init.shape
    # the objective takes the control-grid field in voxels of the grid (stride 2)
    params0 = resize_field(init, (32, 28))
    params1 = resize_field(out, (32, 28))
    assert feature_objective(ff, fm, params1, 1.0) < feature_objective(ff, fm, params0, 1.0)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    err0 = (init - t.view(1, 2, 1, 1))[inner].norm(dim=1).mean()
    err1 = (out - t.view(1, 2, 1, 1))[inner].norm(dim=1).mean()
    assert err1 < err0 and err1 < 0.3


def test_refine_mind_improves_a_rough_start_and_matches_register_mind():
    fixed, moving, t = _known_pair()
    init = torch.zeros(1, 2, *fixed.shape[2:])
    init[:, 0] = 2.0  # rough start, 1.7 px off
    out = refine_mind(fixed, moving, init)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    err0 = (init - t.view(1, 2, 1, 1))[inner].norm(dim=1).mean()
    err1 = (out - t.view(1, 2, 1, 1))[inner].norm(dim=1).mean()
    assert err1 < 0.5 * err0 and err1 < 0.3
    # keywords of InstanceConfig override its settings; no steps leave the start as it is
    assert torch.equal(refine_mind(fixed, moving, init, iters=0), init)
    fewer = refine_mind(fixed, moving, init, iters=3)
    assert not torch.allclose(fewer, out)
    # it is register_mind's own last step: refining register_mind's levels (no refinement)
    # reproduces register_mind
    cfg = MindConfig(capture=False)
    plain = register_mind(
        fixed, moving, MindConfig(capture=False, instance=InstanceConfig(iters=0))
    )
    assert torch.allclose(
        refine_mind(fixed, moving, plain, cfg), register_mind(fixed, moving, cfg), atol=1e-5
    )
    with pytest.raises(ValueError, match="refine_mind"):
        refine_mind(fixed, moving, init[..., :-1])


def test_refine_mind_levels_search_from_the_start():
    # 5.6 px away: mind's two finest 2D levels (+-4 px every 4, +-2 every 2) reach it
    fixed, moving, t = _known_pair(t=(5.6, -3.7))
    init = torch.zeros(1, 2, *fixed.shape[2:])
    inner = (slice(None), slice(None), slice(12, -12), slice(12, -12))

    def err(disp):
        return float((disp - t.view(1, 2, 1, 1))[inner].norm(dim=1).mean())

    searched = refine_mind(fixed, moving, init, levels=2, iters=0)
    assert err(searched) < 0.25 * err(init)
    assert err(refine_mind(fixed, moving, init, levels=2)) < 0.3
    # all of mind's levels from a zero start are register_mind itself
    cfg = MindConfig(capture=False)
    assert torch.allclose(
        refine_mind(fixed, moving, init, cfg, levels=3),
        register_mind(fixed, moving, cfg),
        atol=1e-3,
    )
    with pytest.raises(ValueError, match="levels"):
        refine_mind(fixed, moving, init, levels=-1)
    # steps on pooled features first (2 px off in y): they end as near as the full-resolution ones
    rough = init.clone()
    rough[:, 0], rough[:, 1] = 5.6, -1.7
    both = refine_mind(fixed, moving, rough, coarse=50, iters=50)
    assert err(both) < 0.1 and not torch.allclose(both, refine_mind(fixed, moving, rough, iters=50))
    assert torch.equal(refine_mind(fixed, moving, rough, coarse=5, iters=0), rough)
    with pytest.raises(ValueError, match="coarse"):
        refine_mind(fixed, moving, init, coarse=-1)


def test_feature_optimise_bad_shapes():
    f = torch.rand(1, 4, 8, 8)
    with pytest.raises(ValueError, match="feature_optimise"):
        feature_optimise(f, torch.rand(1, 4, 8, 9), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="init"):
        feature_optimise(f, f, torch.zeros(1, 2, 4, 4))


def test_discrete_register_generic_features_and_alpha_forms():
    fixed, moving, t = _known_pair(t=(3.0, -2.0))
    levels = [LevelConfig(1, 4, 5, 1.0, 1, "point"), LevelConfig(1, 2, 2, 1.0)]
    for alpha in (None, [0.5, 1.0, 0.5, 1.0, 1.0, 4.0], [None, torch.ones(6)]):
        disp = discrete_register(fixed, moving, mind_ssc, levels, alpha=alpha, normalise=True)
        assert disp.shape == (1, 2, 64, 56)
    # features at a stride (like a learned net): the field comes back at the image size
    disp = discrete_register(
        fixed,
        moving,
        lambda x: mind_ssc(F.avg_pool2d(x, 2)),
        [LevelConfig(1, 2, 3, 1.0, 1, "point")],
        normalise=True,
        cost_scale=4.0,
        prior=0.25,
        instance=InstanceConfig(iters=20),
    )
    inner = (slice(None), slice(None), slice(10, -10), slice(10, -10))
    assert disp.shape == (1, 2, 64, 56)
    assert (disp - t.view(1, 2, 1, 1))[inner].norm(dim=1).mean() < 0.6


def test_discrete_register_cost_mode():
    fixed, moving, t = _known_pair(t=(2.0, 1.0))
    levels = [LevelConfig(1, 2, 4, 1.0, 1, "point")]
    disp = discrete_register(
        fixed,
        moving,
        mind_ssc,
        levels,
        normalise=True,
        cost_scale=4.0,
        instance=InstanceConfig(mode="cost", iters=30, lr=0.1, lambda_=0.5),
    )
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    assert (disp - t.view(1, 2, 1, 1))[inner].norm(dim=1).mean() < 1.0


def test_config_validation():
    with pytest.raises(ValueError, match="grid_stride"):
        LevelConfig(grid_stride=0)
    with pytest.raises(ValueError, match="spacing"):
        LevelConfig(spacing=0.0)
    with pytest.raises(ValueError, match="fixed_sampling"):
        LevelConfig(fixed_sampling="nearest")
    with pytest.raises(ValueError, match="mode"):
        InstanceConfig(mode="adam")
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="levels"):
        discrete_register(x, x, mind_ssc, [])
    with pytest.raises(ValueError, match="alpha"):
        discrete_register(x, x, mind_ssc, [LevelConfig()], alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match="features"):
        discrete_register(x, x, lambda im: im[0], [LevelConfig()])


def test_mind_config_resolution():
    cfg = MindConfig().resolved(3, (192, 160, 256))
    assert cfg.feature_stride == 2 and cfg.instance.pool == 2 and len(cfg.levels) == 2
    small = MindConfig().resolved(3, (48, 40, 56))
    assert small.feature_stride == 1 and small.instance.pool == 2
    tiny = MindConfig().resolved(3, (12, 12, 12))  # a pooled 6^3 grid would be too coarse
    assert tiny.feature_stride == 1 and tiny.instance.pool == 1
    two = MindConfig().resolved(2, (256, 320))
    assert two.feature_stride == 1 and len(two.levels) == 3


def test_block_mean_is_the_box_filtered_cost_at_the_control_points():
    from pddreg.features.mind import _box_filter
    from pddreg.optim.discrete import _block_mean, _to_grid

    g = torch.Generator().manual_seed(0)
    for shape in ((12, 18), (9, 6, 12)):
        cost = torch.rand(1, 7, *shape, generator=g, dtype=torch.float64)
        for radius in (1, 3):
            # odd strides: the control points sit on voxels, the window is the box filter's
            want = _to_grid(_box_filter(cost, radius), 3, "point")
            assert torch.allclose(_block_mean(cost, radius, 3), want)
        # even strides: the window of 2r + 2 voxels centred between the two middle voxels
        got = _block_mean(cost, 1, 2)
        pad = F.pad(cost, [2, 2] * len(shape), mode="replicate")
        idx = tuple(slice(1 + 2 * i, 5 + 2 * i) for i in (2, 1, 3)[: len(shape)])
        want = pad[(0, 0, *idx)].mean()
        assert torch.isclose(got[(0, 0, 2, 1, 3)[: 2 + len(shape)]], want)
    with pytest.raises(ValueError, match="aggregate"):
        LevelConfig(aggregate=-1)
    with pytest.raises(ValueError, match="alpha"):
        LevelConfig(alpha=(1.0, 2.0))


def _near_layer_pair(
    shape: tuple[int, int], block: tuple[slice, slice]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(fixed, moving, u)``: smooth noise whose background moves 6 px along x and whose
    ``block`` moves 40 px (stereo-like), ``fixed = moving(x + u(x))``."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 1, *shape, generator=g)
    moving = F.avg_pool2d(noise, 7, 1, 3) + F.avg_pool2d(noise, 15, 1, 7)
    moving = (moving - moving.min()) / (moving.max() - moving.min())
    u = torch.zeros(1, 2, *shape)
    u[:, 1] = 6.0
    u[(slice(None), 1, *block)] = 40.0
    return warp(moving, u), moving, u


def test_block_matching_level_follows_a_near_layer():
    # a block moves 40 px, the background 6 px (stereo-like): a coarse level that averages the
    # cost over 10 x 10 pooled voxels (aggregate) with a data-led regulariser follows both; the
    # same level comparing pooled features voxel by voxel (as mind's capture level) does not
    from pddreg.optim.discrete import level_step
    from pddreg.optim.mindreg import mind_features

    fixed, moving, u = _near_layer_pair((160, 240), (slice(40, 120), slice(60, 140)))
    feats = mind_features(fixed), mind_features(moving)
    common = dict(pool=2, grid_stride=4, radius=22, fixed_sampling="point", prior=1.0)
    blocks = LevelConfig(**common, aggregate=4, alpha=(1.0, 0.5, 1.0, 0.5, 0.0, 16.0))
    flat = LevelConfig(**common, smooth=1, field_smooth=3)

    def block_error(lv):
        out = level_step(*feats, None, lv, None, normalise=True, cost_scale=4.0).residual
        return float((out - u).norm(dim=1)[0, 52:108, 72:128].mean())

    errors = block_error(blocks), block_error(flat)
    assert errors[0] < 1.0 and errors[1] > 2.0, errors


def test_mind_follows_a_near_layer_through_the_block_capture_level(monkeypatch):
    # a block moves 40 px (16 % of the width), the background 6 px: mind's smooth capture level
    # alone loses the block, the block-matching candidate kept region by region follows it
    import pddreg.optim.mindreg as M

    shape = (192, 256)
    fixed, moving, u = _near_layer_pair(shape, (slice(50, 140), slice(60, 150)))
    block = M.block_capture_level(2, shape, M.default_levels(2, shape))
    assert block is not None and block.aggregate > 0
    assert block.pool * block.radius >= 1.2 * M.CAPTURE_FRACTION * max(shape)
    assert M.block_capture_level(3, (64, 64, 64), M.default_levels(3)) is None

    def layer_error() -> float:
        d = M.register_mind(fixed, moving)
        return float((d - u).norm(dim=1)[0, 60:130, 70:140].mean())

    with_blocks = layer_error()
    monkeypatch.setattr(M, "block_capture_level", lambda *args: None)
    without = layer_error()
    assert with_blocks < 8.0 and without > 12.0, (with_blocks, without)


def test_restore_layers_brings_back_a_dragged_layer_and_nothing_else():
    # a 40 px block before a 6 px background: the start (the true, sharp field) against a
    # field whose layer edges were smeared (the Adam steps' drag): the start comes back along
    # the edges; a field within LAYER_MOVE of the start, or a small spot, is left as it is
    import pddreg.optim.mindreg as M
    from pddreg.features.mind import _box_filter

    shape = (128, 160)
    fixed, moving, u = _near_layer_pair(shape, (slice(32, 96), slice(40, 120)))
    feats = M.mind_features(fixed), M.mind_features(moving)
    smeared = _box_filter(u, 10)  # a band of about 20 px (the drag is wider than one voxel)
    edge = (smeared - u).norm(dim=1) > 5.0
    out = M.restore_layers(smeared, u, *feats, None, None)

    def err(d):
        return float((d - u).norm(dim=1)[edge].mean())

    # (not on the side the block moves towards: the true field folds there, and a start that
    # folds is not taken for a layer)
    assert err(out) < 0.6 * err(smeared), (err(out), err(smeared))
    near = u + 0.9 * M.LAYER_MOVE / 2**0.5  # moved less than LAYER_MOVE everywhere
    assert torch.equal(M.restore_layers(near, u, *feats, None, None), near)
    spot = u.clone()
    spot[:, 1, 60:64, 10:14] += 10.0  # a 4 x 4 spot, smaller than the opening
    assert torch.equal(M.restore_layers(spot, u, *feats, None, None), spot)
    # a fixed mask that excludes the layer keeps the smeared field there
    mask = torch.ones(1, 1, *shape)
    mask[..., 20:108, 28:132] = 0.0
    kept = M.restore_layers(smeared, u, *feats, mask, None)
    assert torch.equal(kept[..., 40:88, 48:112], smeared[..., 40:88, 48:112])


def test_refine_mind_keeps_the_sharp_start_of_a_layer(monkeypatch):
    # from the true layered field, the Adam steps alone drag the block's edges; refine_mind
    # puts its start back there
    import pddreg.optim.mindreg as M

    shape = (128, 160)
    fixed, moving, u = _near_layer_pair(shape, (slice(32, 96), slice(40, 120)))

    def edge_error():
        out = M.refine_mind(fixed, moving, u, coarse=50, iters=50, lambda_=0.7)
        band = torch.zeros(shape, dtype=torch.bool)
        band[24:104, 32:128] = True
        band[40:88, 48:112] = False
        return float((out - u).norm(dim=1)[0][band].mean())

    restored = edge_error()
    monkeypatch.setattr(M, "LAYER_MOVE", float("inf"))
    dragged = edge_error()
    assert restored < 0.5 * dragged, (restored, dragged)


def test_restore_layers_native_and_reference_agree(monkeypatch):
    # the native warped SSD (float32 CPU) and grid_sample give the same choice
    import pddreg.optim.mindreg as M
    from pddreg.cost import _native
    from pddreg.features.mind import _box_filter

    if not _native.available():
        pytest.skip("native kernels unavailable")
    fixed, moving, u = _near_layer_pair((96, 128), (slice(24, 72), slice(32, 96)))
    feats = M.mind_features(fixed), M.mind_features(moving)
    smeared = _box_filter(u, 10)
    mask = torch.ones(1, 1, 96, 128)
    mask[..., :10, :] = 0.0
    native = M.restore_layers(smeared, u, *feats, mask, mask)
    monkeypatch.setattr(_native, "supports", lambda *ts: False)
    reference = M.restore_layers(smeared, u, *feats, mask, mask)
    assert not torch.equal(native, smeared)
    assert torch.allclose(native, reference, atol=1e-4)
