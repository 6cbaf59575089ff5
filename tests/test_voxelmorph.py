"""Tests of the VoxelMorph-style continuous baseline."""

from __future__ import annotations

import pytest
import torch

from pddreg.models.voxelmorph import VoxelMorph, VoxelMorphConfig, integrate_velocity


def _squares(shift: int, shape=(32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """An image with a bright square and its label map, the square moved by ``shift`` rows."""
    img = torch.zeros(1, 1, *shape)
    seg = torch.zeros(1, 1, *shape, dtype=torch.long)
    sl = (slice(10 + shift, 22 + shift), slice(10, 22))
    img[(0, 0, *sl)] = 1.0
    seg[(0, 0, *sl)] = 1
    return img, seg


@pytest.mark.parametrize(("ndim", "shape"), [(2, (23, 34)), (3, (9, 12, 17))])
@pytest.mark.parametrize("steps", [0, 4])
def test_shapes_and_zero_init_identity(ndim: int, shape: tuple[int, ...], steps: int) -> None:
    model = VoxelMorph(VoxelMorphConfig(ndim=ndim, integration_steps=steps))
    fixed, moving = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    out = model(fixed, moving)
    assert out["disp"].shape == (2, ndim, *shape)
    assert ("velocity" in out) == (steps > 0)
    # the flow head starts at zero: an untrained model is the identity
    disp = model.register(fixed, moving)
    assert torch.equal(disp, torch.zeros_like(disp))


def test_bad_input_shapes_raise() -> None:
    model = VoxelMorph(VoxelMorphConfig(ndim=2))
    with pytest.raises(ValueError, match="'fixed' must have shape"):
        model(torch.rand(1, 2, 8, 8), torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="share their spatial size"):
        model(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9))
    with pytest.raises(ValueError, match="ndim"):
        VoxelMorphConfig(ndim=4)
    with pytest.raises(ValueError, match="loss_scales"):
        VoxelMorphConfig(loss_scales=(1, 0))
    with pytest.raises(ValueError, match="one entry per encoder level"):
        VoxelMorphConfig(enc_channels=(8, 8), dec_channels=(8,))


def test_integration_of_constant_velocity_is_the_translation() -> None:
    # exp of a constant velocity v is the translation by v (away from the border)
    v = torch.zeros(1, 2, 16, 16)
    v[:, 0] = 1.5
    v[:, 1] = -0.75
    disp = integrate_velocity(v, 6)
    assert torch.allclose(disp, v, atol=1e-5)


def test_integration_of_a_contraction_does_not_fold() -> None:
    # a strong contraction towards the centre folds when used directly as a displacement;
    # integrated by scaling and squaring it stays invertible (J > 0)
    from pddreg.spatial import jacobian_det

    n = 32
    y, x = torch.meshgrid(
        torch.arange(n) - n / 2 + 0.5, torch.arange(n) - n / 2 + 0.5, indexing="ij"
    )
    v = -torch.stack([y, x])[None] * 1.5 * torch.exp(-(x**2 + y**2) / 50.0)
    assert (jacobian_det(v) <= 0).any()
    disp = integrate_velocity(v, 7)
    assert (jacobian_det(disp)[:, 2:-2, 2:-2] > 0).all()


def test_training_steps_lower_the_label_loss() -> None:
    torch.manual_seed(0)
    fixed, fixed_seg = _squares(0)
    moving, moving_seg = _squares(3)
    model = VoxelMorph(
        VoxelMorphConfig(ndim=2, enc_channels=(8, 8), dec_channels=(8, 8), final_channels=(8,))
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, logs = model.training_loss(fixed, moving, fixed_seg, moving_seg, 2)
        assert set(logs) >= {"loss", "label", "diffusion"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    # the field moves the square the right way: rows shift by about +3 inside the square
    disp = model.register(fixed, moving)
    assert disp[0, 0, 12:20, 12:20].mean() > 0.5


def test_unlabelled_loss_uses_similarity() -> None:
    model = VoxelMorph(
        VoxelMorphConfig(ndim=2, enc_channels=(4,), dec_channels=(4,), final_channels=())
    )
    fixed, _ = _squares(0, (16, 16))
    moving, _ = _squares(2, (16, 16))
    loss, logs = model.training_loss(fixed, moving, None, None, 2)
    assert "similarity" in logs and loss.requires_grad


def test_save_and_load_roundtrip(tmp_path) -> None:
    from pddreg.models import load_model, save_model

    model = VoxelMorph(
        VoxelMorphConfig(
            ndim=2,
            integration_steps=3,
            enc_channels=(4, 4),
            dec_channels=(4, 4),
            final_channels=(4,),
        )
    )
    with torch.no_grad():
        model.flow.weight.normal_(0, 0.1)
    path = tmp_path / "vm.pt"
    save_model(model, path)
    loaded = load_model(path)
    assert isinstance(loaded, VoxelMorph) and loaded.config == model.config
    f, m = torch.rand(1, 1, 12, 12), torch.rand(1, 1, 12, 12)
    assert torch.allclose(loaded.register(f, m), model.register(f, m))
