"""Stereo-like layered disparities of 20-100 px on real photographs, with a known answer.

Each case is a grey ``frame10`` of ``--data``'s ``middlebury_frames`` seen with a horizontal
disparity field ``d(x)`` made of layers, as a rectified stereo pair: a slanted background
(``base`` px at the top rising by half of it to the bottom) and three fronto-parallel ellipses
nearer the camera (``near`` px: 45, 70 and 100 by default), each edge a jump of tens of pixels.
``fixed(x) = frame(x + d(x))`` (zero outside the frame), ``moving = frame``; the true field is
``(0, d)``. Columns: mean end-point error over the fixed pixels that see the frame (and inside
the ellipses alone), the share within 3 px, and seconds, for ``register`` with its defaults,
``mind`` and ANTs SyN (affine + SyN) in the same run.

    python benchmarks/bench_stereo.py --threads 2 -o benchmarks/RESULTS.md --append
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

log = logging.getLogger("bench_stereo")

FRAMES = ("RubberWhale", "Grove2", "Urban2", "Venus")
NEAR = (45.0, 70.0, 100.0)


def layered_case(
    img: np.ndarray, base: float, near: tuple[float, ...], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(fixed, true field (2, H, W) in pixels, valid mask, near-layer mask)`` of ``img``."""
    from scipy.ndimage import map_coordinates

    h, w = img.shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    disp = base * (1.0 + 0.5 * yy / (h - 1))
    layer = np.zeros((h, w), bool)
    # ellipses in three bands across the width, away from the right edge the disparity leaves
    for k, dn in enumerate(near):
        cx = w * (0.15 + 0.25 * k + rng.uniform(-0.03, 0.03))
        cy = h * rng.uniform(0.3, 0.7)
        ax, ay = w * rng.uniform(0.08, 0.12), h * rng.uniform(0.15, 0.25)
        inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0
        disp[inside] = dn
        layer |= inside
    mx = xx + disp
    fixed = map_coordinates(img, [yy, mx], order=1, mode="constant", cval=0.0)
    valid = mx <= w - 1
    true = np.stack([np.zeros_like(disp), disp]).astype(np.float32)
    return fixed.astype(np.float32), true, valid, layer & valid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    R.script_arguments(p)
    p.add_argument("--frames", nargs="*", default=list(FRAMES))
    p.add_argument("--base", type=float, default=20.0, help="background disparity at the top")
    p.add_argument("--near", nargs="*", type=float, default=list(NEAR))
    p.add_argument("--no-ants", action="store_true")
    p.add_argument("--methods", nargs="*", default=["default", "mind"])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch
    from PIL import Image

    import pddreg

    torch.set_num_threads(args.threads)
    methods = {"default": {}, "mind": {"method": "mind"}, "pdd": {"method": "pdd"}}
    methods = {k: v for k, v in methods.items() if k in args.methods}
    rows = []
    for k, name in enumerate(args.frames):
        path = args.data / "middlebury_frames" / name / "frame10.png"
        img = np.asarray(Image.open(path).convert("L"), np.float32)
        fixed, true, valid, layer = layered_case(img, args.base, tuple(args.near), seed=k)
        row: dict = {"frame": name, "shape": "x".join(map(str, img.shape))}

        def score(d: np.ndarray, true=true, valid=valid, layer=layer) -> tuple[float, ...]:
            err = np.sqrt(((d - true) ** 2).sum(0))
            return (
                float(err[valid].mean()),
                float(err[layer].mean()),
                float(100.0 * (err[valid] < 3.0).mean()),
            )

        row["before"] = score(np.zeros_like(true))
        for label, kw in methods.items():
            t0 = time.perf_counter()
            res = pddreg.register(fixed, img, uncertainty=False, **kw)
            row[label] = (*score(res.disp), time.perf_counter() - t0)
        if not args.no_ants:
            from pddreg.report import peers

            t0 = time.perf_counter()
            d = np.asarray(peers.ants_syn(fixed, img, threads=args.threads, seed=0))
            row["ANTs SyN"] = (*score(d), time.perf_counter() - t0)
        log.info("%s", row)
        rows.append(row)
    names = [*methods, *([] if args.no_ants else ["ANTs SyN"])]
    near = "/".join(f"{v:g}" for v in args.near)
    head = " | ".join(f"{n}: EPE / near EPE / <3 px % / s" for n in names)
    lines = [
        f"## `python benchmarks/bench_stereo.py --threads {args.threads}` "
        f"(background {args.base:g}-{1.5 * args.base:g} px, near layers {near} px)",
        "",
        "| frame | grid | before: EPE / near EPE | " + head + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        b = r["before"]
        cells = [f"{r[n][0]:.2f} / {r[n][1]:.2f} / {r[n][2]:.0f} / {r[n][3]:.1f}" for n in names]
        lines.append(
            f"| {r['frame']} | {r['shape']} | {b[0]:.1f} / {b[1]:.1f} | " + " | ".join(cells) + " |"
        )
    means = [np.mean([r[n][0] for r in rows]) for n in names]
    lines += [
        "",
        "Mean EPE: " + ", ".join(f"{n} {m:.2f}" for n, m in zip(names, means, strict=True)) + " px",
        "",
    ]
    R.emit(lines, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
