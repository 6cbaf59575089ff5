"""Training loop (weak supervision by label maps), checkpoints, resume, DDP."""

from __future__ import annotations

from .loop import TrainConfig, augment_pair, build_model, train, validate

__all__ = ["TrainConfig", "augment_pair", "build_model", "train", "validate"]
