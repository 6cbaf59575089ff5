"""Speed and accuracy of ``pddreg register`` with its defaults (the default method and its global
stage) and of ``mind`` (with the same global stage) against ANTs SyN (affine + SyN) on real 3D
volumes from 91x109x91 to 192x160x256 voxels, in the same run.

Each case is a real volume of ``--data`` resampled to the size (isotropic voxels), moved by a
known rotation of 10 degrees, a shift of 8 % of the field of view and a smooth deformation
(:mod:`pddreg.data.cases`): ``fixed = source o phi``, ``moving = source``, so the true field is
``phi(x) - x``. Columns: wall time of the registration call and mean end-point error inside the
object (voxels), per method, and the time ratio ANTs / pddreg per method.

    python benchmarks/bench_speed3d.py --threads 2 -o benchmarks/RESULTS.md --append
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real as R  # noqa: E402  (the shared output writer of benchmarks/real.py)

log = logging.getLogger("bench_speed3d")

SIZES = ((91, 109, 91), (128, 128, 128), (192, 160, 256))


def sources(data: Path) -> list[tuple[str, np.ndarray]]:
    import nibabel as nib

    out = []
    brain = data / "mr_brain_2subjects" / "brain1_image.nii.gz"
    ct = data / "ct_chest_2subjects" / "lung1_image.nii.gz"
    if brain.is_file():
        out.append(("brain MR", np.asarray(nib.load(brain).dataobj, np.float32), (0.78, 0.78, 6.5)))
    if ct.is_file():
        out.append(("chest CT", np.asarray(nib.load(ct).dataobj, np.float32), (0.57, 0.57, 5.0)))
    return out


def resized(volume: np.ndarray, spacing: tuple[float, ...], shape: tuple[int, ...]) -> np.ndarray:
    """The volume's extent resampled onto ``shape`` (linear)."""
    from scipy.ndimage import zoom

    return zoom(volume, [t / s for s, t in zip(volume.shape, shape, strict=True)], order=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    R.script_arguments(p)
    p.add_argument("--sizes", nargs="*", default=None, help="e.g. 91x109x91 192x160x256")
    p.add_argument("--no-ants", action="store_true")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["default", "mind"],
        help="pddreg methods ('default': register's own default method)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    import pddreg
    from pddreg.data import affine_field, compose_fields, make_case, random_field

    torch.set_num_threads(args.threads)
    # warm-up: the native kernels' first build and the shipped model's load are not timed
    warm = np.random.default_rng(0).random((24, 28, 24)).astype(np.float32)
    for method in args.methods:
        kw = {} if method == "default" else {"method": method}
        pddreg.register(warm, warm, uncertainty=False, **kw)
    sizes = SIZES if not args.sizes else [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    rows = []
    for name, vol, sp in sources(args.data):
        for shape in sizes:
            src = resized(vol, sp, shape)
            mean = float(np.mean(shape))
            deform = random_field(shape, 0.04 * mean, 0.3 * mean, seed=11)
            glob = affine_field(
                shape, rotation=[0.0, 0.0, 10.0], translation=[0.08 * mean, -0.08 * mean, 0.0]
            )
            case = make_case(src, compose_fields(deform, glob), noise=0.01, seed=5, name=name)

            def epe(d: np.ndarray, case=case) -> float:
                return float(np.sqrt(((d - case.disp) ** 2).sum(0))[case.mask].mean())

            row = {
                "case": name,
                "shape": "x".join(map(str, shape)),
                "before": epe(np.zeros_like(case.disp)),
            }
            for method in args.methods:
                kw = {} if method == "default" else {"method": method}
                t0 = time.perf_counter()
                res = pddreg.register(case.fixed, case.moving, uncertainty=False, **kw)
                row[f"{method}_s"] = time.perf_counter() - t0
                row[method] = epe(res.disp)
            if not args.no_ants:
                from pddreg.report import peers

                t0 = time.perf_counter()
                d = peers.ants_syn(case.fixed, case.moving, threads=args.threads, seed=0)
                row["ants_s"] = time.perf_counter() - t0
                row["ants"] = epe(np.asarray(d))
            log.info("%s", row)
            rows.append(row)
    heads = [f"`{m}` s | EPE | ANTs / `{m}`" for m in args.methods]
    lines = [
        f"## `python benchmarks/bench_speed3d.py --threads {args.threads}`",
        "",
        "| case | grid | EPE before | " + " | ".join(heads) + " | ANTs SyN s | EPE |",
        "|---|---|---|" + "---|---|---|" * len(args.methods) + "---|---|",
    ]
    for r in rows:
        cells = []
        for m in args.methods:
            ratio = f"{r['ants_s'] / r[m + '_s']:.1f}x" if "ants_s" in r else "-"
            cells.append(f"{r[m + '_s']:.1f} | {r[m]:.2f} | {ratio}")
        ants = f"{r['ants_s']:.1f} | {r['ants']:.2f}" if "ants_s" in r else "- | -"
        head = f"| {r['case']} | {r['shape']} | {r['before']:.2f} | "
        lines.append(head + " | ".join(cells) + f" | {ants} |")
    R.emit(lines, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
