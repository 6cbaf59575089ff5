"""Training losses: non-local label loss, warped label loss, diffusion, MIND similarity."""

from __future__ import annotations

from .functional import (
    batch_reduction,
    class_weights,
    diffusion,
    nonlocal_label_loss,
    one_hot,
    similarity_loss,
    warped_label_loss,
)

__all__ = [
    "batch_reduction",
    "class_weights",
    "diffusion",
    "nonlocal_label_loss",
    "one_hot",
    "similarity_loss",
    "warped_label_loss",
]
