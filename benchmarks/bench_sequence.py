"""Tracking on the sequence phantom (a beating, breathing heart and a fast instrument) against
copying the previous frame's segmentation, over several seeds.

    python benchmarks/bench_sequence.py [--seeds 5] [--frames 16] [--shape 96x112]
                                        [--method mind] [--method pdd] [--threads 1]

Per seed (:func:`pddreg.data.sequence.make_sequence`), per label (heart wall, instrument), the
mean Dice over frames 1..T-1 against the ground-truth masks of:

- ``copy previous``: the ground-truth segmentation of frame t-1 as that of frame t (the
  lecture's baseline); ``copy first``: frame 0's for every frame (no motion at all);
- ``track anchored`` / ``sequential`` / ``direct``: ``pddreg track`` from frame 0's labels only
  (:func:`pddreg.report.track.track_sequence`);
- ``one step``: frame t registered to frame t-1 and the ground truth of frame t-1 warped with it
  (the same information as ``copy previous``, plus the registration);
- with ``--joint-steps``: a joint segmentation and motion model trained on other sequences (4
  labelled frames), its segmentation of every frame alone, and combined with ``track``
  (``--segment-model``).

Prints one Markdown table (mean +- standard deviation over the seeds) and the frames per second.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _dice(a: np.ndarray, b: np.ndarray, lab: int) -> float:
    x, y = a == lab, b == lab
    s = x.sum() + y.sum()
    return float(2 * (x & y).sum() / s) if s else float("nan")


def run_seed(
    seed: int,
    frames: int,
    shape: tuple[int, int],
    methods: list[str],
    joint=None,
    combine: tuple[float, ...] = (0.5,),
) -> dict:
    import torch

    from pddreg.data.io import normalise_intensity
    from pddreg.data.sequence import make_sequence
    from pddreg.report.track import track_sequence, tracking_register_fn
    from pddreg.spatial import warp_labels

    images, truth = make_sequence(frames, shape, seed=seed)
    out: dict[str, dict[int, float]] = {}

    def score(name: str, segs: list[np.ndarray]) -> None:
        out[name] = {
            lab: float(np.nanmean([_dice(truth[t], segs[t], lab) for t in range(1, frames)]))
            for lab in (1, 2)
        }

    score("copy previous", [truth[0], *truth[:-1]])
    score("copy first", [truth[0]] * frames)
    fps = {}
    for method in methods:
        for mode in ("anchored", "sequential", "direct"):
            res = track_sequence(images, truth[0], method=method, mode=mode, progress=False)
            score(f"track {mode} ({method})", res.segs)
            if mode == "anchored":
                fps[method] = res.fps
        fn = tracking_register_fn(method, 2)
        segs = [truth[0]]
        for t in range(1, frames):
            f = torch.from_numpy(normalise_intensity(images[t]))[None, None]
            m = torch.from_numpy(normalise_intensity(images[t - 1]))[None, None]
            d = fn(f, m)
            prev = torch.from_numpy(truth[t - 1])[None, None]
            segs.append(warp_labels(prev, d)[0, 0].numpy())
        score(f"one step ({method})", segs)
    if joint is not None:

        def segment(frame):
            return joint.segment(frame)

        seg_alone = []
        for t in range(frames):
            f = torch.from_numpy(normalise_intensity(images[t]))[None, None]
            seg_alone.append(segment(f).argmax(1)[0].numpy())
        score("joint model's segmentation alone", seg_alone)
        for w in combine:
            res = track_sequence(
                images, truth[0], method=methods[0], segmenter=segment, combine=w, progress=False
            )
            score(f"track anchored ({methods[0]}) + joint segmentation (weight {w})", res.segs)
    return {"scores": out, "fps": fps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--shape", default="96x112")
    p.add_argument("--method", action="append", default=[], choices=("mind", "pdd"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--joint-steps",
        type=int,
        default=0,
        help="also train a joint segmentation and motion model for this many steps on 4 "
        "labelled frames (frame 0 of 4 other sequences) and 44 unlabelled ones, and combine "
        "its segmentation of every frame with the propagated labels (0: skip)",
    )
    p.add_argument(
        "--combine",
        type=float,
        action="append",
        default=[],
        help="weights of the joint segmentation in the combination (default 0.5)",
    )
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split("x"))
    methods = args.method or ["mind"]
    runs = []
    t0 = time.perf_counter()
    joint = None
    if args.joint_steps:
        from pddreg.data.sequence import SequenceDataset
        from pddreg.train.joint import JointTrainConfig, train_joint

        train_set = SequenceDataset(range(100, 104), args.frames, shape)
        cfg = JointTrainConfig(labelled=4, steps=args.joint_steps, progress=False)
        joint = train_joint(train_set, cfg)
        print(f"joint model trained in {time.perf_counter() - t0:.0f} s", flush=True)
    for seed in range(args.seeds):
        runs.append(
            run_seed(seed, args.frames, shape, methods, joint, tuple(args.combine or [0.5]))
        )
        line = ", ".join(f"{k}: {v[1]:.3f}/{v[2]:.3f}" for k, v in runs[-1]["scores"].items())
        print(f"seed {seed} (heart/instrument) {line}", flush=True)
    names = list(runs[0]["scores"])
    print()
    print(
        f"Sequence phantom, {args.seeds} seeds, {args.frames} frames of {args.shape}: mean Dice "
        "over frames 1..T-1 (mean +- std over seeds)"
    )
    print()
    print("| segmentation of frame t | heart | instrument |")
    print("|---|---|---|")
    for name in names:
        cells = []
        for lab in (1, 2):
            v = np.array([r["scores"][name][lab] for r in runs])
            cells.append(f"{v.mean():.3f} +- {v.std():.3f}")
        print(f"| {name} | {' | '.join(cells)} |")
    for m in methods:
        fps = np.array([r["fps"][m] for r in runs])
        print(f"\n{m}: {fps.mean():.1f} frames/s at {args.shape} ({args.threads} thread(s))")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
