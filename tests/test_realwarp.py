"""Training pairs from real images by known deformations (pddreg.train.realwarp)."""

from __future__ import annotations

import numpy as np
import torch

from pddreg.spatial import warp
from pddreg.train.realwarp import MixedDataset, RealWarpConfig, real_warp_pair


def _image(shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, *[max(2, s // 6) for s in shape], generator=g)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return torch.nn.functional.interpolate(x, size=shape, mode=mode)[0, 0] * 100 + 50


def test_true_field_maps_moving_onto_fixed():
    cfg = RealWarpConfig(shape=(48, 56), p_remap=0.0, gamma=0.0, bias=0.0, noise=0.0, p_crop=0)
    g = torch.Generator().manual_seed(3)
    fixed, moving, field = real_warp_pair(_image((90, 100)), cfg, g)
    assert fixed.shape == moving.shape == (1, 48, 56) and field.shape == (2, 48, 56)
    back = warp(moving[None], field[None], padding="zeros")[0]
    inside = warp(torch.ones_like(moving)[None], field[None], padding="zeros")[0] > 0.999
    assert inside.float().mean() > 0.5
    err = (back - fixed)[inside].abs().mean()  # interpolation and normalisation only
    assert err < 0.03 and err < 0.25 * (moving - fixed)[inside].abs().mean()
    assert float(field.abs().max()) > 0.1  # it moved


def test_reproducible_and_3d():
    cfg = RealWarpConfig(shape=(16, 20, 24))
    a = real_warp_pair(_image((30, 30, 30)), cfg, torch.Generator().manual_seed(1))
    b = real_warp_pair(_image((30, 30, 30)), cfg, torch.Generator().manual_seed(1))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert a[2].shape == (3, 16, 20, 24) and 0 <= float(a[0].min()) and float(a[0].max()) <= 1


def test_mixed_dataset_gives_both_kinds():
    class Synth:
        ndim, num_labels, label_names = 2, 3, ["a", "b", "c"]

        def sample_pair(self, gen, with_field=False):
            t = torch.ones(1, 8, 8)
            out = (
                t,
                t,
                torch.ones(1, 8, 8, dtype=torch.long),
                torch.ones(1, 8, 8, dtype=torch.long),
            )
            return (*out, torch.zeros(2, 8, 8)) if with_field else out

        def __len__(self):
            return 4

    ds = MixedDataset(
        Synth(),
        [np.random.rand(20, 20).astype(np.float32)],
        RealWarpConfig(shape=(8, 8)),
        p_real=0.5,
    )
    g = torch.Generator().manual_seed(0)
    kinds = {int(ds.sample_pair(g, with_field=True)[2].max()) for _ in range(20)}
    assert kinds == {0, 1}  # real pairs carry one background label, synthetic ones theirs
