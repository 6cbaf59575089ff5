"""Registration uncertainty against the actual error on known-answer cases from real images.

    python benchmarks/bench_uncertainty.py [--data ../shared/data/real] [-o OUT] [--quick]
                                           [--method mind] [--method pdd] [--threads 1]

Each case takes a real 2D image (a chest CT slice, a brain MR slice, an echocardiography frame,
a Middlebury frame) and a smooth random field ``u`` of our choice: ``fixed = image o (id + u)``
(zeros outside the image) and ``moving = image``, so that the true field of the pair is ``u``
exactly. Variants: ``smooth`` (the pair as made, light noise on both), ``contrast`` (the fixed
intensities remapped by a random non-monotonic curve), ``fov`` (the moving image cut to 70 % of
its width: the rest of the fixed image has no counterpart). ``pddreg.register(...,
uncertainty=True)`` gives the expected spread of the displacement per pixel; the table reports
the mean end-point error ``|u_est - u|``, the mean uncertainty and the Spearman rank correlation
between the uncertainty and the end-point error over all pixels of the fixed image, over the
pixels whose true correspondence lies inside the moving image, and over those of the imaged
object only (smoothed intensity above 8 %: no flat background), per case; and the target
registration error of 20 random landmarks on the object (their true positions in the moving
image from the known field; :mod:`pddreg.report.landmarks`, as ``register --fixed-landmarks``
computes it). With ``-o`` it writes
``uncertainty_cases.png`` (fixed, moving, end-point error, uncertainty per case).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np


def _slice_nifti(path: Path, axis: int = 2) -> tuple[np.ndarray, tuple[float, float]]:
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asarray(img.dataobj, dtype=np.float32)
    k = arr.shape[axis] // 2
    plane = np.take(arr, k, axis=axis)
    zooms = [float(z) for i, z in enumerate(img.header.get_zooms()[:3]) if i != axis]
    return plane, (zooms[0], zooms[1])


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"), dtype=np.float32)


def _downsample(a: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return a
    h, w = (a.shape[0] // factor) * factor, (a.shape[1] // factor) * factor
    return a[:h, :w].reshape(h // factor, factor, w // factor, factor).mean((1, 3))


def sources(data: Path, quick: bool) -> list[tuple[str, np.ndarray]]:
    """``(name, image (H, W) float32 in [0, 1])`` for the known-answer cases."""
    from pddreg.data.io import normalise_intensity

    out = []
    ct, _ = _slice_nifti(data / "ct_chest_2subjects" / "lung1_image.nii.gz")
    out.append(("ct_chest", _downsample(ct, 2)))
    mr, _ = _slice_nifti(data / "mr_brain_2subjects" / "brain1_image.nii.gz")
    out.append(("mr_brain", mr))
    out.append(("echo", _png(data / "echo_a4c_cine" / "frame_000.png")))
    out.append(("middlebury", _png(data / "middlebury_frames" / "RubberWhale" / "frame10.png")))
    if quick:
        out = out[:2]
    return [(n, normalise_intensity(a).astype(np.float32)) for n, a in out]


def smooth_field(
    shape: tuple[int, ...], amplitude: float, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """A smooth random field ``(ndim, *shape)`` in voxels: Gaussian-filtered white noise of
    correlation length ``scale`` voxels, scaled so that its largest vector is ``amplitude``."""
    from scipy import ndimage

    comps = [ndimage.gaussian_filter(rng.standard_normal(shape), scale) for _ in shape]
    u = np.stack(comps)
    u *= amplitude / max(float(np.sqrt((u**2).sum(0)).max()), 1e-12)
    return u.astype(np.float32)


def warp(image: np.ndarray, u: np.ndarray, order: int = 1) -> np.ndarray:
    """``image(x + u(x))`` with zeros outside (voxel units, axis order of the array)."""
    from scipy import ndimage

    grid = np.indices(image.shape, dtype=np.float64) + u
    return ndimage.map_coordinates(image, grid, order=order, mode="constant", cval=0.0)


def remap(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random smooth non-monotonic intensity curve on [0, 1] (5 knots)."""
    knots = np.linspace(0, 1, 6)
    values = rng.uniform(0, 1, 6)
    values[0] = 0.0
    return np.interp(image, knots, values).astype(np.float32)


def make_case(
    image: np.ndarray, variant: str, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(fixed, moving, true field (2, H, W), moving mask or None)``."""
    rng = np.random.default_rng(seed)
    shape = image.shape
    amp = 0.03 * max(shape)  # ~8-15 px for 256-512 px images
    u = smooth_field(shape, amp, scale=max(shape) / 10, rng=rng)
    fixed = warp(image, u)
    moving = image.copy()
    mask = None
    if variant == "contrast":
        fixed = remap(fixed, rng)
    if variant == "fov":
        keep = int(0.7 * shape[1])
        mask = np.zeros(shape, np.float32)
        mask[:, :keep] = 1
        moving = moving * mask
    noise = 0.02
    fixed = np.clip(fixed + noise * rng.standard_normal(shape), 0, 1).astype(np.float32)
    moving = np.clip(moving + noise * rng.standard_normal(shape), 0, 1).astype(np.float32)
    if mask is not None:
        moving *= mask
    return fixed, moving, u, mask


def _object(image: np.ndarray) -> np.ndarray:
    """The imaged object: smoothed intensity above 8 % (no flat background)."""
    from scipy import ndimage

    return ndimage.gaussian_filter(image, 3.0) > 0.08


def _landmarks(result, u: np.ndarray, where: np.ndarray, seed: int) -> tuple[float, float]:
    """Mean TRE before and after (:func:`pddreg.report.landmarks.landmark_errors`) of 20
    random fixed landmarks on the object and their true moving positions ``x + u(x)``."""
    from pddreg.report.landmarks import landmark_errors

    cand = np.argwhere(where)
    pick = cand[np.random.default_rng(seed).choice(len(cand), min(20, len(cand)), replace=False)]
    fixed = pick.astype(np.float64)
    moving = fixed + u[(slice(None), *pick.T)].T
    before, after = landmark_errors(result, fixed, moving, "voxel", "voxel")
    return float(before.mean()), float(after.mean())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/real", help="folder of the real images")
    p.add_argument("-o", "--output", default=None, help="folder for uncertainty_cases.png")
    p.add_argument("--method", action="append", default=[], choices=("mind", "pdd"))
    p.add_argument("--variants", default="smooth,contrast,fov")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="two images only")
    args = p.parse_args()

    import torch

    import pddreg

    torch.set_num_threads(args.threads)
    methods = args.method or ["mind"]
    variants = [v for v in args.variants.split(",") if v]
    rows = []
    panels = []
    for name, image in sources(Path(args.data), args.quick):
        for vi, variant in enumerate(variants):
            fixed, moving, u, mask = make_case(image, variant, args.seed + 17 * vi)
            for method in methods:
                t0 = time.perf_counter()
                res = pddreg.register(
                    fixed,
                    moving,
                    method=method,
                    affine="off",
                    same_grid=True,
                    moving_mask=mask,
                    uncertainty=True,
                )
                elapsed = time.perf_counter() - t0
                assert res.uncertainty is not None
                epe = np.sqrt(((res.disp - u) ** 2).sum(0))
                unc = res.uncertainty
                inside = np.all(
                    (np.indices(u.shape[1:]) + u >= 0)
                    & (np.indices(u.shape[1:]) + u <= np.array(u.shape[1:])[:, None, None] - 1),
                    axis=0,
                )
                if mask is not None:
                    inside &= warp(mask, u, order=0) > 0.5
                step = 2
                sub = (slice(None, None, step), slice(None, None, step))
                rho_all = spearman(unc[sub].ravel(), epe[sub].ravel())
                rho_in = spearman(unc[sub][inside[sub]], epe[sub][inside[sub]])
                obj = _object(fixed) & inside
                rho_obj = spearman(unc[sub][obj[sub]], epe[sub][obj[sub]])
                tre_before, tre_after = _landmarks(res, u, obj, args.seed)
                rows.append(
                    {
                        "case": f"{name}/{variant}",
                        "method": method,
                        "shape": "x".join(map(str, image.shape)),
                        "epe": float(epe.mean()),
                        "epe_before": float(np.sqrt((u**2).sum(0)).mean()),
                        "epe_object": float(epe[obj].mean()),
                        "epe_object_before": float(np.sqrt((u**2).sum(0))[obj].mean()),
                        "unc": float(unc.mean()),
                        "rho": rho_all,
                        "rho_inside": rho_in,
                        "rho_object": rho_obj,
                        "tre_before": tre_before,
                        "tre": tre_after,
                        "time": elapsed,
                    }
                )
                print(
                    f"{name}/{variant:8s} {method:4s} EPE {rows[-1]['epe_before']:.2f} -> "
                    f"{rows[-1]['epe']:.2f} px, uncertainty {rows[-1]['unc']:.2f} px, "
                    f"Spearman {rho_all:.3f} (inside {rho_in:.3f}, object {rho_obj:.3f}), "
                    f"{elapsed:.1f} s",
                    flush=True,
                )
                if method == methods[0]:
                    panels.append((f"{name}/{variant}", fixed, moving, epe, unc))

    print()
    print(
        "| case | method | size | EPE before -> after (px) | on the object (px) "
        "| mean uncertainty (px) | Spearman: all pixels | true match inside | object only "
        "| landmark TRE (px) | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['method']} | {r['shape']} | {r['epe_before']:.2f} -> "
            f"{r['epe']:.2f} | {r['epe_object_before']:.2f} -> {r['epe_object']:.2f} | "
            f"{r['unc']:.2f} | {r['rho']:.3f} | {r['rho_inside']:.3f} | "
            f"{r['rho_object']:.3f} | {r['tre_before']:.2f} -> {r['tre']:.2f} | {r['time']:.1f} |"
        )
    if args.output:
        _figure(panels, Path(args.output) / "uncertainty_cases.png")
        print(f"wrote {Path(args.output) / 'uncertainty_cases.png'}")


def _figure(panels: list, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 2.9 * len(panels)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 4, squeeze=False)
    for row, (title, fixed, moving, epe, unc) in zip(axes, panels, strict=True):
        top = float(np.percentile(np.concatenate([epe.ravel(), unc.ravel()]), 99))
        for ax, img, label, kw in (
            (row[0], fixed, f"{title}: fixed", {"cmap": "gray"}),
            (row[1], moving, "moving", {"cmap": "gray"}),
            (row[2], epe, "end-point error (px)", {"cmap": "magma", "vmin": 0, "vmax": top}),
            (row[3], unc, "uncertainty (px)", {"cmap": "magma", "vmin": 0, "vmax": top}),
        ):
            im = ax.imshow(img, **kw)
            ax.set_title(label, fontsize=9)
            ax.set_axis_off()
            if label.endswith("(px)"):
                fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
