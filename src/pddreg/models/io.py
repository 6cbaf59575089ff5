"""Saving and loading models with their config; the pretrained weights shipped in the package.

A model file is a ``torch.save`` dict ``{"model": class name, "config": asdict(config),
"state_dict": ..., "pddreg_version": ...}``. :func:`load_model` rebuilds the class named in it
from :data:`MODEL_CLASSES` (VoxelMorph is looked up lazily in :mod:`pddreg.models.voxelmorph`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pddreg.errors import InputError

__all__ = ["MODEL_CLASSES", "load_model", "pretrained", "pretrained_path", "save_model"]

#: class name -> "module:ClassName" (imported on first use)
MODEL_CLASSES: dict[str, str] = {
    "PDDNet": "pddreg.models.pdd:PDDNet",
    "VoxelMorph": "pddreg.models.voxelmorph:VoxelMorph",
    "JointNet": "pddreg.models.joint:JointNet",
    "SegNet": "pddreg.models.joint:SegNet",
}

#: Shipped weights per dimension, in ``pddreg/weights/`` (made by ``scripts/pretrain.py``).
PRETRAINED = {2: "pdd2d.pt", 3: "pdd3d.pt"}


def _resolve(name: str) -> type[nn.Module]:
    module, cls = MODEL_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _config_class(model_cls: type[nn.Module]) -> Callable[..., Any]:
    module = importlib.import_module(model_cls.__module__)
    return getattr(module, model_cls.__name__ + "Config")


def save_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (with its config dataclass ``model.config``) to ``path`` atomically.

    Written to a temporary file in the same folder, then renamed over ``path``.
    """
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise ValueError(
            f"save_model(): unknown model class {name!r}; expected {sorted(MODEL_CLASSES)}"
        )
    from pddreg import __version__

    inner = getattr(model, "module", model)  # DistributedDataParallel
    payload = {
        "model": name,
        "config": dataclasses.asdict(inner.config),
        "state_dict": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
        "pddreg_version": __version__,
    }
    atomic_save(payload, path)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` via a temporary file and ``os.replace`` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; model files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_model(
    path: str | os.PathLike, map_location: str | torch.device | None = None
) -> nn.Module:
    """Rebuild the model saved by :func:`save_model` in ``path`` (in eval mode).

    Raises :class:`~pddreg.errors.InputError` naming the file when it is missing, unreadable or
    not a pddreg model.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, not a torch file
        raise InputError(f"{path}: not a readable model file ({type(exc).__name__})") from None
    return _from_payload(payload, str(path), map_location)


def _from_payload(payload: Any, name: str, map_location: Any) -> nn.Module:
    if not isinstance(payload, dict) or not {"model", "config", "state_dict"} <= set(payload):
        raise InputError(f"{name}: not a pddreg model file (missing model/config/state_dict)")
    cls_name = payload["model"]
    if cls_name not in MODEL_CLASSES:
        raise InputError(f"{name}: unknown model class {cls_name!r}")
    try:
        cls = _resolve(cls_name)
    except (ImportError, AttributeError):
        raise InputError(f"{name}: model class {cls_name!r} is not available") from None
    try:
        config = _config_class(cls)(**payload["config"])
        model = cls(config)
        model.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{name}: model does not match its config ({first})") from None
    bad = [
        k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise InputError(
            f"{name}: the model's weights hold NaN/Inf values ({bad[0]}{', ...' if bad[1:] else ''}"
            "; saved from a diverged training?)"
        )
    if map_location is not None:
        model.to(map_location)
    return model.eval()


def pretrained_path(ndim: int) -> Path:
    """Path of the shipped weights for ``ndim`` (2 or 3)."""
    if ndim not in PRETRAINED:
        raise InputError(f"ndim: no pretrained model for {ndim}D images (2D and 3D only)")
    res = importlib.resources.files("pddreg").joinpath("weights", PRETRAINED[ndim])
    return Path(str(res))


def pretrained(ndim: int, map_location: str | torch.device | None = None) -> nn.Module:
    """The pretrained PDD-Net shipped with the package for ``ndim``-D images (eval mode)."""
    path = pretrained_path(ndim)
    if not path.is_file():
        raise InputError(
            f"{path}: shipped weights missing; run scripts/pretrain.py --dim {ndim} to make them"
        )
    return load_model(path, map_location=map_location)
