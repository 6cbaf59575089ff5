"""Benchmark of pddreg.cost (correlation + regularisation), in one run on the same inputs.

    python benchmarks/bench_cost.py                 # 2D lecture scale, 3D abdominal scale, minconv
    python benchmarks/bench_cost.py --threads 2     # torch threads (default 2)
    python benchmarks/bench_cost.py --calibrate     # search behind DEFAULT_ALPHA, EXACT_WEIGHT

Prints:
1. 2D at the lecture's scale (24 channels, 80x64 control grid = feature grid, 11x11
   displacements): ours (correlation + two-round regularisation) against the lecture's
   ``F.unfold`` + ``nn.Sequential`` formulation: max relative difference and speed ratio.
2. 3D abdominal scale (16 channels, 32^3 grid, 15^3 displacements, features 32^3): time (wall and
   CPU) and peak-RSS increase, each measured in a fresh subprocess (resource.getrusage
   ru_maxrss): torch.no_grad with the native CPU kernels (pddreg/cost/_native.c) and with the
   PyTorch ones (PDDREG_NATIVE=0), and with autograd (forward + backward, always PyTorch).
3. Mean and max difference between the lecture's approximate min-convolution and the exact one
   (``minconv_exact`` with ``EXACT_WEIGHT``) on SSD costs of MIND-like features of a real MRI.

Timings on a shared machine are noisy: the 1-minute load average is printed with them.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pddreg.cost import (
    DEFAULT_ALPHA,
    EXACT_WEIGHT,
    correlation,
    minconv,
    minconv_exact,
    regularise,
    soft_field,
)

# ------------------------------------------------------------------------------------------
# The lecture's formulation (seed file), 2D, batch 1, features at the grid resolution.


def lecture_chain(feat_fixed, feat_mov, alpha, disp_range=11):
    disp_hw = (disp_range - 1) // 2
    B, C, H, W = feat_fixed.size()
    feat_mov_unfold = F.unfold(feat_mov.transpose(1, 0), (disp_range, disp_range), padding=disp_hw)
    ssd = ((feat_fixed.view(C, 1, -1) - feat_mov_unfold) ** 2).sum(0).view(1, disp_range**2, H, W)
    pad1 = nn.ReplicationPad2d(5)
    pad2 = nn.ReplicationPad2d(6)
    avg1 = nn.AvgPool2d(5, stride=1)
    max1 = nn.MaxPool2d(3, stride=1)
    minconv_ = nn.Sequential(pad1, avg1, avg1, max1)
    meanfield_ = nn.Sequential(pad2, avg1, avg1, avg1)

    def reg(x):
        mc = -minconv_(-x.permute(0, 2, 3, 1).reshape(1, -1, disp_range, disp_range))
        return meanfield_(mc.permute(0, 2, 3, 1).reshape(1, -1, H, W))

    c1 = alpha[0] * ssd + alpha[1] * reg(ssd)
    return alpha[5] * (alpha[2] * ssd + alpha[3] * c1 + alpha[4] * reg(c1))


def native_ok() -> bool:
    from pddreg.cost import _native

    return _native.available()


def best_time(fn, repeats):
    """(best wall seconds, CPU seconds of that run) over ``repeats`` runs after one warm-up."""
    fn()
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        t1, c1 = time.perf_counter(), time.process_time()
        if t1 - t0 < best[0]:
            best = (t1 - t0, c1 - c0)
    return best


def load():
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------
# Real image and MIND-like features (for the min-convolution comparison and the calibration)


def mri_slice() -> np.ndarray:
    """The 256x256 brain MRI slice shipped with matplotlib's sample data, in [0, 1]."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "s1045.ima.gz"
    with gzip.open(path) as f:
        img = np.frombuffer(f.read(), np.uint16).reshape(256, 256).astype(np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5])
    return np.clip((img - lo) / (hi - lo), 0, 1)


def features(image: torch.Tensor, dilations=(1, 2, 3)) -> torch.Tensor:
    """Multi-scale MIND-SSC (pddreg.features.mind_ssc at several dilations): (B, 4*len, *S)."""
    from pddreg.features.mind import mind_ssc

    return torch.cat([mind_ssc(image, radius=1, dilation=d) for d in dilations], 1)


def smooth_field(shape, amplitude, seed, cps=6):
    """(1, 2, *shape) random smooth displacement (voxels), max about ``amplitude``."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 2, cps, cps, generator=g)
    u = F.interpolate(coarse, size=shape, mode="bicubic", align_corners=False)
    return u * (amplitude / u.abs().amax())


def warp2d(img: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """img (1,C,H,W) warped by u (1,2,H,W) in voxels: out(x) = img(x + u(x))."""
    H, W = img.shape[2:]
    y, x = torch.meshgrid(torch.arange(H.__int__()), torch.arange(W.__int__()), indexing="ij")
    gy = 2 * (y + u[0, 0]) / (H - 1) - 1
    gx = 2 * (x + u[0, 1]) / (W - 1) - 1
    grid = torch.stack([gx, gy], -1)[None].to(img.dtype)
    return F.grid_sample(img, grid, align_corners=True, padding_mode="border")


def make_case(seed: int, image: np.ndarray | None = None, amplitude: float = 8.0):
    """A registration case on the MRI: fixed(x) = moving(x + u(x)) with u known.

    Features at half resolution (128^2), control grid 64^2 (stride 2 in the feature map).
    Returns (feat_fixed at grid, feat_moving, true displacement at the grid in feature voxels,
    mask of grid points inside the head).
    """
    img = torch.from_numpy(mri_slice() if image is None else image)[None, None]
    u = smooth_field(tuple(img.shape[2:]), amplitude, seed)
    g = torch.Generator().manual_seed(100 + seed)
    fixed = warp2d(img, u) + 0.02 * torch.randn(img.shape, generator=g)
    moving = img + 0.02 * torch.randn(img.shape, generator=g)
    fixed, moving = F.avg_pool2d(fixed, 2), F.avg_pool2d(moving, 2)
    ff, fm = features(fixed), features(moving)
    ff_grid = F.avg_pool2d(ff, 2)  # point k at (k + 0.5) * 2 - 0.5 of the feature map
    u_grid = F.interpolate(u, size=(64, 64), mode="bilinear", align_corners=False) / 2.0
    mask = F.interpolate(img, size=(64, 64), mode="area")[0, 0] > 0.1
    return ff_grid, fm, u_grid, mask


def epe(cost, u_true, mask, radius):
    disp = soft_field(cost, radius)
    err = (disp - u_true).norm(dim=1)[0]
    return float(err[mask].mean())


# ------------------------------------------------------------------------------------------
# Sections


def bench_lecture_2d(repeats: int) -> dict:
    torch.manual_seed(0)
    ff = torch.rand(1, 24, 80, 64)
    fm = torch.rand(1, 24, 80, 64)
    alpha = torch.tensor(DEFAULT_ALPHA)
    with torch.no_grad():
        ref = lecture_chain(ff, fm, alpha)
        ours = regularise(correlation(ff, fm, 5), alpha)
        diff = float((ours - ref).abs().max() / ref.abs().max())
        t_lec, c_lec = best_time(lambda: lecture_chain(ff, fm, alpha), repeats)
        t_ours, c_ours = best_time(lambda: regularise(correlation(ff, fm, 5), alpha), repeats)
        os.environ["PDDREG_NATIVE"] = "0"
        try:
            ref_torch = regularise(correlation(ff, fm, 5), alpha)
            diff_torch = float((ref_torch - ref).abs().max() / ref.abs().max())
            t_torch, _ = best_time(lambda: regularise(correlation(ff, fm, 5), alpha), repeats)
        finally:
            os.environ.pop("PDDREG_NATIVE")
    ffg = ff.clone().requires_grad_()

    def ours_grad():
        regularise(correlation(ffg, fm, 5), alpha).sum().backward()

    def lec_grad():
        lecture_chain(ffg, fm, alpha).sum().backward()

    t_og, _ = best_time(ours_grad, repeats)
    t_lg, _ = best_time(lec_grad, repeats)
    return {
        "max_rel_diff": diff,
        "lecture_s": t_lec,
        "ours_s": t_ours,
        "ours_torch_s": t_torch,
        "max_rel_diff_torch": diff_torch,
        "speedup": t_lec / t_ours,
        "lecture_cpu_s": c_lec,
        "ours_cpu_s": c_ours,
        "grad_lecture_s": t_lg,
        "grad_ours_s": t_og,
        "grad_speedup": t_lg / t_og,
    }


def child_3d(mode: str, threads: int) -> None:
    """Runs in a fresh process; prints one JSON line."""
    from pddreg.cost import _native

    torch.set_num_threads(threads)
    _native.available()  # build the kernels (once per source version) before timing
    torch.manual_seed(0)
    grad = mode != "no_grad"
    ff = torch.rand(1, 16, 32, 32, 32, requires_grad=grad)
    fm = torch.rand(1, 16, 32, 32, 32, requires_grad=grad)
    alpha = torch.tensor(DEFAULT_ALPHA, requires_grad=grad)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.set_grad_enabled(grad):
            cost = regularise(correlation(ff, fm, 7), alpha)
            disp = soft_field(cost, 7)
            t_fwd = time.perf_counter() - t0
            if mode == "grad_backward":
                disp.square().mean().backward()
        times.append((time.perf_counter() - t0, time.process_time() - c0, t_fwd))
        del cost, disp
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = min(times)
    print(
        json.dumps(
            {
                "mode": mode,
                "wall_s": best[0],
                "cpu_s": best[1],
                "forward_s": best[2],
                "peak_rss_delta_mb": (rss1 - rss0) / 1024.0,
            }
        )
    )


def bench_3d(threads: int) -> list[dict]:
    """no_grad with the native kernels and without them (PDDREG_NATIVE=0), then autograd."""
    out = []
    for mode, native in (("no_grad", "1"), ("no_grad", "0"), ("grad_backward", "1")):
        res = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--threads", str(threads)],
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, PDDREG_NATIVE=native),
        )
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["native"] = native == "1"
        out.append(row)
    return out


def bench_minconv() -> dict:
    ff, fm, _, _ = make_case(0)
    with torch.no_grad():
        cost = correlation(ff, fm, 6)
        approx = minconv(cost)
        exact = minconv_exact(cost, EXACT_WEIGHT)
    d = (approx - exact).abs()
    return {
        "weight": EXACT_WEIGHT,
        "channels": ff.shape[1],
        "cost_mean": float(cost.mean()),
        "cost_std": float(cost.std()),
        "mean_abs_diff": float(d.mean()),
        "max_abs_diff": float(d.max()),
        "mean_rel_to_cost_std": float(d.mean() / cost.std()),
    }


def calibrate() -> None:
    """Grid search of the six weights (and the exact min-conv weight) on the MRI cases."""
    cases = [make_case(s, amplitude=a) for s in range(3) for a in (8.0, 14.0)]
    radius = 6
    with torch.no_grad():
        costs = [(correlation(ff, fm, radius), u, m) for ff, fm, u, m in cases]
    print(f"channels {cases[0][0].shape[1]}, grid 64x64, radius {radius}, {len(cases)} cases")
    before = [float(u.norm(dim=1)[0][m].mean()) for _, u, m in costs]
    print(f"EPE before: {np.mean(before[0::2]):.3f} (small), {np.mean(before[1::2]):.3f} (large)")
    results = []
    grid = itertools.product((0.25, 0.5, 1.0), (0.0, 0.25, 0.5), (0.5, 1, 2, 4), (4, 8, 16, 32, 64))
    with torch.no_grad():
        for a0, a2, a4, a5 in grid:
            alpha = [a0, 1.0, a2, 1.0, float(a4), float(a5)]
            e = [epe(regularise(c, torch.tensor(alpha)), u, m, radius) for c, u, m in costs]
            results.append((float(np.mean(e)), np.mean(e[0::2]), np.mean(e[1::2]), alpha))
        results.sort(key=lambda r: r[0])
        for r in results[:10]:
            print(f"  EPE {r[0]:.3f} (small {r[1]:.3f}, large {r[2]:.3f})  alpha {r[3]}")
        e_def = np.mean([epe(regularise(c), u, m, radius) for c, u, m in costs])
        e_ex = np.mean([epe(regularise(c, exact=True), u, m, radius) for c, u, m in costs])
        print(f"DEFAULT_ALPHA {DEFAULT_ALPHA}: EPE {e_def:.3f}; with exact=True: {e_ex:.3f}")
        print("exact min-convolution weight (mean |approx - exact| on the same costs):")
        for w in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0):
            d = np.mean([float((minconv(c) - minconv_exact(c, w)).abs().mean()) for c, *_ in costs])
            print(f"  weight {w}: {d:.4f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calibrate", action="store_true")
    p.add_argument("--skip-3d", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_3d(args.child, args.threads)
        return 0
    torch.set_num_threads(args.threads)
    if args.calibrate:
        calibrate()
        return 0
    print(f"torch {torch.__version__}, {args.threads} threads, load average {load():.1f}")
    r = bench_lecture_2d(args.repeats)
    print("1. 2D lecture scale (C=24, grid 80x64, 11x11 displacements), correlation + regularise")
    print(
        f"   max relative difference to the lecture's formulation: {r['max_rel_diff']:.2e}"
        f" (PyTorch kernels: {r['max_rel_diff_torch']:.2e})"
    )
    print(
        f"   no_grad: lecture {r['lecture_s'] * 1e3:.1f} ms, ours {r['ours_s'] * 1e3:.1f} ms"
        f" -> {r['speedup']:.1f}x faster (CPU {r['lecture_cpu_s'] * 1e3:.1f} vs"
        f" {r['ours_cpu_s'] * 1e3:.1f} ms)"
    )
    print(
        f"   with the PyTorch kernels (PDDREG_NATIVE=0): {r['ours_torch_s'] * 1e3:.1f} ms"
        f" -> {r['lecture_s'] / r['ours_torch_s']:.1f}x faster than the lecture"
    )
    print(
        f"   forward+backward: lecture {r['grad_lecture_s'] * 1e3:.1f} ms, ours"
        f" {r['grad_ours_s'] * 1e3:.1f} ms -> {r['grad_speedup']:.1f}x"
    )
    if not args.skip_3d:
        print(
            "2. 3D abdominal scale (C=16, grid 32^3, features 32^3, 15^3 displacements):"
            " correlation + regularise + soft_field, fresh subprocess each"
        )
        rows = bench_3d(args.threads)
        for res in rows:
            native = res["native"] and res["mode"] == "no_grad" and native_ok()
            kernels = "native" if native else "PyTorch"
            print(
                f"   {res['mode']:>13} ({kernels:>7} kernels): wall {res['wall_s']:.2f} s"
                f" (forward {res['forward_s']:.2f} s),"
                f" CPU {res['cpu_s']:.2f} s, peak RSS +{res['peak_rss_delta_mb']:.0f} MB"
            )
        print(
            f"   native vs PyTorch kernels (no_grad): {rows[1]['wall_s'] / rows[0]['wall_s']:.1f}x"
            f" faster; (load average now {load():.1f} on {os.cpu_count()} cores)"
        )
    m = bench_minconv()
    print(
        f"3. approximate vs exact min-convolution (weight {m['weight']} per squared step), SSD of"
        f" {m['channels']}-channel MIND on a brain MRI (cost mean {m['cost_mean']:.2f},"
        f" std {m['cost_std']:.2f}):"
    )
    print(
        f"   mean |approx - exact| {m['mean_abs_diff']:.4f} ({m['mean_rel_to_cost_std']:.1%} of"
        f" the cost std), max {m['max_abs_diff']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
