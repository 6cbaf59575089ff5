"""VoxelMorph-style continuous baseline: a U-Net that regresses the displacement field directly.

The network sees the fixed and moving images stacked as two channels ``(B, 2, *S)`` and returns
a dense field ``(B, ndim, *S)`` in voxels. With ``integration_steps > 0`` the output is read as
a stationary velocity field ``v`` and integrated by scaling and squaring
(``u_0 = v / 2^T``, ``u_{t+1} = u_t + warp(u_t, u_t)``), which gives a diffeomorphism in the
continuous limit. It is trained with the same weak supervision as PDD-Net (the warped one-hot
label loss of :func:`pddreg.losses.warped_label_loss` plus ``diffusion_weight`` times the
diffusion penalty) through :func:`pddreg.train.train`, so it is the continuous counterpart of
the discrete model "trained on the same few subjects".

Convention (see :mod:`pddreg.spatial`): voxel units, component ``i`` along array axis ``i``,
``warped(x) = moving(x + u(x))``. One code path serves 2D and 3D (``ndim`` from the config).

The last convolution starts at zero, so an untrained model returns the identity (zero field).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VoxelMorph", "VoxelMorphConfig", "integrate_velocity"]

logger = logging.getLogger(__name__)

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


@dataclass
class VoxelMorphConfig:
    """Configuration of :class:`VoxelMorph` (saved with the weights).

    Attributes:
        ndim: 2 or 3 spatial dimensions.
        enc_channels: output channels of the encoder convolutions; each one halves the grid
            (VoxelMorph's ``vm2`` defaults ``(16, 32, 32, 32)``).
        dec_channels: channels of the decoder convolutions, one per encoder level (each
            followed by upsampling and concatenation of the skip connection).
        final_channels: extra full-resolution convolutions before the flow head.
        integration_steps: ``0`` regresses the displacement directly; ``T > 0`` integrates a
            stationary velocity field with ``T`` scaling-and-squaring steps.
        diffusion_weight: weight of the diffusion penalty in :meth:`VoxelMorph.training_loss`.
        similarity_weight: weight of a MIND-SSC similarity term (only used when no labels are
            given to the loss).
        label_similarity_weight: weight of the MIND-SSC similarity term added to the label loss
            when labels are given (0: weak supervision by labels only, as PDD-Net).
        loss_scales: the warped label loss is averaged over these downsampling factors (the
            field resized and the one-hot labels area-downsampled to each): coarse scales see
            blurred labels, which widens the capture range of a loss whose gradient otherwise
            lives only within a voxel of the label boundaries.
    """

    ndim: int = 2
    enc_channels: tuple[int, ...] = (16, 32, 32, 32)
    dec_channels: tuple[int, ...] = (32, 32, 32, 32)
    final_channels: tuple[int, ...] = (16, 16)
    integration_steps: int = 0
    diffusion_weight: float = 0.1
    similarity_weight: float = 1.0
    label_similarity_weight: float = 0.0
    loss_scales: tuple[int, ...] = (1, 2, 4, 8)

    def __post_init__(self) -> None:
        self.enc_channels = tuple(int(c) for c in self.enc_channels)
        self.dec_channels = tuple(int(c) for c in self.dec_channels)
        self.final_channels = tuple(int(c) for c in self.final_channels)
        self.loss_scales = tuple(int(c) for c in self.loss_scales)
        if not self.loss_scales or min(self.loss_scales) < 1:
            raise ValueError(
                f"VoxelMorphConfig: loss_scales must be factors >= 1, got {self.loss_scales}"
            )
        if self.ndim not in (2, 3):
            raise ValueError(f"VoxelMorphConfig: ndim must be 2 or 3, got {self.ndim}")
        if not self.enc_channels or len(self.dec_channels) != len(self.enc_channels):
            raise ValueError(
                "VoxelMorphConfig: dec_channels must have one entry per encoder level, got "
                f"{len(self.dec_channels)} for {len(self.enc_channels)}"
            )
        if self.integration_steps < 0:
            raise ValueError(
                f"VoxelMorphConfig: integration_steps must be >= 0, got {self.integration_steps}"
            )


def integrate_velocity(velocity: Tensor, steps: int) -> Tensor:
    """Scaling and squaring of a stationary velocity field.

    Args:
        velocity: ``(B, ndim, *S)`` in voxels.
        steps: number of squarings ``T`` (``0`` returns ``velocity``).

    Returns:
        ``(B, ndim, *S)`` displacement of ``exp(v)``: ``u_0 = v / 2^T``, then ``T`` times
        ``u <- u + warp(u, u)`` (the composition of the map with itself).
    """
    from pddreg.spatial import warp

    if velocity.dim() < 4 or velocity.shape[1] != velocity.dim() - 2:
        raise ValueError(
            "integrate_velocity(): 'velocity' must have shape (B, ndim, *spatial), got "
            f"{tuple(velocity.shape)}"
        )
    disp = velocity / (2**steps)
    for _ in range(steps):
        disp = disp + warp(disp, disp, mode="linear", padding="border")
    return disp


class VoxelMorph(nn.Module):
    """Dimension-generic U-Net regressing a displacement (or velocity) field.

    ``model(fixed, moving)`` returns ``{"disp": (B, ndim, *S)}`` (and ``"velocity"`` when
    integrating); ``register`` is the inference entry point shared with PDD-Net.
    Input sizes need not be multiples of ``2^levels``: the input is padded (replicate) and the
    field cropped back.
    """

    def __init__(self, config: VoxelMorphConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else VoxelMorphConfig()
        cfg = self.config
        conv = _CONV[cfg.ndim]

        self.encoder = nn.ModuleList()
        c_prev = 2
        skips = [2]
        for c in cfg.enc_channels:
            self.encoder.append(nn.Sequential(conv(c_prev, c, 3, stride=2, padding=1), _act()))
            c_prev = c
            skips.append(c)
        skips.pop()  # the deepest output is not a skip connection
        self.decoder = nn.ModuleList()
        for c, skip in zip(cfg.dec_channels, reversed(skips), strict=True):
            self.decoder.append(nn.Sequential(conv(c_prev, c, 3, padding=1), _act()))
            c_prev = c + skip
        final: list[nn.Module] = []
        for c in cfg.final_channels:
            final += [conv(c_prev, c, 3, padding=1), _act()]
            c_prev = c
        self.final = nn.Sequential(*final)
        self.flow = conv(c_prev, cfg.ndim, 3, padding=1)
        nn.init.zeros_(self.flow.weight)
        nn.init.zeros_(self.flow.bias)

    @property
    def ndim(self) -> int:
        return self.config.ndim

    def _check(self, fixed: Tensor, moving: Tensor) -> None:
        nd = self.config.ndim
        shape = "(B, 1, " + ", ".join(f"S{i}" for i in range(nd)) + ")"
        for name, x in (("fixed", fixed), ("moving", moving)):
            if x.dim() != nd + 2 or x.shape[1] != 1:
                raise ValueError(
                    f"VoxelMorph: '{name}' must have shape {shape}, got {tuple(x.shape)}"
                )
        if fixed.shape[2:] != moving.shape[2:]:
            raise ValueError(
                "VoxelMorph: 'fixed' and 'moving' must share their spatial size, got "
                f"{tuple(fixed.shape)} and {tuple(moving.shape)}"
            )

    def forward(self, fixed: Tensor, moving: Tensor) -> dict[str, Tensor]:
        """``fixed``, ``moving``: ``(B, 1, *S)`` -> ``{"disp": (B, ndim, *S)}``."""
        self._check(fixed, moving)
        if moving.shape[0] != fixed.shape[0]:
            moving = moving.expand(fixed.shape[0], *moving.shape[1:])
        shape = tuple(fixed.shape[2:])
        factor = 2 ** len(self.config.enc_channels)
        padded = tuple(math.ceil(s / factor) * factor for s in shape)
        x = torch.cat([fixed, moving.to(fixed.dtype)], dim=1)
        if padded != shape:
            pad: list[int] = []
            for s, p in zip(reversed(shape), reversed(padded), strict=True):
                pad += [0, p - s]
            x = F.pad(x, pad, mode="replicate")
        skips = [x]
        for enc in self.encoder:
            x = enc(x)
            skips.append(x)
        skips.pop()
        for dec in self.decoder:
            x = dec(x)
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = torch.cat([x, skip], dim=1)
        x = self.flow(self.final(x))
        field = x[(slice(None), slice(None), *(slice(0, s) for s in shape))]
        out: dict[str, Tensor] = {}
        if self.config.integration_steps > 0:
            out["velocity"] = field
            out["disp"] = integrate_velocity(field, self.config.integration_steps)
        else:
            out["disp"] = field
        return out

    @torch.no_grad()
    def register(self, fixed: Tensor, moving: Tensor, **_: object) -> Tensor:
        """Displacement ``(B, ndim, *S)`` mapping ``fixed`` ``(B, 1, *S)`` onto ``moving``.

        Runs in eval mode without gradients; extra keyword arguments (e.g. ``instance_opt``
        of PDD-Net) are accepted and ignored.
        """
        was_training = self.training
        self.eval()
        try:
            return self(fixed, moving)["disp"]
        finally:
            self.train(was_training)

    def training_loss(
        self,
        fixed: Tensor,
        moving: Tensor,
        fixed_seg: Tensor | None,
        moving_seg: Tensor | None,
        num_labels: int,
    ) -> tuple[Tensor, dict[str, float]]:
        """Weakly supervised loss: warped one-hot label loss + ``diffusion_weight`` * diffusion.

        Args:
            fixed, moving: ``(B, 1, *S)`` images.
            fixed_seg, moving_seg: ``(B, 1, *S)`` integer label maps, or both ``None`` for an
                unsupervised MIND-SSC similarity loss instead.
            num_labels: number of labels including background 0.

        Returns:
            ``(loss, logs)`` with ``logs`` holding floats: ``loss``, ``label`` (or
            ``similarity``) and ``diffusion``.
        """
        from pddreg.losses import similarity_loss
        from pddreg.spatial import diffusion

        disp = self(fixed, moving)["disp"]
        reg = diffusion(disp)
        logs: dict[str, float] = {"diffusion": float(reg.detach())}
        labelled = fixed_seg is not None and moving_seg is not None
        data = disp.new_zeros(())
        if labelled:
            data = self._label_loss(disp, fixed_seg, moving_seg, num_labels)
            logs["label"] = float(data.detach())
        if not labelled or self.config.label_similarity_weight > 0:
            w = (
                self.config.similarity_weight
                if not labelled
                else self.config.label_similarity_weight
            )
            sim = similarity_loss(fixed, moving, disp)
            logs["similarity"] = float(sim.detach())
            data = data + w * sim
        loss = data + self.config.diffusion_weight * reg
        logs["loss"] = float(loss.detach())
        return loss, logs

    def _label_loss(
        self, disp: Tensor, fixed_seg: Tensor, moving_seg: Tensor, num_labels: int
    ) -> Tensor:
        """Mean over ``config.loss_scales`` of the warped label loss at that scale."""
        from pddreg.losses import warped_label_loss
        from pddreg.spatial import resize_field

        shape = disp.shape[2:]
        total = disp.new_zeros(())
        for s in self.config.loss_scales:
            coarse = tuple(max(1, round(n / s)) for n in shape)
            d = disp if coarse == tuple(shape) else resize_field(disp, coarse)
            total = total + warped_label_loss(d, fixed_seg, moving_seg, num_labels)
        return total / len(self.config.loss_scales)


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)
