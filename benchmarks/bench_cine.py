"""2D+t tracking on the real echocardiography cine: frames per second and cycle errors.

    python benchmarks/bench_cine.py --data ../shared/data/real/echo_a4c_cine -o OUT
                                    [--method pdd] [--method mind] [--mode anchored] ...
                                    [--frames 120] [--threads 2]

Runs ``pddreg track`` (:func:`pddreg.report.track.track_files`) on the frames with the
first-frame segmentation drawn in ``benchmarks/data/echo_a4c_lv.json`` (LV blood pool and
myocardium), for every method and mode, with the cycle error (frame t registered back onto
frame 0 and forth: t -> 0 -> t; pixels, no ground truth needed). Each run writes
``OUT/<method>_<mode>/`` (``track.gif`` the overlay animation, ``montage.png`` 8 of its frames,
``curves.png`` the per-frame curves, ``summary.json``, the label maps and fields). Prints per
run the frames per second of the forward tracking (384x512 frames; also per CPU second, the
steadier figure on a shared machine) and the cycle error (mean over the labels; mean, median
and last frame), then one table of the cycle error every ``--every`` frames.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _montage(folder: Path, count: int = 8) -> None:
    """``montage.png``: ``count`` evenly spaced frames of ``track.gif`` at half size."""
    from PIL import Image

    gif = Image.open(folder / "track.gif")
    picks = np.linspace(0, gif.n_frames - 1, count).round().astype(int)
    tiles = []
    for t in picks:
        gif.seek(int(t))
        im = gif.convert("RGB")
        tiles.append(np.asarray(im.resize((im.width // 2, im.height // 2))))
    rows = [np.concatenate(tiles[i : i + 4], 1) for i in range(0, len(tiles), 4)]
    Image.fromarray(np.concatenate(rows, 0)).save(folder / "montage.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/real/echo_a4c_cine", help="frame folder")
    p.add_argument("-o", "--output", default="cine_out", help="output folder")
    p.add_argument("--seg", default=str(HERE / "data" / "echo_a4c_lv.json"))
    p.add_argument("--method", action="append", default=[], choices=("pdd", "mind", "none"))
    p.add_argument(
        "--mode", action="append", default=[], choices=("anchored", "sequential", "direct")
    )
    p.add_argument("--frames", type=int, default=120, help="first N frames")
    p.add_argument("--every", type=int, default=10, help="table of the cycle error every N")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-cycle", action="store_true", help="frames per second only")
    args = p.parse_args()

    import torch

    from pddreg.report.track import track_files

    torch.set_num_threads(args.threads)
    frames = sorted(str(f) for f in Path(args.data).glob("frame_*.png"))[: args.frames]
    if len(frames) < 2:
        raise SystemExit(f"{args.data}: no frame_*.png frames")
    methods = args.method or ["pdd", "mind"]
    modes = args.mode or ["anchored", "sequential", "direct"]
    out = Path(args.output)
    runs = {}
    for method in methods:
        for mode in modes:
            t0 = time.perf_counter()
            summary = track_files(
                frames,
                args.seg,
                out / f"{method}_{mode}",
                method=method,
                mode=mode,
                cycle=not args.no_cycle,
            )
            wall = time.perf_counter() - t0
            errs = np.array(
                [
                    np.nan if f.get("cycle_error_px") is None else f["cycle_error_px"]
                    for f in summary["frames"][1:]
                ]
            )
            runs[(method, mode)] = summary
            _montage(out / f"{method}_{mode}")
            shape = "x".join(map(str, summary["frame_shape"]))
            cpu_fps = (len(frames) - 1) / max(summary["cpu_s"], 1e-9)
            line = (
                f"{method:5s} {mode:10s} {summary['fps']:.1f} frames/s ({shape}, "
                f"{args.threads} threads; {cpu_fps:.1f} frames per CPU second)"
            )
            if not args.no_cycle:
                line += (
                    f", cycle error in the labels: mean {np.nanmean(errs):.2f} px, median "
                    f"{np.nanmedian(errs):.2f}, last frame {errs[-1]:.2f}"
                )
            print(f"{line}; {wall:.0f} s in all -> {out / f'{method}_{mode}'}", flush=True)
    if args.no_cycle:
        return
    keys = list(runs)
    print()
    print("Cycle error t -> 0 -> t (pixels, mean over the propagated labels of frame t)")
    print()
    print("| frame | " + " | ".join(f"{m} {o}" for m, o in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    n = len(frames)
    for t in list(range(args.every, n, args.every)) + ([n - 1] if (n - 1) % args.every else []):
        cells = []
        for k in keys:
            v = runs[k]["frames"][t].get("cycle_error_px")
            cells.append("-" if v is None else f"{v:.2f}")
        print(f"| {t} | " + " | ".join(cells) + " |")
    print("| fps | " + " | ".join(f"{runs[k]['fps']:.1f}" for k in keys) + " |")
    print(
        "| frames per CPU s | "
        + " | ".join(f"{(n - 1) / max(runs[k]['cpu_s'], 1e-9):.1f}" for k in keys)
        + " |"
    )
    (out / "cine_summary.json").write_text(
        json.dumps({f"{m}_{o}": runs[(m, o)] for m, o in keys}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
