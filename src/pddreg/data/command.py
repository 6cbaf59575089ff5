"""The ``pddreg slices`` subcommand (registered by :func:`add_subcommand`)."""

from __future__ import annotations

import argparse
import logging

__all__ = ["add_subcommand", "run"]

log = logging.getLogger(__name__)


def add_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``slices DATASET -o OUT [--axis A] [--every K] [--min-label-fraction F]``."""
    p = subparsers.add_parser(
        "slices",
        help="cut a 2D slice dataset from a 3D dataset",
        description="Cut 2D slices across one axis of every volume of DATASET and write them "
        "as the lecture's tensors (OUT/<prefix>_img.pth, OUT/<prefix>_seg.pth) with an index "
        "OUT/<prefix>_meta.json. 'pddreg train OUT' and 'pddreg evaluate OUT' read it back; "
        "its pairs join slices at the same position of different subjects.",
    )
    p.add_argument(
        "dataset",
        metavar="DATASET",
        help='3D dataset spec: a Learn2Reg json or folder, a NIfTI folder, "phantom3d:n=8"',
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument(
        "--axis", type=int, default=2, help="array axis to cut across (default 2: axial)"
    )
    p.add_argument("--every", type=int, default=1, help="keep every K-th slice (default 1)")
    p.add_argument(
        "--min-label-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="keep slices with at least this fraction of labelled pixels (default 0: all)",
    )
    p.add_argument("--prefix", default="slices", help="file name prefix (default 'slices')")
    p.add_argument(
        "--transpose",
        action="store_true",
        help="swap the in-plane axes (axial slices of (X, Y, Z) volumes become (Y, X), the "
        "layout of the 2D phantoms)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handler of ``pddreg slices``: returns the exit status."""
    from .datasets import open_dataset, write_slices

    dataset = open_dataset(args.dataset)
    path = write_slices(
        dataset,
        args.output,
        axis=args.axis,
        every=args.every,
        min_label_fraction=args.min_label_fraction,
        prefix=args.prefix,
        progress=True,
        transpose=args.transpose,
    )
    log.info("slices written: %s", path)
    return 0
