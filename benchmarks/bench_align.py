"""Known-answer accuracy and speed of the global alignment stage (``pddreg.align.align``).

Each case takes a real image of ``--data`` (default ``../shared/data/real``) as the fixed image
and makes the moving image by resampling it through a known affine map on the same grid
(rotation up to 30 degrees about a random axis in 3D, translation up to 25 % of the field of
view per axis, scales 0.85-1.15; parts leaving the field of view are lost), optionally through a
non-monotonic intensity remap (``0.5 - 0.5 cos(3 pi I)``: dark stays dark, mid-grey becomes
bright, bright becomes dark, ...) and with Gaussian noise. The end-point error of the found
matrix against the true one is averaged over the fixed image's foreground, in voxels of the
full-resolution fixed grid (and in mm).

    python benchmarks/bench_align.py [--data DIR] [--dim 2|3|all] [--threads 2] [--quick]
                                     [--pairs] [--png DIR]

``--pairs`` also aligns the real pairs (two chest CTs of different patients, two brain MRs,
two flip angles of the abdominal MR) from their world geometry and prints the similarity
before and after; with ``--png DIR`` it writes middle slices of fixed / moving / aligned moving
for a look. Prints one table row per case: case, EPE before, EPE after (voxels; mm), mode,
time (s).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=128)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (mu0 - mu1) ** 2)])


def _load(path: Path, slice_axis: int | None = None, volume: int = 0):
    """Normalised ``(1, 1, *S)`` tensor, spacing and affine of an image (a 4D NIfTI: one
    volume; ``slice_axis``: the middle slice across that axis)."""
    from pddreg.data.io import normalise_intensity, read_image

    if str(path).endswith("vfa_4d.nii.gz"):
        import nibabel as nib

        nii = nib.load(str(path))
        arr = np.asarray(nii.dataobj, dtype=np.float32)[..., volume]
        spacing = tuple(float(s) for s in nii.header.get_zooms()[:3])
        affine = nii.affine
    else:
        img = read_image(path)
        arr, spacing, affine = img.array, tuple(img.spacing), img.affine
    if slice_axis is not None:
        arr = np.take(arr, arr.shape[slice_axis] // 2, axis=slice_axis)
        spacing = tuple(s for i, s in enumerate(spacing) if i != slice_axis)
    arr = normalise_intensity(arr)
    return torch.from_numpy(np.ascontiguousarray(arr))[None, None], spacing, affine


def _rotation(vec_deg: list[float]) -> torch.Tensor:
    from pddreg.align._geometry import rotation_matrix

    return rotation_matrix(
        [math.radians(v) for v in vec_deg], len(vec_deg) if len(vec_deg) == 3 else 2
    )


def _make_case(fixed, spacing, rot, tfrac, scales, remap, noise, seed):
    """Moving image and the true fixed index -> moving index map."""
    from pddreg.spatial import identity_grid, sample

    ndim = fixed.dim() - 2
    shape = fixed.shape[2:]
    sp = torch.tensor(spacing, dtype=torch.float64)
    centre = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64) * sp
    lin = _rotation(rot) @ torch.diag(torch.tensor(scales, dtype=torch.float64))
    t = torch.tensor(
        [f * n * s for f, n, s in zip(tfrac, shape, spacing, strict=True)], dtype=torch.float64
    )
    mm = torch.eye(ndim + 1, dtype=torch.float64)
    mm[:ndim, :ndim] = lin
    mm[:ndim, -1] = centre - lin @ centre + t
    s_h = torch.diag(torch.cat([sp, torch.ones(1, dtype=torch.float64)]))
    true = torch.linalg.inv(s_h) @ mm @ s_h
    inv = torch.linalg.inv(true).float()
    grid = identity_grid(shape).reshape(ndim, -1)
    src = (inv[:ndim, :ndim] @ grid + inv[:ndim, -1:]).reshape(1, ndim, *shape)
    moving = sample(fixed, src, padding="zeros")
    if remap:
        moving = 0.5 - 0.5 * torch.cos(3 * math.pi * moving)
    if noise > 0:
        gen = torch.Generator().manual_seed(seed)
        moving = (moving + noise * torch.randn(moving.shape, generator=gen)).clamp(0, 1)
    return moving, true


def _epe(found: torch.Tensor, true: torch.Tensor, fg: torch.Tensor, spacing) -> tuple[float, float]:
    ndim = true.shape[0] - 1
    pts = torch.nonzero(fg).double().t()
    diff = (found[:ndim, :ndim] - true[:ndim, :ndim]) @ pts + (found[:ndim, -1:] - true[:ndim, -1:])
    sp = torch.tensor(spacing, dtype=torch.float64)[:, None]
    return float(diff.norm(dim=0).mean()), float((diff * sp).norm(dim=0).mean())


# (rotation: 2D angle or 3D rotation vector in degrees, translation per axis as a fraction of
# the field of view, scales per axis)
CASES_2D = [
    ([0.0], (0.0, 0.0), (1.0, 1.0)),
    ([10.0], (0.10, -0.05), (1.05, 1.05)),
    ([-20.0], (-0.15, 0.20), (0.90, 0.90)),
    ([30.0], (0.25, -0.25), (1.15, 1.15)),
    ([-30.0], (-0.25, 0.20), (0.85, 0.85)),
    ([25.0], (0.20, 0.25), (1.10, 0.92)),
]


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


CASES_3D = [
    ([0.0, 0.0, 0.0], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ([0.0, 0.0, 10.0], (0.10, -0.05, 0.05), (1.05, 1.05, 1.05)),
    ([20.0 * x for x in _unit([1, 1, 0])], (-0.15, 0.20, -0.10), (0.90, 0.90, 0.90)),
    ([30.0 * x for x in _unit([1, 0, 1])], (0.25, -0.25, 0.10), (1.15, 1.15, 1.15)),
    ([30.0 * x for x in _unit([0.5, -1, 0.3])], (-0.25, 0.20, -0.15), (0.85, 0.85, 0.85)),
    ([25.0 * x for x in _unit([-1, 0.4, 1])], (0.20, 0.25, 0.0), (1.10, 0.92, 1.0)),
]


def _images(data: Path, dim: int, quick: bool):
    out = []
    if dim == 2:
        out.append(("middlebury_Grove2", data / "middlebury_frames/Grove2/frame10.png", None))
        out.append(("echo_frame", data / "echo_a4c_cine/frame_000.png", None))
        if not quick:
            out.append(("brain1_slice", data / "mr_brain_2subjects/brain1_image.nii.gz", 2))
            out.append(("lung1_slice", data / "ct_chest_2subjects/lung1_image.nii.gz", 2))
            out.append(("middlebury_Urban2", data / "middlebury_frames/Urban2/frame10.png", None))
    else:
        out.append(("brain1", data / "mr_brain_2subjects/brain1_image.nii.gz", None))
        out.append(("vfa_fa2", data / "mr_abdomen_vfa_4d/vfa_4d.nii.gz", None))
        if not quick:
            out.append(("lung1", data / "ct_chest_2subjects/lung1_image.nii.gz", None))
            out.append(("lung1_192x160x256", data / "ct_chest_2subjects/lung1_image.nii.gz", "r"))
    return out


def _resampled(fixed: torch.Tensor, spacing, shape=(192, 160, 256)):
    """The volume resampled (trilinear) to ``shape`` over the same field of view."""
    out = torch.nn.functional.interpolate(fixed, size=shape, mode="trilinear", align_corners=False)
    fov = [n * s for n, s in zip(fixed.shape[2:], spacing, strict=True)]
    return out, tuple(f / n for f, n in zip(fov, shape, strict=True))


def known_answer(args) -> list[dict]:
    from pddreg.align import align

    data = Path(args.data)
    dims = [2, 3] if args.dim == "all" else [int(args.dim)]
    rows = []
    head = ("case", "EPE before", "EPE after", "(mm)", "mode", "wall s", "cpu s")
    print(
        f"{head[0]:48s} {head[1]:>10s} {head[2]:>9s} {head[3]:>7s} {head[4]:>8s} {head[5]:>6s} "
        f"{head[6]:>6s}"
    )
    for dim in dims:
        cases = CASES_2D if dim == 2 else CASES_3D
        if args.quick:
            cases = cases[:1] + cases[3:5]
        for name, path, axis in _images(data, dim, args.quick):
            if not path.exists():
                print(f"{name}: {path} missing, skipped")
                continue
            if axis == "r":
                fixed, spacing = _resampled(*_load(path)[:2])
            else:
                fixed, spacing, _ = _load(path, axis)
            thr = _otsu(fixed.numpy().ravel())
            fg = fixed[0, 0] > thr
            if name.startswith("middlebury"):
                fg = torch.ones_like(fg)
            align(fixed, fixed, fixed_spacing=spacing, moving_spacing=spacing)  # warm-up
            for ci, (rot, tfrac, scales) in enumerate(cases):
                for remap in (False, True):
                    moving, true = _make_case(
                        fixed, spacing, rot, tfrac, scales, remap, args.noise, seed=ci
                    )
                    t0, c0 = time.perf_counter(), time.process_time()
                    res = align(
                        fixed, moving, fixed_spacing=spacing, moving_spacing=spacing, mode=args.mode
                    )
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                    ident = torch.eye(dim + 1, dtype=torch.float64)
                    b_vox, _ = _epe(ident, true, fg, spacing)
                    a_vox, a_mm = _epe(res.matrix, true, fg, spacing)
                    rot_n = math.sqrt(sum(r * r for r in rot))
                    label = (
                        f"{name} r{rot_n:.0f} t{max(abs(x) for x in tfrac):.2f} "
                        f"s{min(scales):.2f}-{max(scales):.2f}{' remap' if remap else ''}"
                    )
                    print(
                        f"{label:48s} {b_vox:10.2f} {a_vox:9.3f} {a_mm:7.3f} {res.mode:>8s} "
                        f"{dt:6.3f} {dc:6.3f}",
                        flush=True,
                    )
                    rows.append(
                        {
                            "case": label,
                            "dim": dim,
                            "remap": remap,
                            "before": b_vox,
                            "after": a_vox,
                            "after_mm": a_mm,
                            "time": dt,
                            "cpu": dc,
                        }
                    )
    for dim in dims:
        sel = [r for r in rows if r["dim"] == dim]
        if not sel:
            continue
        for remap in (False, True):
            s = [r for r in sel if r["remap"] == remap]
            if s:
                worst = max(r["after"] for r in s)
                print(
                    f"{dim}D {'remap' if remap else 'same '}: worst EPE {worst:.3f}"
                    f" voxels, median {np.median([r['after'] for r in s]):.3f}, "
                    f"wall median {np.median([r['time'] for r in s]):.3f} s "
                    f"(max {max(r['time'] for r in s):.3f}), cpu median "
                    f"{np.median([r['cpu'] for r in s]):.3f} s (max {max(r['cpu'] for r in s):.3f})"
                )
    return rows


def _world_init(aff_f: np.ndarray, aff_m: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.linalg.inv(aff_m) @ aff_f)


def _png(path: Path, fixed: np.ndarray, moving_on_fixed: np.ndarray, aligned: np.ndarray) -> None:
    from PIL import Image

    def norm(a):
        return (np.clip(a, 0, 1) * 255).astype(np.uint8)

    top = np.concatenate([norm(fixed), norm(moving_on_fixed), norm(aligned)], axis=1)
    rgb_before = np.stack([norm(fixed), norm(moving_on_fixed), norm(fixed)], axis=-1)
    rgb_after = np.stack([norm(fixed), norm(aligned), norm(fixed)], axis=-1)
    grey = np.stack([top] * 3, axis=-1)
    blank = np.zeros_like(rgb_before)
    bottom = np.concatenate([rgb_before, rgb_after, blank], axis=1)
    Image.fromarray(np.concatenate([grey, bottom], axis=0)).save(path)


def real_pairs(args) -> None:
    from pddreg.align import align
    from pddreg.spatial import identity_grid, sample

    data = Path(args.data)
    ct, mr, vfa = "ct_chest_2subjects", "mr_brain_2subjects", "mr_abdomen_vfa_4d/vfa_4d.nii.gz"
    pairs = [  # (name, fixed, fixed volume, moving, moving volume)
        ("lung2<-lung1", f"{ct}/lung2_image.nii.gz", 0, f"{ct}/lung1_image.nii.gz", 0),
        ("lung1<-lung2", f"{ct}/lung1_image.nii.gz", 0, f"{ct}/lung2_image.nii.gz", 0),
        ("brain1<-brain2", f"{mr}/brain1_image.nii.gz", 0, f"{mr}/brain2_image.nii.gz", 0),
        ("vfa_fa2<-fa25", vfa, 0, vfa, 4),
    ]
    head = ("pair", "sim before", "sim after", "mode", "time s")
    print(f"\n{head[0]:18s} {head[1]:>10s} {head[2]:>10s} {head[3]:>9s} {head[4]:>7s}  parameters")
    for name, fpath, fvol, mpath, mvol in pairs:
        if not (data / fpath).exists():
            print(f"{name}: missing, skipped")
            continue
        f, fsp, faff = _load(data / fpath, volume=fvol)
        m, msp, maff = _load(data / mpath, volume=mvol)
        init = _world_init(faff, maff)
        t0 = time.perf_counter()
        res = align(f, m, init=init, fixed_spacing=fsp, moving_spacing=msp, mode=args.mode)
        dt = time.perf_counter() - t0
        p = res.parameters
        print(
            f"{name:18s} {res.similarity_before:10.4f} {res.similarity_after:10.4f} {res.mode:>9s} "
            f"{dt:7.3f}  t={np.round(p['translation_mm'], 1).tolist()} mm "
            f"rot={np.round(p['rotation_deg'], 1).tolist()} deg "
            f"scales={np.round(p['scales'], 3).tolist()}"
        )
        if args.png:
            out = Path(args.png)
            out.mkdir(parents=True, exist_ok=True)
            shape = f.shape[2:]
            grid = identity_grid(shape, dtype=torch.float64).reshape(3, -1)
            imgs = []
            for mat in (init, res.matrix):
                c = (mat[:3, :3] @ grid + mat[:3, -1:]).reshape(1, 3, *shape).float()
                imgs.append(sample(m, c, padding="zeros")[0, 0].numpy())
            fz = f[0, 0].numpy()
            for axis in (2, 0):
                k = shape[axis] // 2
                sl = [np.take(a, k, axis=axis) for a in (fz, imgs[0], imgs[1])]
                if axis == 0:  # coronal-ish: stretch the 5-6.5 mm axis for the look
                    rep = max(1, int(round(fsp[2] / fsp[1])))
                    sl = [np.repeat(s, rep, axis=1) for s in sl]
                _png(
                    out / f"{name.replace('<-', '_from_')}_axis{axis}.png",
                    *[np.rot90(s) for s in sl],
                )


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data",
        default=str(here.parent.parent / "shared" / "data" / "real"),
        help="folder of the real images (default: ../shared/data/real next to the repository)",
    )
    ap.add_argument("--dim", default="all", choices=["2", "3", "all"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", default="auto", choices=["auto", "affine", "rigid", "translation"])
    ap.add_argument("--noise", type=float, default=0.02, help="Gaussian noise added to moving")
    ap.add_argument("--quick", action="store_true", help="fewer images and cases")
    ap.add_argument("--pairs", action="store_true", help="also align the real pairs")
    ap.add_argument("--no-known", action="store_true", help="skip the known-answer grid")
    ap.add_argument("--png", default=None, help="folder for pictures of the real pairs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_known:
        known_answer(args)
    if args.pairs:
        real_pairs(args)
    os.sys.stdout.flush()


if __name__ == "__main__":
    main()
