"""Photographs under a change of viewpoint: real frames moved by known homographies.

Each case is a grey frame of ``--data``'s ``middlebury_frames`` seen through a homography that
tilts the view (the top edge pulled in by ``strength`` of the width on each side, the other
corners moved less, plus a random jitter of 5 %): ``fixed(x) = frame(H x)`` (zero outside the
frame), ``moving = frame``, so the true field is ``H x - x``. Columns: mean end-point error over
the fixed pixels that see the frame, and the share of them within 3 px, for ``register`` with
its defaults (global stage ``auto``: affine, then in 2D the homography where it wins), the same
with ``--affine affine`` (no homography), ``mind`` with its defaults, and ANTs SyN (affine +
SyN) in the same run.

    python benchmarks/bench_viewpoint.py --threads 2 -o benchmarks/RESULTS.md --append
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

log = logging.getLogger("bench_viewpoint")

FRAMES = ("Grove2", "Venus", "RubberWhale", "Urban2", "Dimetrodon", "Hydrangea")
STRENGTHS = (0.05, 0.1, 0.15, 0.2)


def homography_case(
    img: np.ndarray, strength: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fixed, true field (2, H, W) in pixels, valid mask)`` of ``img`` under a tilt."""
    from scipy.ndimage import map_coordinates

    h, w = img.shape
    rng = np.random.default_rng(seed)
    src = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], float)  # (x, y)
    s = strength
    move = [[s * w, 0.5 * s * h], [-s * w, 0.3 * s * h], [0.3 * s * w, -0.2 * s * h]]
    move.append([-0.2 * s * w, -0.1 * s * h])
    dst = src + np.array(move) + rng.uniform(-0.05, 0.05, size=(4, 2)) * [w, h]
    rows = []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    hm = np.linalg.svd(np.array(rows))[2][-1].reshape(3, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    p = hm @ np.stack([xx.ravel(), yy.ravel(), np.ones(xx.size)])
    mx, my = (p[0] / p[2]).reshape(h, w), (p[1] / p[2]).reshape(h, w)
    fixed = map_coordinates(img, [my, mx], order=1, mode="constant", cval=0.0)
    valid = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    return fixed.astype(np.float32), np.stack([my - yy, mx - xx]).astype(np.float32), valid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    R.script_arguments(p)
    p.add_argument("--frames", nargs="*", default=list(FRAMES))
    p.add_argument("--strengths", nargs="*", type=float, default=list(STRENGTHS))
    p.add_argument("--no-ants", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch
    from PIL import Image

    import pddreg

    torch.set_num_threads(args.threads)
    methods = {
        "default": {},
        "default, affine only": {"affine": "affine"},
        "mind": {"method": "mind"},
    }
    rows = []
    for k, name in enumerate(args.frames):
        path = args.data / "middlebury_frames" / name / "frame10.png"
        img = np.asarray(Image.open(path).convert("L"), np.float32)
        for strength in args.strengths:
            fixed, true, valid = homography_case(img, strength, seed=k)
            row = {"frame": name, "shape": "x".join(map(str, img.shape)), "strength": strength}

            def score(d: np.ndarray, true=true, valid=valid) -> tuple[float, float]:
                err = np.sqrt(((d - true) ** 2).sum(0))[valid]
                return float(err.mean()), float(100.0 * (err < 3.0).mean())

            row["before"] = score(np.zeros_like(true))
            for label, kw in methods.items():
                t0 = time.perf_counter()
                res = pddreg.register(fixed, img, uncertainty=False, **kw)
                row[label] = (*score(res.disp), time.perf_counter() - t0, res.affine_mode)
            if not args.no_ants:
                from pddreg.report import peers

                t0 = time.perf_counter()
                d = np.asarray(peers.ants_syn(fixed, img, threads=args.threads, seed=0))
                row["ANTs SyN"] = (*score(d), time.perf_counter() - t0, "affine")
            log.info("%s", row)
            rows.append(row)
    names = [*methods, *([] if args.no_ants else ["ANTs SyN"])]
    head = " | ".join(f"{n}: EPE / <3 px % / s" for n in names)
    lines = [
        f"## `python benchmarks/bench_viewpoint.py --threads {args.threads}`",
        "",
        "| frame | grid | strength | before: EPE / <3 px % | " + head + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        b = r["before"]
        cells = []
        for n in names:
            e, ok, sec, mode = r[n]
            tag = " (H)" if mode == "projective" else ""
            cells.append(f"{e:.2f} / {ok:.0f} / {sec:.1f}{tag}")
        first = f"| {r['frame']} | {r['shape']} | {r['strength']:g} | {b[0]:.1f} / {b[1]:.0f} | "
        lines.append(first + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Mean EPE per strength (px):")
    lines.append("")
    lines.append("| strength | before | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for s in args.strengths:
        sel = [r for r in rows if r["strength"] == s]
        vals = [np.mean([r[n][0] for r in sel]) for n in names]
        before = np.mean([r["before"][0] for r in sel])
        lines.append(f"| {s:g} | {before:.1f} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    lines.append("")
    lines.append("(H): the global stage kept the homography.")
    R.emit(lines, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
