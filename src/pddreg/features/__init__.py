"""Features for the correlation layer: MIND-SSC (hand-crafted) and learned nets.

``mind_ssc`` and ``MINDSSC`` live in :mod:`pddreg.features.mind`; the learned nets in
:mod:`pddreg.features.nets`.
"""

from __future__ import annotations

from typing import Any

from .nets import (
    FEATURE_NETS,
    LectureNet,
    MindFeatures,
    ObeliskNet,
    build_feature_net,
    feature_grid_shape,
)

__all__ = [
    "FEATURE_NETS",
    "LectureNet",
    "MINDSSC",
    "MindFeatures",
    "ObeliskNet",
    "build_feature_net",
    "feature_grid_shape",
    "mind_ssc",
]


def __getattr__(name: str) -> Any:
    # MIND-SSC is imported on first use so that the nets do not depend on it at import time.
    if name in ("mind_ssc", "MINDSSC"):
        from . import mind

        return getattr(mind, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
