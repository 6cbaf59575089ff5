"""Registration models: PDD-Net (one or two levels), the VoxelMorph-style baseline, save/load.

Every model offers ``model.register(fixed, moving, **kw) -> disp (B, ndim, *S)`` and
``model.training_loss(fixed, moving, fixed_seg, moving_seg, num_labels) -> (loss, logs)``.
"""

from __future__ import annotations

from typing import Any

from .io import MODEL_CLASSES, load_model, pretrained, pretrained_path, save_model
from .pdd import PDDNet, PDDNetConfig, default_config

__all__ = [
    "MODEL_CLASSES",
    "PDDNet",
    "PDDNetConfig",
    "VoxelMorph",
    "VoxelMorphConfig",
    "default_config",
    "load_model",
    "pretrained",
    "pretrained_path",
    "save_model",
]


def __getattr__(name: str) -> Any:
    # The continuous baseline lives in its own module (owned separately); imported on first use.
    if name in ("VoxelMorph", "VoxelMorphConfig"):
        from . import voxelmorph

        return getattr(voxelmorph, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
