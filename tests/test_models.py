import pytest
import torch

from pddreg.errors import InputError
from pddreg.models import PDDNet, PDDNetConfig, load_model, pretrained, save_model

CASES = [
    (PDDNetConfig(ndim=2, radius=3), (40, 48)),
    (PDDNetConfig(ndim=2, radius=3, levels=2, features="obelisk"), (40, 48)),
    (PDDNetConfig(ndim=3, radius=2, grid_stride=2, levels=2), (24, 16, 32)),
]


@pytest.mark.parametrize("config,shape", CASES)
def test_forward_shapes_and_register_agree(config, shape):
    model = PDDNet(config).eval()
    f, m = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    with torch.no_grad():
        out = model(f, m)
    nd = len(shape)
    feat = tuple(-(-s // 4) for s in shape)
    grid = tuple(
        -(-s // config.grid_stride2 if config.levels == 2 else -s // config.grid_stride)
        for s in feat
    )
    assert out["disp"].shape == (2, nd, *shape)
    assert out["disp_grid"].shape == (2, nd, *grid)
    assert out["prob"].shape[2:] == grid and out["cost"].shape == out["prob"].shape
    assert torch.allclose(out["prob"].sum(1), torch.ones(()), atol=1e-5)
    assert len(out["levels"]) == config.levels
    # inference computes the same field, and so does pddreg.optim.discrete_register with the
    # learned features and weights (the generic multi-level search)
    from pddreg.optim import LevelConfig, discrete_register

    disp = model.register(f, m)
    assert torch.allclose(disp, out["disp"], atol=1e-5)
    levels = [LevelConfig(1, config.grid_stride, config.radius, config.spacing)]
    alphas = [model.alpha.detach()]
    if config.levels == 2:
        levels.append(LevelConfig(1, config.grid_stride2, config.radius2, config.spacing2))
        alphas.append(model.alpha2.detach())
    with torch.no_grad():
        other = discrete_register(f, m, model.features, levels, alpha=alphas, padding="border")
    assert torch.allclose(other, disp, atol=1e-4)


def test_mind_features_learn_only_alpha():
    model = PDDNet(PDDNetConfig(ndim=2, features="mind"))
    assert [n for n, p in model.named_parameters()] == ["alpha"]


def test_training_loss_backward_all_params():
    model = PDDNet(PDDNetConfig(ndim=2, radius=2, levels=2, label_loss="warped"))
    shape = (32, 32)
    seg = torch.randint(0, 3, (2, 1, *shape))
    loss, logs = model.training_loss(
        torch.rand(2, 1, *shape), torch.rand(2, 1, *shape), seg, seg.flip(-1), 3
    )
    loss.backward()
    assert set(logs) >= {"loss", "warped1", "warped2", "diffusion1", "diffusion2"}
    assert "label1" not in logs  # the non-local loss is off in this ablation setting
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bad_inputs():
    model = PDDNet(PDDNetConfig(ndim=2))
    with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\)"):
        model(torch.rand(1, 2, 16, 16), torch.rand(1, 2, 16, 16))
    with pytest.raises(ValueError, match="shape of 'fixed'"):
        model(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 20))
    with pytest.raises(ValueError, match="features"):
        PDDNetConfig(features="unet")


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(3)
    model = PDDNet(PDDNetConfig(ndim=2, radius=2, features="obelisk", levels=2))
    with torch.no_grad():
        model.alpha.add_(0.1)
    path = tmp_path / "m.pt"
    save_model(model, path)
    again = load_model(path)
    assert isinstance(again, PDDNet) and again.config == model.config
    f, m = torch.rand(1, 1, 32, 40), torch.rand(1, 1, 32, 40)
    assert torch.equal(model.register(f, m), again.register(f, m))
    assert not list(tmp_path.glob("*.tmp"))  # atomic: no leftovers


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="nope.pt: model file not found"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match="bad.pt: not a readable model file"):
        load_model(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(InputError, match="other.pt: not a pddreg model file"):
        load_model(other)


@pytest.mark.parametrize("ndim", [2, 3])
def test_pretrained_loads(ndim):
    model = pretrained(ndim)
    assert isinstance(model, PDDNet) and model.config.ndim == ndim and not model.training
    shape = (48, 40) if ndim == 2 else (24, 24, 24)
    img = torch.rand(1, 1, *shape)
    disp = model.register(img, img)
    assert disp.shape == (1, ndim, *shape) and torch.isfinite(disp).all()
    # the shipped file refines as default_config says (scripts/pretrain.py --refresh-config)
    from pddreg.models import default_config
    from pddreg.models.pdd import INFERENCE_FIELDS

    ref = default_config(ndim)
    for name in INFERENCE_FIELDS:
        assert getattr(model.config, name) == getattr(ref, name), name
    with pytest.raises(ValueError, match="io_levels"):
        PDDNetConfig(ndim=ndim, io_levels=-1)
    with pytest.raises(ValueError, match="io_coarse"):
        PDDNetConfig(ndim=ndim, io_coarse=-1)


def test_pretrained_2d_on_unseen_phantoms():
    # the shipped 2D model was trained on synthetic label-map images only: on phantom CT
    # slices (another generator) it must reduce the image dissimilarity without folding
    from pddreg.data import make_phantom
    from pddreg.metrics import folding_fraction
    from pddreg.spatial import warp

    model = pretrained(2)
    gains = []
    for seed in (11, 12):
        f, _ = make_phantom(seed, ndim=2)
        m, _ = make_phantom(seed + 100, ndim=2)
        f, m = torch.as_tensor(f)[None, None], torch.as_tensor(m)[None, None]
        disp = model.register(f, m)
        before = float((f - m).square().mean())
        after = float((f - warp(m, disp)).square().mean())
        gains.append(after / before)
        assert folding_fraction(disp) < 0.01
    assert max(gains) < 0.95, gains


def test_register_with_instance_optimisation():
    torch.manual_seed(0)
    model = PDDNet(PDDNetConfig(ndim=2, radius=2, io_iters=5))
    f, m = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    plain = model.register(f, m)
    refined = model.register(f, m, instance_opt=True)
    assert refined.shape == plain.shape and torch.isfinite(refined).all()
    assert not torch.allclose(refined, plain)
    assert torch.equal(model.register(f, m, instance_opt=True, iters=0), plain)
    # the refinement matches MIND-SSC by default, the learned features on request
    learned = PDDNet(PDDNetConfig(ndim=2, radius=2, io_iters=5, io_features="learned"))
    learned.load_state_dict(model.state_dict())
    other = learned.register(f, m, instance_opt=True)
    assert other.shape == plain.shape and not torch.allclose(other, refined)
    with pytest.raises(ValueError, match="io_features"):
        PDDNetConfig(ndim=2, io_features="bogus")


def test_pretrained_capture_follows_a_large_shift():
    # a shift of 22 % of the extent is beyond the shipped 2D levels (about 14 % with the
    # margin): the capture search of register(capture=None) follows it, the levels alone not
    from pddreg.data import make_phantom
    from pddreg.spatial import warp

    model = pretrained(2)
    img, _ = make_phantom(3, ndim=2)
    img = torch.as_tensor(img)[None, None]
    h, w = img.shape[2:]
    shift = torch.tensor([0.0, 0.22 * w]).view(1, 2, 1, 1).expand(1, 2, h, w)
    fixed = warp(img, shift, padding="zeros")
    inner = (slice(None), slice(None), slice(8, -8), slice(8, int(0.7 * w)))

    def err(disp):
        return float((disp - shift)[inner].norm(dim=1).mean())

    plain = model.register(fixed, img)
    wide = model.register(fixed, img, capture=None)
    assert err(wide) < 3.0 and err(plain) > 20.0, (err(wide), err(plain))
    # a small shift: the capture search changes little (only regions that match better)
    small = torch.roll(img, 2, dims=3)
    a, b = model.register(small, img, capture=None), model.register(small, img)
    assert float((a - b).norm(dim=1).mean()) < 0.1


def test_large_volumes_run_the_network_at_half_size(monkeypatch):
    # above mind's LARGE_VOLUME the network sees the images area-pooled by 2 (as mind's
    # features); the field comes back at full size and still follows a shift
    import pddreg.optim.mindreg as mindreg

    monkeypatch.setattr(mindreg, "LARGE_VOLUME", 20**3)
    model = pretrained(3)
    seen = []
    model.register_forward_hook(lambda mod, inputs, out: seen.append(tuple(inputs[0].shape)))
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 36, 32, 40, generator=g), 3, 1, 1)
    moving = torch.roll(img, 2, dims=2)  # moving(x) = img(x - 2): u = +2 along axis 0
    disp = model.register(img, moving, instance_opt=False)
    assert seen == [(1, 1, 18, 16, 20)] and disp.shape == (1, 3, 36, 32, 40)
    inner = disp[0, 0, 8:-8, 8:-8, 8:-8]
    assert abs(float(inner.median()) - 2.0) < 0.5
