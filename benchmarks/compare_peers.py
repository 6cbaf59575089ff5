"""Compare pddreg's methods with the registration tools a user would pick instead.

On the same pairs, in one run: our methods (``none``, ``mind``, ``pdd`` = the shipped
pretrained PDD-Net, ``pdd+inst`` = the same with instance optimisation, and a PDD-Net and a
VoxelMorph-style continuous baseline both trained here on the same few subjects with the same
budget) against the peers, each an optional PyPI extra (``pip install -e ".[peers]"``) that is
skipped with a message when missing:

* ANTsPy SyN (``antspyx``): ``ants.registration(type_of_transform="SyN")`` (affine + SyN);
* SimpleITK: multi-resolution cubic B-spline (LBFGS2, mean squares) and fast symmetric
  forces demons;
* ConvexAdam (``convexadam``, 3D only; ``pip install --no-deps convexadam`` keeps our torch).

The peer wrappers are those of :mod:`pddreg.report.peers` (fields in our convention).

Every method gets the same images (float32 in ``[0, 1]``, unit voxel spacing, so all fields
are in voxels) and is scored by :mod:`pddreg.report.evaluate` (Dice, HD95 in mm, SDlogJ,
% folding). Time is wall-clock per pair; peak memory is the largest rise of the process's
resident set (sampled every 2 ms) over the call, or the CUDA peak on a GPU. All libraries
run with the same number of threads (``--threads``).

    nice -n 10 python benchmarks/compare_peers.py --dims 2 3 -o benchmarks/RESULTS.md

The 2D pairs come from ``phantom2d`` and the 3D pairs from ``phantom3d`` (any dataset spec of
:func:`pddreg.data.open_dataset` works through ``--dataset2d``/``--dataset3d``).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("compare_peers")

RegisterFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Largest rise of the resident set size (bytes) while the ``with`` block runs; on CUDA the
    peak of ``torch.cuda.max_memory_allocated`` above the start instead."""

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device = device
        self.interval = interval
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = _rss_bytes()
        self._max = self._start
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._max = max(self._max, _rss_bytes())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, _rss_bytes())
        self.peak = self._max - self._start


def with_memory(
    fn: RegisterFn, device: torch.device, peaks: list[int], cpu: list[float]
) -> RegisterFn:
    """``fn`` that appends its peak memory (bytes) to ``peaks`` and its process CPU time
    (seconds, all threads) to ``cpu``."""

    def wrapped(fixed: Tensor, moving: Tensor) -> Tensor:
        with PeakMemory(device) as pm:
            t0 = time.process_time()
            disp = fn(fixed, moving)
            cpu.append(time.process_time() - t0)
        peaks.append(pm.peak)
        return disp

    return wrapped


# --------------------------------------------------------------------------------------------
# peers: the wrappers of pddreg.report.peers (NumPy, our convention: (ndim, *S) in voxels,
# warped(x) = moving(x + u(x))) as functions of (1, 1, *S) tensors
# --------------------------------------------------------------------------------------------
def _np(x: Tensor) -> np.ndarray:
    return x[0, 0].detach().cpu().numpy().astype(np.float32)


def _out(u: np.ndarray, like: Tensor) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(u, dtype=np.float32))[None].to(like.device)


def _tensor_peer(name: str) -> RegisterFn:
    from pddreg.report import peers

    fn = peers.PEERS[name][1]

    def run(fixed: Tensor, moving: Tensor) -> Tensor:
        if name == "convexadam":
            return _out(fn(_np(fixed), _np(moving), device=fixed.device), fixed)
        return _out(fn(_np(fixed), _np(moving)), fixed)

    run.__name__ = name.replace("-", "_")
    return run


def _peer_table() -> dict[str, tuple[str, RegisterFn, tuple[int, ...]]]:
    from pddreg.report import peers

    return {
        name: (module, _tensor_peer(name), dims) for name, (module, _, dims) in peers.PEERS.items()
    }


PEERS: dict[str, tuple[str, RegisterFn, tuple[int, ...]]] = _peer_table()


def _available(module: str) -> str | None:
    """None when ``module`` imports, else the reason."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError or a broken install
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


# --------------------------------------------------------------------------------------------
# trained baselines
# --------------------------------------------------------------------------------------------
def train_here(dataset: Any, kind: str, ndim: int, steps: int, device: torch.device) -> Any:
    """Train a PDD-Net (the shipped configuration) or a VoxelMorph on ``dataset``'s training
    subjects with the same budget (steps, batch, learning rate, augmentation)."""
    from pddreg.train import TrainConfig, train

    model = None
    if kind == "pdd":  # the shipped configuration, fresh weights
        import copy

        from pddreg.models import PDDNet, PDDNetConfig, pretrained

        try:
            cfg = copy.deepcopy(pretrained(ndim).config)
        except Exception as exc:
            log.warning("no shipped %dD model (%s): default PDDNetConfig", ndim, exc)
            cfg = PDDNetConfig(ndim=ndim)
        model = PDDNet(cfg)
    config = TrainConfig(
        model="pdd" if kind == "pdd" else "voxelmorph",
        steps=steps,
        lr=1e-3,
        batch=2 if ndim == 2 else 1,
        seed=0,
        augment=True,
        val_every=steps,
        val_pairs=4,
        device=str(device),
        progress=False,
    )
    t0 = time.perf_counter()
    model = train(dataset, config, model=model)
    log.info("trained %s (%dD) for %d steps in %.0f s", kind, ndim, steps, time.perf_counter() - t0)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def run_dim(args: argparse.Namespace, ndim: int) -> tuple[list[dict[str, Any]], list[str]]:
    from pddreg.data import open_dataset
    from pddreg.report.evaluate import evaluate_method, label_names, make_register_fn, summarise

    device = torch.device(args.device)
    spec = args.dataset2d if ndim == 2 else args.dataset3d
    dataset = open_dataset(spec)
    pairs = list(dataset.pairs(args.split))[: args.pairs]
    notes = [f"dataset `{spec}`, split `{args.split}`: {len(pairs)} pairs"]
    log.info("%dD: %s", ndim, notes[0])

    methods: list[tuple[str, RegisterFn]] = []
    for name in args.ours:
        if name in ("pdd-here", "voxelmorph-here"):
            if args.train_steps <= 0:
                notes.append(f"`{name}` not run (--train-steps 0)")
                continue
            try:
                model = train_here(dataset, name.split("-")[0], ndim, args.train_steps, device)
            except Exception as exc:
                notes.append(f"`{name}` training failed: {type(exc).__name__}: {exc}")
                log.exception("training %s failed", name)
                continue
            notes.append(f"`{name}` trained for {args.train_steps} steps on the train split")
            methods.append((name, lambda f, m, model=model: model.register(f, m)))
            continue
        try:
            methods.append((name, make_register_fn(name, ndim, device)))
        except Exception as exc:
            notes.append(f"skipped `{name}`: {exc}")
            log.warning("skipped %s: %s", name, exc)
    for name in args.peers:
        module, fn, dims = PEERS[name]
        if ndim not in dims:
            continue
        why = _available(module)
        if why is not None:
            notes.append(f"skipped `{name}` (not installed: {why})")
            log.warning("skipped %s: %s", name, why)
            continue
        methods.append((name, fn))

    # pairs outer, methods inner: load changes on a shared machine hit every method alike
    records: list[dict[str, Any]] = []
    peaks: dict[str, list[int]] = {name: [] for name, _ in methods}
    cpu: dict[str, list[float]] = {name: [] for name, _ in methods}
    wrapped = {name: with_memory(fn, device, peaks[name], cpu[name]) for name, fn in methods}
    if args.warmup:  # first calls pay for imports, allocator growth, thread pools
        f0 = dataset.subject(pairs[0][0])
        x = torch.as_tensor(np.asarray(f0.image), dtype=torch.float32)[None, None].to(device)
        for name, fn in list(methods):
            try:
                fn(x, x)
            except Exception as exc:  # a peer failing must not lose the others' results
                notes.append(f"`{name}` failed: {type(exc).__name__}: {exc}".splitlines()[0])
                log.exception("%s failed", name)
                methods.remove((name, fn))
    for k, pair in enumerate(pairs):
        for name, _ in methods:
            try:
                rec = evaluate_method(dataset, name, wrapped[name], [pair], device=device)
            except Exception as exc:
                notes.append(f"`{name}` failed on pair {k}: {type(exc).__name__}: {exc}")
                log.exception("%s failed", name)
                continue
            records += rec
            log.info(
                "pair %d/%d %s: Dice %.3f, %.2f s",
                k + 1,
                len(pairs),
                name,
                rec[0]["mean_dice"],
                rec[0]["time"],
            )
    rows = summarise(records, label_names(dataset))
    for row in rows:
        p = peaks.get(row["method"], [])
        row["peak_mb"] = max(p) / 2**20 if p else float("nan")
        c = cpu.get(row["method"], [])
        row["cpu_time"] = float(np.mean(c)) if c else float("nan")
    return rows, notes


def _f(v: Any, d: int = 3) -> str:
    return "nan" if v is None or not np.isfinite(v) else f"{v:.{d}f}"


def markdown(rows: list[dict[str, Any]], ndim: int, notes: list[str]) -> str:
    from pddreg.report.evaluate import format_table

    lines = [f"### {ndim}D", ""]
    lines += [f"- {n}" for n in notes]
    lines += [
        "",
        "| method | Dice mean +- std | large | small | HD95 (mm) | SDlogJ | % folding "
        "| time/pair (s) | CPU time/pair (s) | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_f(r['dice_mean'])} +- {_f(r['dice_std'])} "
            f"| {_f(r['dice_large'])} | {_f(r['dice_small'])} | {_f(r['hd95'], 2)} "
            f"| {_f(r['sdlogj'])} | {_f(r['folding_pct'], 2)} | {_f(r['time'], 2)} "
            f"| {_f(r['cpu_time'], 2)} | {_f(r['peak_mb'], 0)} |"
        )
    if rows:
        lines += [
            "",
            f"Large structures (mean fixed volume >= {rows[0]['size_threshold']:.0f} mm^{ndim}): "
            f"{', '.join(rows[0]['large']) or '-'}; small: {', '.join(rows[0]['small']) or '-'}.",
            "",
            "Dice per structure:",
            "",
            "\n".join(
                line
                for line in format_table(rows, markdown=True).splitlines()
                if line.startswith("|")
            ),
        ]
        by = {r["method"]: r for r in rows}
        if "pdd" in by and "ants-syn" in by:
            p, a = by["pdd"], by["ants-syn"]
            lines += [
                "",
                f"pdd vs ANTs SyN: Dice {_f(p['dice_mean'])} vs {_f(a['dice_mean'])}, "
                f"{a['time'] / p['time']:.1f}x less wall-clock time and "
                f"{a['cpu_time'] / p['cpu_time']:.1f}x less CPU time per pair.",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=(2, 3))
    p.add_argument("--dataset2d", default="phantom2d:n=12,seed=0")
    p.add_argument("--dataset3d", default="phantom3d:n=8,seed=0")
    p.add_argument("--split", default="test")
    p.add_argument("--pairs", type=int, default=6, help="at most this many pairs per dimension")
    p.add_argument(
        "--ours",
        nargs="*",
        default=["none", "mind", "pdd", "pdd+inst", "pdd-here", "voxelmorph-here"],
    )
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    p.add_argument(
        "--train-steps", type=int, default=300, help="budget of pdd-here / voxelmorph-here"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("-o", "--output", type=Path, default=None, help="write the Markdown here")
    p.add_argument("--append", action="store_true", help="append to --output")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    torch.set_num_threads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    except ImportError:
        pass

    command = "python benchmarks/compare_peers.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    parts = [
        f"## `{command.strip()}`",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {args.threads} threads for every library, device {args.device}; "
        f"torch {torch.__version__}.",
        "",
    ]
    for ndim in args.dims:
        rows, notes = run_dim(args, ndim)
        parts.append(markdown(rows, ndim, notes))
        print(parts[-1], flush=True)
    text = "\n".join(parts)
    if args.output:
        if args.append and args.output.exists():
            text = args.output.read_text().rstrip("\n") + "\n\n" + text
        args.output.write_text(text)
        log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
