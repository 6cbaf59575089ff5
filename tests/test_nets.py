import pytest
import torch

from pddreg.features import LectureNet, ObeliskNet, build_feature_net, feature_grid_shape
from pddreg.features.nets import layer


@pytest.mark.parametrize("name", ["lecture", "obelisk"])
@pytest.mark.parametrize("shape", [(40, 36), (20, 16, 24), (33, 30)])
def test_shapes_and_range(name, shape):
    net = build_feature_net(name, len(shape))
    with torch.no_grad():
        out = net(torch.rand(2, 1, *shape))
    assert out.shape == (2, net.out_channels, *feature_grid_shape(shape, net.stride))
    assert net.stride == 4
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_weight_counts():
    # the lecture CNN is small; the OBELISK net is in the PDD-Net paper's range (~100-200k)
    assert sum(p.numel() for p in LectureNet(2).parameters()) < 60_000
    for ndim in (2, 3):
        n = sum(p.numel() for p in ObeliskNet(ndim).parameters())
        assert 100_000 <= n <= 200_000, n


def test_layer_factory():
    assert layer("conv", 2) is torch.nn.Conv2d and layer("conv", 3) is torch.nn.Conv3d
    with pytest.raises(ValueError, match="ndim"):
        layer("conv", 4)
    with pytest.raises(ValueError, match="unknown net"):
        build_feature_net("unet", 2)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\(B, 1, S0, S1\)"):
        LectureNet(2)(torch.rand(1, 2, 16, 16))


def test_obelisk_offsets_learn():
    # the sampling offsets receive gradients: the deformable sampling is trainable
    net = ObeliskNet(2)
    net(torch.rand(1, 1, 32, 32)).sum().backward()
    assert net.offsets.grad is not None and float(net.offsets.grad.abs().sum()) > 0


def test_obelisk_shift_equivariance():
    # shifting the image by one output stride shifts the interior features by one cell
    torch.manual_seed(1)
    net = ObeliskNet(2, offset_range=2.0).eval()
    img = torch.rand(1, 1, 64, 64)
    shifted = torch.roll(img, shifts=4, dims=2)
    a, b = net(img), net(shifted)
    # instance norm statistics change a little with the rolled border; compare the interior
    assert torch.allclose(a[..., 4:10, 4:12], b[..., 5:11, 4:12], atol=0.05)
