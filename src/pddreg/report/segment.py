"""The ``pddreg segment`` subcommand: segment an image with a joint segmentation and motion
model (``pddreg train --joint``) or a segmentation-only network.

``pddreg segment IMAGE --model M -o OUT``: OUT is a label image (``.png``, ``.nii.gz``, ``.npy``,
...) or a folder, which then receives ``seg.<format of IMAGE>`` and ``prob.npy`` (``(K, *S)``
float32 label probabilities).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["add_subcommand", "segment_image"]

_SUFFIXES = (".nii.gz", ".nii", ".png", ".tif", ".tiff", ".npy", ".mha", ".nrrd")


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


def _run(args: argparse.Namespace) -> int:
    from ..cli import atomic_output_dir, output_suffix
    from ..data.io import read_image, write_image

    image = read_image(args.image)
    prob = segment_image(image, args.model, args.device)
    seg = prob.argmax(0).astype(np.uint8 if prob.shape[0] <= 256 else np.int32)
    out = Path(args.output)
    if out.name.lower().endswith(_SUFFIXES):
        write_image(str(out), seg, like=image)
    else:
        with atomic_output_dir(out, ("seg.*", "prob.npy")) as tmp:
            write_image(str(tmp / f"seg{output_suffix(args.image)}"), seg, like=image)
            np.save(tmp / "prob.npy", prob)
    labels = ", ".join(f"{k}: {int((seg == k).sum())}" for k in range(1, prob.shape[0]))
    print(f"segmented {args.image} (voxels per label {labels}); wrote {out}")
    return 0


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``segment IMAGE --model M -o OUT`` to ``subparsers``."""
    p = subparsers.add_parser(
        "segment",
        help="segment an image with a joint segmentation and motion model",
        description="Segment IMAGE with a model trained by pddreg train --joint (or a "
        "segmentation-only SegNet). -o OUT is a label image file, or a folder that receives "
        "seg.* and prob.npy (label probabilities, (K, *S)).",
    )
    p.add_argument("image", help="image (.nii/.nii.gz, .png/.jpg, .npy, .mha/.nrrd)")
    p.add_argument("--model", required=True, metavar="M", help="saved joint model")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file or folder")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=_run)
    return p
