"""Evaluation of registration methods on a dataset: the ``pddreg evaluate`` subcommand.

Every pair of a split is registered with each method; the moving labels are warped (nearest)
and compared with the fixed labels. The table follows Table 1 of the PDD-Net paper: one row per
method with the Dice per label, the mean +- std of the per-pair mean Dice, HD95 (mm), the
standard deviation of the log Jacobian determinant (SDlogJ), the percentage of folding voxels
(``J <= 0``) and the run time per pair.

Structures are also grouped by size, as Xu et al. (TBME 2016) did for abdominal CT, where
registration was acceptable for the large organs (liver, spleen, kidneys, stomach) and too
inaccurate for the small ones (gallbladder, oesophagus, pancreas, adrenal glands, veins). A
label is *large* when its mean volume in the fixed images of the evaluated pairs is at least
the size threshold: :data:`LARGE_VOLUME_MM3` (100 mL) in 3D, :data:`LARGE_AREA_FRACTION`
of the image area in 2D (slices have no comparable physical size), or ``size_threshold`` in
mm^ndim when given.

Library use::

    records = evaluate_method(dataset, "mind", register_fn, dataset.pairs("test"))
    rows = summarise(records)
    text = format_table(rows)
    write_results(rows, "results/")

A ``register_fn`` maps ``(fixed (1, 1, *S), moving (1, 1, *S))`` float tensors in ``[0, 1]``
to a displacement ``(1, ndim, *S)`` in voxels (``warped(x) = moving(x + u(x))``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pddreg.errors import InputError

__all__ = [
    "LARGE_AREA_FRACTION",
    "LARGE_VOLUME_MM3",
    "METHODS",
    "RegisterFn",
    "evaluate_method",
    "format_table",
    "label_names",
    "make_register_fn",
    "model_register_fn",
    "run_evaluation",
    "structure_rows",
    "summarise",
    "write_records",
    "write_results",
]

logger = logging.getLogger(__name__)

RegisterFn = Callable[[Tensor, Tensor], Tensor]

#: 3D size threshold between small and large structures: 100 mL = 1e5 mm^3. Splits Xu et al.'s
#: abdominal organs into liver, spleen, kidneys, stomach (large) and gallbladder, oesophagus,
#: pancreas, adrenals, aorta/veins (small) at typical adult volumes.
LARGE_VOLUME_MM3 = 1.0e5
#: 2D size threshold, as a fraction of the slice area: 1%. In an axial abdominal slice with a
#: 40 cm field of view (1600 cm^2) that is 16 cm^2: liver, spleen, kidneys (20-30 cm^2) and
#: stomach are large; pancreas, gallbladder, adrenals and vessels (< 15 cm^2) are small.
LARGE_AREA_FRACTION = 0.01

#: Built-in methods of ``--method``.
METHODS = ("none", "mind", "pdd", "pdd+inst")


# --------------------------------------------------------------------------------------------
# register functions
# --------------------------------------------------------------------------------------------
def make_register_fn(name: str, ndim: int, device: str | torch.device | None = None) -> RegisterFn:
    """The ``register_fn`` of a built-in method.

    Args:
        name: ``"none"`` (zero field), ``"mind"`` (:func:`pddreg.optim.register_mind`),
            ``"pdd"`` (the shipped pretrained PDD-Net of dimension ``ndim``) or ``"pdd+inst"``
            (the same with instance optimisation).
        ndim: 2 or 3.
        device: where the pretrained model lives.
    """
    from pddreg.api import make_register_fn as api_register_fn

    if name not in METHODS:
        raise InputError(f"--method: unknown method {name!r}; expected one of {', '.join(METHODS)}")
    if name == "pdd+inst":
        return api_register_fn("pdd", ndim, device=device, instance_opt=True)
    if name == "pdd":
        return api_register_fn("pdd", ndim, device=device, instance_opt=False)
    return api_register_fn(name, ndim, device=device)


def model_register_fn(model: torch.nn.Module) -> RegisterFn:
    """``register_fn`` of a loaded model (anything with ``register(fixed, moving)``)."""
    model.eval()
    return lambda fixed, moving: model.register(fixed, moving)


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def _to_tensor(array: Any, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    t = torch.as_tensor(np.asarray(array) if not isinstance(array, Tensor) else array)
    return t.to(device=device, dtype=dtype)


def label_names(dataset: Any) -> dict[int, str]:
    """``{label: name}`` of a dataset's ``label_names`` (a dict or a sequence; {} if none)."""
    names = getattr(dataset, "label_names", None)
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    if isinstance(names, (list, tuple)):
        return {i: str(n) for i, n in enumerate(names)}
    return {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite_or_nan(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def evaluate_method(
    dataset: Any,
    name: str,
    register_fn: RegisterFn,
    pairs: Sequence[tuple[int, int]],
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Register every pair with ``register_fn`` and measure it.

    Args:
        dataset: a :class:`pddreg.data.RegistrationDataset` (``subject(i)`` with ``image``,
            ``labels``, ``spacing``, ``name``; ``num_labels``; ``label_names``).
        name: the method's name in the records.
        register_fn: ``(fixed (1,1,*S), moving (1,1,*S)) -> disp (1,ndim,*S)``; called with
            autograd enabled (instance optimisation needs it), so it should switch gradients
            off itself where it does not (``model.register`` does).
        pairs: ``(fixed_index, moving_index)`` pairs.
        device: device of the image tensors handed to ``register_fn`` (default CPU).
        progress: show a progress bar.

    Returns:
        one record per pair: ``method``, ``fixed``, ``moving`` (subject names), ``dice``,
        ``hd95`` (``{label: value}``, NaN where a label is missing), ``volume``
        (``{label: fixed volume in mm^ndim}``), ``domain`` (image volume in mm^ndim),
        ``mean_dice``, ``mean_hd95``, ``sdlogj``, ``folding`` (fraction), ``time`` (seconds,
        the call of ``register_fn`` only) and ``error`` (``None`` or the reason the field was
        unusable). A field with non-finite values gives NaN metrics and an ``error``. Where
        both subjects have landmarks (``dataset.landmarks(i)``, e.g. Learn2Reg keypoints) the
        record also holds ``tre_before`` and ``tre`` (mean target registration error in mm,
        :func:`pddreg.metrics.tre`) and ``landmarks`` (their number); pairs with landmarks
        need no label maps.
    """
    from pddreg.metrics import dice, hd95, jacobian_metrics, tre
    from pddreg.spatial import warp_labels

    dev = torch.device(device) if device is not None else torch.device("cpu")
    num_labels = int(getattr(dataset, "num_labels", 0) or 0)
    records: list[dict[str, Any]] = []
    iterator: Iterable[tuple[int, int]] = pairs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(pairs, desc=f"evaluate {name}", unit="pair")
    for fi, mi in iterator:
        fs, ms = dataset.subject(int(fi)), dataset.subject(int(mi))
        points = _pair_landmarks(dataset, int(fi), int(mi))
        unlabelled = fs.labels is None or ms.labels is None
        if unlabelled and points is None:
            raise InputError(
                f"dataset: subjects {fs.name!r} and {ms.name!r} need label maps to be evaluated "
                "(Learn2Reg test pairs have none: try --pairs val)"
            )
        fixed = _to_tensor(fs.image, torch.float32, dev)[None, None]
        moving = _to_tensor(ms.image, torch.float32, dev)[None, None]
        fixed_lab = np.zeros(fs.image.shape, np.int64) if unlabelled else fs.labels
        moving_lab = np.zeros(ms.image.shape, np.int64) if unlabelled else ms.labels
        fixed_seg = _to_tensor(fixed_lab, torch.int64, "cpu")[None, None]
        moving_seg = _to_tensor(moving_lab, torch.int64, "cpu")[None, None]
        ndim = fixed.dim() - 2
        spacing = tuple(float(s) for s in (fs.spacing or (1.0,) * ndim))
        labels = list(range(1, num_labels)) if num_labels > 1 and not unlabelled else None
        if unlabelled:
            labels = []
        elif labels is None:
            found = np.union1d(np.unique(fs.labels), np.unique(ms.labels))
            labels = [int(v) for v in found if v != 0]

        # no torch.no_grad() here: methods with instance optimisation need autograd inside
        _sync(dev)
        t0 = time.perf_counter()
        disp = register_fn(fixed, moving)
        _sync(dev)
        elapsed = time.perf_counter() - t0
        disp = torch.as_tensor(disp).detach().to("cpu", torch.float32)
        expected = (1, ndim, *fixed.shape[2:])
        if tuple(disp.shape) != expected:
            raise ValueError(
                f"evaluate_method(): method {name!r} returned a field of shape "
                f"{tuple(disp.shape)}, expected {expected}"
            )
        voxel = float(np.prod(spacing))
        fixed_np = fixed_seg[0, 0].numpy()
        volume = {lab: float((fixed_np == lab).sum()) * voxel for lab in labels}
        record: dict[str, Any] = {
            "method": name,
            "fixed": fs.name,
            "moving": ms.name,
            "volume": volume,
            "domain": float(fixed_np.size) * voxel,
            "ndim": ndim,
            "time": elapsed,
            "error": None,
        }
        if points is not None:
            zero = torch.zeros_like(disp[0])
            record["landmarks"] = int(points[0].shape[0])
            record["tre_before"] = float(tre(points[0], points[1], zero, spacing).mean())
            record["tre"] = math.nan
        if not torch.isfinite(disp).all():
            logger.warning("%s: non-finite displacement for pair %s/%s", name, fs.name, ms.name)
            record.update(
                dice={lab: math.nan for lab in labels},
                hd95={lab: math.nan for lab in labels},
                mean_dice=math.nan,
                mean_hd95=math.nan,
                sdlogj=math.nan,
                folding=math.nan,
                error="non-finite displacement",
            )
            records.append(record)
            continue
        if points is not None:
            record["tre"] = float(tre(points[0], points[1], disp[0], spacing).mean())
        warped = warp_labels(moving_seg, disp)[0, 0].numpy()
        scores = dice(fixed_np, warped, labels=labels, reference=moving_seg)
        d = {int(k): _finite_or_nan(v) for k, v in scores.items()}
        h = {
            int(k): _finite_or_nan(v)
            for k, v in hd95(fixed_np, warped, spacing=spacing, labels=labels).items()
        }
        jm = jacobian_metrics(disp[0])
        record.update(
            dice=d,
            hd95=h,
            mean_dice=_nanmean(d.values()),
            mean_hd95=_nanmean(h.values()),
            sdlogj=_finite_or_nan(jm["sdlogj"]),
            folding=_finite_or_nan(jm["folding_fraction"]),
        )
        records.append(record)
    return records


def _pair_landmarks(dataset: Any, fi: int, mi: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The landmarks of both subjects of a pair (voxels), or None where either has none."""
    get = getattr(dataset, "landmarks", None)
    if get is None:
        return None
    pf, pm = get(fi), get(mi)
    if pf is None or pm is None:
        return None
    if len(pf) != len(pm):
        logger.warning(
            "landmarks of subjects %d and %d differ in number (%d, %d): no TRE for the pair",
            fi,
            mi,
            len(pf),
            len(pm),
        )
        return None
    return np.asarray(pf, dtype=np.float64), np.asarray(pm, dtype=np.float64)


def _nanmean(values: Iterable[float]) -> float:
    v = np.asarray([x for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _nanstd(values: Iterable[float]) -> float:
    v = np.asarray([x for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.std()) if v.size else math.nan


def summarise(
    records: Sequence[dict[str, Any]],
    label_names: dict[int, str] | None = None,
    size_threshold: float | None = None,
) -> list[dict[str, Any]]:
    """One row per method (in order of first appearance) from :func:`evaluate_method` records.

    Row keys: ``method``, ``pairs``, ``failed`` (pairs with an unusable field), ``dice_mean``
    and ``dice_std`` (over pairs of the per-pair mean Dice, NaN ignored), ``dice:<label>`` per
    label (mean over pairs), ``hd95`` (mean of the per-pair mean HD95, mm), ``sdlogj``,
    ``folding_pct`` (percent of voxels with ``J <= 0``), ``time`` (seconds per pair),
    ``dice_large``/``dice_small`` (mean Dice of the large/small structures) and ``large`` /
    ``small`` (their label names). Labels are named ``label_names[label]`` or their number.

    The size threshold (mm^ndim) between small and large: ``size_threshold`` if given, else
    :data:`LARGE_VOLUME_MM3` in 3D and :data:`LARGE_AREA_FRACTION` of the image area in 2D;
    a label is large when its mean fixed volume over all records reaches it.
    """
    names = label_names or {}
    if not records:
        return []
    # structure sizes from every record (all methods see the same fixed images)
    _, large, small, size_threshold = _size_groups(records, size_threshold)

    def label_name(lab: int) -> str:
        return names.get(lab, str(lab))

    rows: list[dict[str, Any]] = []
    methods = list(dict.fromkeys(r["method"] for r in records))
    all_labels = sorted({int(k) for r in records for k in r.get("dice", {})})
    for m in methods:
        rs = [r for r in records if r["method"] == m]
        row: dict[str, Any] = {
            "method": m,
            "pairs": len(rs),
            "failed": sum(1 for r in rs if r.get("error")),
            "dice_mean": _nanmean(r["mean_dice"] for r in rs),
            "dice_std": _nanstd(r["mean_dice"] for r in rs),
        }
        per_label = {}
        for lab in all_labels:
            per_label[lab] = _nanmean(r["dice"].get(lab, math.nan) for r in rs)
            row[f"dice:{label_name(lab)}"] = per_label[lab]
        row["hd95"] = _nanmean(r["mean_hd95"] for r in rs)
        row["sdlogj"] = _nanmean(r["sdlogj"] for r in rs)
        row["folding_pct"] = 100.0 * _nanmean(r["folding"] for r in rs)
        row["time"] = _nanmean(r["time"] for r in rs)
        if any("tre" in r for r in records):
            row["tre_before"] = _nanmean(r.get("tre_before", math.nan) for r in rs)
            row["tre"] = _nanmean(r.get("tre", math.nan) for r in rs)
            row["tre_std"] = _nanstd(r.get("tre", math.nan) for r in rs)
        row["dice_large"] = _nanmean(per_label.get(lab, math.nan) for lab in large)
        row["dice_small"] = _nanmean(per_label.get(lab, math.nan) for lab in small)
        row["large"] = [label_name(lab) for lab in large]
        row["small"] = [label_name(lab) for lab in small]
        row["size_threshold"] = float(size_threshold)
        rows.append(row)
    return rows


def structure_rows(
    records: Sequence[dict[str, Any]],
    label_names: dict[int, str] | None = None,
    size_threshold: float | None = None,
) -> list[dict[str, Any]]:
    """Per-structure results grouped by size: one row per (method, label), large ones first.

    Keys: ``method``, ``structure``, ``label``, ``group`` (``"large"``/``"small"``),
    ``volume`` (mean fixed volume, mm^ndim), ``dice_mean``, ``dice_std``, ``hd95`` (means over
    pairs, NaN ignored). The threshold is the one of :func:`summarise`.
    """
    if not records:
        return []
    names = label_names or {}
    mean_volume, large, small, _ = _size_groups(records, size_threshold)
    rows = []
    for m in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == m]
        for group, labs in (("large", large), ("small", small)):
            for lab in labs:
                rows.append(
                    {
                        "method": m,
                        "structure": names.get(lab, str(lab)),
                        "label": lab,
                        "group": group,
                        "volume": mean_volume[lab],
                        "dice_mean": _nanmean(r["dice"].get(lab, math.nan) for r in rs),
                        "dice_std": _nanstd(r["dice"].get(lab, math.nan) for r in rs),
                        "hd95": _nanmean(r["hd95"].get(lab, math.nan) for r in rs),
                    }
                )
    return rows


def _size_groups(
    records: Sequence[dict[str, Any]], size_threshold: float | None
) -> tuple[dict[int, float], list[int], list[int], float]:
    """Mean fixed volume per label, the large and small labels, and the threshold used."""
    volumes: dict[int, list[float]] = {}
    domains = []
    for r in records:
        domains.append(float(r.get("domain", math.nan)))
        for lab, v in r.get("volume", {}).items():
            volumes.setdefault(int(lab), []).append(float(v))
    ndim = int(records[0].get("ndim", 3))
    if size_threshold is None:
        if ndim == 3:
            size_threshold = LARGE_VOLUME_MM3
        else:
            size_threshold = LARGE_AREA_FRACTION * _nanmean(domains)

    mean_volume = {lab: _nanmean(v) for lab, v in volumes.items()}
    large = sorted(lab for lab, v in mean_volume.items() if v >= size_threshold)
    small = sorted(lab for lab, v in mean_volume.items() if not v >= size_threshold)
    return mean_volume, large, small, float(size_threshold)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The results as a text (or Markdown) table like Table 1 of the PDD-Net paper.

    Columns: method, Dice per label, Dice mean +- std, Dice of large / small structures,
    HD95 (mm), SDlogJ, % folding, time per pair (s) and, for datasets with landmarks, the mean
    TRE before and after (mm). NaN prints as ``nan``.
    """
    if not rows:
        return "(no results)"
    label_cols = [k for k in rows[0] if k.startswith("dice:")]
    with_tre = any("tre" in r for r in rows)
    header = (
        ["method"]
        + [c[len("dice:") :] for c in label_cols]
        + ["Dice mean+-std", "large", "small", "HD95", "SDlogJ", "% fold", "time/s"]
        + (["TRE before/mm", "TRE mm"] if with_tre else [])
    )
    body = []
    for r in rows:
        body.append(
            [str(r["method"])]
            + [_fmt(r.get(c)) for c in label_cols]
            + [
                f"{_fmt(r['dice_mean'])} +- {_fmt(r['dice_std'])}",
                _fmt(r.get("dice_large")),
                _fmt(r.get("dice_small")),
                _fmt(r.get("hd95"), 2),
                _fmt(r.get("sdlogj")),
                _fmt(r.get("folding_pct"), 2),
                _fmt(r.get("time"), 3),
            ]
            + (
                [
                    _fmt(r.get("tre_before"), 2),
                    f"{_fmt(r.get('tre'), 2)} +- {_fmt(r.get('tre_std'), 2)}",
                ]
                if with_tre
                else []
            )
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
    else:
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        lines = [line(header), "  ".join("-" * w for w in widths)]
        lines += [line(b) for b in body]
    r0 = rows[0]
    if "large" in r0:
        thr = r0.get("size_threshold", math.nan)
        lines.append(
            f"large structures (mean fixed volume >= {_fmt(thr, 1)} mm^n): "
            f"{', '.join(r0['large']) or '-'}; small: {', '.join(r0['small']) or '-'}"
        )
    return "\n".join(lines)


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return _json_safe(v.item())
    return v


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(
    rows: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike,
    name: str = "results",
    table: bool = True,
) -> dict[str, Path]:
    """Write ``rows`` as ``<out_dir>/<name>.csv``, ``.json`` (one object per row; NaN as
    ``null``) and, with ``table``, ``.txt`` (:func:`format_table`). Returns the paths by
    extension."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create the output folder ({e.strerror})") from e
    paths = {ext: out / f"{name}.{ext}" for ext in ("csv", "json", "txt")[: 3 if table else 2]}
    keys = list(dict.fromkeys(k for r in rows for k in r))
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {
                k: (";".join(map(str, v)) if isinstance(v, (list, tuple)) else _csv_value(v))
                for k, v in r.items()
            }
        )
    _atomic_write(paths["csv"], buf.getvalue())
    _atomic_write(paths["json"], json.dumps(_json_safe(list(rows)), indent=2) + "\n")
    if table:
        _atomic_write(paths["txt"], format_table(rows) + "\n")
    return paths


def _csv_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    return v


def write_records(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Per-pair records as JSON (NaN as ``null``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(p, json.dumps(_json_safe(list(records)), indent=2) + "\n")
    return p


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def run_evaluation(
    dataset: Any,
    methods: Sequence[tuple[str, RegisterFn]],
    split: str = "test",
    *,
    device: str | torch.device | None = None,
    size_threshold: float | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Evaluate ``methods`` (``(name, register_fn)``) on ``dataset.pairs(split)``.

    Returns ``(records, rows)``.
    """
    pairs = list(dataset.pairs(split))
    if not pairs:
        raise InputError(f"--pairs: the dataset has no {split!r} pairs")
    records: list[dict[str, Any]] = []
    for name, fn in methods:
        records += evaluate_method(dataset, name, fn, pairs, device=device, progress=progress)
    rows = summarise(records, label_names(dataset), size_threshold)
    return records, rows
