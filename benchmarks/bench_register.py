"""PDD-Net inference time / peak memory and training throughput, 2D and 3D.

    python benchmarks/bench_register.py [--threads 2] [--quick]

Cases (each in its own child process, so that its peak resident memory is its own):
- ``infer2d``: ``pretrained(2).register`` on a 320x256 phantom pair (target < 100 ms on 2 cores);
- ``infer3d``: ``pretrained(3).register`` on a 192x160x256 pair (target < 5 s and < 4 GB);
- ``train2d`` / ``train3d``: training steps (forward + backward + Adam) of the shipped
  configuration, pairs per second (2D: batch 4 of 160x160; 3D: batch 1 of 64^3 crops).
Without shipped weights the shipped configuration is used with random weights (same cost).
Times are the median of repeated runs after a warm-up; the machine is shared, so compare
ratios rather than absolute numbers.

Measured 2026-11-25 with ``--quick`` while the 2 cores ran ~10 other jobs (so 5-10x slow):
infer2d 3.4 s (the same call took 0.29 s single-threaded at a quieter moment; profile:
correlation+regularisation ~60%, convolutions ~15%); infer3d 65-130 s, peak RSS 2.9 GB
(a 96x80x128 volume took 3.3 s single-threaded); train2d 0.19 pairs/s; train3d 0.05 pairs/s.
Targets (100 ms 2D, 5 s 3D) were not met on this machine; see the final report.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _model(ndim: int):
    from pddreg.errors import InputError
    from pddreg.models import PDDNet, default_config, pretrained

    try:
        return pretrained(ndim), True
    except InputError:
        return PDDNet(default_config(ndim)).eval(), False


def _pair(shape: tuple[int, ...]):
    import torch

    from pddreg.data import make_phantom

    fi, _ = make_phantom(1, ndim=len(shape), shape=shape)
    mi, _ = make_phantom(2, ndim=len(shape), shape=shape)
    return torch.as_tensor(fi)[None, None], torch.as_tensor(mi)[None, None]


def case_infer(ndim: int, repeats: int) -> dict:
    import torch

    shape = (320, 256) if ndim == 2 else (192, 160, 256)
    model, shipped = _model(ndim)
    f, m = _pair(shape)
    base = _rss_mb()
    model.register(f, m)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            disp = model.register(f, m)
        times.append(time.perf_counter() - t0)
    return {
        "case": f"infer{ndim}d",
        "shape": list(shape),
        "shipped_weights": shipped,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_mb": _rss_mb(),
        "peak_delta_mb": _rss_mb() - base,
        "finite": bool(torch.isfinite(disp).all()),
    }


def case_train(ndim: int, steps: int) -> dict:
    import torch

    from pddreg.models import PDDNet, default_config
    from pddreg.train.synth import SynthConfig, synth_pair

    shape = (160, 160) if ndim == 2 else (64, 64, 64)
    batch = 4 if ndim == 2 else 1
    gen = torch.Generator().manual_seed(0)
    pairs = [synth_pair(SynthConfig(shape=shape, num_labels=12), gen) for _ in range(batch)]
    f, m, fs, ms = (torch.stack(x) for x in zip(*pairs, strict=True))
    model = PDDNet(default_config(ndim)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        loss, _ = model.training_loss(f, m, fs, ms, 12)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {
        "case": f"train{ndim}d",
        "shape": list(shape),
        "batch": batch,
        "median_step_s": t,
        "pairs_per_s": batch / t,
        "peak_rss_mb": _rss_mb(),
    }


def run_child(case: str, threads: int, quick: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--threads", str(threads)]
    if quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"case": case, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--cases", nargs="+", default=["infer2d", "infer3d", "train2d", "train3d"])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        kind, ndim = args.child[:-2], int(args.child[-2])
        if kind == "infer":
            res = case_infer(ndim, 3 if args.quick or ndim == 3 else 10)
        else:
            res = case_train(ndim, 2 if args.quick else 5)
        print(json.dumps(res))
        return 0
    print(f"threads: {args.threads}")
    for case in args.cases:
        res = run_child(case, args.threads, args.quick)
        if "error" in res:
            print(f"{case}: failed: {res['error']}")
        elif case.startswith("infer"):
            target = "100 ms" if case == "infer2d" else "5 s, 4 GB"
            print(
                f"{case} {tuple(res['shape'])}: median {res['median_s'] * 1000:.0f} ms "
                f"(min {res['min_s'] * 1000:.0f} ms), peak RSS {res['peak_rss_mb']:.0f} MB "
                f"(+{res['peak_delta_mb']:.0f} MB during registration), "
                f"shipped weights: {res['shipped_weights']}  [target < {target}]"
            )
        else:
            print(
                f"{case} {tuple(res['shape'])} batch {res['batch']}: "
                f"{res['median_step_s']:.2f} s/step, {res['pairs_per_s']:.2f} pairs/s, "
                f"peak RSS {res['peak_rss_mb']:.0f} MB"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
