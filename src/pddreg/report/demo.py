"""``pddreg demo``: the whole method end to end on the built-in abdominal phantoms.

1. the dataset ``phantom2d`` (40 subjects, 8 held out, as the lecture's tutorial) at
   :data:`SHAPE` (see there why not the phantoms' default 256x320);
2. a brief fine-tuning of the shipped 2D PDD-Net (:func:`pddreg.models.pretrained`) with the
   weakly supervised (label) loss on the training subjects (:func:`pddreg.train.train`);
3. the held-out pairs registered with ``none``, ``mind`` and ``pdd``; the results table;
4. figures (the lecture's four panels, deformation grid, Jacobian map) and ``report.html``.

Repeatable for a given seed: torch seeded (the phantoms and the training have their own seeded
generators), deterministic algorithms on the CPU, a fixed number of training steps (not a time
budget). The default step count keeps the whole demo within 5 minutes on 2 CPU cores
(measured; see :data:`DEFAULT_STEPS`).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_STEPS", "DemoConfig", "DemoResult", "run_demo"]

#: Phantom slice size. The default 256x320 phantoms differ by inter-subject deformations of
#: tens of pixels, beyond the capture range of the default ``mind`` and ``pdd`` settings
#: (measured on the 12 held-out pairs, seed 0: none 0.350, mind 0.356, shipped pdd 0.380 mean
#: Dice at 256x320; none 0.350, mind 0.462, shipped pdd 0.419 at 128x160), and every step
#: costs 4x more; the lecture-style demo therefore runs at half resolution.
SHAPE = (128, 160)
#: Fine-tuning steps of the full demo and of ``--quick``, pairs per step and learning rate.
DEFAULT_STEPS = 600
QUICK_STEPS = 60
TRAIN_BATCH = 2
TRAIN_LR = 3e-3
#: Intra-op threads. The demo's tensors are small (128x160); on a 2-core machine shared with
#: other work, two threads made a training step 6x slower in CPU time than one (measured:
#: 12 steps 13.8 s vs 2.2 s), so the demo runs single-threaded, which also fixes the order
#: of reductions (repeatable numbers).
THREADS = 1
METHODS = ("none", "mind", "pdd")


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (None: the full or ``quick`` default)."""

    output: str | os.PathLike[str] = "pddreg_demo"
    seed: int = 0
    quick: bool = False
    subjects: int | None = None
    held_out: int | None = None
    steps: int | None = None
    max_pairs: int | None = None
    figure_pairs: int = 2
    device: str | None = None
    init: str | None = None
    progress: bool = True

    def resolved(self) -> DemoConfig:
        """A copy with every None replaced by its default."""
        q = self.quick
        return DemoConfig(
            output=self.output,
            seed=self.seed,
            quick=q,
            subjects=self.subjects or (16 if q else 40),
            held_out=self.held_out or (4 if q else 8),
            steps=self.steps if self.steps is not None else (QUICK_STEPS if q else DEFAULT_STEPS),
            max_pairs=self.max_pairs,
            figure_pairs=self.figure_pairs,
            device=self.device or "cpu",
            init=self.init,
            progress=self.progress,
        )


@dataclass
class DemoResult:
    """What :func:`run_demo` made."""

    table: str
    rows: list[dict[str, Any]]
    report: Path
    figures: list[Path] = field(default_factory=list)
    runtime_s: float = 0.0


@contextmanager
def _repeatable(seed: int, device: torch.device, threads: int) -> Iterator[None]:
    """Seed torch, use deterministic algorithms on the CPU and ``threads`` intra-op threads;
    the previous settings are restored afterwards (the phantoms have their own seeded
    generators, training its own generator)."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_threads = torch.get_num_threads()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
        torch.set_num_threads(was_threads)


def _fine_tune(dataset: Any, cfg: DemoConfig, device: torch.device) -> tuple[Any, float]:
    """The initial 2D model (shipped, or ``cfg.init``) fine-tuned for ``cfg.steps`` steps."""
    from ..models import default_config, load_model, pretrained
    from ..train import TrainConfig, train

    model = pretrained(2) if cfg.init is None else load_model(cfg.init, map_location="cpu")
    if cfg.init is None:
        # The shipped file smooths its fields heavily for use without training; fine-tuning on
        # labels trains with the training smoothing (pddreg.models.pdd.SHIPPED_SMOOTH_2D).
        model.config.smooth = default_config(2).smooth
    if not cfg.steps:
        return model.to(device).eval(), 0.0
    start = time.perf_counter()
    tc = TrainConfig(
        steps=cfg.steps,
        batch=TRAIN_BATCH,
        lr=TRAIN_LR,
        seed=cfg.seed,
        device=str(device),
        val_every=0,
        val_pairs=4,
        progress=cfg.progress,
    )
    model = train(dataset, tc, model=model)
    return model.to(device).eval(), time.perf_counter() - start


def _pair_tensors(dataset: Any, i: int, j: int, device: torch.device) -> tuple[Any, ...]:
    fixed, moving = dataset.subject(i), dataset.subject(j)
    f = torch.as_tensor(np.asarray(fixed.image, dtype=np.float32))[None, None].to(device)
    m = torch.as_tensor(np.asarray(moving.image, dtype=np.float32))[None, None].to(device)
    return fixed, moving, f, m


def _keeping_first(fn: Any, count: int, kept: list[torch.Tensor]) -> Any:
    """``fn`` that also keeps its first ``count`` fields (for the figures; no second run)."""

    def wrapped(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        disp = fn(fixed, moving)
        if len(kept) < count:
            kept.append(disp.detach())
        return disp

    return wrapped


def _display_row(row: dict[str, Any]) -> dict[str, Any]:
    """A summary row of :func:`pddreg.report.evaluate.summarise` as the report shows it."""
    out: dict[str, Any] = {"method": row["method"], "pairs": row.get("pairs")}
    out.update({k.split(":", 1)[1]: v for k, v in row.items() if k.startswith("dice:")})
    mean, std = row.get("dice_mean", math.nan), row.get("dice_std", math.nan)
    out["mean Dice"] = f"{mean:.3f} \u00b1 {std:.3f}"
    out["large"] = row.get("dice_large")
    out["small"] = row.get("dice_small")
    out["HD95 mm"] = row.get("hd95")
    out["SDlogJ"] = row.get("sdlogj")
    out["% folding"] = row.get("folding_pct")
    out["s / pair"] = row.get("time")
    return out


def run_demo(config: DemoConfig | None = None) -> DemoResult:
    """Run the demo (see the module docstring) and write its outputs to ``config.output``:
    ``report.html``, ``results.{txt,csv,json}``, ``pairs.json`` and ``figures/*.png``, all at
    once when everything succeeded (other files in the folder are left alone)."""
    from .. import __version__
    from ..api import make_register_fn
    from ..cli import atomic_output_dir
    from ..data import open_dataset
    from .evaluate import (
        evaluate_method,
        format_table,
        label_names,
        summarise,
        write_records,
        write_results,
    )
    from .html import write_report

    t0 = time.perf_counter()
    cfg = (config or DemoConfig()).resolved()
    device = torch.device(cfg.device)
    shape = "x".join(map(str, SHAPE))
    spec = f"phantom2d:n={cfg.subjects},held_out={cfg.held_out},seed={cfg.seed},shape={shape}"
    dataset = open_dataset(spec)
    logger.info("dataset %s: %d subjects", spec, len(dataset))
    pairs = list(dataset.pairs("test"))[: cfg.max_pairs]
    records: list[dict[str, Any]] = []
    kept: dict[str, list[torch.Tensor]] = {}
    with _repeatable(cfg.seed, device, THREADS):
        model, train_s = _fine_tune(dataset, cfg, device)
        fns = {
            "none": make_register_fn("none", 2, device=device),
            "mind": make_register_fn("mind", 2, device=device),
            # the fine-tuned network alone: what the labels taught it
            "pdd": make_register_fn("pdd", 2, model=model, device=device, instance_opt=False),
        }
        for name, fn in fns.items():
            kept[name] = []
            fn = _keeping_first(fn, cfg.figure_pairs, kept[name])
            records += evaluate_method(
                dataset, name, fn, pairs, device=device, progress=cfg.progress
            )
    rows = summarise(records, label_names=label_names(dataset))
    table = format_table(rows)
    settings = {
        "dataset": spec,
        "held-out (test) pairs": len(pairs),
        "fine-tuning steps": cfg.steps,
        "fine-tuning pairs per step": TRAIN_BATCH,
        "fine-tuning learning rate": TRAIN_LR,
        "fine-tuning time s": round(train_s, 1),
        "initial model": cfg.init or "shipped pdd2d.pt",
        "seed": cfg.seed,
        "device": str(device),
        "torch threads": THREADS,
        "pddreg": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    owned = ("report.html", "results.*", "pairs.json", "figures")
    with atomic_output_dir(cfg.output, owned) as tmp:
        write_results(rows, tmp)
        write_records(records, tmp / "pairs.json")
        pictures = _write_figures(tmp / "figures", dataset, pairs, kept, cfg.figure_pairs, device)
        write_report(
            tmp / "report.html",
            title="pddreg demo: discrete registration on abdominal phantoms",
            notes=[
                "Held-out phantom pairs registered with no registration (none), the "
                "training-free MIND-SSC discrete registration (mind) and the shipped 2D PDD-Net "
                f"fine-tuned briefly on the training subjects (pdd). Dice over {len(pairs)} "
                "pairs.",
            ],
            table_rows=[_display_row(r) for r in rows],
            table_text=table,
            figures=pictures,
            settings=settings,
        )
        figures = sorted(p.relative_to(tmp) for p in (tmp / "figures").glob("*.png"))
    out = Path(cfg.output)
    runtime = time.perf_counter() - t0
    logger.info("demo finished in %.1f s", runtime)
    return DemoResult(
        table=table,
        rows=rows,
        report=out / "report.html",
        figures=[out / p for p in figures],
        runtime_s=runtime,
    )


def _write_figures(
    fig_dir: Path,
    dataset: Any,
    pairs: list[tuple[int, int]],
    kept: dict[str, list[torch.Tensor]],
    count: int,
    device: torch.device,
) -> list[tuple[str, list[Any]]]:
    """Four-panel figures of every method, grid and Jacobian of mind and pdd, for the first
    ``count`` pairs; returns the report sections."""
    from ..spatial import warp, warp_labels
    from .figures import save_pair_figures
    from .html import ReportFigure

    sections = []
    for p, (i, j) in enumerate(pairs[:count]):
        fixed, moving, _, m = _pair_tensors(dataset, i, j, device)
        mseg = torch.as_tensor(np.asarray(moving.labels, dtype=np.int64))[None, None].to(device)
        figs: list[ReportFigure] = []
        for name in METHODS:
            d = kept[name][p]
            kinds = ("pair",) if name == "none" else ("pair", "grid", "jacobian")
            paths = save_pair_figures(
                fig_dir,
                f"pair{p}_{name}",
                fixed.image,
                moving.image,
                warp(m, d)[0, 0].cpu().numpy(),
                d[0].cpu().numpy(),
                fixed_seg=fixed.labels,
                warped_seg=warp_labels(mseg, d)[0, 0].cpu().numpy(),
                title=f"{name}: fixed {fixed.name}, moving {moving.name}",
                kinds=kinds,
            )
            figs += [ReportFigure(f"{name}: {paths[k].name}", paths[k]) for k in kinds]
        sections.append((f"Pair {p}: fixed {fixed.name}, moving {moving.name}", figs))
    return sections
