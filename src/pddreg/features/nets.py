"""Learned feature networks for PDD-Net: the lecture's small CNN and an OBELISK-style net.

Both map an image ``(B, 1, *S)`` to features ``(B, C, *G)`` in ``[0, 1]`` on a grid of size
``G = ceil(S / stride)`` (stride 4). One dimension-generic code path each: the convolution,
normalisation and pooling layers are picked by ``ndim`` through :func:`layer`.

Convention: a feature map of size ``G`` covers the image like a coarse grid does
(``F.interpolate(..., align_corners=False)``): feature ``k`` sits at image voxel
``(k + 0.5) * S / G - 0.5``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FEATURE_NETS",
    "HybridNet",
    "LectureNet",
    "MindFeatures",
    "ObeliskNet",
    "build_feature_net",
    "feature_grid_shape",
    "layer",
]

_LAYERS = {
    "conv": (nn.Conv2d, nn.Conv3d),
    "batch": (nn.BatchNorm2d, nn.BatchNorm3d),
    "instance": (nn.InstanceNorm2d, nn.InstanceNorm3d),
    "avgpool": (nn.AvgPool2d, nn.AvgPool3d),
    "maxpool": (nn.MaxPool2d, nn.MaxPool3d),
}


def layer(kind: str, ndim: int) -> type[nn.Module]:
    """The ``nn`` layer class of ``kind`` ("conv", "batch", "instance", "avgpool", "maxpool") for
    ``ndim`` spatial dimensions (2 or 3)."""
    if ndim not in (2, 3):
        raise ValueError(f"layer(): ndim must be 2 or 3, got {ndim}")
    if kind not in _LAYERS:
        raise ValueError(f"layer(): unknown kind {kind!r}; expected one of {sorted(_LAYERS)}")
    return _LAYERS[kind][ndim - 2]


def _norm(norm: str, ndim: int, channels: int) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    if norm == "instance":
        return layer("instance", ndim)(channels, affine=True)
    if norm == "batch":
        return layer("batch", ndim)(channels)
    raise ValueError(f"norm must be 'instance', 'batch' or 'none', got {norm!r}")


def _block(
    ndim: int, c_in: int, c_out: int, kernel: int, stride: int, norm: str
) -> list[nn.Module]:
    conv = layer("conv", ndim)(
        c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=norm == "none"
    )
    return [conv, _norm(norm, ndim, c_out), nn.PReLU(c_out)]


def feature_grid_shape(shape: Sequence[int], stride: int) -> tuple[int, ...]:
    """Size ``ceil(S / stride)`` per axis of the feature grid of an image of size ``shape``."""
    return tuple(math.ceil(int(s) / stride) for s in shape)


def _check_image(x: Tensor, ndim: int, name: str) -> None:
    if x.dim() != ndim + 2 or x.shape[1] != 1:
        shape = "(B, 1, " + ", ".join("S" + str(i) for i in range(ndim)) + ")"
        raise ValueError(f"{name}: input must have shape {shape}, got {tuple(x.shape)}")


class LectureNet(nn.Module):
    """The lecture's small feature CNN: strided convolutions, normalisation, PReLU, sigmoid.

    Two stride-2 stages (``stride=4``, the lecture's) or one (``stride=2``, finer features at
    about 4x the convolution cost), ``channels`` outputs in ``[0, 1]``.
    About 25k weights in 2D, 70k in 3D with the defaults.

    Input ``(B, 1, *S)``; output ``(B, channels, *ceil(S / stride))``.
    """

    def __init__(
        self,
        ndim: int,
        channels: int = 24,
        width: int = 32,
        norm: str = "instance",
        stride: int = 4,
    ) -> None:
        super().__init__()
        if stride not in (2, 4):
            raise ValueError(f"LectureNet: stride must be 2 or 4, got {stride}")
        self.ndim = ndim
        self.stride = stride
        self.out_channels = channels
        half = width // 2
        self.body = nn.Sequential(
            *_block(ndim, 1, half, 5, 2, norm),
            *_block(ndim, half, width, 3, stride // 2, norm),
            *_block(ndim, width, width, 3, 1, norm),
            *_block(ndim, width, width, 3, 1, norm),
            layer("conv", ndim)(width, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, image: Tensor) -> Tensor:
        """``(B, 1, *S) -> (B, C, *ceil(S / stride))``."""
        _check_image(image, self.ndim, "LectureNet")
        return self.body(image)


class ObeliskNet(nn.Module):
    """OBELISK-style feature net (Heinrich et al., MedIA 2019), as used by PDD-Net.

    A small convolutional stem (stride 2) is sampled with ``grid_sample`` at ``num_offsets``
    learned spatial offsets around every output point (a deformable, sparse "large kernel"
    whose taps are trained), then mixed by 1x1 convolutions to ``channels`` outputs in
    ``[0, 1]``. Output points form the stride-4 grid. About 100-200k weights with the defaults.

    The offsets are stored in voxels of the stem map; they start uniformly in
    ``[-offset_range, offset_range]^ndim``.

    Input ``(B, 1, *S)``; output ``(B, channels, *ceil(S / 4))``.
    """

    stride = 4

    def __init__(
        self,
        ndim: int,
        channels: int = 24,
        stem_channels: int = 8,
        num_offsets: int = 64,
        hidden: int = 192,
        offset_range: float = 4.0,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        self.ndim = ndim
        self.out_channels = channels
        self.num_offsets = num_offsets
        self.stem = nn.Sequential(
            *_block(ndim, 1, stem_channels, 5, 2, norm),
            *_block(ndim, stem_channels, stem_channels, 3, 1, norm),
        )
        gen = torch.Generator().manual_seed(1234)
        offsets = (torch.rand(num_offsets, ndim, generator=gen) * 2 - 1) * offset_range
        self.offsets = nn.Parameter(offsets)
        conv = layer("conv", ndim)
        sampled = stem_channels * num_offsets
        self.head = nn.Sequential(
            conv(sampled, hidden, 1, bias=norm == "none"),
            _norm(norm, ndim, hidden),
            nn.PReLU(hidden),
            conv(hidden, hidden // 2, 1, bias=norm == "none"),
            _norm(norm, ndim, hidden // 2),
            nn.PReLU(hidden // 2),
            conv(hidden // 2, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, image: Tensor) -> Tensor:
        """``(B, 1, *S) -> (B, C, *ceil(S / 4))``."""
        from pddreg.spatial import sample

        _check_image(image, self.ndim, "ObeliskNet")
        stem = self.stem(image)  # (B, Cs, *S/2)
        b = stem.shape[0]
        out_shape = feature_grid_shape(image.shape[2:], self.stride)
        # output points on the stem grid, by the coarse-grid convention
        axes = [
            (torch.arange(g, device=image.device, dtype=stem.dtype) + 0.5) * (s / g) - 0.5
            for g, s in zip(out_shape, stem.shape[2:], strict=True)
        ]
        centres = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (ndim, *G)
        k = self.num_offsets
        view = (self.ndim, k) + (1,) * self.ndim
        coords = centres.unsqueeze(1) + self.offsets.to(stem.dtype).t().reshape(view)
        # (ndim, K, *G) -> (B, ndim, K * G0, G1, ...) so that grid_sample sees ndim output axes
        coords = coords.reshape(self.ndim, k * out_shape[0], *out_shape[1:])
        coords = coords.unsqueeze(0).expand(b, *coords.shape)
        taps = sample(stem, coords, mode="linear", padding="border")  # (B, Cs, K*G0, ...)
        taps = taps.reshape(b, stem.shape[1] * k, *out_shape)
        return self.head(taps)


class MindFeatures(nn.Module):
    """MIND-SSC descriptors (no weights) pooled to the stride-4 grid, for the "mind" ablation.

    Input ``(B, 1, *S)``; output ``(B, C_mind, *ceil(S / 4))``.
    """

    stride = 4

    def __init__(self, ndim: int, radius: int = 1, dilation: int = 2) -> None:
        super().__init__()
        self.ndim = ndim
        self.radius = radius
        self.dilation = dilation
        self.out_channels = 12 if ndim == 3 else _mind_channels_2d(radius, dilation)

    def forward(self, image: Tensor) -> Tensor:
        """``(B, 1, *S) -> (B, C, *ceil(S / 4))``."""
        from pddreg.features.mind import mind_ssc

        _check_image(image, self.ndim, "MindFeatures")
        feat = mind_ssc(image, radius=self.radius, dilation=self.dilation)
        return _area_resize(feat, feature_grid_shape(image.shape[2:], self.stride))


class HybridNet(nn.Module):
    """MIND-SSC channels alongside learned ones, so the features cannot start worse than the
    training-free baseline.

    ``out = cat(g_mind * MIND-SSC(pool(image, stride)), g_cnn * CNN(image))``: the MIND part is
    exactly ``pddreg.optim.mind_features`` (area-pooled image, then MIND-SSC, in ``(0, 1]``);
    the learned part is a small CNN (a stride-2 stage per factor 2 of ``stride``, two
    3-convolutions at the feature grid, a 1x1 to ``channels`` outputs, sigmoid); the two gains
    are learned (log-parametrised), the CNN's starting small (``cnn_gain``) so that an
    untrained net matches like MIND alone and training adds what the learned channels offer.

    Input ``(B, 1, *S)``; output ``(B, C_mind + channels, *ceil(S / stride))``.
    """

    def __init__(
        self,
        ndim: int,
        channels: int = 16,
        width: int = 24,
        stride: int = 2,
        norm: str = "instance",
        mind_radius: int = 1,
        mind_dilation: int = 2,
        cnn_gain: float = 0.1,
    ) -> None:
        super().__init__()
        if stride not in (1, 2, 4):
            raise ValueError(f"HybridNet: stride must be 1, 2 or 4, got {stride}")
        from pddreg.features.mind import mind_channels

        self.ndim = ndim
        self.stride = stride
        self.mind_radius = mind_radius
        self.mind_dilation = mind_dilation
        self.mind_out = mind_channels(ndim)
        self.out_channels = self.mind_out + channels
        layers: list[nn.Module] = []
        c_in, factor = 1, stride
        while factor > 1:
            layers += _block(ndim, c_in, width, 3, 2, norm)
            c_in, factor = width, factor // 2
        layers += _block(ndim, c_in, width, 3, 1, norm)
        layers += _block(ndim, width, width, 3, 1, norm)
        layers += [layer("conv", ndim)(width, channels, 1), nn.Sigmoid()]
        self.cnn = nn.Sequential(*layers)
        self.log_gain = nn.Parameter(torch.tensor([0.0, math.log(cnn_gain)]))

    def forward(self, image: Tensor) -> Tensor:
        """``(B, 1, *S) -> (B, C, *ceil(S / stride))``."""
        from pddreg.features.mind import mind_ssc

        _check_image(image, self.ndim, "HybridNet")
        shape = feature_grid_shape(image.shape[2:], self.stride)
        small = image if self.stride == 1 else _area_resize(image, shape)
        mind = mind_ssc(small, radius=self.mind_radius, dilation=self.mind_dilation)
        learned = _area_resize(self.cnn(image), shape)
        gain = self.log_gain.exp().to(image.dtype)
        return torch.cat([mind * gain[0], learned * gain[1]], dim=1)


def _mind_channels_2d(radius: int, dilation: int) -> int:
    from pddreg.features.mind import mind_ssc

    probe = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return int(mind_ssc(probe, radius=radius, dilation=dilation).shape[1])


def _area_resize(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Area (mean) resampling of ``(B, C, *S)`` to ``(B, C, *shape)``."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    pool = F.adaptive_avg_pool2d if x.dim() == 4 else F.adaptive_avg_pool3d
    return pool(x, tuple(shape))


FEATURE_NETS: dict[str, type[nn.Module]] = {
    "lecture": LectureNet,
    "obelisk": ObeliskNet,
    "mind": MindFeatures,
    "hybrid": HybridNet,
}


def build_feature_net(name: str, ndim: int, **kwargs: object) -> nn.Module:
    """The feature net called ``name`` ("lecture", "obelisk", "mind" or "hybrid") for ``ndim``.

    Every net maps ``(B, 1, *S)`` to ``(B, net.out_channels, *ceil(S / net.stride))``.
    Keyword arguments go to the net's constructor.
    """
    if name not in FEATURE_NETS:
        raise ValueError(
            f"build_feature_net(): unknown net {name!r}; expected {sorted(FEATURE_NETS)}"
        )
    if ndim not in (2, 3):
        raise ValueError(f"build_feature_net(): ndim must be 2 or 3, got {ndim}")
    return FEATURE_NETS[name](ndim, **kwargs)
