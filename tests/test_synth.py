"""The synthetic-data engine (pddreg.train.synth_engine), its prefetcher and SynthDataset."""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pddreg.errors import InputError
from pddreg.spatial import identity_grid, jacobian_det, warp_labels
from pddreg.train.prefetch import Prefetcher
from pddreg.train.synth import SynthConfig, SynthDataset, synth_pair
from pddreg.train.synth_engine import SynthEngine, SynthEngineConfig, SynthPair, draw_seed
from pddreg.train.synth_ops import integrate_svf, node_axes, smooth_field

SHAPES = {2: (40, 48), 3: (20, 24, 28)}

# acquisition effects off: images are piecewise constant on the generation labels
CLEAN = dict(
    texture_std=0.0,
    p_smooth_texture=0.0,
    p_speckle=0.0,
    blur=0.0,
    p_thick=0.0,
    p_lowres=0.0,
    bias=0.0,
    noise=0.0,
    p_box=0.0,
    p_sector=0.0,
    p_ellipse=0.0,
    p_merge_render=1.0,
    p_clustered_means=0.0,
)


def _engine(ndim: int, **kw) -> SynthEngine:
    kw.setdefault("anatomy_pool", 2)
    return SynthEngine(SynthEngineConfig(shape=kw.pop("shape", SHAPES[ndim]), **kw))


def _inside(field: torch.Tensor) -> torch.Tensor:
    """Voxels whose target ``x + u(x)`` lies in the grid."""
    shape = field.shape[1:]
    q = identity_grid(shape) + field
    ok = torch.ones(shape, dtype=torch.bool)
    for i, n in enumerate(shape):
        ok &= (q[i] >= 0) & (q[i] <= n - 1)
    return ok


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("p_anatomy", [0.0, 1.0])
def test_pair_shapes_dtypes_ranges(ndim, p_anatomy):
    eng = _engine(ndim, p_anatomy=p_anatomy, num_labels=10)
    shape = SHAPES[ndim]
    for seed in range(3):
        p = eng.pair(seed)
        assert p.kind == ("anatomy" if p_anatomy else "noise")
        for img in (p.fixed, p.moving):
            assert img.shape == (1, *shape) and img.dtype == torch.float32
            assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
            assert float(img.max()) > 0.5  # normalised, not blank
        for seg in (p.fixed_seg, p.moving_seg):
            assert seg.shape == (1, *shape) and seg.dtype == torch.int64
            assert int(seg.min()) >= 0 and int(seg.max()) < 10
            assert len(torch.unique(seg)) >= 2
        assert p.field.shape == (ndim, *shape) and p.field.dtype == torch.float32
        assert p.fixed_mask.shape == (1, *shape) and p.fixed_mask.dtype == torch.bool
        assert torch.isfinite(p.field).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_reproducible_by_seed(ndim):
    eng = _engine(ndim, p_anatomy=0.5)
    a, b = eng.pair(11), _engine(ndim, p_anatomy=0.5).pair(11)
    for x, y in zip(a.as_tuple(True), b.as_tuple(True), strict=True):
        assert torch.equal(x, y)
    c = eng.pair(12)
    assert not torch.equal(a.fixed, c.fixed)
    assert not torch.equal(a.field, c.field)
    # sample(gen) is pair(one seed drawn from gen)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    s = eng.sample(g1)
    assert torch.equal(s.moving, eng.pair(draw_seed(g2)).moving)
    assert torch.equal(g1.get_state(), g2.get_state())
    # with_field=False gives the same pair, without the field
    nf = eng.pair(11, with_field=False)
    assert nf.field is None and torch.equal(nf.moving, a.moving)
    with pytest.raises(InputError):
        nf.as_tuple(with_field=True)


@pytest.mark.parametrize("ndim", [2, 3])
def test_labels_consistent_with_images(ndim):
    """Without texture, blur, bias and noise an image is constant on each label region, and
    the regions differ in intensity; with texture each region has its own spread."""
    eng = _engine(ndim, p_anatomy=0.0, **CLEAN)
    distinct = []
    for seed in range(6):
        p = eng.pair(seed)
        for img, seg in ((p.fixed, p.fixed_seg), (p.moving, p.moving_seg)):
            means = []
            for lab in torch.unique(seg):
                v = img[seg == lab]
                assert float(v.max() - v.min()) < 1e-4, (seed, int(lab))
                means.append(float(v.mean()))
            means = np.array(means)
            distinct.append(np.mean(np.abs(means[:, None] - means[None, :]) > 1e-3))
    # off the diagonal nearly all label pairs differ (ties only by chance clipping)
    n = np.mean(distinct)
    assert n > 0.6, n
    # texture noise: each label region has a within-label spread
    tex = _engine(ndim, p_anatomy=0.0, **{**CLEAN, "texture_std": 0.1}).pair(0)
    spreads = [float(tex.fixed[tex.fixed_seg == lab].std()) for lab in torch.unique(tex.fixed_seg)]
    assert max(spreads) > 1e-3


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("p_anatomy", [0.0, 1.0])
def test_ground_truth_field_maps_moving_labels_onto_fixed(ndim, p_anatomy):
    shape = (64, 72) if ndim == 2 else (32, 32, 36)
    eng = _engine(ndim, shape=shape, p_anatomy=p_anatomy, svf_max_disp=0.15)
    agree, before = [], []
    for seed in range(4):
        p = eng.pair(seed)
        warped = warp_labels(p.moving_seg[None], p.field[None])[0]
        ok = _inside(p.field)
        agree.append(float((warped == p.fixed_seg)[0][ok].float().mean()))
        before.append(float((p.moving_seg == p.fixed_seg)[0][ok].float().mean()))
    # nearest-neighbour rounding at label boundaries only
    assert min(agree) > 0.9, agree
    assert np.mean(before) < np.mean(agree) - 0.05, (before, agree)


@pytest.mark.parametrize("ndim", [2, 3])
def test_fields_are_diffeomorphic(ndim):
    eng = _engine(ndim, svf_max_disp=0.15, svf_scale=(0.15, 0.3), rotation=15.0, scaling=0.1)
    for seed in range(4):
        p = eng.pair(seed)
        assert float(jacobian_det(p.field[None]).min()) > 0.0
        assert float(p.field.abs().max()) > 0.5  # not a trivial field
    # exp(-v) inverts exp(v): composing both is close to the identity
    shape = SHAPES[ndim]
    axes = node_axes(shape, 2, "cpu")
    nodes = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    v = smooth_field(torch.Generator().manual_seed(0), ndim, axes, 0.4 * max(shape))
    v = v * (0.15 * max(shape) / v.norm(dim=0).amax())
    d, di = integrate_svf(torch.stack([v, -v]), nodes, shape, 7)
    from pddreg.train.synth_ops import sample_nodes

    x = nodes[None]
    y = x + d[None]
    back = y + sample_nodes(di[None], y, shape)
    inside = torch.ones(y.shape[2:], dtype=torch.bool)
    for i, n in enumerate(shape):
        inside &= (y[0, i] >= 0) & (y[0, i] <= n - 1)
    err = (back - x).norm(dim=1)[0][inside]
    assert float(err.max()) < 0.15, float(err.max())
    assert float(d.abs().max()) > 1.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_field_of_view_zero_outside(ndim):
    box = _engine(ndim, p_box=1.0, box_crop=0.3, p_sector=0.0, p_ellipse=0.0)
    for seed in range(3):
        p = box.pair(seed)
        for img, mask in ((p.fixed, p.fixed_mask), (p.moving, p.moving_mask)):
            assert float(img[~mask].abs().sum()) == 0.0
            idx = torch.nonzero(mask[0])
            lo, hi = idx.min(0).values, idx.max(0).values
            sl = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi, strict=True))
            assert bool(mask[0][sl].all()) and int(mask.sum()) == mask[0][sl].numel()
            assert 0.4**ndim - 0.02 < float(mask.float().mean()) < 1.0
    # the two images have their own fields of view
    assert not torch.equal(p.fixed_mask, p.moving_mask)
    sector = _engine(ndim, p_box=0.0, p_sector=1.0, p_ellipse=0.0)
    p = sector.pair(0)
    assert float(p.fixed[~p.fixed_mask].abs().sum()) == 0.0
    assert 0.05 < float(p.fixed_mask.float().mean()) < 0.95
    ell = _engine(ndim, p_box=0.0, p_sector=0.0, p_ellipse=1.0).pair(0)
    assert float(ell.moving[~ell.moving_mask].abs().sum()) == 0.0


def test_contrast_modes():
    base = dict(p_anatomy=0.0, **CLEAN)
    same = _engine(2, p_same_contrast=1.0, p_monotonic=0.0, p_nonmonotonic=0.0, gamma=0.0, **base)
    diff = _engine(2, p_same_contrast=0.0, p_monotonic=0.0, p_nonmonotonic=0.0, **base)

    def corr(p: SynthPair) -> float:
        # per-label mean intensities of both images for the labels both show
        fm, mm = [], []
        for lab in torch.unique(p.fixed_seg):
            f, m = p.fixed[p.fixed_seg == lab], p.moving[p.moving_seg == lab]
            if f.numel() and m.numel():
                fm.append(float(f.mean()))
                mm.append(float(m.mean()))
        return float(np.corrcoef(fm, mm)[0, 1]) if len(fm) > 2 else 1.0

    cs = [corr(same.pair(s)) for s in range(4)]
    cd = [corr(diff.pair(s)) for s in range(8)]
    assert min(cs) > 0.99, cs
    assert np.mean(np.abs(cd)) < 0.9, cd


def test_config_errors():
    with pytest.raises(InputError):
        SynthEngineConfig(shape=(4, 4))
    with pytest.raises(InputError):
        SynthEngineConfig(min_labels=20, num_labels=10)
    with pytest.raises(InputError):
        SynthEngineConfig(p_box=0.6, p_sector=0.6)
    with pytest.raises(InputError):
        SynthEngineConfig(thick_factor=(0.5, 2.0))


def _make(seed: int) -> tuple[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed % (2**31))
    time.sleep(float(torch.rand(1, generator=g)) * 0.01)  # random timing
    return seed, torch.rand(3, generator=g)


@pytest.mark.parametrize("workers", [1, 3])
def test_prefetcher_same_sequence_as_direct(workers):
    direct_gen = torch.Generator().manual_seed(7)
    direct = [_make(draw_seed(direct_gen)) for _ in range(12)]
    gen = torch.Generator().manual_seed(7)
    with Prefetcher(_make, depth=4, workers=workers) as pf:
        got = [pf.next(gen) for _ in range(12)]
        assert pf.hits >= 11
    assert [s for s, _ in got] == [s for s, _ in direct]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, direct, strict=True))
    assert torch.equal(gen.get_state(), direct_gen.get_state())


def test_prefetcher_resyncs_and_resumes():
    gen = torch.Generator().manual_seed(1)
    ref_gen = torch.Generator().manual_seed(1)
    with Prefetcher(_make, depth=3) as pf:
        out = [pf.next(gen)[0] for _ in range(3)]
        state = gen.get_state()
        torch.rand(1, generator=gen)  # another use of the generator between pairs
        out.append(pf.next(gen)[0])
        # resume from a saved state (as the trainer does after a checkpoint)
        gen.set_state(state)
        out.append(pf.next(gen)[0])
        assert pf.misses == 2
    ref = [draw_seed(ref_gen) for _ in range(3)]
    ref_state = ref_gen.get_state()
    torch.rand(1, generator=ref_gen)
    ref.append(draw_seed(ref_gen))
    ref_gen.set_state(ref_state)
    ref.append(draw_seed(ref_gen))
    assert out == ref


def test_prefetcher_gives_up_speculating_when_always_missing(caplog):
    gen = torch.Generator().manual_seed(2)
    ref = torch.Generator().manual_seed(2)
    with Prefetcher(_make, depth=2) as pf:
        got, want = [], []
        for _ in range(8):
            torch.rand(1, generator=gen)
            torch.rand(1, generator=ref)
            got.append(pf.next(gen)[0])
            want.append(draw_seed(ref))
        assert not pf._speculate
    assert got == want
    assert "making pairs in the caller's thread" in caplog.text


def test_dataset_engine_prefetch_matches_direct():
    cfg = SynthEngineConfig(shape=(32, 40), num_labels=8, anatomy_pool=2)
    plain = SynthDataset(cfg, val_pairs=2, seed=3)
    fast = SynthDataset(cfg, val_pairs=2, seed=3, prefetch=3, workers=2)
    try:
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        for _ in range(4):
            a = plain.sample_pair(g1, with_field=True)
            b = fast.sample_pair(g2, with_field=True)
            assert len(a) == 5 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert fast._prefetcher.hits >= 3
        fixed, moving, fseg, mseg = plain.sample_pair(g1)
        assert fixed.shape == (1, 32, 40) and mseg.dtype == torch.long
    finally:
        fast.close()
    # the dataset protocol of train/loop.py
    assert plain.ndim == 2 and plain.num_labels == 8 and len(plain.label_names) == 8
    assert plain.pairs("val") == [(0, 1), (2, 3)] and plain.pairs("train") == []
    s0, s1 = plain.subject(0), plain.subject(1)
    assert s0.image.shape == (32, 40) and s0.labels.dtype == np.int64
    f = plain.val_field(0)
    warped = warp_labels(torch.as_tensor(s1.labels)[None, None], f[None])[0, 0].numpy()
    ok = _inside(f).numpy()
    assert np.mean((warped == s0.labels)[ok]) > 0.9


def test_dataset_legacy_config_unchanged():
    cfg = SynthConfig(shape=(32, 32), num_labels=6, label_scale=12, max_disp=3, disp_scale=24)
    ds = SynthDataset(cfg, val_pairs=1, seed=0)
    a = ds.sample_pair(torch.Generator().manual_seed(9))
    b = synth_pair(cfg, torch.Generator().manual_seed(9))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(InputError):
        ds.sample_pair(torch.Generator(), with_field=True)
    with pytest.raises(InputError):
        SynthDataset(cfg, prefetch=2)


def test_trains_on_engine_pairs_with_prefetch():
    from pddreg.models import PDDNet, PDDNetConfig
    from pddreg.train import TrainConfig, train

    cfg = SynthEngineConfig(shape=(32, 32), num_labels=6, min_labels=3, anatomy_pool=1)
    ds = SynthDataset(cfg, val_pairs=1, prefetch=2)
    try:
        torch.manual_seed(0)
        model = PDDNet(PDDNetConfig(ndim=2, radius=2, feature_kwargs={"width": 8}))
        conf = TrainConfig(steps=2, batch=2, augment=False, val_every=0, progress=False)
        model = train(ds, conf, model=model)
        assert math.isfinite(model.val_dice)
        # the trainer's generators (one per batch slot) are only used for pairs: every draw
        # after each slot's first is made ahead
        assert ds._prefetcher.hits >= 2 and ds._prefetcher.misses == 0
    finally:
        ds.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pairs():
    eng = SynthEngine(SynthEngineConfig(shape=(24, 28, 32), anatomy_pool=1), device="cuda")
    p = eng.pair(0)
    assert p.fixed.is_cuda and p.field.is_cuda and p.fixed_seg.dtype == torch.int64
    assert torch.equal(p.fixed, eng.pair(0).fixed)
    assert float(jacobian_det(p.field[None]).min()) > 0


@pytest.mark.slow
def test_prefetch_worker_processes_match_threads():
    cfg = SynthEngineConfig(shape=(24, 28), anatomy_pool=1)
    ds = SynthDataset(cfg, val_pairs=0, prefetch=2, workers=1, executor="process")
    try:
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _ in range(3):
                a = ds.sample_pair(g1, with_field=True)
                b = ds.engine.sample(g2, with_field=True).as_tuple(True)
                for x, y in zip(a, b, strict=True):
                    assert torch.allclose(x.float(), y.float(), atol=1e-5)
    finally:
        ds.close()


def test_timing_sanity(capsys):
    """Runs the benchmark's timing at tiny sizes (prints, asserts nothing about speed)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_synth.py"
    spec = importlib.util.spec_from_file_location("bench_synth", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.bench((32, 40), 4, torch.device("cpu"), 1)
    mod.bench((16, 20, 24), 2, torch.device("cpu"), 1)
    out = capsys.readouterr().out
    assert "ms/pair" in out and "Dice" in out
