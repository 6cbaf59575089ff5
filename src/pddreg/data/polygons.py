"""Segmentations drawn as polygons (a small JSON file) and their label maps.

The file::

    {"shape": [384, 512],                                   (optional: the image size)
     "labels": {"1": "LV blood pool", "2": "myocardium"},   (optional: names)
     "polygons": [{"label": 2, "points": [[row, col], ...]},
                  {"label": 1, "points": [[row, col], ...]}]}

Points are pixel coordinates in array axis order (row, column; pixel ``(r, c)`` has its centre
at ``(r, c)``). Polygons are painted in the order listed, later ones over earlier ones, so a
ring (myocardium) is its outer polygon with the inner one (blood pool) painted over it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["rasterise_polygons", "read_polygons"]


def read_polygons(path: str | os.PathLike) -> dict[str, Any]:
    """The polygon file as a dict (``polygons`` checked: label > 0, at least 3 points each)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{p}: cannot read the polygon file ({err})") from None
    polys = doc.get("polygons") if isinstance(doc, dict) else None
    if not isinstance(polys, list) or not polys:
        raise InputError(f"{p}: expected a JSON object with a non-empty 'polygons' list")
    for k, poly in enumerate(polys):
        pts = np.asarray(poly.get("points", []) if isinstance(poly, dict) else [], dtype=float)
        label = poly.get("label") if isinstance(poly, dict) else None
        if pts.ndim != 2 or pts.shape[0] < 3 or pts.shape[1] != 2 or not np.isfinite(pts).all():
            raise InputError(f"{p}: polygon {k + 1} needs at least 3 points [row, col]")
        if not isinstance(label, int) or label < 1:
            raise InputError(f"{p}: polygon {k + 1} needs an integer 'label' >= 1")
    return doc


def rasterise_polygons(doc: dict[str, Any], shape: Sequence[int] | None = None) -> np.ndarray:
    """The label map ``(H, W)`` int64 of a polygon file (:func:`read_polygons`): a pixel takes
    the label of the last polygon containing its centre (on its boundary counts as inside).

    Args:
        doc: the file's contents.
        shape: the image size (default: the file's ``shape``).
    """
    from matplotlib.path import Path as MplPath

    if shape is None:
        shape = doc.get("shape")
    if shape is None or len(shape) != 2:
        raise InputError("polygons: give the image shape (H, W)")
    if doc.get("shape") is not None and tuple(doc["shape"]) != tuple(shape):
        raise InputError(
            f"polygons: drawn on an image of shape {tuple(doc['shape'])}, not {tuple(shape)}"
        )
    h, w = (int(s) for s in shape)
    centres = np.stack(np.indices((h, w)).reshape(2, -1), 1).astype(np.float64)
    out = np.zeros(h * w, np.int64)
    for poly in doc["polygons"]:
        path = MplPath(np.asarray(poly["points"], dtype=np.float64))
        # centres on the boundary count as inside (the sign of matplotlib's radius that grows
        # the polygon depends on its orientation: take both)
        inside = path.contains_points(centres, radius=1e-6) | path.contains_points(
            centres, radius=-1e-6
        )
        out[inside] = int(poly["label"])
    return out.reshape(h, w)
