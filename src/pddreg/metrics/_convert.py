"""Conversions shared by the metrics: numpy/torch inputs, label maps, displacement layouts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def to_numpy(x: Any, name: str) -> np.ndarray:
    """A numpy view/copy of a numpy array, torch tensor or nested sequence."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(f"'{name}' must be a numpy array or torch tensor, got {type(x)}") from exc


def label_array(x: Any, name: str) -> np.ndarray:
    """Integer label map as int64; floats must hold integer values."""
    arr = to_numpy(x, name)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64, copy=False)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"'{name}' must be an integer label map, got non-integer values")
        return arr.astype(np.int64)
    raise ValueError(f"'{name}' must be an integer label map, got dtype {arr.dtype}")


def pair_of_label_maps(a: Any, b: Any, fn: str) -> tuple[np.ndarray, np.ndarray]:
    la, lb = label_array(a, "a"), label_array(b, "b")
    if la.shape != lb.shape:
        raise ValueError(
            f"{fn}: 'a' and 'b' must have the same shape, got {la.shape} and {lb.shape}"
        )
    return la, lb


def resolve_labels(la: np.ndarray, lb: np.ndarray, labels: Sequence[int] | None) -> list[int]:
    """The labels to score: the given ones, else every non-zero value in either map."""
    if labels is not None:
        return [int(v) for v in labels]
    values = np.union1d(np.unique(la), np.unique(lb))
    return [int(v) for v in values if v != 0]


def disp_batch(disp: Any, name: str = "disp", keep_float32: bool = False) -> np.ndarray:
    """Displacement as float64 (or kept float32) ``(B, ndim, *S)`` from ``(ndim, *S)`` or
    ``(B, ndim, *S)``."""
    arr = to_numpy(disp, name)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if arr.ndim >= 2 and arr.shape[0] == arr.ndim - 1:
        arr = arr[None]
    elif not (arr.ndim >= 3 and arr.shape[1] == arr.ndim - 2):
        raise ValueError(
            f"'{name}' must have shape (ndim, *spatial) or (B, ndim, *spatial), got {arr.shape}"
        )
    if keep_float32 and arr.dtype == np.float32:
        return arr
    return arr.astype(np.float64, copy=False)


def spacing_tuple(
    spacing: Sequence[float] | float | None, ndim: int, name: str = "spacing"
) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        values = (float(spacing),) * ndim  # type: ignore[arg-type]
    else:
        values = tuple(float(s) for s in spacing)  # type: ignore[union-attr]
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"'{name}' must hold {ndim} positive values, got {spacing}")
    return values
