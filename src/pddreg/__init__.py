"""pddreg: deformable registration by discrete displacement search with learned features."""

from __future__ import annotations

import os
import sys
from typing import Any

# OpenMP threads that spin while idle steal the cores the native cost kernels' own threads
# need: on a loaded 2-core machine a 3D ``mind`` registration took 27-31 s with the default
# wait policy and 8-10 s with PASSIVE (same run). It only takes effect before torch loads.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
