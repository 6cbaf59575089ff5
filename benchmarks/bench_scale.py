"""Scale: batch registration and training over processes, and the memory budget of 3D runs.

    python benchmarks/bench_scale.py [--quick] [--device cpu] [-o RESULTS.md]

Sections (every measurement in its own child process, started by ``torchrun`` where it has
several processes, so that start-up, peak memory and threads are its own):

- **batch**: ``pddreg.batch.run_batch`` (``mind``) on ``--pairs`` 2D phantom pairs, pairs per
  second with 1 process x 1 thread, 1 process x 2 threads and 2 processes x 1 thread
  (``torchrun --nproc_per_node 2``); the time of the loop only (after imports and a warm-up
  registration), so start-up is not counted;
- **train**: ``pddreg.train.train`` of the shipped 2D PDD-Net configuration on phantom slices,
  training pairs per second (forward, backward, Adam) with 1 and 2 processes (DDP, gloo on the
  CPU; each process ``--batch`` pairs per step), after ``--warmup`` steps;
- **memory**: a 3D ``mind`` registration of ``--memory-shape`` under ``--max-memory``: the
  estimate (:func:`pddreg.memory.estimate_registration`), the budget and the measured peak
  (resident memory on the CPU, from ``/proc/self/status`` VmHWM reset before the call; on CUDA
  ``torch.cuda.max_memory_reserved``); then ``--big-shape``, which cannot fit the same budget:
  refused before it allocates (time and memory of the refusal, and the message);
- **calibration** (``--calibrate SHAPES``): the estimate against the measured peak for a few
  sizes and ``--method``.

Ratios are measured in one run; the machine may be shared, so compare them rather than the
absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
#: OMP_WAIT_POLICY of the children (--wait-policy; None: inherited).
WAIT_POLICY: str | None = None


# --------------------------------------------------------------------------- helpers
def _hwm_reset() -> int:
    """Reset the peak resident memory of this process (Linux); returns the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status()[1]


def _status() -> tuple[int, int]:
    text = Path("/proc/self/status").read_text()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) * 1024
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) * 1024
    return hwm, rss


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.lower().split("x"))


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _child(args: list[str], nproc: int, threads: int, port: int, timeout: float = 900) -> dict:
    """Run this script's worker ``args`` in ``nproc`` processes; rank 0's JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PDDREG_BENCH_THREADS": str(threads)}
    if WAIT_POLICY:
        env["OMP_WAIT_POLICY"] = WAIT_POLICY
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_port", str(port), str(HERE), *args, "--result", result]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(Path(result).read_text())
    os.unlink(result)
    return out


def _write_result(path: str, doc: dict) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        Path(path).write_text(json.dumps(doc))


# --------------------------------------------------------------------------- workers
def worker_batch(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("PDDREG_BENCH_THREADS", "1")))
    from pddreg.api import register
    from pddreg.batch import run_batch
    from pddreg.data.io import read_image

    rows = [ln.split(",") for ln in Path(a.table).read_text().splitlines()[1:]]
    f, m = read_image(rows[0][0]), read_image(rows[0][1])
    register(f, m, method=a.method, device=a.device)  # warm-up (kernels, caches)
    t0 = time.perf_counter()
    res = run_batch(a.table, a.out, method=a.method, device=a.device, progress=False)
    wall = time.perf_counter() - t0
    done = res.count("done")
    assert done == len(rows), res.errors
    _write_result(a.result, {"pairs": done, "wall_s": wall, "pairs_per_s": done / wall})


def worker_train(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("PDDREG_BENCH_THREADS", "1")))
    from pddreg.data import open_dataset
    from pddreg.models import PDDNet, default_config
    from pddreg.train import TrainConfig, train

    dataset = open_dataset(f"phantom2d:n=16,held_out=4,seed=0,shape={a.train_shape}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    stamps: list[float] = []
    config = TrainConfig(
        steps=a.warmup + a.train_steps,
        batch=a.batch,
        seed=0,
        val_every=0,
        val_pairs=0,
        progress=False,
        device=a.device,
    )
    torch.manual_seed(0)
    train(
        dataset,
        config,
        PDDNet(default_config(2)),
        callback=lambda s, _: stamps.append(time.perf_counter()),
    )
    if dist.is_initialized():
        dist.destroy_process_group()
    if stamps:
        wall = stamps[-1] - stamps[a.warmup - 1]
        pairs = a.train_steps * a.batch * world
        _write_result(a.result, {"pairs": pairs, "wall_s": wall, "pairs_per_s": pairs / wall})


def _peak_during(fn, device):
    import torch

    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_reserved()
    rss0 = _hwm_reset()
    t0 = time.perf_counter()
    out, error = None, None
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - the refusal is the measured outcome
        error = err
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = _status()[0] - rss0
    if cuda:
        peak = torch.cuda.max_memory_reserved() - base
    return out, error, wall, peak


def worker_memory(a: argparse.Namespace) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("PDDREG_BENCH_THREADS", "1")))
    from scipy.ndimage import gaussian_filter

    from pddreg.api import register
    from pddreg.memory import estimate_registration

    shape = _shape(a.memory_shape)
    rng = np.random.default_rng(0)
    fixed = gaussian_filter(rng.random(shape).astype(np.float32), 2)
    moving = np.roll(fixed, 3, axis=0)
    small = tuple(slice(0, 16) for _ in shape)
    register(fixed[small].copy(), moving[small].copy(), method="mind", device=a.device)
    register(fixed[small].copy(), moving[small].copy(), method=a.method, device=a.device)
    est = estimate_registration(a.method, shape)
    res, err, wall, peak = _peak_during(
        lambda: register(
            fixed, moving, method=a.method, device=a.device, max_memory=a.max_memory, affine="off"
        ),
        a.device,
    )
    doc = {
        "shape": list(shape),
        "estimate": est.total,
        "parts": est.parts,
        "peak": peak,
        "wall_s": wall,
        "refused": None if err is None else str(err),
    }
    _write_result(a.result, doc)


def worker_refuse(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from pddreg.api import register
    from pddreg.memory import estimate_registration

    shape = _shape(a.big_shape)
    fixed = torch.rand(shape)  # the arrays exist; the registration must not allocate
    moving = torch.rand(shape)
    est = estimate_registration("mind", shape)
    _, err, wall, peak = _peak_during(
        lambda: register(fixed, moving, method="mind", device=a.device, max_memory=a.max_memory),
        a.device,
    )
    _write_result(
        a.result,
        {
            "shape": list(shape),
            "estimate": est.total,
            "peak": peak,
            "wall_s": wall,
            "refused": None if err is None else str(err),
        },
    )


WORKERS = {
    "batch": worker_batch,
    "train": worker_train,
    "memory": worker_memory,
    "refuse": worker_refuse,
}


# --------------------------------------------------------------------------- driver
def _make_pairs(folder: Path, n: int, shape: tuple[int, ...]) -> str:
    import numpy as np
    from PIL import Image

    from pddreg.data import make_phantom

    lines = ["fixed,moving"]
    for i in range(n):
        paths = []
        for j, seed in enumerate((2 * i + 1, 2 * i + 2)):
            img, _ = make_phantom(seed, ndim=2, shape=shape)
            p = folder / f"p{i}_{j}.png"
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(p)
            paths.append(str(p))
        lines.append(",".join(paths))
    table = folder / "pairs.csv"
    table.write_text("\n".join(lines) + "\n")
    return str(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer pairs and steps")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--pairs", type=int, default=12, help="batch pairs")
    p.add_argument("--shape", default="160x192", help="2D batch image size")
    p.add_argument("--method", default="mind", choices=("mind", "pdd", "none"))
    p.add_argument("--train-steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="training pairs per process and step")
    p.add_argument("--train-shape", default="96x112")
    p.add_argument("--memory-shape", default="80x80x80", help="3D registration under budget")
    p.add_argument("--big-shape", default="192x160x256", help="3D volume that cannot fit")
    p.add_argument("--max-memory", default="640M", help="budget of the memory section")
    p.add_argument("--sections", default="batch,train,memory", help="comma-separated")
    p.add_argument(
        "--calibrate",
        default="",
        metavar="SHAPES",
        help="also: estimate against measured peak for these shapes (e.g. 64x64x64,512x512) "
        "with --method (mind or pdd), each in a fresh process",
    )
    p.add_argument(
        "--wait-policy",
        choices=("ACTIVE", "PASSIVE"),
        default=None,
        help="OMP_WAIT_POLICY of the measured processes (default: inherited); PASSIVE stops "
        "idle OpenMP threads from spinning on cores other threads need",
    )
    p.add_argument("-o", "--output", default=None, help="append the markdown here")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--table", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        WORKERS[a.worker](a)
        return 0
    global WAIT_POLICY
    WAIT_POLICY = a.wait_policy
    if a.quick:
        a.pairs, a.train_steps = min(a.pairs, 6), min(a.train_steps, 6)
    sections = a.sections.split(",")
    lines = [f"## `python benchmarks/bench_scale.py {' '.join(argv or sys.argv[1:])}`", ""]
    import platform

    import torch

    lines.append(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, "
        f"{os.cpu_count()} cores, device {a.device}; torch {torch.__version__}; "
        f"OMP_WAIT_POLICY {a.wait_policy or os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
        f"load average {os.getloadavg()[0]:.1f}."
    )
    lines.append("")
    port = 29600 + os.getpid() % 200
    if "batch" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            table = _make_pairs(Path(tmp), a.pairs, _shape(a.shape))
            rows = []
            for nproc, threads in ((1, 1), (1, 2), (2, 1)):
                out = Path(tmp) / f"out{nproc}{threads}"
                args = ["--worker", "batch", "--table", table, "--out", str(out)]
                args += ["--method", a.method, "--device", a.device]
                r = _child(args, nproc, threads, port)
                port += 1
                rows.append((nproc, threads, r))
            base = rows[0][2]["pairs_per_s"]
            lines += [
                f"Batch registration (`{a.method}`, {a.pairs} pairs of {a.shape}, `run_batch`):",
                "",
                "| processes x threads | wall (s) | pairs/s | vs 1 x 1 |",
                "|---|---|---|---|",
            ]
            for nproc, threads, r in rows:
                lines.append(
                    f"| {nproc} x {threads} | {r['wall_s']:.2f} | {r['pairs_per_s']:.2f} | "
                    f"{r['pairs_per_s'] / base:.2f}x |"
                )
            lines.append("")
    if "train" in sections:
        rows = []
        for nproc in (1, 2):
            args = ["--worker", "train", "--train-steps", str(a.train_steps), "--warmup"]
            args += [str(a.warmup), "--batch", str(a.batch), "--train-shape", a.train_shape]
            args += ["--device", a.device]
            rows.append((nproc, _child(args, nproc, 1, port)))
            port += 1
        base = rows[0][1]["pairs_per_s"]
        lines += [
            f"Training (shipped 2D PDD-Net config, phantom slices {a.train_shape}, {a.batch} "
            f"pairs per process and step, {a.train_steps} steps after {a.warmup}):",
            "",
            "| processes (DDP) | global batch | wall (s) | pairs/s | vs 1 process |",
            "|---|---|---|---|---|",
        ]
        for nproc, r in rows:
            lines.append(
                f"| {nproc} | {nproc * a.batch} | {r['wall_s']:.2f} | {r['pairs_per_s']:.2f} | "
                f"{r['pairs_per_s'] / base:.2f}x |"
            )
        lines.append("")
    if "memory" in sections:
        from pddreg.memory import format_bytes, parse_memory

        budget = parse_memory(a.max_memory)
        args = ["--worker", "memory", "--memory-shape", a.memory_shape, "--max-memory"]
        args += [a.max_memory, "--method", "mind", "--device", a.device]
        fit = _child(args, 1, 1, port)
        port += 1
        args = ["--worker", "refuse", "--big-shape", a.big_shape, "--max-memory", a.max_memory]
        big = _child([*args, "--device", a.device], 1, 1, port)
        kind = "resident (CPU)" if a.device == "cpu" else "CUDA reserved"
        lines += [
            f"Memory budget `--max-memory {a.max_memory}` ({format_bytes(budget)}), 3D `mind`, "
            f"peak {kind} memory of the registration call:",
            "",
            "| volume | estimate | budget | measured peak | peak / budget | outcome | time (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in (fit, big):
            outcome = "registered" if r["refused"] is None else "refused before allocating"
            lines.append(
                f"| {'x'.join(map(str, r['shape']))} | {_mib(r['estimate'])} | {_mib(budget)} | "
                f"{_mib(r['peak'])} | {r['peak'] / budget:.2f} | {outcome} | {r['wall_s']:.2f} |"
            )
        lines.append("")
        if big["refused"]:
            lines += ["The refusal:", "", f"    pddreg: error: {big['refused']}", ""]
    if a.calibrate:
        lines += [
            f"Estimate against measured peak (`{a.method}`, no budget):",
            "",
            "| shape | estimate | measured peak | estimate / measured | time (s) |",
            "|---|---|---|---|---|",
        ]
        for shape in a.calibrate.split(","):
            args = ["--worker", "memory", "--memory-shape", shape, "--max-memory", "1T"]
            r = _child([*args, "--method", a.method, "--device", a.device], 1, 1, port)
            port += 1
            lines.append(
                f"| {shape} | {_mib(r['estimate'])} | {_mib(r['peak'])} | "
                f"{r['estimate'] / max(r['peak'], 1):.2f} | {r['wall_s']:.2f} |"
            )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if a.output:
        with open(a.output, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
