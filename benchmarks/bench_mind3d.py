"""Time, peak memory and accuracy of ``register_mind`` on a synthetic 3D pair of 192x160x256.

The pair: a 3D abdominal phantom (``pddreg.data.make_phantom``, generated at 96x80x128 and
linearly upsampled to 192x160x256, i.e. 2 mm voxels like Learn2Reg AbdomenCTCT) as the moving
image, and the same image warped by a known smooth random field (max ``--amp`` voxels) as the
fixed one. The registration runs in a child process so that its peak resident memory can be read
with ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``; the child loads the pair from ``.npy``
files, so the phantom generation is not counted.

    python benchmarks/bench_mind3d.py [--threads 2] [--amp 10] [--shape 192 160 256]

Prints the registration time (wall and CPU seconds: on a shared machine the CPU time / threads
is the better estimate of the uncontended wall time), the peak RSS of the child, and the mean
end-point error (voxels) over the body, before and after. Target: < 15 s and < 4 GB on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD = r"""
import json, sys, time
import numpy as np
import torch
torch.set_num_threads(int(sys.argv[2]))
from pddreg.optim import register_mind
d = sys.argv[1]
fixed = torch.from_numpy(np.load(d + "/fixed.npy"))[None, None]
moving = torch.from_numpy(np.load(d + "/moving.npy"))[None, None]
register_mind(fixed[..., :16, :16, :16], moving[..., :16, :16, :16])  # warm-up (lazy imports)
t, c = time.perf_counter(), time.process_time()
disp = register_mind(fixed, moving)
seconds, cpu = time.perf_counter() - t, time.process_time() - c
np.save(d + "/disp.npy", disp[0].numpy())
print(json.dumps({"seconds": seconds, "cpu": cpu}))
"""


def make_pair(shape: tuple[int, ...], amp: float, seed: int = 0):
    import torch
    import torch.nn.functional as F

    from pddreg.data.phantom import make_phantom
    from pddreg.spatial import warp

    small = tuple(max(8, s // 2) for s in shape)
    image, labels = make_phantom(seed, 3, small)
    moving = F.interpolate(
        torch.from_numpy(image)[None, None], size=shape, mode="trilinear", align_corners=False
    )
    g = torch.Generator().manual_seed(seed + 1)
    ctrl = torch.randn(1, 3, 4, 4, 4, generator=g)
    u = F.interpolate(ctrl, size=shape, mode="trilinear", align_corners=True)
    u = u * (amp / u.norm(dim=1).max())
    fixed = warp(moving, u)
    body = (fixed > 0.05)[0, 0]
    return fixed[0, 0].numpy(), moving[0, 0].numpy(), u[0].numpy(), body.numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--amp", type=float, default=10.0, help="max displacement (voxels)")
    ap.add_argument("--shape", type=int, nargs=3, default=(192, 160, 256))
    args = ap.parse_args(argv)
    shape = tuple(args.shape)
    t0 = time.perf_counter()
    fixed, moving, u, body = make_pair(shape, args.amp)
    print(f"pair {shape} made in {time.perf_counter() - t0:.1f} s (not counted)")
    with tempfile.TemporaryDirectory() as d:
        np.save(os.path.join(d, "fixed.npy"), fixed)
        np.save(os.path.join(d, "moving.npy"), moving)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        out = subprocess.run(
            [sys.executable, "-c", CHILD, d, str(args.threads)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        timing = json.loads(out.stdout.strip().splitlines()[-1])
        seconds, cpu = timing["seconds"], timing["cpu"]
        disp = np.load(os.path.join(d, "disp.npy"))
    rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    epe_before = np.linalg.norm(u, axis=0)[body].mean()
    epe_after = np.linalg.norm(disp - u, axis=0)[body].mean()
    print(f"register_mind {shape}, {args.threads} threads: {seconds:.2f} s, ", end="")
    print(f"{cpu:.1f} CPU s (all threads), peak RSS {rss_gb:.2f} GB")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (wall time is shared)")
    print(f"mean EPE over the body: {epe_before:.2f} -> {epe_after:.2f} voxels", end=" ")
    print(f"(max |u| {args.amp})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
