"""pddreg: deformable registration by discrete displacement search with learned features."""

from __future__ import annotations

from typing import Any

from .errors import InputError, PddregError

__version__ = "0.1.0"
__all__ = ["InputError", "PddregError", "__version__", "load_model", "register"]


def register(*args: Any, **kwargs: Any) -> Any:
    """Register a moving image to a fixed one; see :func:`pddreg.api.register`."""
    from .api import register as _register

    return _register(*args, **kwargs)


def load_model(path: Any, **kwargs: Any) -> Any:
    """Rebuild a saved model from its file; see :func:`pddreg.models.load_model`."""
    from .models import load_model as _load_model

    return _load_model(path, **kwargs)
