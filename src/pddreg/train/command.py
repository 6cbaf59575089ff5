"""The ``pddreg train`` subcommand (registered by :func:`add_subcommand`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pddreg.errors import InputError

__all__ = ["add_subcommand", "run"]

log = logging.getLogger(__name__)


def add_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train DATASET -o MODEL.pt ...`` to ``subparsers``; the handler is :func:`run`."""
    p = subparsers.add_parser(
        "train",
        help="train a registration model with label supervision (torchrun-able)",
        description="Weakly supervised training on random inter-subject pairs of DATASET's "
        "training split; validation Dice on its 'val' pairs. Writes MODEL.pt and a checkpoint "
        "MODEL.pt.ckpt (use --resume to continue an interrupted run exactly).",
    )
    p.add_argument(
        "dataset", metavar="DATASET", help='dataset spec, e.g. "phantom2d" or a Learn2Reg json'
    )
    p.add_argument("-o", "--output", required=True, metavar="MODEL.pt", help="trained model file")
    p.add_argument(
        "--dim", type=int, choices=(2, 3), default=None, help="check the dataset's dimension"
    )
    p.add_argument("--model", choices=("pdd", "voxelmorph"), default="pdd")
    p.add_argument("--features", choices=("lecture", "obelisk", "mind"), default="lecture")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", type=int, nargs="+", default=None, help="random crop size per axis")
    p.add_argument("--resume", action="store_true", help="continue from MODEL.pt.ckpt")
    p.add_argument("--init", metavar="MODEL.pt", default=None, help="start from a saved model")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument(
        "--labelled",
        type=int,
        default=None,
        metavar="N",
        help="use the labels of the first N training subjects only (with --joint the others "
        "count as unlabelled; without it only those N train)",
    )
    p.add_argument(
        "--joint",
        action="store_true",
        help="train a joint segmentation and motion model (pddreg.models.joint.JointNet: the "
        "PDD-Net's feature encoder shared with a segmentation head) on the labelled and the "
        "unlabelled subjects; segment images with pddreg segment IMAGE --model MODEL.pt",
    )
    p.add_argument("--seg-weight", type=float, default=None, help="--joint: segmentation loss")
    p.add_argument(
        "--similarity-weight", type=float, default=None, help="--joint: image similarity"
    )
    p.add_argument(
        "--consistency-weight",
        type=float,
        default=None,
        help="--joint: warped-segmentation consistency",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handler of ``pddreg train``: returns the exit status."""
    import torch.distributed as dist

    from pddreg.data import open_dataset
    from pddreg.models import load_model, save_model

    from .loop import TrainConfig, train

    dataset = open_dataset(args.dataset)
    if args.dim is not None and dataset.ndim != args.dim:
        raise InputError(f"--dim: {args.dataset} holds {dataset.ndim}D images, not {args.dim}D")
    out = Path(args.output)
    if out.exists() and out.is_dir():
        raise InputError(f"{out}: is a folder, expected a model file path")
    if args.joint:
        return _run_joint(args, dataset, out)
    if args.labelled is not None:
        from .joint import LabelledView

        dataset = LabelledView(dataset, args.labelled)
    model = None
    if args.init is not None:
        model = load_model(args.init)
        model.train()
    config = TrainConfig(
        model=args.model,
        features=args.features,
        steps=args.steps,
        lr=args.lr,
        batch=args.batch,
        seed=args.seed,
        crop=args.crop,
        augment=not args.no_augment,
        checkpoint=str(out) + ".ckpt",
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        val_every=args.val_every,
        device=args.device,
    )
    model = train(dataset, config, model=model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_model(model, out)
        log.info("wrote %s (validation Dice %.3f)", out, getattr(model, "val_dice", float("nan")))
    if dist.is_initialized():
        # every rank leaves together: one tearing its connections down while another still
        # writes the model can abort the other inside gloo
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _run_joint(args: argparse.Namespace, dataset: object, out: Path) -> int:
    """``pddreg train --joint``: :func:`pddreg.train.joint.train_joint`."""
    from pddreg.models import save_model

    from .joint import JointTrainConfig, train_joint

    config = JointTrainConfig(
        labelled=args.labelled,
        steps=args.steps,
        lr=args.lr,
        batch=args.batch,
        seed=args.seed,
        augment=not args.no_augment,
        seg_weight=args.seg_weight,
        similarity_weight=args.similarity_weight,
        consistency_weight=args.consistency_weight,
        init=args.init or "shipped",
        device=args.device,
    )
    model = train_joint(dataset, config)
    save_model(model, out)
    log.info("wrote %s", out)
    return 0
