"""Segmentation of an image (``pddreg segment``, whose handler is in :mod:`pddreg.cli`) with a
joint segmentation and motion model (``pddreg train --joint``) or a segmentation-only network.

``pddreg segment IMAGE --model M -o OUT``: OUT is a label image (``.png``, ``.nii.gz``, ``.npy``,
...) or a folder, which then receives ``seg.<format of IMAGE>`` and ``prob.npy`` (``(K, *S)``
float32 label probabilities).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["SUFFIXES", "segment_image"]

SUFFIXES = (".nii.gz", ".nii", ".png", ".tif", ".tiff", ".npy", ".mha", ".nrrd")


def segment_image(image: Any, model: Any, device: Any = None) -> np.ndarray:
    """Label probabilities ``(K, *S)`` float32 of an image (array ``(*S)``, Image or path) by a
    model with ``segment`` (a saved file or the model). Intensities are normalised to [0, 1]
    (:func:`pddreg.data.io.normalise_intensity`) as for registration."""
    import torch

    from ..api import _image_array, _resolve_device
    from ..data.io import normalise_intensity
    from ..models import load_model

    arr, name, _ = _image_array(image, "image")
    dev = _resolve_device(device)
    net = load_model(str(model), map_location=dev) if isinstance(model, (str, Path)) else model
    if not hasattr(net, "segment"):
        raise InputError(
            f"--model: {model} cannot segment (a {type(net).__name__}; train one with "
            "pddreg train --joint)"
        )
    ndim = getattr(getattr(net, "config", None), "ndim", arr.ndim)
    if int(ndim) != arr.ndim:
        raise InputError(f"{name}: the model is {ndim}D but the image is {arr.ndim}D")
    x = torch.from_numpy(normalise_intensity(arr))[None, None].to(dev)
    with torch.no_grad():
        prob = net.to(dev).eval().segment(x)
    return prob[0].float().cpu().numpy()
