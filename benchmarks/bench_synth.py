"""Time the synthetic-pair engine (pddreg.train.synth_engine) in 2D and 3D; draw a montage.

    python benchmarks/bench_synth.py                         # 2D 128x160 and 3D 96^3, 1 thread
    python benchmarks/bench_synth.py --montage /tmp/synth_montage.png
    python benchmarks/bench_synth.py --device cuda --pairs 50

Prints, per dimension: the mean and median wall-clock time and the mean process CPU time per
pair (anatomy subjects built beforehand,
their one-off cost printed apart), split by map kind (noise / anatomy), the time of the legacy
generator (``pddreg.train.synth.synth_pair``) on the same shape in the same run, and the
ground-truth check of the last pairs (Dice of the moving labels warped by the returned field
against the fixed labels, and the smallest Jacobian determinant of the field).

The montage shows, per pair, the fixed image, the moving image and the moving image warped by
the ground-truth field, with the fixed label contours drawn on all three (2D pairs first, then
the middle slices of 3D pairs along each axis).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pddreg.metrics import mean_dice
from pddreg.spatial import jacobian_det, warp, warp_labels
from pddreg.train.synth import SynthConfig, synth_pair
from pddreg.train.synth_engine import SynthEngine, SynthEngineConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(shape: tuple[int, ...], pairs: int, device: torch.device, pool: int) -> None:
    eng = SynthEngine(SynthEngineConfig(shape=shape, anatomy_pool=pool), device=device)
    t0 = time.perf_counter()
    eng.warm_up()
    warm = time.perf_counter() - t0
    eng.pair(10**6)  # first call: caches
    times: dict[str, list[float]] = {"noise": [], "anatomy": []}
    cpu = []
    dice, jmin = [], []
    for s in range(pairs):
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        p = eng.pair(s)
        _sync(device)
        times[p.kind].append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if s >= pairs - 3:
            ws = warp_labels(p.moving_seg[None], p.field[None])[0, 0].cpu().numpy()
            dice.append(mean_dice(p.fixed_seg[0].cpu().numpy(), ws))
            jmin.append(float(jacobian_det(p.field[None]).min()))
    all_t = times["noise"] + times["anatomy"]
    legacy_cfg = SynthConfig(shape=shape, num_labels=16)
    gen = torch.Generator().manual_seed(0)
    synth_pair(legacy_cfg, gen)
    n_leg = max(2, pairs // 4)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n_leg):
        synth_pair(legacy_cfg, gen)
    legacy = (time.perf_counter() - t) / n_leg
    legacy_cpu = (time.process_time() - c) / n_leg
    name = "x".join(map(str, shape))
    print(
        f"{name:>10}: {1e3 * statistics.mean(all_t):7.1f} ms/pair mean, "
        f"{1e3 * statistics.median(all_t):7.1f} median ({pairs} pairs, {device}); "
        + ", ".join(
            f"{k} {1e3 * statistics.mean(v):.1f} ms (n={len(v)})" for k, v in times.items() if v
        )
        + f"; legacy synth_pair {1e3 * legacy:.1f} ms; anatomy pool of {pool} built in "
        f"{warm:.1f} s"
    )
    print(
        f"{'':>10}  process CPU time: {1e3 * statistics.mean(cpu):.1f} ms/pair "
        f"(legacy {1e3 * legacy_cpu:.1f} ms; with 1 thread this is the compute time, "
        "steadier than wall-clock on a loaded machine)"
    )
    print(
        f"{'':>10}  ground truth on the last pairs: Dice(fixed, moving o field) "
        f"{np.mean(dice):.3f}, min Jacobian {min(jmin):.3f}"
    )


def _contours(ax, seg: np.ndarray) -> None:
    edges = np.zeros(seg.shape, bool)
    edges[:-1] |= seg[:-1] != seg[1:]
    edges[:, :-1] |= seg[:, :-1] != seg[:, 1:]
    overlay = np.zeros((*seg.shape, 4))
    overlay[edges] = (1.0, 0.25, 0.1, 0.8)
    ax.imshow(overlay, interpolation="nearest")


def montage(path: Path, seed: int, device: torch.device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = []  # (title, fixed, moving, warped, fixed_seg) 2D arrays
    eng2 = SynthEngine(SynthEngineConfig(shape=(128, 160), anatomy_pool=6), device=device)
    for k in range(10):
        p = eng2.pair(seed + k)
        w = warp(p.moving[None], p.field[None])[0, 0]
        rows.append((f"2D {p.kind} seed {seed + k}", p.fixed[0], p.moving[0], w, p.fixed_seg[0]))
    eng3 = SynthEngine(SynthEngineConfig(shape=(96, 96, 96), anatomy_pool=4), device=device)
    for k in range(4):
        p = eng3.pair(seed + 100 + k)
        w = warp(p.moving[None], p.field[None])[0, 0]
        axis = k % 3
        mid = p.fixed.shape[1 + axis] // 2
        sl = [slice(None)] * 3
        sl[axis] = mid
        sl = tuple(sl)
        rows.append(
            (
                f"3D {p.kind} seed {seed + 100 + k}, axis {axis} mid slice",
                p.fixed[0][sl],
                p.moving[0][sl],
                w[sl],
                p.fixed_seg[0][sl],
            )
        )
    cols = 2  # pairs side by side
    nrow = (len(rows) + cols - 1) // cols
    fig = Figure(figsize=(cols * 3 * 2.2, nrow * 2.0), dpi=90)
    FigureCanvasAgg(fig)
    for i, (title, f, m, w, s) in enumerate(rows):
        r, c = divmod(i, cols)
        s_np = s.cpu().numpy()
        for j, (img, label) in enumerate(((f, "fixed"), (m, "moving"), (w, "moving o u"))):
            ax = fig.add_subplot(nrow, cols * 3, r * cols * 3 + c * 3 + j + 1)
            ax.imshow(img.cpu().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            _contours(ax, s_np)
            ax.set_axis_off()
            ax.set_title(f"{title}: {label}" if j == 0 else label, fontsize=6)
    fig.tight_layout(pad=0.3)
    fig.savefig(path)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=20, help="pairs timed per dimension")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dims", default="2,3", help="dimensions to time, e.g. 2 or 2,3")
    p.add_argument("--pool", type=int, default=4, help="phantom subjects built for the timing")
    p.add_argument("--montage", type=Path, default=None, help="write a PNG montage here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = {2: (128, 160), 3: (96, 96, 96)}
    for d in (int(x) for x in args.dims.split(",") if x):
        n = args.pairs if d == 2 else max(2, args.pairs // 4)
        bench(shapes[d], n, device, args.pool)
    if args.montage is not None:
        montage(args.montage, args.seed, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
