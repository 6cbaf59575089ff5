"""Benchmark pddreg on real images: known-answer cases made from them, and real pairs as they are.

The images are those of ``--data`` (default ``../shared/data/real``, see its README): chest CT
of two patients, brain MR of two patients, an echo cine, a 5-flip-angle abdominal MR (4D NIfTI)
and Middlebury frame pairs. None comes with ground-truth correspondences, so:

(a) **known-answer cases** (:mod:`pddreg.data.cases`): 3D volumes (brain MR at 2.5 mm, chest CT
    at 3 mm, abdominal MR at its own ~4.7 mm; ``--quick``: coarser) and 2D images (an axial
    slice of each, an echo frame, Middlebury frames), each warped by a known smooth random field
    (largest displacement ``--amplitude`` x the mean grid size, default 8 %), once with the same
    contrast and once with the moving image through a random non-monotonic intensity remap;
    both images get a little Gaussian noise (``--noise``). Scored by the mean end-point error
    (EPE, voxels) inside the object (derived mask, cut to where the field stays inside the
    image), before and after, with the time and % folding voxels.
(b) **real pairs as they are**: the two chest CTs and the two brain MRs (inter-subject, on
    different grids), the abdominal MR at flip angles 10-25 degrees against 2 degrees (contrast
    changes, the body breathes), echo cine frame 0 against frames 10, 20, ..., and Middlebury
    ``frame10`` against ``frame11``. Scored by image similarity before and after (NCC inside
    the fixed object for one contrast, MIND-SSC SSD for different contrasts, lower is better;
    the Middlebury frames less a band of 5 % along their edges, whose content leaves the view),
    Dice of masks derived from each image by thresholds (CT: body and lungs; MR: head or body;
    echo: the dark, low-echo region inside the sector, mostly blood), % folding, SDlogJ and
    time.

Methods per case: ``none``, ``mind``, ``pdd`` (shipped weights, the network alone:
``instance_opt=False``), ``pdd+inst`` (with its instance optimisation on MIND-SSC, the shipped
default), ``default`` (``pddreg.register(fixed, moving)`` with no method argument) and the
peers (``--peers``, default ANTsPy SyN; skipped with a note when not installed).

The inter-subject pairs are passed to ``pddreg.register`` as NIfTI files (resampled to the
benchmark's voxel size, headers kept) when it accepts images on different grids (world
coordinates, a global stage: keyword ``affine``); with an older ``register`` the script puts
the moving image onto the fixed grid itself, after aligning the centres of mass of the two
objects (a translation), and says so. Keywords a ``register`` lacks are dropped with a note.

    python benchmarks/real.py --data ../shared/data/real --quick --threads 1 -o /tmp/real.md
    python benchmarks/real.py --threads 2 -o benchmarks/RESULTS.md --append

Times are wall-clock seconds of the registration call (pddreg: ``result.runtime_s``, which
leaves out reading and normalising; peers: the whole call), after a warm-up call per method.
The summary also gives pddreg's deformable stage alone (``details["timings"]["deformable"]``:
without the global stage, which every method but ``none`` runs first).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("real")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("..") / "shared" / "data" / "real"
OURS = ("none", "mind", "pdd", "pdd+inst", "default")
PEER_CHOICES = ("ants-syn", "sitk-bspline", "sitk-demons")


# ============================================================================ geometry


@dataclass
class Vol:
    """An image with its grid.

    Attributes:
        array: ``(*S)`` float32 (raw intensities: HU for CT).
        affine: ``(ndim + 1, ndim + 1)`` voxel index -> world (mm; NIfTI RAS for 3D files).
        name: label.
    """

    array: np.ndarray
    affine: np.ndarray
    name: str = ""

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def spacing(self) -> tuple[float, ...]:
        lin = self.affine[: self.ndim, : self.ndim]
        return tuple(float(v) for v in np.linalg.norm(lin, axis=0))

    def image(self) -> Any:
        """As a :class:`pddreg.data.Image` (affine only for 3D, as the readers do)."""
        from pddreg.data import Image

        aff = self.affine.copy() if self.ndim == 3 else None
        return Image(array=self.array, spacing=self.spacing, affine=aff, path=None)


def _diag_affine(spacing: Sequence[float]) -> np.ndarray:
    n = len(spacing)
    a = np.eye(n + 1)
    a[:n, :n] = np.diag([float(s) for s in spacing])
    return a


def _sample(arr: np.ndarray, coords: np.ndarray, order: int, cval: float) -> np.ndarray:
    """``arr`` at voxel coordinates ``(ndim, *T)`` (constant ``cval`` outside)."""
    from scipy import ndimage

    return ndimage.map_coordinates(
        arr.astype(np.float32), coords, order=order, mode="constant", cval=cval, prefilter=False
    ).astype(np.float32)


def _grid(shape: Sequence[int]) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))


def resample(vol: Vol, spacing: float | Sequence[float], order: int = 1) -> Vol:
    """The same field of view on a grid of ``spacing`` mm (anti-aliased when coarser).

    Grid sizes are rounded, so the spacing is adjusted to keep the field of view; the affine
    follows (voxel ``j`` of the new grid sits at old voxel ``(j + 0.5) * n / m - 0.5``).
    """
    from scipy import ndimage

    ndim = vol.ndim
    old_sp = np.asarray(vol.spacing)
    new_sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,))
    old_n = np.asarray(vol.array.shape)
    new_n = np.maximum(1, np.round(old_n * old_sp / new_sp)).astype(int)
    step = old_n / new_n  # old voxels per new voxel
    arr = vol.array.astype(np.float32)
    if order > 0 and np.any(step > 1):
        arr = ndimage.gaussian_filter(arr, sigma=np.where(step > 1, 0.4 * step, 0.0))
    axes = [(np.arange(m) + 0.5) * s - 0.5 for m, s in zip(new_n, step, strict=True)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    out = ndimage.map_coordinates(arr, coords, order=order, mode="nearest", prefilter=False)
    index = np.eye(ndim + 1)
    index[:ndim, :ndim] = np.diag(step)
    index[:ndim, ndim] = 0.5 * step - 0.5
    return Vol(out.astype(np.float32), vol.affine @ index, vol.name)


def map_moving(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    fixed_affine: np.ndarray,
    fixed_shape: Sequence[int],
    disp: np.ndarray | None = None,
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """The moving image on the fixed grid: ``moving_world(A_f (x + disp(x)))``.

    pddreg's convention on different grids: ``disp`` is in voxels of the fixed grid (zero when
    None: the header alignment alone).
    """
    ndim = len(fixed_shape)
    pos = _grid(fixed_shape)
    if disp is not None:
        pos = pos + disp
    m = np.linalg.inv(moving_affine) @ fixed_affine
    coords = np.tensordot(m[:ndim, :ndim], pos, axes=([1], [0]))
    coords += m[:ndim, ndim].reshape((ndim,) + (1,) * ndim)
    return _sample(moving, coords, order, cval)


def centre_of_mass(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World position of a mask's centre of mass."""
    ndim = mask.ndim
    idx = np.array([c.mean() for c in np.nonzero(mask)])
    return affine[:ndim, :ndim] @ idx + affine[:ndim, ndim]


# ============================================================================ data


def _read_nifti(path: Path, frame: int | None = None) -> Vol:
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asarray(img.dataobj, dtype=np.float32)
    if frame is not None:
        arr = arr[..., frame]
    return Vol(np.ascontiguousarray(arr), np.asarray(img.affine, dtype=np.float64), path.stem)


def _read_png(path: Path, spacing: float) -> Vol:
    from pddreg.data import read_image

    arr = np.asarray(read_image(path).array, dtype=np.float32)
    return Vol(arr, _diag_affine((spacing, spacing)), path.stem)


def _slice(vol: Vol, axis: int = 2, index: int | None = None) -> Vol:
    """A 2D slice across ``axis`` (default: the middle one), in-plane spacing kept."""
    k = vol.array.shape[axis] // 2 if index is None else index
    arr = np.take(vol.array, k, axis=axis)
    keep = [i for i in range(3) if i != axis]
    return Vol(np.ascontiguousarray(arr), _diag_affine([vol.spacing[i] for i in keep]), vol.name)


def _check_data(data: Path) -> Path:
    if not (data / "ct_chest_2subjects").is_dir():
        cand = ROOT / data if not data.is_absolute() else data
        if (cand / "ct_chest_2subjects").is_dir():
            return cand
        raise SystemExit(
            f"real.py: error: {data}: not the real-image folder (no ct_chest_2subjects/); "
            "give it with --data"
        )
    return data


ECHO_SPACING = 0.51  # mm per pixel of the echo frames (README)
MIDDLEBURY = ("RubberWhale", "Urban2", "Dimetrodon", "Grove2", "Hydrangea", "Venus")


@dataclass
class Source:
    """A real image to make known-answer cases from.

    Attributes:
        vol: the image (resampled to the benchmark's grid).
        kind: ``"ct"``, ``"mr"``, ``"echo"`` or ``"photo"`` (which object mask).
        mask: the object, when made otherwise than by :func:`pddreg.data.object_mask` of ``vol``
            (slices of volumes: the slice of the volume's mask, filled in 3D).
    """

    vol: Vol
    kind: str
    mask: np.ndarray | None = None


def object_threshold(kind: str) -> float | str | None:
    """Threshold of :func:`pddreg.data.object_mask` per kind of image."""
    return {"photo": None, "echo": 0.02}.get(kind, "otsu")


def sources(data: Path, quick: bool, dims: Sequence[int]) -> list[Source]:
    """The images of the known-answer cases, resampled to a size registered in seconds."""
    from pddreg.data import object_mask

    out: list[Source] = []
    brain = _read_nifti(data / "mr_brain_2subjects" / "brain1_image.nii.gz")
    ct = _read_nifti(data / "ct_chest_2subjects" / "lung1_image.nii.gz")
    abd = _read_nifti(data / "mr_abdomen_vfa_4d" / "vfa_4d.nii.gz", frame=1)  # 10 degrees
    brain.name, ct.name, abd.name = "brain MR", "chest CT", "abdomen MR"
    if 3 in dims:
        out += [
            Source(resample(brain, 3.5 if quick else 2.5), "mr"),
            Source(resample(ct, 4.5 if quick else 3.0), "ct"),
            Source(abd if not quick else resample(abd, 6.0), "mr"),
        ]
    if 2 in dims:
        slices = ((brain, "mr", 2.0 if quick else 1.5), (ct, "ct", 3.0 if quick else 2.0))
        for vol, kind, sp in (*slices, (abd, "mr", None)):
            mask = Vol(object_mask(vol.array).astype(np.float32), vol.affine, vol.name)
            image, mask = _slice(vol), _slice(mask)
            if sp is not None:
                image, mask = resample(image, sp), resample(mask, sp, order=0)
            out.append(Source(image, kind, mask.array > 0.5))
        echo = _read_png(data / "echo_a4c_cine" / "frame_000.png", ECHO_SPACING)
        echo.name = "echo"
        out.append(Source(resample(echo, 2.0 if quick else 1.5), "echo"))
        for scene in MIDDLEBURY[: 1 if quick else 2]:
            photo = _read_png(data / "middlebury_frames" / scene / "frame10.png", 1.0)
            photo.name = f"Middlebury {scene}"
            out.append(Source(resample(photo, 3.0 if quick else 2.0), "photo"))
    return out


# ============================================================================ methods


@dataclass
class Api:
    """What the installed ``pddreg.register`` accepts."""

    params: frozenset[str]
    dropped: set[str] = field(default_factory=set)

    @classmethod
    def detect(cls) -> Api:
        from pddreg import api

        params = inspect.signature(api.register).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            raise SystemExit("real.py: pddreg.api.register takes **kwargs: cannot tell its API")
        return cls(frozenset(params))

    @property
    def world(self) -> bool:
        """Images on different grids (world coordinates, global stage) are supported."""
        return "affine" in self.params

    def kwargs(self, kw: dict[str, Any]) -> dict[str, Any]:
        """``kw`` without None values and without the keywords ``register`` lacks (noted)."""
        out = {}
        for k, v in kw.items():
            if v is None:
                continue
            if k in self.params:
                out[k] = v
            else:
                self.dropped.add(k)
        return out


def run_ours(
    api: Api,
    method: str,
    fixed: Any,
    moving: Any,
    extra: dict[str, Any],
    stages: dict[str, float] | None = None,
) -> tuple[np.ndarray, float]:
    """``pddreg.register`` for one row; returns (disp ``(ndim, *S_fixed)``, seconds); the
    seconds per stage (``global``, ``deformable``, ...) go into ``stages`` when given."""
    import pddreg

    if method == "default":
        kw: dict[str, Any] = {k: v for k, v in extra.items() if k != "affine"}
    elif method == "pdd+inst":
        kw = {"method": "pdd", "instance_opt": True, **extra}
    elif method == "pdd":  # the network alone
        kw = {"method": "pdd", "instance_opt": False, **extra}
    else:
        kw = {"method": method, **extra}
    res = pddreg.register(fixed, moving, **api.kwargs(kw))
    if stages is not None:
        stages.update((getattr(res, "details", None) or {}).get("timings", {}))
    return np.asarray(res.disp, dtype=np.float32), float(res.runtime_s)


def run_peer(
    name: str, fixed: Any, moving: Any, spacing: Sequence[float] | None, threads: int
) -> tuple[np.ndarray, float]:
    """A peer of :mod:`pddreg.report.peers`; returns (disp, wall seconds of the call)."""
    from pddreg.data import Image
    from pddreg.report import peers

    fn = peers.PEERS[name][1]
    t0 = time.perf_counter()
    if name == "ants-syn":
        if isinstance(fixed, Image):
            disp = fn(fixed, moving, threads=threads, seed=0)
        else:
            disp = fn(fixed, moving, spacing=spacing, threads=threads, seed=0)
    else:
        f = fixed.array if isinstance(fixed, Image) else fixed
        m = moving.array if isinstance(moving, Image) else moving
        disp = fn(f, m, spacing=spacing, threads=threads)
    return np.asarray(disp, dtype=np.float32), time.perf_counter() - t0


def method_list(args: argparse.Namespace, notes: list[str]) -> list[str]:
    """Our rows and the peers that can run (missing ones noted)."""
    from pddreg.report import peers

    names = list(args.ours)
    for p in args.peers:
        why = peers.available(p)
        if why is None:
            names.append(p)
        else:
            notes.append(f"`{p}` skipped (not installed: {why})")
    return names


def run_method(
    api: Api,
    name: str,
    fixed: Any,
    moving: Any,
    spacing: Sequence[float],
    args: argparse.Namespace,
    extra: dict[str, Any] | None = None,
    stages: dict[str, float] | None = None,
) -> tuple[np.ndarray, float]:
    if name in OURS:
        return run_ours(api, name, fixed, moving, extra or {}, stages)
    return run_peer(name, fixed, moving, spacing, args.threads)


def warm_up(api: Api, names: Sequence[str], dims: Sequence[int], args: argparse.Namespace) -> None:
    """One small call per method and dimension: imports, native build, thread pools."""
    rng = np.random.default_rng(0)
    for ndim in dims:
        shape = (32,) * ndim
        a = rng.random(shape).astype(np.float32)
        for name in names:
            try:
                run_method(api, name, a, a, (1.0,) * ndim, args)
            except Exception as exc:  # reported at the real call
                log.warning("warm-up of %s (%dD) failed: %s", name, ndim, exc)


# ============================================================================ metrics


def folding_pct(disp: np.ndarray) -> float:
    from pddreg.metrics import folding_fraction

    return 100.0 * folding_fraction(disp)


def sdlogj(disp: np.ndarray) -> float:
    from pddreg.metrics import sdlogj as _sdlogj

    return _sdlogj(disp)


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised cross-correlation of two images over ``mask`` (all voxels when None)."""
    x = a[mask] if mask is not None else a.ravel()
    y = b[mask] if mask is not None else b.ravel()
    x = x.astype(np.float64) - x.mean()
    y = y.astype(np.float64) - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else math.nan


def mind_ssd(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean squared difference of the MIND-SSC descriptors of two ``[0, 1]`` images over
    ``mask`` (lower is better; insensitive to the intensity mapping)."""
    import torch

    from pddreg.features.mind import mind_ssc

    with torch.no_grad():
        fa = mind_ssc(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None])
        fb = mind_ssc(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))[None, None])
        d = (fa - fb).square().mean(dim=1)[0].numpy()
    return float(d[mask].mean() if mask is not None else d.mean())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / s if s else math.nan


# ============================================================================ (a) known answers


def known_cases(args: argparse.Namespace) -> list[tuple[Any, Source]]:
    """(KnownCase, source) for every source and contrast."""
    from pddreg.data import make_case, random_field

    out = []
    for k, src in enumerate(sources(args.data, args.quick, args.dims)):
        shape = src.vol.array.shape
        mean = float(np.mean(shape))
        disp = random_field(shape, args.amplitude * mean, 0.3 * mean, seed=100 + k)
        for remap in (False, True):
            case = make_case(
                src.vol.array,
                disp,
                remap=remap,
                noise=args.noise,
                seed=200 + k,
                spacing=src.vol.spacing,
                threshold=object_threshold(src.kind),
                name=src.vol.name,
                source_mask=src.mask,
            )
            out.append((case, src))
    return out


def case_inputs(case: Any) -> tuple[Any, Any]:
    """Fixed and moving images of a known-answer case for ``register`` (one grid, spacing)."""
    from pddreg.data import Image

    aff = _diag_affine(case.spacing) if case.fixed.ndim == 3 else None
    f = Image(array=case.fixed, spacing=case.spacing, affine=aff)
    m = Image(array=case.moving, spacing=case.spacing, affine=aff)
    return f, m


def bench_known(args: argparse.Namespace, api: Api, names: Sequence[str]) -> list[dict[str, Any]]:
    from pddreg.metrics import epe

    rows = []
    cases = known_cases(args)
    for i, (case, _src) in enumerate(cases):
        f, m = case_inputs(case)
        before = epe(np.zeros_like(case.disp), case.disp, case.mask)
        extra = _extra_kwargs(args, case.mask, case.mask if not case.remapped else None)
        for name in names:
            row = {
                "case": case.name,
                "dim": case.fixed.ndim,
                "grid": "x".join(str(s) for s in case.fixed.shape),
                "spacing": case.spacing[0],
                "contrast": "remap" if case.remapped else "same",
                "method": name,
                "epe_before": before,
                "max_true": float(np.sqrt((case.disp**2).sum(0)).max()),
            }
            try:
                stages: dict[str, float] = {}
                disp, sec = run_method(api, name, f, m, case.spacing, args, extra, stages)
                row.update(epe_after=epe(disp, case.disp, case.mask), time=sec)
                row.update(stage=stages.get("deformable", math.nan))
                row.update(folding=folding_pct(disp))
            except Exception as exc:
                log.exception("%s on %s failed", name, case.name)
                row.update(epe_after=math.nan, time=math.nan, folding=math.nan, error=str(exc))
            rows.append(row)
            log.info(
                "(a) %d/%d %s %dD %s %s: EPE %.2f -> %.2f, %.2f s",
                i + 1,
                len(cases),
                case.name,
                row["dim"],
                row["contrast"],
                name,
                before,
                row["epe_after"],
                row["time"],
            )
    return rows


def _extra_kwargs(args: argparse.Namespace, fixed_mask: Any, moving_mask: Any) -> dict[str, Any]:
    """Keywords for ``register`` from the command line: ``affine`` and, with ``--masks``, the
    object masks."""
    out: dict[str, Any] = {"affine": getattr(args, "affine", None)}
    if not args.masks:
        return out
    if fixed_mask is not None:
        out["fixed_mask"] = np.asarray(fixed_mask, dtype=np.uint8)
    if moving_mask is not None:
        out["moving_mask"] = np.asarray(moving_mask, dtype=np.uint8)
    return out


# ============================================================================ (b) real pairs


def _largest(mask: np.ndarray, keep: int = 1, min_fraction: float = 0.0) -> np.ndarray:
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(sizes)[::-1][:keep]
    out = np.zeros_like(mask)
    for k in order:
        if sizes[k] >= min_fraction * mask.size:
            out |= lab == k + 1
    return out


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    mask = ndimage.binary_fill_holes(mask)
    if mask.ndim == 3:
        for k in range(mask.shape[2]):
            mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return mask


def derived_masks(arr: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """Masks made by thresholds (no labels are shared between subjects).

    - ``ct``: ``body`` (HU > -500, largest part, holes filled per axial slice), ``lungs``
      (HU < -400 inside the body, the two largest parts);
    - ``head``, ``body`` (MR): :func:`pddreg.data.object_mask` (Otsu, closed, largest part,
      filled), named after the kind;
    - ``echo``: ``dark``: the low-echo part (below Otsu's threshold of the smoothed image) inside
      the sector, mostly the blood pools.
    """
    from pddreg.data import object_mask, otsu_threshold
    from pddreg.data.io import normalise_intensity

    if kind == "ct":
        body = _fill_slices(_largest(arr > -500))
        lungs = _largest((arr < -400) & body, keep=2, min_fraction=0.002)
        return {"body": body, "lungs": lungs}
    if kind in ("head", "body", "mr"):
        return {kind if kind != "mr" else "object": object_mask(arr)}
    if kind == "echo":
        from scipy import ndimage

        x = normalise_intensity(arr)
        sector = object_mask(arr, threshold=0.02)
        inner = ndimage.binary_erosion(sector, iterations=3)
        smooth = ndimage.gaussian_filter(x, 2.0)
        dark = inner & (smooth < otsu_threshold(smooth[inner]))
        dark = _largest(ndimage.binary_opening(dark, iterations=2), keep=4, min_fraction=0.003)
        return {"dark": dark}
    return {}


def similarity_mask(arr: np.ndarray, kind: str) -> np.ndarray | None:
    m = derived_masks(arr, kind)
    if kind == "ct":
        return m["body"]
    if kind in ("head", "body", "mr"):
        return next(iter(m.values()))
    if kind == "echo":
        from pddreg.data import object_mask

        return object_mask(arr, threshold=0.02)
    return None


#: Fraction of each axis left out along the frame's edges in the similarity of the photo pairs.
PHOTO_BAND = 0.05


def score_mask(arr: np.ndarray, kind: str) -> np.ndarray | None:
    """Where a real pair's similarity is measured: :func:`similarity_mask`; for the photo pairs
    (consecutive video frames) the frame less :data:`PHOTO_BAND` of each axis along its edges:
    the content there moves out of view or comes into it, so every method, ANTs included,
    compared padding there (Yosemite's full-frame NCC fell from 0.967 to 0.957-0.965 for all
    of them, while away from the edges it rose to 0.997)."""
    if kind != "photo":
        return similarity_mask(arr, kind)
    inner = np.zeros(arr.shape, dtype=bool)
    band = [max(1, int(round(PHOTO_BAND * n))) for n in arr.shape]
    inner[tuple(slice(b, n - b) for b, n in zip(band, arr.shape, strict=True))] = True
    return inner


@dataclass
class Pair:
    """A real pair. ``given_*`` are what the methods get: the files/arrays as they are, or (old
    ``register``) the moving image already put onto the fixed grid."""

    name: str
    kind: str
    fixed: Vol
    moving: Vol
    contrast: str  # "same" or "different"
    given_moving: Vol | None = None
    note: str = ""


def _two_subjects(folder: Path, stem: str, spacing: float) -> list[Vol]:
    """``<stem>1_image.nii.gz`` and ``<stem>2_image.nii.gz`` of ``folder`` at ``spacing`` mm."""
    return [resample(_read_nifti(folder / f"{stem}{i}_image.nii.gz"), spacing) for i in (1, 2)]


def real_pairs(args: argparse.Namespace) -> list[Pair]:
    data, quick = args.data, args.quick
    out: list[Pair] = []
    if 3 in args.dims:
        lung = _two_subjects(data / "ct_chest_2subjects", "lung", 4.0 if quick else 3.0)
        out.append(Pair("chest CT 1 <- 2", "ct", lung[0], lung[1], "same"))
        brain = _two_subjects(data / "mr_brain_2subjects", "brain", 3.0 if quick else 2.0)
        out.append(Pair("brain MR 1 <- 2", "head", brain[0], brain[1], "same"))
        path = data / "mr_abdomen_vfa_4d" / "vfa_4d.nii.gz"
        fa = (2, 10, 15, 20, 25)
        fixed = _read_nifti(path, frame=0)
        for k in (1, 4) if quick else (1, 2, 3, 4):
            out.append(
                Pair(
                    f"abdomen MR FA {fa[0]} <- {fa[k]}",
                    "body",
                    fixed,
                    _read_nifti(path, frame=k),
                    "different",
                )
            )
    if 2 in args.dims:
        scale = 2.0 if quick else 1.5
        echo = data / "echo_a4c_cine"
        f0 = resample(_read_png(echo / "frame_000.png", ECHO_SPACING), scale)
        frames = (10, 30, 60) if quick else tuple(range(10, 120, 10))
        for k in frames:
            mk = resample(_read_png(echo / f"frame_{k:03d}.png", ECHO_SPACING), scale)
            out.append(Pair(f"echo frame 0 <- {k}", "echo", f0, mk, "same"))
        scenes = sorted(p.name for p in (data / "middlebury_frames").iterdir() if p.is_dir())
        for scene in scenes[:4] if quick else scenes:
            d = data / "middlebury_frames" / scene
            f = resample(_read_png(d / "frame10.png", 1.0), 2.0 if quick else 1.0)
            m = resample(_read_png(d / "frame11.png", 1.0), 2.0 if quick else 1.0)
            out.append(Pair(f"Middlebury {scene} 10 <- 11", "photo", f, m, "same"))
    return out


def _normalise_like(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(ref, [0.5, 99.5])
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def _background(arr: np.ndarray, kind: str) -> float:
    return float(arr.min()) if kind == "ct" else 0.0


def prepare_pair(pair: Pair, api: Api, notes: list[str]) -> None:
    """Decide what the methods get (see :class:`Pair`)."""
    same_grid = pair.fixed.array.shape == pair.moving.array.shape and np.allclose(
        pair.fixed.affine, pair.moving.affine
    )
    if same_grid or api.world:
        pair.given_moving = pair.moving
        return
    # old register(): the moving image onto the fixed grid, centres of mass of the objects aligned
    fm = similarity_mask(pair.fixed.array, pair.kind)
    mm = similarity_mask(pair.moving.array, pair.kind)
    shift = centre_of_mass(mm, pair.moving.affine) - centre_of_mass(fm, pair.fixed.affine)
    ndim = pair.fixed.ndim
    aff = pair.moving.affine.copy()
    aff[:ndim, ndim] -= shift  # the moving image's header moved by -shift: centres coincide
    arr = map_moving(
        pair.moving.array,
        aff,
        pair.fixed.affine,
        pair.fixed.array.shape,
        cval=_background(pair.moving.array, pair.kind),
    )
    pair.given_moving = Vol(arr, pair.fixed.affine.copy(), pair.moving.name)
    pair.note = (
        "moving resampled onto the fixed grid by the script after a "
        f"{np.linalg.norm(shift):.0f} mm centre-of-mass shift"
    )
    notes.append(f"{pair.name}: {pair.note} (register() has no world coordinates here)")


def bench_pairs(
    args: argparse.Namespace, api: Api, names: Sequence[str], notes: list[str]
) -> list[dict[str, Any]]:
    from pddreg.data import write_image

    rows = []
    pairs = real_pairs(args)
    tmp = tempfile.TemporaryDirectory(prefix="pddreg_real_")
    try:
        for i, pair in enumerate(pairs):
            prepare_pair(pair, api, notes)
            gm = pair.given_moving
            fixed_img, moving_img = pair.fixed.image(), gm.image()
            ours_f: Any = fixed_img
            ours_m: Any = moving_img
            if api.world and pair.fixed.ndim == 3 and gm is pair.moving:
                # the file paths, so that register() reads the headers itself
                ours_f = os.path.join(tmp.name, f"p{i}_fixed.nii.gz")
                ours_m = os.path.join(tmp.name, f"p{i}_moving.nii.gz")
                write_image(ours_f, pair.fixed.array, like=fixed_img)
                write_image(ours_m, gm.array, like=moving_img)
            rows += _score_pair(
                args, api, names, pair, ours_f, ours_m, fixed_img, moving_img, i, len(pairs)
            )
    finally:
        tmp.cleanup()
    return rows


def _score_pair(
    args: argparse.Namespace,
    api: Api,
    names: Sequence[str],
    pair: Pair,
    ours_f: Any,
    ours_m: Any,
    fixed_img: Any,
    moving_img: Any,
    index: int,
    total: int,
) -> list[dict[str, Any]]:
    f, gm = pair.fixed, pair.given_moving
    assert gm is not None
    shape = f.array.shape
    f_masks = derived_masks(f.array, pair.kind)
    m_masks = derived_masks(gm.array, pair.kind)
    m_masks_raw = derived_masks(pair.moving.array, pair.kind)
    sim_mask = score_mask(f.array, pair.kind)
    metric = "NCC" if pair.contrast == "same" else "MIND-SSD"
    f_norm = _normalise_like(f.array, f.array)
    bg = _background(pair.moving.array, pair.kind)

    def similarity(warped: np.ndarray) -> float:
        w = _normalise_like(warped, pair.moving.array)
        return ncc(f_norm, w, sim_mask) if metric == "NCC" else mind_ssd(f_norm, w, sim_mask)

    def dices(
        masks: dict[str, np.ndarray], affine: np.ndarray, disp: np.ndarray | None
    ) -> dict[str, float]:
        out = {}
        for key, mk in masks.items():
            w = map_moving(mk.astype(np.float32), affine, f.affine, shape, disp, order=0) > 0.5
            out[key] = dice(f_masks[key], w)
        return out

    # before: the headers alone (the moving image as it is, on the fixed grid)
    before_img = map_moving(pair.moving.array, pair.moving.affine, f.affine, shape, cval=bg)
    sim_before = similarity(before_img)
    dice_before = dices(m_masks_raw, pair.moving.affine, None)
    rows = []
    extra = _extra_kwargs(
        args, similarity_mask(f.array, pair.kind), similarity_mask(gm.array, pair.kind)
    )
    for name in names:
        row: dict[str, Any] = {
            "pair": pair.name,
            "dim": f.ndim,
            "grid": "x".join(str(s) for s in shape),
            "method": name,
            "metric": metric,
            "sim_before": sim_before,
            "dice_before": dice_before,
            "note": pair.note,
        }
        try:
            if name in OURS:
                disp, sec = run_ours(api, name, ours_f, ours_m, extra)
            else:
                disp, sec = run_peer(name, fixed_img, moving_img, f.spacing, args.threads)
            if disp.shape != (f.ndim, *shape):
                raise ValueError(f"field of shape {disp.shape}, expected {(f.ndim, *shape)}")
            warped = map_moving(gm.array, gm.affine, f.affine, shape, disp, cval=bg)
            row.update(
                sim_after=similarity(warped),
                dice_after=dices(m_masks, gm.affine, disp),
                folding=folding_pct(disp),
                sdlogj=sdlogj(disp),
                time=sec,
            )
        except Exception as exc:
            log.exception("%s on %s failed", name, pair.name)
            row.update(
                sim_after=math.nan,
                dice_after={},
                folding=math.nan,
                sdlogj=math.nan,
                time=math.nan,
                error=str(exc),
            )
        rows.append(row)
        log.info(
            "(b) %d/%d %s %s: %s %.3f -> %.3f, Dice %s -> %s, %.2f s",
            index + 1,
            total,
            pair.name,
            name,
            metric,
            sim_before,
            row["sim_after"],
            _fmt_dice(dice_before),
            _fmt_dice(row["dice_after"]),
            row["time"],
        )
    return rows


# ============================================================================ tables


def _f(v: Any, d: int = 2) -> str:
    if v is None:
        return "-"
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "-" if not math.isfinite(v) else f"{v:.{d}f}"


def _row(*cells: Any) -> str:
    """A Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _rule(n: int) -> str:
    return "|" + "---|" * n


def _fmt_dice(d: dict[str, float]) -> str:
    return " / ".join(f"{k} {_f(v, 3)}" for k, v in d.items()) if d else "-"


def _mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else math.nan


def table_known(rows: list[dict[str, Any]], names: Sequence[str]) -> str:
    lines = [
        "### (a) Known-answer cases: mean EPE inside the object (voxels)",
        "",
        "EPE after per method (EPE before in its own column; max |true field| in voxels):",
        "",
        "| case | dim | grid (spacing mm) | contrast | max true | before | "
        + " | ".join(names)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(names),
    ]
    keyed: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        keyed.setdefault((r["case"], r["dim"], r["grid"], r["spacing"], r["contrast"]), {})[
            r["method"]
        ] = r
    for (case, dim, grid, sp, contrast), by in keyed.items():
        first = next(iter(by.values()))
        lines.append(
            f"| {case} | {dim}D | {grid} ({_f(sp, 2)}) | {contrast} | {_f(first['max_true'], 1)} "
            f"| {_f(first['epe_before'])} | "
            + " | ".join(_f(by.get(n, {}).get("epe_after")) for n in names)
            + " |"
        )
    lines += [
        "",
        "Time (s) and % folding voxels per method:",
        "",
        "| case | dim | contrast | " + " | ".join(f"{n} s / fold %" for n in names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for (case, dim, _grid, _sp, contrast), by in keyed.items():
        lines.append(
            f"| {case} | {dim}D | {contrast} | "
            + " | ".join(
                f"{_f(by.get(n, {}).get('time'))} / {_f(by.get(n, {}).get('folding'), 2)}"
                for n in names
            )
            + " |"
        )
    lines += ["", "Summary (mean over cases):", ""]
    lines += [
        "| method | "
        + " | ".join(f"EPE {d}D {c}" for d in (2, 3) for c in ("same", "remap"))
        + " | EPE all | time (s) 2D | time (s) 3D | % folding | deformable stage (s) 2D / 3D |",
        "|---|" + "---|" * 9,
    ]
    before = {
        (d, c): _mean(
            [
                r["epe_before"]
                for r in rows
                if r["dim"] == d and r["contrast"] == c and r["method"] == names[0]
            ]
        )
        for d in (2, 3)
        for c in ("same", "remap")
    }
    lines.append(
        "| (before) | "
        + " | ".join(_f(before[(d, c)]) for d in (2, 3) for c in ("same", "remap"))
        + f" | {_f(_mean([r['epe_before'] for r in rows if r['method'] == names[0]]))} | | | | |"
    )
    for n in names:
        rs = [r for r in rows if r["method"] == n]
        cells = [
            _f(_mean([r["epe_after"] for r in rs if r["dim"] == d and r["contrast"] == c]))
            for d in (2, 3)
            for c in ("same", "remap")
        ]
        lines.append(
            f"| {n} | "
            + " | ".join(cells)
            + f" | {_f(_mean([r['epe_after'] for r in rs]))}"
            + f" | {_f(_mean([r['time'] for r in rs if r['dim'] == 2]))}"
            + f" | {_f(_mean([r['time'] for r in rs if r['dim'] == 3]))}"
            + f" | {_f(_mean([r['folding'] for r in rs]), 3)}"
            + f" | {_f(_mean([r.get('stage', math.nan) for r in rs if r['dim'] == 2]))}"
            + f" / {_f(_mean([r.get('stage', math.nan) for r in rs if r['dim'] == 3]))} |"
        )
    errors = [
        f"- `{r['method']}` on {r['case']} {r['dim']}D {r['contrast']}: {r['error']}"
        for r in rows
        if "error" in r
    ]
    if errors:
        lines += ["", "Failures:", "", *errors]
    return "\n".join(lines) + "\n"


def table_pairs(rows: list[dict[str, Any]], names: Sequence[str]) -> str:
    lines = [
        "### (b) Real pairs as they are",
        "",
        "Similarity: NCC inside the fixed object (higher is better) for one contrast, MIND-SSC "
        "SSD (lower is better) for different contrasts; *before* is the moving image placed by "
        "its header alone. Dice of masks derived by thresholds (CT: body / lungs; MR: head or "
        "body; echo: the dark, low-echo region inside the sector; none for Middlebury).",
        "",
        _row(
            "pair",
            "grid",
            "method",
            "similarity before",
            "after",
            "Dice before",
            "Dice after",
            "% folding",
            "SDlogJ",
            "time (s)",
        ),
        _rule(10),
    ]
    for r in rows:
        lines.append(
            _row(
                r["pair"],
                r["grid"],
                r["method"],
                f"{r['metric']} {_f(r['sim_before'], 3)}",
                _f(r["sim_after"], 3),
                _fmt_dice(r["dice_before"]),
                _fmt_dice(r["dice_after"]),
                _f(r["folding"], 2),
                _f(r["sdlogj"], 3),
                _f(r["time"]),
            )
        )
    lines += [
        "",
        "Summary per method (means over pairs; similarity gain = after - before for NCC, "
        "before - after for MIND-SSD, so higher is better for both):",
        "",
        _row(
            "method",
            "NCC after (3D)",
            "NCC after (2D)",
            "NCC gain",
            "MIND-SSD gain",
            "Dice after (mean over masks)",
            "Dice gain",
            "% folding",
            "SDlogJ",
            "time (s) 2D",
            "time (s) 3D",
        ),
        _rule(11),
    ]
    for n in names:
        rs = [r for r in rows if r["method"] == n]
        ncc_rows = [r for r in rs if r["metric"] == "NCC"]
        mind_rows = [r for r in rs if r["metric"] != "NCC"]
        d_after, d_gain = [], []
        for r in rs:
            for k, v in (r["dice_after"] or {}).items():
                d_after.append(v)
                d_gain.append(v - r["dice_before"].get(k, math.nan))
        lines.append(
            _row(
                n,
                _f(_mean([r["sim_after"] for r in ncc_rows if r["dim"] == 3]), 3),
                _f(_mean([r["sim_after"] for r in ncc_rows if r["dim"] == 2]), 3),
                _f(_mean([r["sim_after"] - r["sim_before"] for r in ncc_rows]), 3),
                _f(_mean([r["sim_before"] - r["sim_after"] for r in mind_rows]), 4),
                _f(_mean(d_after), 3),
                _f(_mean(d_gain), 3),
                _f(_mean([r["folding"] for r in rs]), 3),
                _f(_mean([r["sdlogj"] for r in rs]), 3),
                _f(_mean([r["time"] for r in rs if r["dim"] == 2])),
                _f(_mean([r["time"] for r in rs if r["dim"] == 3])),
            )
        )
    errors = [f"- `{r['method']}` on {r['pair']}: {r['error']}" for r in rows if "error" in r]
    if errors:
        lines += ["", "Failures:", "", *errors]
    return "\n".join(lines) + "\n"


# ============================================================================ main


def setup(args: argparse.Namespace) -> None:
    """Threads for torch and ITK; quiet the per-call warnings of pddreg."""
    import pddreg  # noqa: F401  (first: its OpenMP setting applies only before torch loads)

    # isort: split
    import torch

    torch.set_num_threads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("pddreg").setLevel(logging.ERROR)


def header(
    script: str, args: argparse.Namespace, api: Api, argv: Sequence[str] | None
) -> list[str]:
    import torch

    command = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    return [
        f"## `{command.strip()}`",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(load average {os.getloadavg()[0]:.1f} at the start), {args.threads} "
        f"thread{'s' if args.threads != 1 else ''} for every method; torch {torch.__version__}; "
        "`pddreg.register` "
        + ("with" if api.world else "without")
        + " world coordinates / global stage (keyword `affine`).",
        "",
    ]


def write_output(path: Path | None, text: str, append: bool) -> None:
    if path is None:
        return
    if append and path.exists():
        text = path.read_text().rstrip("\n") + "\n\n" + text
    path.write_text(text)
    log.info("wrote %s", path)


def emit(lines: list[str], args: argparse.Namespace) -> None:
    """Print the Markdown ``lines`` and write them to ``args.output`` (``args.append``)."""
    text = "\n".join(lines) + "\n"
    print(text)
    write_output(args.output, text, args.append)


def script_arguments(p: argparse.ArgumentParser) -> None:
    """``--data`` (default: the shared real-image folder next to this checkout), ``--threads``,
    ``-o`` and ``--append``: the options of the smaller benchmark scripts."""
    p.add_argument(
        "--data",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "real",
        help="the real-image folder",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--output", type=Path, default=None, help="write the Markdown here")
    p.add_argument("--append", action="store_true", help="append to --output")


def common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the real-image folder")
    p.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    p.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=(2, 3))
    p.add_argument("--threads", type=int, default=2, help="threads for torch and ITK (ANTs)")
    p.add_argument("--ours", nargs="*", default=list(OURS), choices=OURS)
    p.add_argument("--peers", nargs="*", default=["ants-syn"], choices=PEER_CHOICES)
    p.add_argument(
        "--affine",
        choices=("auto", "rigid", "affine", "off"),
        default=None,
        help="global stage for the named methods (mind, pdd, pdd+inst); default: register()'s "
        "own default; the `default` row never gets it",
    )
    p.add_argument(
        "--masks",
        action="store_true",
        help="pass the object masks to register() as fixed_mask / moving_mask (when it takes them)",
    )
    p.add_argument("-o", "--output", type=Path, default=None, help="write the Markdown here")
    p.add_argument("--append", action="store_true", help="append to --output")
    p.add_argument("-v", "--verbose", action="store_true", help="keep pddreg's warnings")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(p)
    p.add_argument("--parts", nargs="+", default=["known", "pairs"], choices=("known", "pairs"))
    p.add_argument(
        "--amplitude",
        type=float,
        default=0.08,
        help="largest displacement of the known fields as a fraction of the mean grid size",
    )
    p.add_argument(
        "--noise", type=float, default=0.01, help="noise added to both images (of [0, 1])"
    )
    args = p.parse_args(argv)
    args.data = _check_data(args.data)
    setup(args)
    api = Api.detect()
    notes: list[str] = []
    names = method_list(args, notes)
    t0 = time.perf_counter()
    warm_up(api, names, args.dims, args)
    parts = header("real.py", args, api, argv)
    body = []
    if "known" in args.parts:
        body.append(table_known(bench_known(args, api, names), names))
        print(body[-1], flush=True)
    if "pairs" in args.parts:
        body.append(table_pairs(bench_pairs(args, api, names, notes), names))
        print(body[-1], flush=True)
    if api.dropped:
        notes.append(
            "keywords this `register` does not take were dropped: "
            + ", ".join(f"`{k}`" for k in sorted(api.dropped))
        )
    notes.append(f"total run time {time.perf_counter() - t0:.0f} s")
    parts += [f"- {n}" for n in notes] + [""] + body
    text = "\n".join(parts)
    print("\n".join(f"- {n}" for n in notes))
    write_output(args.output, text, args.append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
