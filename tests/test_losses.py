import pytest
import torch

from pddreg.cost import displacement_set, probabilities
from pddreg.losses import (
    class_weights,
    diffusion,
    nonlocal_label_loss,
    one_hot,
    similarity_loss,
    warped_label_loss,
)


def _blob_seg(shape, shift=(0, 0)):
    seg = torch.zeros(1, 1, *shape, dtype=torch.long)
    seg[..., 4 + shift[0] : 10 + shift[0], 5 + shift[1] : 12 + shift[1]] = 1
    seg[..., 12 + shift[0] : 15 + shift[0], 3 + shift[1] : 8 + shift[1]] = 2
    return seg


def _delta_prob(shift, radius, grid, ndim=2):
    """Probabilities putting all mass on one displacement."""
    d = displacement_set(radius, 1.0, ndim)
    idx = int(((d - torch.tensor(shift, dtype=d.dtype)).abs().sum(1) == 0).nonzero()[0])
    prob = torch.zeros(1, d.shape[0], *grid, dtype=torch.float64)
    prob[:, idx] = 1
    return prob


def test_one_hot_and_weights():
    seg = _blob_seg((20, 20))
    oh = one_hot(seg, 3)
    assert oh.shape == (1, 3, 20, 20) and torch.equal(oh.sum(1), torch.ones(1, 20, 20))
    w = class_weights(oh)
    assert w.shape == (3,) and w[0] < w[2]  # rarer class weighs more
    assert float(w.sum()) == pytest.approx(3.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        one_hot(seg, 2)


def test_nonlocal_loss_known_shift():
    # fixed(x) = moving(x + s): the delta at the true shift gives zero loss, others do not
    shape = (20, 20)
    moving = _blob_seg(shape, shift=(2, 1))
    fixed = _blob_seg(shape)
    right = nonlocal_label_loss(_delta_prob((2, 1), 3, shape), fixed, moving, 3, radius=3)
    wrong = nonlocal_label_loss(_delta_prob((0, 0), 3, shape), fixed, moving, 3, radius=3)
    assert float(right) == pytest.approx(0.0, abs=1e-12)
    assert float(wrong) > 0.01


def test_nonlocal_loss_gradient():
    shape = (5, 4)
    fixed = torch.randint(0, 3, (1, 1, *shape))
    moving = torch.randint(0, 3, (1, 1, *shape))
    cost = torch.randn(1, 9, *shape, dtype=torch.float64, requires_grad=True)

    def f(c):
        return nonlocal_label_loss(probabilities(c), fixed, moving, 3, radius=1)

    assert torch.autograd.gradcheck(f, (cost,), eps=1e-6, atol=1e-6)


def test_warped_loss_known_shift_and_gradient():
    shape = (20, 20)
    moving = _blob_seg(shape, shift=(2, 1))
    fixed = _blob_seg(shape)
    disp = torch.zeros(1, 2, *shape, dtype=torch.float64)
    disp[:, 0], disp[:, 1] = 2.0, 1.0
    assert float(warped_label_loss(disp, fixed, moving, 3)) == pytest.approx(0.0, abs=1e-12)
    assert float(warped_label_loss(disp * 0, fixed, moving, 3)) > 0.01
    small = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    fs, ms = torch.randint(0, 3, (1, 1, 12, 14)), torch.randint(0, 3, (1, 1, 12, 14))
    assert torch.autograd.gradcheck(
        lambda d: warped_label_loss(d, fs, ms, 3), (small,), eps=1e-6, atol=1e-5
    )


def test_diffusion_affine_zero_for_constant():
    assert float(diffusion(torch.ones(1, 3, 5, 6, 7))) == 0.0


@pytest.mark.parametrize("shape", [(24, 20), (12, 10, 14)])
def test_similarity_loss(shape):
    torch.manual_seed(0)
    img = torch.nn.functional.avg_pool2d if len(shape) == 2 else torch.nn.functional.avg_pool3d
    fixed = img(torch.rand(1, 1, *[2 * s for s in shape]), 2)
    zero = torch.zeros(1, len(shape), *shape, requires_grad=True)
    same = similarity_loss(fixed, fixed, zero)
    other = similarity_loss(fixed, torch.rand(1, 1, *shape), zero)
    s, o = float(same.detach()), float(other.detach())
    assert s == pytest.approx(0.0, abs=1e-7) and o > s
    other.backward()
    assert zero.grad is not None and torch.isfinite(zero.grad).all()
