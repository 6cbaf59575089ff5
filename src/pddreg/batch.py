"""Batch registration: ``pddreg batch PAIRS -o OUT`` registers every pair of a table.

``PAIRS`` is a CSV table with a header row naming the columns ``fixed`` and ``moving`` and
optionally ``fixed_seg`` / ``moving_seg`` (label maps; also ``fixed_labels`` /
``moving_labels``), ``fixed_mask`` / ``moving_mask``, ``fixed_landmarks`` / ``moving_landmarks``
(CSV point files) and ``name`` (the pair's output folder); relative paths are read relative to
the table's folder (else to the working folder). It may also be a Learn2Reg ``*_dataset.json``:
its ``registration_val`` and ``registration_test`` pairs (``--split``), with the label maps and
masks found next to the images (``imagesTr`` -> ``labelsTr`` / ``masksTr``).

``OUT`` receives one folder per pair holding exactly what ``pddreg register`` writes (plus
``batch.json``: the row and the settings it was made with) and ``summary.csv`` /
``summary.json``: one row per pair with its status (``done``, ``skipped``: complete from an
earlier run with the same settings, ``failed``) and its metrics.

Faults: a pair folder appears only complete (it is written as a hidden temporary folder that
is renamed into place), so a batch killed at any moment and run again finds every finished
pair complete, skips it, removes the temporary folders of the killed run and registers the
rest. Bad rows (missing files, empty cells) and pairs whose registration refuses its input
are reported, one line each, and the other pairs finish; the exit status is then 2.

Under ``torchrun --nproc_per_node N`` each process registers every N-th pending pair (on its
own GPU, ``cuda:LOCAL_RANK``, or on the CPU); rank 0 decides which pairs are pending before any
process starts and writes the summary, so every pair is written exactly once.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import inspect
import json
import logging
import math
import os
import re
import shutil
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, PddregError
from .methods import DEFAULT_METHOD

__all__ = [
    "SUMMARY_COLUMNS",
    "BatchResult",
    "PairSpec",
    "read_pairs",
    "run_batch",
]

logger = logging.getLogger(__name__)

#: Column names accepted in a pairs table (first: the field of :class:`PairSpec`).
COLUMNS: dict[str, tuple[str, ...]] = {
    "fixed": ("fixed", "fixed_image"),
    "moving": ("moving", "moving_image"),
    "fixed_seg": ("fixed_seg", "fixed_labels", "fixed_label"),
    "moving_seg": ("moving_seg", "moving_labels", "moving_label"),
    "fixed_mask": ("fixed_mask",),
    "moving_mask": ("moving_mask",),
    "fixed_landmarks": ("fixed_landmarks", "fixed_points"),
    "moving_landmarks": ("moving_landmarks", "moving_points"),
    "name": ("name", "pair", "id"),
}
_FILES = (
    "fixed",
    "moving",
    "fixed_seg",
    "moving_seg",
    "fixed_mask",
    "moving_mask",
    "fixed_landmarks",
    "moving_landmarks",
)

#: Columns of ``summary.csv`` (``summary.json`` holds the same rows).
SUMMARY_COLUMNS = (
    "name",
    "row",
    "status",
    "error",
    "fixed",
    "moving",
    "method",
    "runtime_s",
    "mean_dice_before",
    "mean_dice",
    "mean_hd95",
    "sdlogj",
    "folding_fraction",
    "affine_mode",
    "output",
    "rank",
)

#: Name of the file in each pair folder that records how the pair was made.
RECORD = "batch.json"
SPLITS = ("all", "val", "test", "train")


@dataclass
class PairSpec:
    """One row of a pairs table.

    Attributes:
        row: the row's number in the table (1 = the first row after the header) or the entry's
            number in the Learn2Reg json.
        name: the pair's output folder (unique within the table).
        fixed, moving: image paths.
        fixed_seg, moving_seg, fixed_mask, moving_mask, fixed_landmarks, moving_landmarks:
            optional paths (None when the column is absent or the cell empty).
        problem: why the row cannot be registered (a missing file, an empty cell), or None.
    """

    row: int
    name: str
    fixed: str
    moving: str
    fixed_seg: str | None = None
    moving_seg: str | None = None
    fixed_mask: str | None = None
    moving_mask: str | None = None
    fixed_landmarks: str | None = None
    moving_landmarks: str | None = None
    problem: str | None = None


@dataclass
class BatchResult:
    """What :func:`run_batch` returns (the same on every process).

    Attributes:
        rows: one summary row per pair, in table order (:data:`SUMMARY_COLUMNS`).
        errors: one line per failed pair, ``"<pairs file> row <n>: <file>: <problem>"``.
        summary: the paths of ``summary.csv`` and ``summary.json``.
        internal_errors: pairs that failed on an unexpected error (a bug, not their input).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    summary: dict[str, Path] = field(default_factory=dict)
    internal_errors: int = 0

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r["status"] == status)


# ----------------------------------------------------------------------------- reading pairs
def _key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._") or "pair"
    return name[:120]


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".npy", ".mha", ".nrrd", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _resolve(cell: str, base: Path) -> str:
    p = Path(cell).expanduser()
    if p.is_absolute():
        return str(p)
    here = base / p
    if here.exists() or not p.exists():
        return str(here)
    return str(p)  # relative to the working folder


def _unique_names(specs: list[PairSpec]) -> None:
    seen: dict[str, int] = {}
    for s in specs:
        base = s.name
        if base in seen:
            s.name = f"{base}-row{s.row}"
        seen[base] = seen.get(base, 0) + 1


def _check_files(spec: PairSpec) -> None:
    if spec.problem is not None:
        return
    for key in _FILES:
        path = getattr(spec, key)
        if path is not None and not os.path.exists(path):
            spec.problem = f"{path}: no such file ({key})"
            return


def _read_csv(path: Path) -> list[PairSpec]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the pairs table ({err})") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputError(f"{path}: the pairs table is empty (expected a header fixed,moving)")
    try:
        reader = csv.reader(lines)
        header = [_key(h) for h in next(reader)]
        body = list(reader)
    except csv.Error as err:
        raise InputError(f"{path}: not a CSV table ({err})") from None
    index: dict[str, int] = {}
    for field_name, aliases in COLUMNS.items():
        for alias in aliases:
            if alias in header:
                index[field_name] = header.index(alias)
                break
    missing = [c for c in ("fixed", "moving") if c not in index]
    if missing:
        raise InputError(
            f"{path}: no {' and no '.join(repr(c) for c in missing)} column (header: "
            f"{','.join(header)}); the table needs the columns fixed,moving and optionally "
            "fixed_seg,moving_seg,fixed_mask,moving_mask,fixed_landmarks,moving_landmarks,name"
        )
    unknown = [h for h in header if h and not any(h in a for a in COLUMNS.values())]
    if unknown:
        logger.warning("%s: ignoring the unknown columns %s", path, ", ".join(unknown))
    if not body:
        raise InputError(f"{path}: the pairs table holds a header but no pairs")
    base = path.absolute().parent
    specs = []
    for n, cells in enumerate(body, start=1):
        values = {}
        for key, i in index.items():
            cell = cells[i].strip() if i < len(cells) else ""
            values[key] = cell or None
        problem = None
        for key in ("fixed", "moving"):
            if values[key] is None:
                problem = f"the {key!r} cell is empty"
                break
        files = {k: (_resolve(values[k], base) if values.get(k) else None) for k in _FILES}
        name = values.get("name") or (
            f"{_stem(values['fixed'] or 'fixed')}__{_stem(values['moving'] or 'moving')}"
        )
        spec = PairSpec(
            row=n,
            name=_safe_name(name),
            fixed=files["fixed"] or "",
            moving=files["moving"] or "",
            problem=problem,
            **{k: files[k] for k in _FILES[2:]},
        )
        _check_files(spec)
        specs.append(spec)
    return specs


def _read_learn2reg(path: Path, split: str) -> list[PairSpec]:
    from .data.learn2reg import case_id

    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read the Learn2Reg json ({err})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: not a Learn2Reg dataset json")
    keys = {
        "all": ("registration_val", "registration_test"),
        "val": ("registration_val",),
        "test": ("registration_test",),
        "train": ("training_paired_images",),
    }[split]
    entries = [e for k in keys for e in (meta.get(k) or [])]
    if not entries:
        raise InputError(f"{path}: lists no pairs in {' or '.join(keys)} (see --split)")
    root = path.absolute().parent

    def beside(image: str, folder: str) -> str | None:
        guess = image.replace("images", folder, 1)
        return guess if guess != image and os.path.exists(guess) else None

    specs = []
    for n, e in enumerate(entries, start=1):
        if not isinstance(e, dict) or "fixed" not in e or "moving" not in e:
            specs.append(PairSpec(n, f"entry{n}", "", "", problem="entry without fixed/moving"))
            continue
        fixed = _resolve(str(e["fixed"]), root)
        moving = _resolve(str(e["moving"]), root)
        spec = PairSpec(
            row=n,
            name=_safe_name(f"{case_id(fixed)}_{case_id(moving)}"),
            fixed=fixed,
            moving=moving,
            fixed_seg=beside(fixed, "labels"),
            moving_seg=beside(moving, "labels"),
            fixed_mask=beside(fixed, "masks"),
            moving_mask=beside(moving, "masks"),
        )
        _check_files(spec)
        specs.append(spec)
    return specs


def read_pairs(path: str | os.PathLike, split: str = "all") -> list[PairSpec]:
    """The pairs of a CSV table or a Learn2Reg ``*_dataset.json`` (see the module docstring).

    Rows that cannot be registered (an empty ``fixed``/``moving`` cell, a file that does not
    exist) are returned with their :attr:`PairSpec.problem` set.

    Args:
        path: ``.csv`` table or ``.json`` Learn2Reg dataset file.
        split: Learn2Reg only: ``"all"`` (``registration_val`` and ``registration_test``),
            ``"val"``, ``"test"`` or ``"train"`` (``training_paired_images``).

    Raises:
        InputError: the file is missing, unreadable, empty, lacks the ``fixed`` or ``moving``
            column, or is neither a CSV table nor a Learn2Reg json.
    """
    p = Path(path)
    if split not in SPLITS:
        raise InputError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if not p.exists():
        raise InputError(f"{p}: no such pairs file")
    if p.is_dir():
        found = sorted(p.glob("*_dataset.json"))
        if len(found) != 1:
            raise InputError(f"{p}: a folder, but not of one Learn2Reg *_dataset.json")
        p = found[0]
    suffix = p.name.lower()
    if suffix.endswith(".json"):
        specs = _read_learn2reg(p, split)
    elif suffix.endswith((".csv", ".txt")):
        specs = _read_csv(p)
    else:
        raise InputError(
            f"{p}: unsupported pairs file type (expected a .csv table or a Learn2Reg "
            "*_dataset.json)"
        )
    _unique_names(specs)
    return specs


# ----------------------------------------------------------------------------- one pair
def _settings(
    method: str, model: Any, affine: str, same_grid: bool, instance_opt: bool | None
) -> dict[str, Any]:
    """What a pair folder must have been made with to be skipped on a rerun."""
    model_id = None
    if method == "pdd":
        if isinstance(model, (str, os.PathLike)):
            p = Path(model)
            try:
                st = p.stat()
                model_id = f"{p.absolute()}:{st.st_size}:{int(st.st_mtime)}"
            except OSError:
                model_id = str(p.absolute())
        elif model is None:
            model_id = "shipped"
        else:
            model_id = f"object:{type(model).__name__}"
    return {
        "method": method,
        "model": model_id,
        "affine": affine,
        "same_grid": bool(same_grid),
        "instance_opt": instance_opt,
    }


def _complete(folder: Path, settings: dict[str, Any], spec: PairSpec) -> dict[str, Any] | None:
    """The metrics of a finished pair folder made with ``settings`` (every file readable),
    else None."""
    try:
        record = json.loads((folder / RECORD).read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        meta = json.loads((folder / "transform.json").read_text())
        disp = np.load(folder / "disp.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if record.get("settings") != settings:
        return None
    if (record.get("fixed"), record.get("moving")) != (spec.fixed, spec.moving):
        return None
    expected = (int(meta.get("ndim", -1)), *[int(s) for s in meta.get("fixed_shape", [])])
    if tuple(disp.shape) != expected:
        return None
    for name in record.get("files", []):
        if not (folder / name).is_file():
            return None
    return metrics


def _summary_row(
    spec: PairSpec, status: str, metrics: dict[str, Any] | None, output: str, rank: int
) -> dict[str, Any]:
    m = metrics or {}
    return {
        "name": spec.name,
        "row": spec.row,
        "status": status,
        "error": None,
        "fixed": spec.fixed,
        "moving": spec.moving,
        "method": m.get("method"),
        "runtime_s": m.get("runtime_s"),
        "mean_dice_before": m.get("mean_dice_before"),
        "mean_dice": m.get("mean_dice"),
        "mean_hd95": m.get("mean_hd95"),
        "sdlogj": m.get("sdlogj"),
        "folding_fraction": m.get("folding_fraction"),
        "affine_mode": m.get("affine_mode"),
        "output": output,
        "rank": rank,
    }


def _register_kwargs() -> set[str]:
    from .api import register

    return set(inspect.signature(register).parameters)


class _PairRunner:
    """Registers pairs with settings fixed for the batch; models are loaded once per ndim."""

    def __init__(
        self,
        method: str,
        model: Any,
        device: Any,
        affine: str,
        same_grid: bool,
        instance_opt: bool | None,
        max_memory: int | None,
    ) -> None:
        self.method = method
        self.model_arg = model
        self.device = device
        self.affine = affine
        self.same_grid = same_grid
        self.instance_opt = instance_opt
        self.max_memory = max_memory
        self._models: dict[int, Any] = {}
        self._loaded = None
        self._accepts = _register_kwargs()
        self._noted_landmarks = False
        if method == "pdd" and model is not None and not _is_module(model):
            from .models import load_model

            self._loaded = load_model(os.fspath(model), map_location="cpu")  # once, here

    def model_for(self, ndim: int) -> Any:
        if self.method != "pdd":
            return None
        if self._loaded is not None:
            return self._loaded
        if _is_module(self.model_arg):
            return self.model_arg
        if ndim not in self._models:
            from .models import pretrained

            self._models[ndim] = pretrained(ndim)
        return self._models[ndim]

    def register(self, spec: PairSpec, out: Path, record: dict[str, Any]) -> dict[str, Any]:
        """Register one pair and write its folder ``out`` (atomically); returns its metrics."""
        from . import cli
        from .api import register
        from .data.io import read_image, read_labels

        fixed = read_image(spec.fixed)
        moving = read_image(spec.moving)
        fseg = read_labels(spec.fixed_seg) if spec.fixed_seg else None
        mseg = read_labels(spec.moving_seg) if spec.moving_seg else None
        model = self.model_for(fixed.ndim)
        if model is not None:
            cfg_ndim = getattr(getattr(model, "config", None), "ndim", None)
            if cfg_ndim is not None and int(cfg_ndim) != fixed.ndim:
                where = self.model_arg if self.model_arg is not None else "the shipped model"
                raise InputError(
                    f"{where}: the model is {cfg_ndim}D but the images of this pair are "
                    f"{fixed.ndim}D"
                )
        kwargs: dict[str, Any] = {
            "method": self.method,
            "model": model,
            "fixed_seg": fseg,
            "moving_seg": mseg,
            "device": self.device,
            "instance_opt": self.instance_opt,
            "affine": self.affine,
            "fixed_mask": spec.fixed_mask,
            "moving_mask": spec.moving_mask,
            "same_grid": self.same_grid,
        }
        if self.max_memory is not None:
            kwargs["max_memory"] = self.max_memory
        for key in ("fixed_landmarks", "moving_landmarks"):
            value = getattr(spec, key)
            if value is None:
                continue
            if key in self._accepts:
                kwargs[key] = value
            elif not self._noted_landmarks:
                self._noted_landmarks = True
                logger.info(
                    "landmark columns are ignored: this version's register() takes no landmarks"
                )
        kwargs = {k: v for k, v in kwargs.items() if k in self._accepts}
        result = register(fixed, moving, **kwargs)
        args = argparse.Namespace(
            fixed=spec.fixed,
            moving=spec.moving,
            fixed_seg=spec.fixed_seg,
            moving_seg=spec.moving_seg,
            fixed_mask=spec.fixed_mask,
            moving_mask=spec.moving_mask,
            same_grid=self.same_grid,
        )
        with cli.atomic_output_dir(out, (*cli._REGISTER_OUTPUTS, RECORD)) as tmp:
            cli._write_register_outputs(tmp, result, fixed, moving, args)
            files = sorted(p.name for p in tmp.iterdir())
            doc = {**record, "files": files, "written": _now()}
            _write_text(tmp / RECORD, json.dumps(doc, indent=2) + "\n")
        return json.loads((out / "metrics.json").read_text())


def _is_module(x: Any) -> bool:
    try:
        from torch import nn
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, nn.Module)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write ({err.strerror or err})") from None


# ----------------------------------------------------------------------------- processes
class _World:
    """This process's rank among ``torchrun`` processes (1 process without torchrun)."""

    def __init__(self) -> None:
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        self.dist: Any = None
        if self.size > 1:
            import torch.distributed as dist

            self.dist = dist
            if not dist.is_initialized():
                # gloo: only Python objects travel (the pairs, the summary rows); a week's
                # timeout, since ranks wait for each other at the end of the batch
                dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
                self.owned = True
            self.size = dist.get_world_size()
            self.rank = dist.get_rank()

    def broadcast(self, obj: Any) -> Any:
        if self.dist is None:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if self.dist is None:
            return [obj]
        out: list[Any] = [None] * self.size
        self.dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owned and self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _device_for(device: Any, world: _World) -> Any:
    """``cuda`` without an index becomes this process's GPU (``LOCAL_RANK``) under torchrun."""
    if device is None:
        from .api import default_device

        device = default_device()
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and world.size > 1:
        count = torch.cuda.device_count()
        if count:
            dev = torch.device("cuda", world.local_rank % count)
            torch.cuda.set_device(dev)
    return dev


def _clear_pair_folder(folder: Path) -> None:
    """Remove an earlier, incomplete or outdated pair folder; refuse to touch anything else."""
    if folder.is_dir() and not folder.is_symlink():
        names = {p.name for p in folder.iterdir()}
        if not names or names & {RECORD, "transform.json", "metrics.json", "disp.npy"}:
            shutil.rmtree(folder)
            return
    raise InputError(
        f"{folder}: exists and is not a pair folder of pddreg batch (rename it, or give the "
        "pair another name)"
    )


def _remove_stale(out: Path) -> None:
    """Remove the temporary folders and files a killed run left in ``out``."""
    for p in out.iterdir():
        if p.name.startswith(".") and ".tmp" in p.name:
            logger.info("removing %s (left by an interrupted run)", p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _write_summary(out: Path, rows: list[dict[str, Any]]) -> dict[str, Path]:
    import io

    def cell(v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, float):
            return "" if not math.isfinite(v) else f"{v:.6g}"
        return v

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SUMMARY_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: cell(r.get(k)) for k in SUMMARY_COLUMNS})
    paths = {"csv": out / "summary.csv", "json": out / "summary.json"}
    _write_text(paths["csv"], buf.getvalue())
    _write_text(paths["json"], json.dumps(rows, indent=2) + "\n")
    return paths


def run_batch(
    pairs: str | os.PathLike | Sequence[PairSpec],
    output: str | os.PathLike,
    method: str = DEFAULT_METHOD,
    model: Any = None,
    *,
    device: Any = None,
    split: str = "all",
    affine: str = "auto",
    same_grid: bool = False,
    instance_opt: bool | None = None,
    max_memory: int | str | None = None,
    progress: bool = True,
) -> BatchResult:
    """Register every pair of ``pairs`` into ``output`` (see the module docstring).

    Args:
        pairs: a pairs table or Learn2Reg json (:func:`read_pairs`), or the pairs themselves.
        output: the output folder (created; pairs complete from an earlier run are kept).
        method: ``"mind"``, ``"pdd"`` or ``"none"`` (as :func:`pddreg.register`).
        model: for ``pdd``: a saved model's path or a model object; loaded once per process.
        device: where to register (None: CUDA when available; under torchrun ``cuda`` means
            this process's GPU).
        split: which pairs of a Learn2Reg json (:func:`read_pairs`).
        affine, same_grid, instance_opt: as :func:`pddreg.register`.
        max_memory: memory budget of one registration (bytes or ``"4G"``): a pair whose
            estimate exceeds it fails with a message naming the memory it needs.
        progress: a progress bar on rank 0 (on a terminal).

    Returns:
        :class:`BatchResult`; a failed pair does not raise.

    Raises:
        InputError: problems of the whole batch, before anything is written: the pairs file
            (missing, unreadable, no ``fixed``/``moving`` column), the model file, the options.
    """
    from .api import METHODS

    if method not in METHODS:
        raise InputError(f"--method: unknown method {method!r} (choose from {', '.join(METHODS)})")
    budget = None
    if max_memory is not None:
        from .memory import parse_memory

        budget = parse_memory(max_memory)
    source = str(pairs) if isinstance(pairs, (str, os.PathLike)) else "pairs"
    specs = read_pairs(pairs, split) if isinstance(pairs, (str, os.PathLike)) else list(pairs)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    runner = _PairRunner(method, model, device, affine, same_grid, instance_opt, budget)
    world = _World()
    try:
        dev = _device_for(device, world)
        runner.device = dev
        settings = _settings(method, model, affine, same_grid, instance_opt)
        result = _run(specs, source, out, runner, settings, world, progress)
    finally:
        world.close()
    return result


def _prepare(
    specs: list[PairSpec], out: Path, settings: dict[str, Any], rows: dict[int, dict[str, Any]]
) -> list[int]:
    """Rank 0, before any process writes: create ``out``, remove what a killed run left, and
    find the pairs still to register (the complete ones go into ``rows`` as skipped)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{out}: cannot create the output folder ({err.strerror})") from None
    _remove_stale(out)
    pending = []
    for i, spec in enumerate(specs):
        if spec.problem is not None:
            continue
        done = _complete(out / spec.name, settings, spec)
        if done is not None:
            rows[i] = _summary_row(spec, "skipped", done, spec.name, -1)
        else:
            pending.append(i)
    logger.info(
        "%d pairs: %d complete from an earlier run, %d to register, %d bad rows",
        len(specs),
        len(rows),
        len(pending),
        sum(1 for s in specs if s.problem is not None),
    )
    return pending


def _run(
    specs: list[PairSpec],
    source: str,
    out: Path,
    runner: _PairRunner,
    settings: dict[str, Any],
    world: _World,
    progress: bool,
) -> BatchResult:
    from tqdm.auto import tqdm

    rows: dict[int, dict[str, Any]] = {}
    pending: list[int] = []
    problem = None
    if world.rank == 0:
        try:
            pending = _prepare(specs, out, settings, rows)
        except InputError as err:  # told to every process, so that none waits for rank 0
            problem = str(err)
    pending, problem, rows = world.broadcast((pending, problem, rows))
    if problem is not None:
        raise InputError(problem)
    mine = pending[world.rank :: world.size]
    own: dict[int, dict[str, Any]] = {}
    internal = 0
    bar = tqdm(
        total=len(mine),
        desc="batch" if world.size == 1 else f"batch rank 0/{world.size}",
        unit="pair",
        disable=True if (not progress or world.rank != 0) else None,
        dynamic_ncols=True,
    )
    failures = 0
    for i in mine:
        spec = specs[i]
        folder = out / spec.name
        record = {
            "row": spec.row,
            "fixed": spec.fixed,
            "moving": spec.moving,
            "settings": settings,
            "rank": world.rank,
        }
        start = time.perf_counter()
        try:
            if folder.exists():  # incomplete or made with other settings: made again
                _clear_pair_folder(folder)
            metrics = runner.register(spec, folder, record)
            row = _summary_row(spec, "done", metrics, spec.name, world.rank)
        except PddregError as err:
            failures += 1
            row = _summary_row(spec, "failed", None, "", world.rank)
            row["error"] = " ".join(str(err).split())
            logger.info("%s row %d failed: %s", source, spec.row, row["error"])
        except Exception as err:  # noqa: BLE001 - one pair's bug must not end the batch
            failures += 1
            internal += 1
            row = _summary_row(spec, "failed", None, "", world.rank)
            row["error"] = f"internal error: {type(err).__name__}: {' '.join(str(err).split())}"
            logger.error("%s row %d: internal error\n%s", source, spec.row, traceback.format_exc())
        if row["status"] == "done":
            logger.info(
                "%s row %d (%s): %.2f s", source, spec.row, spec.name, time.perf_counter() - start
            )
        own[i] = row
        bar.update(1)
        if failures:
            bar.set_postfix(failed=failures)
    bar.close()
    gathered = world.gather((own, internal))
    for part, _ in gathered:
        rows.update(part)
    internal = sum(n for _, n in gathered)
    for i, spec in enumerate(specs):
        if spec.problem is not None:
            row = _summary_row(spec, "failed", None, "", -1)
            row["error"] = spec.problem
            rows[i] = row
    ordered = [rows[i] for i in range(len(specs))]
    errors = [f"{source} row {r['row']}: {r['error']}" for r in ordered if r["status"] == "failed"]
    summary: dict[str, Path] = {}
    if world.rank == 0:
        summary = _write_summary(out, ordered)
    if world.dist is not None:
        world.dist.barrier()
    return BatchResult(ordered, errors, summary, internal)


# ----------------------------------------------------------------------------- command line
