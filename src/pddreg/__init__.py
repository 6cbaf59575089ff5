"""pddreg: deformable registration by discrete displacement search with learned features."""

from __future__ import annotations

import os
import sys
from typing import Any

# OpenMP threads spin a while after each parallel region before they sleep, and while they
# spin they hold the cores that the native cost kernels' own threads need. libgomp's default
# (300000 spins, milliseconds) made a 3D ``mind`` registration on a loaded 2-core machine take
# 27-31 s against 8-10 s without spinning (PASSIVE); but PASSIVE wakes the threads with a
# system call for each of PyTorch's many small parallel ops. A short spin (1000) against
# PASSIVE, 2 threads, interleaved runs: 2D ``pdd`` on a 480x640 photo pair 2.3-2.7 s against
# 3.3-3.8 s, ``mind`` on a chest CT at 128^3 2.4-2.7 s against 3.4-3.6 s; with two busy
# processes beside it, ``mind`` at 91x109x91 3.6-4.2 s against 2.6-4.0 s. Read when libgomp
# loads (with torch): set only before that, never over the user's own OMP_WAIT_POLICY.
if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

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
