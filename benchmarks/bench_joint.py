"""Joint segmentation and motion on phantoms with only a few labelled training subjects.

    python benchmarks/bench_joint.py [--subjects 24] [--held-out 6] [--labelled 4]
                                     [--steps 300] [--shape 128x160] [--threads 1]

The phantom set ``phantom2d:n=SUBJECTS,held_out=HELD_OUT`` is split as usual; of its training
subjects only the first ``--labelled`` keep their labels. Trained for the same number of steps
(batch 4, the shipped 2D PDD-Net as the starting point):

- ``registration only``: PDD-Net with its label loss on the labelled subjects
  (:func:`pddreg.train.train` on :class:`pddreg.train.joint.LabelledView`);
- ``joint``: :class:`pddreg.models.joint.JointNet` on the labelled and the unlabelled subjects
  (:func:`pddreg.train.joint.train_joint`);
- ``segmentation only``: :class:`pddreg.models.joint.SegNet` (the joint model's feature net and
  head) on the labelled subjects (:func:`pddreg.train.joint.train_segnet`);
- with ``--ablation``, ``registration + similarity``: the joint model's training without its
  segmentation terms (label loss on the labelled pairs, MIND similarity on all pairs).

Prints the registration Dice of every ordered pair of the held-out subjects (with ``none`` and
the untrained shipped model as references) and the segmentation Dice of the held-out images.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--subjects", type=int, default=24)
    p.add_argument("--held-out", type=int, default=6)
    p.add_argument("--labelled", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--shape", default="128x160")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--similarity-weight", type=float, default=None)
    p.add_argument("--consistency-weight", type=float, default=None)
    p.add_argument("--seg-weight", type=float, default=None)
    p.add_argument("--skip", action="append", default=[], choices=("reg", "joint", "seg"))
    p.add_argument(
        "--ablation",
        action="store_true",
        help="also the joint model without its segmentation terms (registration with the "
        "label loss of the labelled pairs and the similarity of all pairs: what the "
        "unlabelled images alone give)",
    )
    args = p.parse_args()

    import torch

    from pddreg.data import open_dataset
    from pddreg.models import default_config, pretrained
    from pddreg.report.evaluate import evaluate_method, summarise
    from pddreg.train import TrainConfig, train
    from pddreg.train.joint import (
        JointTrainConfig,
        LabelledView,
        segmentation_dice,
        train_joint,
        train_segnet,
    )

    torch.set_num_threads(args.threads)
    spec = (
        f"phantom2d:n={args.subjects},held_out={args.held_out},seed={args.seed},shape={args.shape}"
    )
    ds = open_dataset(spec)
    test = ds.indices("test") + ds.indices("val")
    pairs = [(i, j) for i in test for j in test if i != j]
    n_train = len(ds.indices("train"))
    print(
        f"{spec}: {n_train} training subjects ({args.labelled} labelled), {len(test)} held out "
        f"({len(pairs)} pairs); {args.steps} steps, batch 4"
    )
    jc = JointTrainConfig(
        labelled=args.labelled,
        steps=args.steps,
        seed=args.seed,
        similarity_weight=args.similarity_weight,
        consistency_weight=args.consistency_weight,
        seg_weight=args.seg_weight,
        progress=False,
    )
    models = {}
    times = {}
    if "reg" not in args.skip:
        t0 = time.perf_counter()
        base = pretrained(2)
        base.config.smooth = default_config(2).smooth
        tc = TrainConfig(steps=args.steps, batch=4, seed=args.seed, val_every=0, progress=False)
        models["registration only"] = train(LabelledView(ds, args.labelled), tc, model=base)
        times["registration only"] = time.perf_counter() - t0
    if "joint" not in args.skip:
        t0 = time.perf_counter()
        models["joint"] = train_joint(ds, jc)
        times["joint"] = time.perf_counter() - t0
    if args.ablation:
        t0 = time.perf_counter()
        ab = dataclasses.replace(jc, seg_weight=0.0, consistency_weight=0.0)
        models["registration + similarity"] = train_joint(ds, ab)
        times["registration + similarity"] = time.perf_counter() - t0
    seg_only = None
    if "seg" not in args.skip:
        t0 = time.perf_counter()
        seg_only = train_segnet(ds, jc)
        times["segmentation only"] = time.perf_counter() - t0

    shipped = pretrained(2)
    shipped.config.smooth = default_config(2).smooth
    records = evaluate_method(
        ds, "none", lambda f, m: torch.zeros(1, 2, *f.shape[2:]), pairs
    ) + evaluate_method(ds, "shipped pdd (untrained)", lambda f, m: shipped.register(f, m), pairs)
    for name, model in models.items():
        records += evaluate_method(ds, name, lambda f, m, mm=model: mm.register(f, m), pairs)
    rows = summarise(records)
    print()
    print(
        "| model | registration Dice (held-out pairs) | segmentation Dice (held-out images) "
        "| training time (s) |"
    )
    print("|---|---|---|---|")
    seg = {}
    if "joint" in models:
        seg["joint"] = segmentation_dice(models["joint"], ds, test)
    if seg_only is not None:
        seg["segmentation only"] = segmentation_dice(seg_only, ds, test)
    for r in rows:
        name = r["method"]
        s = seg.get(name)
        print(
            f"| {name} | {r['dice_mean']:.3f} +- {r['dice_std']:.3f} | "
            f"{'-' if s is None else f'{s:.3f}'} | {times.get(name, 0):.0f} |"
        )
    if seg_only is not None:
        print(
            f"| segmentation only | - | {seg['segmentation only']:.3f} | "
            f"{times['segmentation only']:.0f} |"
        )
    print("\nSDlogJ: " + ", ".join(f"{r['method']} {r['sdlogj']:.3f}" for r in rows))
    if "joint" in models and "registration only" in models:
        per = {
            name: np.array([r["mean_dice"] for r in records if r["method"] == name])
            for name in ("joint", "registration only")
        }
        diff = per["joint"] - per["registration only"]
        print(
            f"joint - registration only, paired over {diff.size} pairs: mean {diff.mean():+.3f}, "
            f"joint better in {(diff > 0).sum()} of {diff.size}"
        )


if __name__ == "__main__":
    main()
