"""The ``pddreg`` command: ``register``, ``apply``, ``track``, ``demo``, ``evaluate``, ``batch``
and ``segment`` here; ``train`` and ``slices`` registered by their own modules through
``add_subcommand(subparsers)``.

Errors of the user's input (:class:`pddreg.errors.PddregError`) end as ONE line on stderr,
``pddreg: error: <file or argument>: <problem>``, with exit status 2 and no output written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, PddregError
from .methods import DEFAULT_METHOD

logger = logging.getLogger("pddreg")

__all__ = ["atomic_output_dir", "main", "output_suffix", "read_points"]

# Subcommands that live in other modules, each offering ``add_subcommand(subparsers)``.
_EXTERNAL_COMMANDS = ("pddreg.train.command", "pddreg.data.command")

# Files ``register`` may write; stale ones from an earlier run into the same OUT are removed.
_REGISTER_OUTPUTS = (
    "disp.npy",
    "disp.nii.gz",
    "disp_mm.npy",
    "disp_itk.nii.gz",
    "affine.txt",
    "affine.tfm",
    "transform.json",
    "warped.*",
    "warped_seg.*",
    "metrics.json",
    "uncertainty.npy",
    "uncertainty.nii.gz",
    "uncertainty.png",
    "warped_prob.npy",
    "warped_prob.nii.gz",
)


def output_suffix(path: str | os.PathLike[str]) -> str:
    """The suffix to write an image like ``path`` with: .nii.gz / .nii / .png / .npy.

    JPEG inputs give .png (no second lossy compression); other formats (MHA, NRRD, ...) .nii.gz.
    """
    name = os.fspath(path).lower()
    for suffix in (".nii.gz", ".nii", ".png", ".npy"):
        if name.endswith(suffix):
            return suffix
    if name.endswith((".jpg", ".jpeg")):
        return ".png"
    return ".nii.gz"


@contextmanager
def atomic_output_dir(out: str | os.PathLike[str], owned: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success its files are moved into ``out``.

    If ``out`` does not exist the folder is renamed to it (atomic); otherwise each entry replaces
    its namesake (``os.replace``; an output folder replaces the old folder whole) and entries
    matching ``owned`` (glob patterns) that the new run did not write are removed; other files
    in ``out`` are left alone. On any error the temporary folder is deleted and ``out`` is left
    exactly as it was.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        umask = os.umask(0)  # mkdtemp makes the folder 0700; give OUT the usual permissions
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
    except OSError as err:
        raise InputError(f"{out}: cannot create the output folder ({err.strerror})") from err
    try:
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
            return
        new = {p.name for p in tmp.iterdir()}
        for pattern in owned:
            for old in out.glob(pattern):
                if old.name not in new:
                    _remove(old)
        for p in tmp.iterdir():
            if (out / p.name).is_dir() and p.is_dir():
                _remove(out / p.name)  # a folder of outputs is replaced whole
            os.replace(p, out / p.name)
    except OSError as err:
        raise InputError(f"{out}: cannot write the outputs ({err.strerror or err})") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# ----------------------------------------------------------------------------- register
def _cmd_register(args: argparse.Namespace) -> int:
    from .api import register
    from .data.io import read_image, read_labels

    fixed = read_image(args.fixed)
    moving = read_image(args.moving)
    fseg = read_labels(args.fixed_seg) if args.fixed_seg else None
    mseg = read_labels(args.moving_seg) if args.moving_seg else None
    result = register(
        fixed,
        moving,
        method=args.method,
        model=args.model,
        fixed_seg=fseg,
        moving_seg=mseg,
        device=args.device,
        instance_opt=args.instance_opt,
        affine=args.affine,
        fixed_mask=args.fixed_mask,
        moving_mask=args.moving_mask,
        same_grid=args.same_grid,
        max_memory=args.max_memory,
        uncertainty=bool(args.uncertainty) and args.method != "none",
    )
    extra = _landmark_metrics(args, result, moving)
    with atomic_output_dir(args.output, _REGISTER_OUTPUTS) as tmp:
        _write_register_outputs(tmp, result, fixed, moving, args, extra)
    summary = f"{result.method}: {result.runtime_s:.2f} s"
    if result.affine_mode != "off":
        summary += f", global stage {result.affine_mode}"
    if result.metrics is not None and result.metrics.get("mean_dice") is not None:
        before = result.metrics.get("mean_dice_before")
        # no Dice before where the headers do not overlap (the global stage placed the image)
        start = "-" if before is None else f"{before:.3f}"
        summary += f", mean Dice {start} -> {result.metrics['mean_dice']:.3f}"
    if "tre_mm" in extra:
        summary += f", TRE {extra['tre_before_mm']:.2f} -> {extra['tre_mm']:.2f} mm"
    print(f"{summary}; wrote {args.output}")
    return 0


def _landmark_metrics(args: argparse.Namespace, result: Any, moving: Any) -> dict[str, Any]:
    """TRE entries of metrics.json for ``--fixed-landmarks`` / ``--moving-landmarks``."""
    if args.fixed_landmarks is None and args.moving_landmarks is None:
        return {}
    if args.fixed_landmarks is None or args.moving_landmarks is None:
        raise InputError("--fixed-landmarks and --moving-landmarks: give both files")
    from .report.landmarks import landmark_errors, landmark_summary, read_landmarks

    n = result.disp.shape[0]
    pf, sf = read_landmarks(args.fixed_landmarks, n, args.landmarks_space)
    pm, sm = read_landmarks(args.moving_landmarks, n, args.landmarks_space)
    before, after = landmark_errors(result, pf, pm, sf, sm, moving.shape)
    doc = landmark_summary(before, after)
    doc["tre"].update({"fixed_landmarks": args.fixed_landmarks, "fixed_space": sf})
    doc["tre"].update({"moving_landmarks": args.moving_landmarks, "moving_space": sm})
    return doc


def _write_register_outputs(
    tmp: Path, result: Any, fixed: Any, moving: Any, args: Any, extra: dict | None = None
) -> None:
    """Every file of ``pddreg register`` (see :mod:`pddreg.data.transforms`) into ``tmp``.

    The compressed NIfTI files are written by a few threads at once (zlib releases the GIL):
    for two chest CTs at 512x512x48 the four of them took 11 s one after the other, more than
    the registration itself. The uncertainty outputs go first: submitted last, they ran alone
    after the fields on the two brain MRs (256x256x25), 1.6 s instead of 1.2 s on 2 cores."""
    from concurrent.futures import ThreadPoolExecutor

    from .data.io import write_image
    from .data.learn2reg import write_displacement
    from .data.transforms import write_affine, write_itk_displacement, write_registration

    space = "index" if args.same_grid else "world"
    write_registration(
        tmp,
        result.disp,
        result.fixed_world,
        moving.shape,
        result.moving_world,
        space,
        extra={"fixed": args.fixed, "moving": args.moving, "method": result.method},
    )
    disp_mm = result.disp_mm
    np.save(tmp / "disp_mm.npy", disp_mm)
    jobs: list[Callable[[], object]] = []
    if result.disp.shape[0] == 3:
        jobs.append(
            lambda: write_displacement(tmp / "disp.nii.gz", result.disp, affine=fixed.affine)
        )
    n = fixed.ndim
    world_to_itk = fixed.itk_physical[:n, :n] @ np.linalg.inv(fixed.world[:n, :n])
    jobs.append(
        lambda: write_itk_displacement(
            tmp / "disp_itk.nii.gz", disp_mm, fixed.itk_physical, fixed.itk_order, world_to_itk
        )
    )
    if result.affine is not None:
        write_affine(tmp, result.affine)
    warped_name = str(tmp / f"warped{output_suffix(args.moving)}")
    jobs.append(lambda: write_image(warped_name, result.warped, like=fixed))
    if result.warped_seg is not None:
        seg_name = str(tmp / f"warped_seg{output_suffix(args.moving_seg)}")
        jobs.append(lambda: write_image(seg_name, result.warped_seg, like=fixed))
    if getattr(result, "uncertainty", None) is not None:
        from .report.uncertainty import write_uncertainty_outputs

        # first: the longest job (two files and a figure) while the others share the rest
        jobs.insert(0, lambda: write_uncertainty_outputs(tmp, result, fixed))  # its summary
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        pending = [pool.submit(job) for job in jobs]
        doc = {
            "fixed": args.fixed,
            "moving": args.moving,
            "fixed_seg": args.fixed_seg,
            "moving_seg": args.moving_seg,
            "fixed_mask": args.fixed_mask,
            "moving_mask": args.moving_mask,
            "method": result.method,
            "runtime_s": result.runtime_s,
            "spacing": list(result.spacing),
            "space": space,
            "affine_mode": result.affine_mode,
            "affine": None if result.affine is None else np.asarray(result.affine).tolist(),
            **result.details,
        }
        if result.metrics is not None:
            doc.update(result.metrics)
        else:
            from .api import deformation_metrics

            doc.update(deformation_metrics(result.disp))
        for done in pending:
            summary = done.result()  # re-raises a failed write (nothing is moved into place)
            if isinstance(summary, dict):
                doc.update(summary)
    doc.update(extra or {})
    (tmp / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")


def _add_register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "register",
        parents=[common],
        help="register two images (2D or 3D, on any grids)",
        description="Register MOVING onto FIXED (world coordinates from the headers, a global "
        "stage, then the deformable method) and write into OUT: disp.npy (fixed voxels), "
        "disp_mm.npy, disp.nii.gz (3D, Learn2Reg layout), disp_itk.nii.gz (ITK/ANTs "
        "displacement field), affine.txt and affine.tfm (global stage), transform.json (for "
        "pddreg apply), warped.*, warped_seg.* (with --moving-seg), uncertainty.npy (+ .nii.gz for "
        "NIfTI; the expected spread of the displacement per voxel, from the displacement "
        "probabilities) with its picture uncertainty.png, warped_prob.npy (+ .nii.gz; soft "
        "label transfer, with --moving-seg) and metrics.json (TRE with landmarks). Nothing is "
        "written unless the whole registration succeeds.",
    )
    p.add_argument("fixed", help="fixed image (.nii/.nii.gz, .png/.jpg, .npy, .mha/.nrrd)")
    p.add_argument("moving", help="moving image (any grid: the headers place it in the world)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument(
        "--method",
        choices=("pdd", "mind", "none"),
        default=DEFAULT_METHOD,
        help="pdd (default: the learned PDD-Net, refined on MIND-SSC: the most accurate on our "
        "real-image benchmark), mind (training-free) or none",
    )
    p.add_argument("--model", metavar="PATH", help="saved model for pdd (default: shipped)")
    p.add_argument("--fixed-seg", metavar="F", help="fixed label map (for metrics.json)")
    p.add_argument("--moving-seg", metavar="M", help="moving label map (warped_seg.*)")
    p.add_argument("--fixed-mask", metavar="F", help="only voxels inside count (fixed grid)")
    p.add_argument("--moving-mask", metavar="M", help="only voxels inside count (moving grid)")
    p.add_argument(
        "--affine",
        choices=("auto", "rigid", "affine", "projective", "translation", "off"),
        default="auto",
        help="global stage before the deformable one (default auto: affine, in 2D then a "
        "homography, each kept where it improves the similarity; projective: the homography "
        "always)",
    )
    p.add_argument(
        "--same-grid",
        action="store_true",
        help="treat both arrays as one index grid and ignore the headers' geometry (data "
        "already resampled, e.g. Learn2Reg)",
    )
    p.add_argument(
        "--instance-opt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="instance optimisation after the network (pdd; default: the model's setting, on "
        "for the shipped weights; --no-instance-opt: the network alone, faster)",
    )
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        default=None,
        help="memory budget, e.g. 4G or 512M: a registration estimated to need more is refused "
        "before it allocates (default: the memory available on the device)",
    )
    p.add_argument(
        "--uncertainty",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write uncertainty.* and uncertainty.png (and warped_prob.* with --moving-seg) "
        "from the displacement probabilities (mind, pdd; default: on, a few %% of the run time)",
    )
    p.add_argument(
        "--fixed-landmarks",
        metavar="F.csv",
        help="fixed landmarks, one point per row (header i,j,k = voxels, x,y,z = mm): TRE "
        "before and after in metrics.json",
    )
    p.add_argument("--moving-landmarks", metavar="M.csv", help="the corresponding moving landmarks")
    p.add_argument(
        "--landmarks-space",
        choices=("auto", "voxel", "mm"),
        default="auto",
        help="units of the landmark files (default: by their header, voxel without one)",
    )
    p.set_defaults(func=_cmd_register)


# ----------------------------------------------------------------------------- apply
_IMAGE_SUFFIXES = (
    ".nii.gz",
    ".nii",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".npy",
    ".mha",
    ".nrrd",
)
_VOXEL_NAMES = {"i", "j", "k", "voxel_0", "voxel_1", "voxel_2", "row", "col", "column"}
_MM_NAMES = {"x", "y", "z", "x_mm", "y_mm", "z_mm"}


def read_points(path: str, ndim: int, space: str = "auto") -> tuple[np.ndarray, str, list[str]]:
    """Points from a CSV file: one point per row, ``ndim`` numbers (extra columns ignored).

    A header row may name the columns: ``i,j,k`` (voxel indices) or ``x,y,z`` (world mm); with
    ``space="auto"`` it decides, and a file without a header holds voxel indices.

    Returns:
        ``(points (N, ndim), space ("voxel" or "mm"), header names)``.
    """
    import csv

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such points file")
    try:
        rows = [
            r for r in csv.reader(p.read_text().splitlines()) if r and any(c.strip() for c in r)
        ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path}: cannot read the points ({err})") from None
    header: list[str] = []
    if rows:
        try:
            [float(c) for c in rows[0][:ndim]]
        except ValueError:
            header = [c.strip() for c in rows[0]]
            rows = rows[1:]
    if not rows:
        raise InputError(f"{path}: holds no points")
    try:
        pts = np.array([[float(c) for c in r[:ndim]] for r in rows], dtype=np.float64)
    except ValueError as err:
        raise InputError(f"{path}: not a table of numbers ({err})") from None
    if pts.shape[1] != ndim or not np.all(np.isfinite(pts)):
        raise InputError(f"{path}: expected {ndim} finite coordinates per row")
    if space == "auto":
        names = {h.lower() for h in header[:ndim]}
        space = "mm" if names and names <= _MM_NAMES else "voxel"
        if names and not (names <= _MM_NAMES or names <= _VOXEL_NAMES):
            raise InputError(
                f"{path}: header {header[:ndim]} names neither voxel (i,j,k) nor mm (x,y,z) "
                "columns; say which with --points-space"
            )
    return pts, space, header


def _cmd_apply(args: argparse.Namespace) -> int:
    from .api import apply_registration, map_points
    from .data.io import read_image, read_labels, write_image
    from .data.transforms import read_registration

    saved = read_registration(args.registration)
    if args.image is None and args.points is None:
        raise InputError("apply: give an IMAGE to warp and/or --points CSV")
    out = Path(args.output)
    single = args.image is not None and out.name.lower().endswith(_IMAGE_SUFFIXES)
    if single and args.points is not None:
        raise InputError(f"{out}: with --points, -o names an output folder")
    warped = like = None
    if args.image is not None:
        image = read_labels(args.image) if args.labels else read_image(args.image)
        warped = apply_registration(saved, image, labels=args.labels, device=args.device)
        like = _fixed_like(saved)
    mapped = None
    if args.points is not None:
        pts, space, header = read_points(args.points, saved.ndim, args.points_space)
        try:
            mapped = (map_points(saved, pts, space), space, header)
        except InputError as err:  # name the file rather than the argument
            raise InputError(f"{args.points}: {str(err).removeprefix('points: ')}") from None
    if single:
        write_image(str(out), warped, like=like)
        print(f"wrote {out}")
        return 0
    with atomic_output_dir(out, ("warped.*", "warped_seg.*", "points.csv")) as tmp:
        if warped is not None:
            stem = "warped_seg" if args.labels else "warped"
            write_image(str(tmp / f"{stem}{output_suffix(args.image)}"), warped, like=like)
        if mapped is not None:
            pts, space, header = mapped
            names = header[: saved.ndim] or (
                ["x", "y", "z"][: saved.ndim] if space == "mm" else ["i", "j", "k"][: saved.ndim]
            )
            lines = [",".join(names)] + [",".join(f"{v:.6f}" for v in row) for row in pts]
            (tmp / "points.csv").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


def _fixed_like(saved: Any) -> Any:
    """An Image carrying the fixed grid's geometry, for writing results like register does."""
    from .data.io import Image

    n = saved.ndim
    affine = np.eye(4)
    keep = [*range(n), 3]
    affine[np.ix_(keep, keep)] = saved.fixed_world
    spacing = tuple(float(v) for v in np.linalg.norm(saved.fixed_world[:n, :n], axis=0))
    return Image(
        array=np.zeros(saved.fixed_shape, np.float32), spacing=spacing, affine=affine, kind="nifti"
    )


def _add_apply(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "apply",
        parents=[common],
        help="apply a saved registration to another image, label map or point set",
        description="Warp IMAGE (an image of the moving space, on any grid: its header places "
        "it) onto the fixed grid with the registration saved in REG_DIR by pddreg register "
        "(global stage and field, world coordinates included), and/or map fixed-space points "
        "(--points) into the moving space. -o OUT is a file (warped image) or a folder "
        "(OUT/warped.* or OUT/warped_seg.*, OUT/points.csv).",
    )
    p.add_argument("registration", metavar="REG_DIR", help="output folder of pddreg register")
    p.add_argument("image", nargs="?", metavar="IMAGE", help="image or label map to warp")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file or folder")
    p.add_argument("--labels", action="store_true", help="IMAGE is a label map (nearest)")
    p.add_argument(
        "--points",
        metavar="CSV",
        help="fixed-space points (one per row; header i,j,k = voxels, x,y,z = mm) to map into "
        "the moving space (OUT/points.csv, same units)",
    )
    p.add_argument(
        "--points-space",
        choices=("auto", "voxel", "mm"),
        default="auto",
        help="units of --points (default: by the header, voxel without one)",
    )
    p.set_defaults(func=_cmd_apply)


# ----------------------------------------------------------------------------- track / demo
def _cmd_track(args: argparse.Namespace) -> int:
    from .report.track import track_files

    summary = track_files(
        args.frames,
        args.seg,
        args.output,
        method=args.method,
        mode=args.mode,
        model=args.model,
        device=args.device,
        cycle=args.cycle,
        segment_model=args.segment_model,
        combine=args.combine,
        animation=args.animation,
    )
    line = (
        f"tracked {len(summary['frames'])} frames ({args.method}, {args.mode}) "
        f"in {summary['runtime_s']:.1f} s, {summary['fps']:.1f} frames/s"
    )
    if summary.get("mean_cycle_error_px") is not None:
        line += f", mean cycle error {summary['mean_cycle_error_px']:.2f} px"
    print(f"{line}; wrote {args.output}")
    return 0


def _add_track(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "track",
        parents=[common],
        help="propagate the first frame's segmentation through a 2D+t sequence",
        description="Propagate FIRST_SEG (the labels of the first frame: a label image, or "
        "a polygon file .json) through the frames and write OUT/seg_TTTT.* and "
        "OUT/disp_TTTT.npy per frame, OUT/summary.json (per frame: label sizes, cycle error, "
        "times; frames per second), OUT/track.png, the overlay animation OUT/track.gif and "
        "the per-frame curves OUT/curves.png. Mode "
        "'anchored' (default) registers every frame to the first one, starting from the "
        "previous frame's field; 'sequential' registers each frame to the one before and "
        "composes the fields; 'direct' registers every frame to the first one from scratch. "
        "The cycle error (pixels) tracks back t -> 0 -> t, a consistency "
        "measure that needs no ground truth.",
    )
    p.add_argument("frames", nargs="+", help="frames in time order (first = reference)")
    p.add_argument("--seg", required=True, metavar="FIRST_SEG", help="labels of the first frame")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--method", choices=("pdd", "mind", "none"), default="mind")
    p.add_argument(
        "--mode",
        choices=("anchored", "sequential", "direct"),
        default="anchored",
        help="anchored (default): each frame to frame 0 from the previous field; sequential: "
        "each frame to the one before, fields composed; direct: each frame to frame 0 from "
        "scratch (no chain, no drift; motion since frame 0 within about +-14 px in 2D)",
    )
    p.add_argument("--model", metavar="PATH", help="saved model for pdd (default: shipped)")
    p.add_argument(
        "--cycle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the cycle error t -> 0 -> t per frame (tracks the sequence backwards "
        "too: twice the time; default: on)",
    )
    p.add_argument(
        "--segment-model",
        metavar="M",
        help="a joint segmentation and motion model (pddreg train --joint): its segmentation "
        "of every frame is combined with the propagated labels",
    )
    p.add_argument(
        "--combine",
        type=float,
        default=0.5,
        help="weight of --segment-model's probabilities against the propagated labels "
        "(default 0.5)",
    )
    p.add_argument(
        "--animation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write OUT/track.gif (default: on)",
    )
    p.set_defaults(func=_cmd_track)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .report.demo import DemoConfig, run_demo

    config = DemoConfig(
        output=args.output,
        seed=args.seed,
        quick=args.quick,
        subjects=args.subjects,
        held_out=args.held_out,
        steps=args.steps,
        max_pairs=args.pairs,
        device=args.device,
        init=args.init,
    )
    result = run_demo(config)
    print(result.table)
    print(f"report: {result.report}")
    return 0


def _add_demo(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="end to end on built-in phantoms: fine-tune, register, table, report",
        description="Fine-tune the shipped 2D PDD-Net on built-in abdominal phantoms, register "
        "the held-out pairs with none / mind / pdd, print the table and write figures and "
        "report.html to OUT.",
    )
    p.add_argument("-o", "--output", default="pddreg_demo", metavar="OUT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer subjects and steps (tests)")
    p.add_argument(
        "--init", metavar="MODEL.pt", help="model to fine-tune (default: the shipped 2D PDD-Net)"
    )
    p.add_argument("--subjects", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--held-out", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_demo)


# ----------------------------------------------------------------------------- batch / segment
def _add_batch(subparsers: Any) -> argparse.ArgumentParser:
    """``pddreg batch PAIRS -o OUT ...`` (:func:`pddreg.batch.run_batch`)."""
    from .batch import SPLITS

    p = subparsers.add_parser(
        "batch",
        help="register every pair of a CSV table or Learn2Reg json (torchrun-able)",
        description="Register every pair of PAIRS (a CSV table with the columns fixed,moving "
        "and optionally fixed_seg,moving_seg,fixed_mask,moving_mask,fixed_landmarks,"
        "moving_landmarks,name; or a Learn2Reg *_dataset.json) into OUT/<name>/ (the files of "
        "pddreg register) and write OUT/summary.csv and OUT/summary.json. A rerun skips pairs "
        "already complete. Under torchrun --nproc_per_node N the pairs are shared between the "
        "processes (one GPU each, or the CPU). Bad rows are reported one line each and the "
        "other pairs finish (exit status 2).",
    )
    p.add_argument("pairs", metavar="PAIRS", help="pairs table (.csv) or Learn2Reg json")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--method", choices=("pdd", "mind", "none"), default=DEFAULT_METHOD)
    p.add_argument("--model", metavar="PATH", help="saved model for pdd (default: shipped)")
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="all",
        help="Learn2Reg json: registration_val and _test (all), val, test, or the training "
        "pairs (train)",
    )
    p.add_argument(
        "--affine",
        choices=("auto", "rigid", "affine", "projective", "translation", "off"),
        default="auto",
        help="global stage (as pddreg register)",
    )
    p.add_argument("--same-grid", action="store_true", help="as pddreg register --same-grid")
    p.add_argument(
        "--instance-opt", action=argparse.BooleanOptionalAction, default=None, help="pdd only"
    )
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        default=None,
        help="memory budget of one registration, e.g. 4G: a pair estimated to need more fails "
        "before it allocates (default: the memory available)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 (default: cuda if available; under torchrun cuda = cuda:RANK)",
    )
    p.set_defaults(func=_cmd_batch)
    return p


def _cmd_batch(args: argparse.Namespace) -> int:
    """``pddreg batch``: 0 when every pair is complete, 2 when some failed on their
    input, 1 when some failed on an internal error."""
    from .batch import run_batch

    result = run_batch(
        args.pairs,
        args.output,
        method=args.method,
        model=args.model,
        device=args.device,
        split=args.split,
        affine=args.affine,
        same_grid=args.same_grid,
        instance_opt=args.instance_opt,
        max_memory=args.max_memory,
        progress=not args.no_progress,
    )
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        return 2 if result.errors else 0
    for line in result.errors:
        print(f"pddreg: error: {line}", file=sys.stderr)
    done, skipped = result.count("done"), result.count("skipped")
    failed = result.count("failed")
    print(
        f"batch: {done} registered, {skipped} already complete, {failed} failed; "
        f"wrote {result.summary.get('csv', args.output)}"
    )
    if result.internal_errors:
        return 1
    return 2 if failed else 0


def _cmd_segment(args: argparse.Namespace) -> int:
    """``pddreg segment IMAGE --model M -o OUT`` (:func:`pddreg.report.segment.segment_image`)."""
    from .data.io import read_image, write_image
    from .report.segment import SUFFIXES, segment_image

    image = read_image(args.image)
    prob = segment_image(image, args.model, args.device)
    seg = prob.argmax(0).astype(np.uint8 if prob.shape[0] <= 256 else np.int32)
    out = Path(args.output)
    if out.name.lower().endswith(SUFFIXES):
        write_image(str(out), seg, like=image)
    else:
        with atomic_output_dir(out, ("seg.*", "prob.npy")) as tmp:
            write_image(str(tmp / f"seg{output_suffix(args.image)}"), seg, like=image)
            np.save(tmp / "prob.npy", prob)
    labels = ", ".join(f"{k}: {int((seg == k).sum())}" for k in range(1, prob.shape[0]))
    print(f"segmented {args.image} (voxels per label {labels}); wrote {out}")
    return 0


def _add_segment(subparsers: Any) -> argparse.ArgumentParser:
    """``pddreg segment IMAGE --model M -o OUT``."""
    p = subparsers.add_parser(
        "segment",
        help="segment an image with a joint segmentation and motion model",
        description="Segment IMAGE with a model trained by pddreg train --joint (or a "
        "segmentation-only SegNet). -o OUT is a label image file, or a folder that receives "
        "seg.* and prob.npy (label probabilities, (K, *S)).",
    )
    p.add_argument("image", help="image (.nii/.nii.gz, .png/.jpg, .npy, .mha/.nrrd)")
    p.add_argument("--model", required=True, metavar="M", help="saved joint model")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file or folder")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=_cmd_segment)
    return p


# ----------------------------------------------------------------------------- main
def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """--log-level and --device, accepted before and after the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    default_level = argparse.SUPPRESS if suppress else "warning"
    default_device = argparse.SUPPRESS if suppress else None
    p.add_argument(
        "--log-level",
        default=default_level,
        choices=("debug", "info", "warning", "error"),
        help="logging level (default: warning)",
    )
    p.add_argument(
        "--device",
        default=default_device,
        help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)",
    )
    return p


def add_evaluate(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``pddreg evaluate`` (:mod:`pddreg.report.evaluate`) on a subparsers object."""
    import torch

    from .report.evaluate import METHODS

    p = subparsers.add_parser(
        "evaluate",
        help="register every pair of a dataset split with each method and tabulate the results",
        description=(
            "Register every pair of a split with each method and print a table like Table 1 "
            "of the PDD-Net paper (Dice per label, mean +- std, large/small structures, HD95, "
            "SDlogJ, %% folding, time per pair); with -o also write results.csv/.json/.txt, "
            "structures.csv/.json (per organ, grouped by size) and per-pair records.json."
        ),
    )
    p.add_argument("dataset", help="dataset spec (Learn2Reg json/dir, NIfTI folder, phantom2d)")
    p.add_argument(
        "--method",
        action="append",
        default=[],
        choices=METHODS,
        help="built-in method (repeatable): none, mind, pdd, pdd+inst",
    )
    p.add_argument("--model", action="append", default=[], help="a saved model file (repeatable)")
    p.add_argument("--pairs", default="test", choices=("train", "val", "test", "all"))
    p.add_argument("-o", "--output", default=None, help="output folder for the tables")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: available)",
    )
    p.add_argument(
        "--size-threshold",
        type=float,
        default=None,
        help="volume (mm^ndim) between small and large structures (default: 100 mL in 3D, "
        "1%% of the slice area in 2D)",
    )
    p.set_defaults(func=_cmd_evaluate)
    return p


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .data import open_dataset
    from .models import load_model
    from .report.evaluate import (
        format_table,
        label_names,
        make_register_fn,
        model_register_fn,
        run_evaluation,
        structure_rows,
        write_records,
        write_results,
    )

    if not args.method and not args.model:
        raise InputError("evaluate: give at least one --method or --model")
    if args.size_threshold is not None and not args.size_threshold > 0:
        raise InputError(f"--size-threshold: must be positive, got {args.size_threshold}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device: CUDA is not available on this machine")
    dataset = open_dataset(args.dataset)
    ndim = int(dataset.ndim)
    methods: list[tuple[str, Any]] = []
    for name in args.method:
        methods.append((name, make_register_fn(name, ndim, device)))
    for path in args.model:
        if not Path(path).is_file():
            raise InputError(f"{path}: model file not found")
        model = load_model(path, map_location=device)
        model_ndim = getattr(getattr(model, "config", None), "ndim", ndim)
        if int(model_ndim) != ndim:
            raise InputError(f"{path}: a {model_ndim}D model cannot register {ndim}D data")
        methods.append((Path(path).stem, model_register_fn(model.to(device))))
    records, rows = run_evaluation(
        dataset, methods, args.pairs, device=device, size_threshold=args.size_threshold
    )
    print(format_table(rows))
    if args.output:
        paths = write_results(rows, args.output)
        srows = structure_rows(records, label_names(dataset), args.size_threshold)
        paths.update(
            {
                f"structures.{k}": v
                for k, v in write_results(srows, args.output, "structures", False).items()
            }
        )
        write_records(records, Path(args.output) / "records.json")
        logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``pddreg`` parser with every subcommand that is installed."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="pddreg",
        parents=[_common_options(suppress=False)],
        description="Deformable image registration by discrete displacement search (PDD-Net).",
    )
    parser.add_argument("--version", action="version", version=f"pddreg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    common = _common_options(suppress=True)
    _add_register(sub, common)
    _add_apply(sub, common)
    _add_track(sub, common)
    _add_demo(sub, common)
    add_evaluate(sub)
    _add_batch(sub)
    _add_segment(sub)
    for name in _EXTERNAL_COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            logger.debug("subcommand module %s not available: %s", name, err)
            continue
        add: Callable[[Any], Any] | None = getattr(module, "add_subcommand", None)
        if add is None:
            logger.debug("%s has no add_subcommand()", name)
            continue
        add(sub)
    return parser


def _resolve_device_option(args: argparse.Namespace) -> None:
    from .api import default_device

    if getattr(args, "device", None) is None:
        args.device = str(default_device())
    import torch

    try:
        dev = torch.device(args.device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"--device: not a device: {args.device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device: {args.device} requested but CUDA is not available")


def main(argv: list[str] | None = None) -> int:
    """Run the ``pddreg`` command; returns the exit status (0 ok, 2 bad input)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--log-level", default="warning")
    known, _ = pre.parse_known_args(argv)
    level = getattr(logging, str(known.log_level).upper(), logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(getattr(logging, args.log_level.upper()))
    try:
        _resolve_device_option(args)
        return int(args.func(args) or 0)
    except PddregError as err:
        message = " ".join(str(err).split())
        print(f"pddreg: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pddreg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
