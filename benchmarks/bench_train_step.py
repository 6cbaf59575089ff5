"""Training throughput of the cost-volume operators: native backward kernels vs the PyTorch path.

    python benchmarks/bench_train_step.py                  # 3D step and 2D pairs/s, 2 threads
    python benchmarks/bench_train_step.py --only 3d        # or --only 2d
    python benchmarks/bench_train_step.py --repeat 2       # alternate the runs twice (noise)
    python benchmarks/bench_train_step.py --skip-torch-3d  # without the slow PyTorch 3D step
    python benchmarks/bench_train_step.py --only 3d --skip-torch-3d --keep-first-round
    python benchmarks/bench_train_step.py --baseline /work/main/src   # also "today": another
                                                   # source tree's PyTorch path (PYTHONPATH)

Prints, each figure from a fresh subprocess (so that the peak resident memory belongs to that
run alone: the kernel's high-water mark VmHWM, reset before the first step, minus the resident
memory then; ``resource`` ru_maxrss where /proc is missing):

1. One 3D training step at the abdominal scale of the issue: fixed features (1, 16, 32^3) at
   the control grid, moving features (1, 16, 32^3), 15^3 displacements (radius 7, spacing 1):
   ``correlation`` -> ``regularise`` (learned alpha) -> ``probabilities_and_field`` -> the
   non-local label loss (5 labels) on the probabilities + 0.1 * diffusion of the expected
   displacement -> ``backward`` (gradients of both feature maps and alpha).  Wall time of the
   first and of the best step (forward part, CPU seconds), peak RSS increase; native kernels
   against ``PDDREG_NATIVE=0``.
2. 2D training pairs per second of the shipped 2D model (``pddreg.models.default_config(2)``:
   lecture CNN, two levels, non-local + warped label loss) on 128x160 pairs, batch 4 (the
   pretraining batch), Adam steps: native kernels against ``PDDREG_NATIVE=0``.

The machine may be shared: the 1-minute load average is printed with each figure, and the
ratios (measured in the same run) are the comparable numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def load() -> float:
    return os.getloadavg()[0]


def _status(key: str) -> float | None:
    """A field of /proc/self/status in MB (None where it does not exist)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak() -> float:
    """Reset the peak-RSS mark where Linux allows it; returns the resident memory now (MB)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss = _status("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak() -> float:
    hwm = _status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def smooth_labels(shape, num_labels: int, seed: int):
    """(1, 1, *shape) int64 labels: quantised smooth noise (blobs of every label)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    nd = len(shape)
    coarse = torch.rand(1, 1, *[max(2, s // 8) for s in shape], generator=g)
    mode = "bilinear" if nd == 2 else "trilinear"
    u = F.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=False)
    u = (u - u.min()) / (u.max() - u.min() + 1e-12)
    return (u * num_labels).long().clamp(max=num_labels - 1)


def child_3d(threads: int, steps: int, keep_first_round: bool) -> dict:
    import torch

    from pddreg.cost import DEFAULT_ALPHA, _native, correlation, displacement_set, regularise
    from pddreg.losses import diffusion, nonlocal_label_loss

    try:
        from pddreg.cost import probabilities_and_field
    except ImportError:  # an older tree (--baseline): the two operators
        from pddreg.cost import expected_displacement, probabilities

        def probabilities_and_field(cost, disps):
            prob = probabilities(cost)
            return prob, expected_displacement(prob, disps)

    if keep_first_round:
        from pddreg.cost import _autograd

        _autograd.KEEP_FIRST_ROUND_BYTES = 1 << 62
    torch.set_num_threads(threads)
    native = _native.available()  # builds the kernels (once per source version) before timing
    torch.manual_seed(0)
    grid, radius, labels = (32, 32, 32), 7, 5
    ff = torch.rand(1, 16, *grid, requires_grad=True)
    fm = torch.rand(1, 16, *grid, requires_grad=True)
    alpha = torch.tensor(DEFAULT_ALPHA, requires_grad=True)
    fseg, mseg = smooth_labels(grid, labels, 1), smooth_labels(grid, labels, 2)
    disps = displacement_set(radius, 1.0, 3)

    def step() -> tuple[float, float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        cost = regularise(correlation(ff, fm, radius), alpha)
        prob, field = probabilities_and_field(cost, disps)
        del cost
        loss = nonlocal_label_loss(prob, fseg, mseg, labels, radius, moving_shape=grid)
        loss = loss + 0.1 * diffusion(field)
        del prob, field
        t1 = time.perf_counter()
        loss.backward()
        for t in (ff, fm, alpha):
            t.grad = None
        return time.perf_counter() - t0, t1 - t0, time.process_time() - c0

    rss0 = reset_peak()
    runs = [step() for _ in range(steps)]
    best = min(runs)
    return {
        "native": native,
        "first_s": runs[0][0],
        "wall_s": best[0],
        "forward_s": best[1],
        "cpu_s": best[2],
        "peak_mb": peak() - rss0,
        "load": load(),
    }


def child_2d(threads: int, steps: int, batch: int) -> dict:
    import torch

    from pddreg.cost import _native
    from pddreg.models import PDDNet, default_config

    torch.set_num_threads(threads)
    native = _native.available()
    torch.manual_seed(0)
    model = PDDNet(default_config(2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    shape = (128, 160)
    fixed = torch.rand(batch, 1, *shape)
    moving = torch.rand(batch, 1, *shape)
    fseg = torch.cat([smooth_labels(shape, 4, 10 + i) for i in range(batch)])
    mseg = torch.cat([smooth_labels(shape, 4, 20 + i) for i in range(batch)])

    def step() -> None:
        opt.zero_grad()
        loss, _ = model.training_loss(fixed, moving, fseg, mseg, 4)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up
        step()
    times, cpus = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    median = sorted(times)[len(times) // 2]
    cpu = sorted(cpus)[len(cpus) // 2]
    return {
        "native": native,
        "pairs_per_s": batch / median,
        "step_s": median,
        "cpu_ms": cpu * 1e3,
        "load": load(),
    }


def run_child(kind: str, native: bool, args, src: str | None = None) -> dict:
    env = dict(os.environ, PDDREG_NATIVE="1" if native else "0")
    if src is not None:  # another source tree first on the path (the baseline)
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--child", kind, "--threads", str(args.threads)]
    cmd += ["--steps", str(args.steps if native or kind == "2d" else args.torch_steps)]
    cmd += ["--steps-2d", str(args.steps_2d), "--batch-2d", str(args.batch_2d)]
    if args.keep_first_round:
        cmd.append("--keep-first-round")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--only", choices=("3d", "2d"), default=None)
    p.add_argument("--repeat", type=int, default=1, help="alternate the runs this many times")
    p.add_argument("--steps", type=int, default=3, help="3D native steps per run (best shown)")
    p.add_argument("--torch-steps", type=int, default=1, help="3D PyTorch-path steps per run")
    p.add_argument("--skip-torch-3d", action="store_true", help="no PyTorch-path 3D step")
    p.add_argument("--steps-2d", type=int, default=12, help="2D timed steps (median shown)")
    p.add_argument("--batch-2d", type=int, default=4)
    p.add_argument(
        "--baseline",
        default=None,
        metavar="SRC",
        help="also run the PyTorch path of the package in SRC (e.g. the main branch's src)",
    )
    p.add_argument(
        "--keep-first-round",
        action="store_true",
        help="native 3D: keep the first regularisation round for the backward (one more volume"
        " alive) instead of recomputing it (_autograd.KEEP_FIRST_ROUND_BYTES)",
    )
    p.add_argument("--child", choices=("3d", "2d"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "3d":
        print(json.dumps(child_3d(args.threads, args.steps, args.keep_first_round)))
        return 0
    if args.child == "2d":
        print(json.dumps(child_2d(args.threads, args.steps_2d, args.batch_2d)))
        return 0

    import torch

    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs")
    if args.only in (None, "3d"):
        print(
            "1. 3D training step: features 16 x 32^3 (fixed at the grid, moving), 15^3"
            " displacements, regularise, probabilities + field, non-local label loss + diffusion,"
            " backward"
        )
        for _ in range(args.repeat):
            runs = [("native", True, None)]
            if not args.skip_torch_3d:
                runs.append(("PyTorch", False, None))
                if args.baseline:
                    runs.append(("baseline", False, args.baseline))
            rows = []
            for name, native, src in runs:
                r = run_child("3d", native, args, src)
                rows.append((name, r))
                if name == "native" and not r["native"]:
                    name = "native (unavailable: PyTorch)"
                print(
                    f"   {name:>8}: step {r['wall_s']:.2f} s (first {r['first_s']:.2f} s,"
                    f" forward {r['forward_s']:.2f} s, CPU {r['cpu_s']:.2f} s),"
                    f" peak RSS +{r['peak_mb']:.0f} MB  [load {r['load']:.1f}]",
                    flush=True,
                )
            n = rows[0][1]
            for name, t in rows[1:]:
                print(
                    f"   native vs {name}: {t['wall_s'] / n['wall_s']:.1f}x faster,"
                    f" {t['peak_mb'] / max(n['peak_mb'], 1.0):.1f}x less peak memory"
                )
    if args.only in (None, "2d"):
        print(
            f"2. 2D training, shipped 2D config (default_config(2)), 128x160 pairs, batch"
            f" {args.batch_2d}, Adam steps (median of {args.steps_2d})"
        )
        for _ in range(args.repeat):
            runs = [("native", True, None), ("PyTorch", False, None)]
            if args.baseline:
                runs.append(("baseline", False, args.baseline))
            rows = []
            for name, native, src in runs:
                r = run_child("2d", native, args, src)
                rows.append((name, r))
                print(
                    f"   {name:>8}: {r['pairs_per_s']:.1f} pairs/s ({r['step_s'] * 1e3:.0f} ms per"
                    f" step, CPU {r['cpu_ms']:.0f} ms)  [load {r['load']:.1f}]",
                    flush=True,
                )
            n = rows[0][1]
            for name, t in rows[1:]:
                print(
                    f"   native vs {name}: {n['pairs_per_s'] / t['pairs_per_s']:.2f}x the pairs per"
                    f" second ({t['cpu_ms'] / n['cpu_ms']:.2f}x less CPU per step)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
