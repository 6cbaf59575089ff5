"""Native CPU kernels for cost volumes: compiled on first use, cached, optional.

The correlation, the min-convolution, the mean-field, the softmax and the soft field are chains
of small,
memory-bound ops in PyTorch (every op a pass over a chunk, the correlation a matmul over
windows plus a gather); ``_native.c`` runs each as one loop nest per cache-sized block, with
the sums in AVX registers (3D at 32^3 x 15^3: 1.7 s instead of 4.4 s on 2 cores, see
``benchmarks/bench_cost.py``).  Large cost volumes are allocated on transparent huge pages
(Linux ``madvise``), since the kernels read short runs from thousands of rows.  The source
has no Python or torch headers: the system C compiler (``$CC``, else ``cc``) builds
it in a few seconds, once per source version, into ``$PDDREG_CACHE_DIR`` (default
``~/.cache/pddreg``, else a temporary folder); the calls go through ``ctypes``, which releases
the GIL, so ``torch.get_num_threads()`` Python threads split each call.

``pdd_warp_ssd`` (:func:`warp_ssd`) serves the instance optimisation of ``pddreg.optim``: the
moving features warped by a field, their SSD against the fixed ones and its gradient with
respect to the field in one pass (``grid_sample``'s forward and backward otherwise).
``pdd_box`` (:func:`box_filter`) is the replicate-border box mean of MIND-SSC and of the
levels' feature smoothing, one pass per axis instead of ``2r + 1`` slice additions.
``pdd_sample3`` (:func:`sample3`) is the 3D linear sampling of ``pddreg.spatial.sample`` outside
autograd (every warp of multi-channel feature maps in the levels, the images and masks): the
corner weights once per point for all channels, 3-4x faster than ``grid_sample`` on 12 MIND-SSC
channels at 91x109x91-128^3 on two cores.

Used only where it computes exactly what the PyTorch code does: float32 tensors on the CPU
(:func:`usable`: outside autograd, for inference; :func:`supports`: also under autograd, where
``_autograd`` wraps the forward kernels and their backward kernels, ``pdd_*_bwd``,
``pdd_meanfield_t``, ``pdd_lattice_sums``, in ``torch.autograd.Function``s).  Without a
compiler, on a failed build, or with ``PDDREG_NATIVE=0`` every caller keeps its PyTorch path
(outputs and gradients agree to float32 rounding; tests/test_native*.py check both).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "available",
    "box_filter",
    "correlation",
    "empty_like",
    "io_adam",
    "io_grad",
    "io_sums",
    "lattice_sums",
    "meanfield",
    "meanfield_t",
    "minconv",
    "minconv_backward",
    "probabilities",
    "resample_axis",
    "resample_axis_t",
    "soft_field",
    "softmax_backward",
    "softmax_field",
    "supports",
    "usable",
    "warp_ssd",
]

_SOURCE = Path(__file__).with_name("_native.c")
_MC_W = 32  # column block of pdd_minconv (MC_W in the C source)
_MB_W = 16  # column block of pdd_minconv_bwd (MB_W)
_SF_T = 2048  # column tile of pdd_soft_field (SF_T)
_BX_W = 64  # column block of pdd_box (BX_W)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child makes its own

_p = ctypes.c_void_p
_l = ctypes.c_int64  # int64_t in the C source (C long is 32-bit on Windows)
_i = ctypes.c_int
_f = ctypes.c_float
_SIGNATURES = {
    "pdd_minconv": [_p, _p, _l, _i, _i, _l, _l, _p],
    "pdd_meanfield": [_p, _p, _p, _p, _i, _p, _l, _l, _f, _f, _f, _p, _p],
    "pdd_soft_field": [_p, _p, _p, _l, _l, _i, _l, _l, _p],
    "pdd_hugepages": [_p, _l],
    "pdd_softmax_neg": [_p, _p, _l, _l, _l, _l, _p],
    "pdd_resample": [_p, _p, _l, _l, _l, _p, _p, _p, _p, _l, _l],
    "pdd_correlation": [_p, _p, _p, _i, _p, _p, _p, _p, _p, _l, _l, _l, _i],
    "pdd_minconv_bwd": [_p, _p, _p, _p, _p, _l, _i, _i, _l, _l, _f, _f, _f, _p, _p],
    "pdd_meanfield_t": [_p, _p, _p, _p, _i, _p, _l, _l, _f, _f, _f, _p, _p],
    "pdd_lattice_sums": [_p, _p, _p, _p, _p, _p, _p, _i, _p, _p, _p, _p, _p, _l, _l, _l, _l],
    "pdd_resample_t": [_p, _p, _l, _l, _l, _p, _p, _p, _p, _l, _l],
    "pdd_softmax_field": [_p, _p, _p, _p, _l, _l, _i, _l, _l, _p],
    "pdd_softmax_bwd": [_p, _p, _p, _p, _p, _p, _l, _l, _i, _l, _l, _p],
    "pdd_warp_ssd": [_p, _p, _p, _p, _p, _p, _p, _p, _i, _p, _i, _l, _l],
    "pdd_box": [_p, _p, _l, _l, _i, _l, _l, _l, _l, _p],
    "pdd_sample3": [_p, _p, _p, _p, _i, _l, _i, _l, _l],
    "pdd_io_sums": [_p, _p, _p, _l, _l, _p],
    "pdd_io_grad": [_p, _p, _p, _p, _p, _f, _f, _i, _l, _l, _l],
    "pdd_io_adam": [_p, _p, _p, _p, _p, _i, _p, _p, _f, _f, _f, _f, _f, _f, _f, _l, _l],
}


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc.split()[0]) and cc


def _flags() -> list[str]:
    flags = ["-O3", "-std=gnu99", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math"]
    cap = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64") and cap in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _cache_dirs() -> list[Path]:
    env = os.environ.get("PDDREG_CACHE_DIR")
    if env:
        return [Path(env)]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    user = getattr(os, "getuid", lambda: "user")()
    return [Path(base) / "pddreg", Path(tempfile.gettempdir()) / f"pddreg-{user}"]


def _private_folder(folder: Path) -> None:
    """Create ``folder`` (mode 0700) and refuse it unless this user owns it and nobody else
    may write to it: a library loaded from a folder others can write to runs their code."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not hasattr(os, "getuid"):
        return
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(f"{folder}: not a private folder of this user")


def _build(cc: str, flags: list[str], target: Path) -> None:
    """Compile into a temporary file beside ``target``, then move it into place atomically."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [*cc.split(), *flags, "-o", tmp, str(_SOURCE), "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr else "failed")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        logger.info("no C compiler (cc or $CC): cost volumes use the PyTorch kernels")
        return None
    flags = _flags()
    key = hashlib.sha256(
        _SOURCE.read_bytes() + repr((cc, flags, sys.platform, platform.machine())).encode()
    ).hexdigest()[:16]
    error: Exception | None = None
    for folder in _cache_dirs():
        target = folder / f"_native-{key}.so"
        try:
            _private_folder(folder)
            try:
                lib = ctypes.CDLL(str(target))
            except OSError:  # not built yet, or a broken file: (re)build it
                _build(cc, flags, target)
                lib = ctypes.CDLL(str(target))
        except Exception as exc:  # unwritable or shared folder, compiler error
            error = exc
            continue
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = None
        return lib
    logger.info("native cost kernels unavailable (%s): using the PyTorch kernels", error)
    return None


def available() -> bool:
    """Whether the native kernels are built and loaded (building them on the first call)."""
    global _lib, _tried
    if os.environ.get("PDDREG_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _load()
                _tried = True
    return _lib is not None


def _library() -> ctypes.CDLL:
    if not available():
        raise RuntimeError("pddreg native kernels are not available")
    return _lib


def supports(*ts: torch.Tensor | None) -> bool:
    """True when every tensor is float32 on the CPU and the kernels load (autograd or not: the
    differentiable operators of ``_autograd`` run the native backward kernels)."""
    for t in ts:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return False
    return available()


def usable(*ts: torch.Tensor | None) -> bool:
    """True when every tensor is float32 on the CPU, outside autograd, and the kernels load."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts):
        return False
    return supports(*ts)


def empty_like(t: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``torch.empty`` of ``shape`` (default ``t.shape``) like ``t``, contiguous, backed by
    transparent huge pages where Linux has them (madvise before the first touch; tensors of
    4 MiB and more)."""
    out = torch.empty(t.shape if shape is None else shape, dtype=t.dtype, device=t.device)
    nbytes = out.numel() * out.element_size()
    if nbytes >= 4 * 2**20 and out.device.type == "cpu" and available():
        _lib.pdd_hugepages(out.data_ptr(), nbytes)
    return out


def _executor() -> ThreadPoolExecutor:
    global _pool
    pid = os.getpid()
    if _pool is None or _pool[0] != pid:
        with _lock:
            if _pool is None or _pool[0] != pid:
                _pool = (pid, ThreadPoolExecutor(max(2, os.cpu_count() or 2), "pddreg-native"))
    return _pool[1]


def _run(fn, ranges: list[tuple[int, int]], work_floats: int) -> list[torch.Tensor]:
    """fn(lo, hi, work_ptr) over the ranges, one Python thread each (ctypes drops the GIL);
    returns the work buffers (one per range, in order)."""
    works = [torch.empty(work_floats, dtype=torch.float32) for _ in ranges]
    if len(ranges) == 1:
        fn(*ranges[0], works[0].data_ptr())
        return works
    pool = _executor()
    futures = [
        pool.submit(fn, lo, hi, w.data_ptr()) for (lo, hi), w in zip(ranges, works, strict=True)
    ]
    for f in futures:
        f.result()
    return works


def _tasks(fn, tasks: list[tuple], work_floats: int) -> None:
    """``fn(*task, work_ptr)`` for every task, on up to torch.get_num_threads() Python threads
    (ctypes drops the GIL), each with its own work buffer and every n-th task."""
    nw = max(1, min(torch.get_num_threads(), len(tasks)))
    works = [torch.empty(work_floats, dtype=torch.float32) for _ in range(nw)]

    def worker(i: int) -> None:
        for t in tasks[i::nw]:
            fn(*t, works[i].data_ptr())

    if nw == 1:
        worker(0)
        return
    for f in [_executor().submit(worker, i) for i in range(nw)]:
        f.result()


def _item_ptr(t: torch.Tensor | None, b: int) -> int | None:
    return None if t is None else t.data_ptr() + b * t.stride(0) * t.element_size()


def _per_item(
    tensors: list[torch.Tensor | None], fn, ranges: list[tuple[int, int]], work: int
) -> None:
    """``fn(*pointers of item b, lo, hi, work)`` for every batch item b and range (``tensors``:
    contiguous float32 with the batch axis first, or None: a NULL pointer).  Small items (one
    range each) run in parallel with each other."""
    batch = next(t for t in tensors if t is not None).shape[0]
    tasks = [
        (*[_item_ptr(t, b) for t in tensors], lo, hi) for b in range(batch) for lo, hi in ranges
    ]
    _tasks(fn, tasks, work)


# Least work (elements times their cost) of one range: smaller calls are not split (2D cost
# volumes of a few 10k floats ran slower on two threads than on one).
_MIN_PART = 1 << 16


def _split(total: int, align: int, unit: int = 1) -> list[tuple[int, int]]:
    """``[0, total)`` in up to torch.get_num_threads() ranges, boundaries on ``align``, each of at
    least ``_MIN_PART`` work (``unit``: the work of one of the ``total``)."""
    blocks = -(-total // align)
    parts = max(1, min(torch.get_num_threads(), blocks, total * unit // _MIN_PART))
    edges = [min(total, (blocks * i // parts) * align) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def minconv(src: torch.Tensor, dst: torch.Tensor, n: int, nd: int) -> None:
    """``dst = minconv(src)``, the lecture's min-convolution over the displacement axes.

    Args:
        src, dst: (B, n**nd, *G) contiguous float32 (may be the same tensor).
        n, nd: side and dimension of the displacement cube (nd <= 3).
    """
    K = src[0, 0].numel()
    lib = _library()

    def call(s: int, d: int, k0: int, k1: int, w: int) -> None:
        lib.pdd_minconv(s, d, K, n, nd, k0, k1, w)

    _per_item([src, dst], call, _split(K, _MC_W, 8 * n**nd), 2 * (n + 2) ** nd * _MC_W)


def meanfield(
    x: torch.Tensor,
    d: torch.Tensor | None,
    c: torch.Tensor | None,
    out: torch.Tensor,
    taps: tuple[float, ...],
    wd: float = 0.0,
    wc: float = 0.0,
    wm: float = 1.0,
) -> None:
    """``out = wd * d + wc * c + wm * MF(x)``, MF the lecture's mean-field over the grid axes.

    Args:
        x, d, c, out: (B, |L|, *G) contiguous float32, ``len(G) <= 3``; ``d``/``c`` may be
            None (term left out), ``c`` may be ``out``.
        taps: the 13 taps of the mean-field filter (three box-5 averages), used on the last
            grid axis (the others sum the boxes directly).
    """
    grid = tuple(x.shape[2:])
    nd = len(grid)
    rows = x.shape[0] * x.shape[1]
    t32 = torch.tensor(taps, dtype=torch.float32)
    g = (ctypes.c_int * nd)(*grid)
    G = x[0, 0].numel()
    lib = _library()
    ptr = [None if t is None else t.data_ptr() for t in (x, d, c, out)]

    def call(r0: int, r1: int, w: int) -> None:
        lib.pdd_meanfield(*ptr, nd, g, r0, r1, wd, wc, wm, t32.data_ptr(), w)

    _run(call, _split(rows, 1, 8 * G), 2 * G + 32 * (grid[-1] + 28))


def _lattice_sizes(grid, nodes, a, b, n):
    """The five int64[3] size arrays of the lattice kernels (lower dimensions lead with 1s)."""
    nd = len(grid)
    lead = 3 - nd
    arr = ctypes.c_int64 * 3
    return (
        arr(*([1] * lead + list(grid))),
        arr(*([1] * lead + list(nodes))),
        arr(*([0] * lead + list(a))),
        arr(*([0] * lead + list(b))),
        arr(*([1] * lead + [n] * nd)),
    )


def _row_ranges(G, work: int) -> list[tuple[int, int]]:
    """Ranges of control-grid rows (k0, k1) per thread: whole planes k0 where there are enough
    (``work``: of one row)."""
    return _split(G[0] * G[1], G[1] if G[0] >= 2 * torch.get_num_threads() else 1, work)


def correlation(
    fixed: torch.Tensor,
    lattice: torch.Tensor,
    a: tuple[int, ...],
    b: tuple[int, ...],
    n: int,
    plen: int,
    *,
    dot: bool = False,
) -> torch.Tensor:
    """``cost[:, l, k] = sum_c (fixed[:, c, k] - lattice[:, c, a * k + b * j_l])**2``.

    Args:
        fixed: (B, C, *G) contiguous float32 fixed features at the control points.
        lattice: (B, C, *N) contiguous float32 moving features on the lattice (per axis node
            ``a * k + b * j`` for point ``k``, displacement index ``j`` in ``0..n-1``), the
            last axis phase-major (``_lattice.phase_major``: ``N[-1] = a[-1] * plen``).
        a, b: lattice steps per axis; n: displacements per axis (``2 r + 1``).
        dot: ``sum_c fixed[:, c, k] * lattice[:, c, a * k + b * j_l]`` instead.

    Returns:
        (B, n**nd, *G) float32 (huge-page backed where available).
    """
    B, C = fixed.shape[:2]
    grid = tuple(fixed.shape[2:])
    lat = lattice
    G, N, A, Bs, NJ = _lattice_sizes(grid, tuple(lat.shape[2:]), a, b, n)
    out = empty_like(fixed, (B, n ** len(grid), *grid))
    lib = _library()
    mode = int(dot)

    def call(fp: int, gp: int, op: int, r0: int, r1: int, w: int) -> None:
        lib.pdd_correlation(fp, gp, op, C, G, N, A, Bs, NJ, plen, r0, r1, mode)

    _per_item([fixed, lat, out], call, _row_ranges(G, G[2] * NJ[0] * NJ[1] * NJ[2] * C), 1)
    return out


def lattice_sums(
    weights: torch.Tensor,
    fixed: torch.Tensor | None,
    lattice: torch.Tensor | None,
    nodes: tuple[int, ...],
    a: tuple[int, ...],
    b: tuple[int, ...],
    n: int,
    plen: int,
    *,
    want: str,
) -> dict[str, torch.Tensor]:
    """The sums over the displacements behind the lattice operators' gradients.

    With ``m = a * k + b * j_l`` per axis (as :func:`correlation`) and ``w = weights``::

        T[:, c, k] = sum_l w[:, l, k] lattice[:, c, m]        S[:, 0, k] = sum_l w[:, l, k]
        U[:, c, m] = sum_{k, l -> m} w[:, l, k] fixed[:, c, k]  W[:, 0, m] = sum_{k, l -> m} w

    Args:
        weights: (B, n**nd, *G) contiguous float32.
        fixed: (B, C, *G) contiguous float32 (needed for U).
        lattice: (B, C, *N) contiguous float32 (needed for T), the last axis phase-major as
            in :func:`correlation` (``N[-1] = a[-1] * plen``).
        nodes: N, the lattice size.
        want: which of "TSUW" to compute.

    Returns:
        {"T": (B, C, *G), "S": (B, 1, *G), "U": (B, C, *N), "W": (B, 1, *N)} for those wanted
        (U and W phase-major like the lattice).
    """
    B = weights.shape[0]
    grid = tuple(weights.shape[2:])
    C = (fixed if fixed is not None else lattice).shape[1]
    pnodes = tuple(nodes)
    G, N, A, Bs, NJ = _lattice_sizes(grid, pnodes, a, b, n)
    nt = math.prod(pnodes)
    out: dict[str, torch.Tensor] = {}
    gt = math.prod(grid)
    ts = gt + 16 if gt % 1024 == 0 else gt  # channel stride of T: not a multiple of 4 kB
    T = S = None
    if "T" in want:
        T = weights.new_empty(B, C, ts)[:, :, :gt].unflatten(2, grid)
    if "S" in want:
        S = weights.new_empty(B, 1, *grid)
    for key, t in (("T", T), ("S", S)):
        if t is not None:
            out[key] = t
    scatter = "U" in want or "W" in want
    if scatter:
        out["U"] = weights.new_zeros(B, C, *pnodes)
        out["W"] = weights.new_zeros(B, 1, *pnodes)
    lib = _library()
    ranges = _row_ranges(G, 2 * G[2] * NJ[0] * NJ[1] * NJ[2] * C)
    work = (C + 1) * nt if scatter else 1
    uoff = 0 if "U" in want else None
    woff = C * nt if "W" in want else None
    for bi in range(B):
        wp, fp, gp = (_item_ptr(t, bi) for t in (weights, fixed, lattice))
        tp, sp = _item_ptr(T, bi), _item_ptr(S, bi)

        def call(r0: int, r1: int, w: int, wp=wp, fp=fp, gp=gp, tp=tp, sp=sp) -> None:
            up = None if uoff is None else w + 4 * uoff
            vp = None if woff is None else w + 4 * woff
            if up is not None or vp is not None:
                ctypes.memset(w, 0, 4 * work)
            lib.pdd_lattice_sums(wp, fp, gp, tp, sp, up, vp, C, G, N, A, Bs, NJ, plen, ts, r0, r1)

        works = _run(call, ranges, work)
        if scatter:
            total = works[0] if len(works) == 1 else torch.stack(works).sum(0)
            out["U"][bi] = total[: C * nt].view(C, *pnodes)
            out["W"][bi] = total[C * nt :].view(1, *pnodes)
    return {k: v for k, v in out.items() if k in want}


def resample_axis(
    x: torch.Tensor,
    dim: int,
    i0: torch.Tensor,
    w0: torch.Tensor,
    i1: torch.Tensor,
    w1: torch.Tensor,
) -> torch.Tensor:
    """``out[.., i, ..] = w0[i] x[.., i0[i], ..] + w1[i] x[.., i1[i], ..]`` along ``dim`` of a
    contiguous float32 ``x``: linear resampling with the taps of
    ``pddreg.cost._lattice.linear_taps``."""
    size = x.shape[dim]
    idx = [t.to(torch.int64).contiguous() for t in (i0, i1)]
    wts = [t.to(torch.float32).contiguous() for t in (w0, w1)]
    o = idx[0].numel()
    P = math.prod(x.shape[:dim])
    Q = math.prod(x.shape[dim + 1 :])
    out = empty_like(x, (*x.shape[:dim], o, *x.shape[dim + 1 :]))
    lib = _library()
    ptrs = (idx[0].data_ptr(), wts[0].data_ptr(), idx[1].data_ptr(), wts[1].data_ptr())

    def call(p0: int, p1: int, w: int) -> None:
        lib.pdd_resample(x.data_ptr(), out.data_ptr(), size, Q, o, *ptrs, p0, p1)

    _run(call, _split(P, 1, 2 * o * Q), 1)
    return out


def resample_axis_t(
    y: torch.Tensor,
    dim: int,
    size: int,
    i0: torch.Tensor,
    w0: torch.Tensor,
    i1: torch.Tensor,
    w1: torch.Tensor,
) -> torch.Tensor:
    """The transpose (gradient) of :func:`resample_axis`: ``y`` (.., o, ..) along ``dim`` back
    onto an axis of ``size`` (taps as there)."""
    idx = [t.to(torch.int64).contiguous() for t in (i0, i1)]
    wts = [t.to(torch.float32).contiguous() for t in (w0, w1)]
    o = y.shape[dim]
    P = math.prod(y.shape[:dim])
    Q = math.prod(y.shape[dim + 1 :])
    y = y.contiguous()
    out = empty_like(y, (*y.shape[:dim], size, *y.shape[dim + 1 :]))
    lib = _library()
    ptrs = (idx[0].data_ptr(), wts[0].data_ptr(), idx[1].data_ptr(), wts[1].data_ptr())

    def call(p0: int, p1: int, w: int) -> None:
        lib.pdd_resample_t(y.data_ptr(), out.data_ptr(), size, Q, o, *ptrs, p0, p1)

    _run(call, _split(P, 1, 2 * o * Q), 1)
    return out


def probabilities(cost: torch.Tensor) -> torch.Tensor:
    """``softmax(-cost, dim=1)`` of a contiguous float32 (B, |L|, *G) cost (huge pages)."""
    nl = cost.shape[1]
    K = cost[0, 0].numel()
    out = empty_like(cost)
    lib = _library()

    def call(c: int, o: int, k0: int, k1: int, w: int) -> None:
        lib.pdd_softmax_neg(c, o, nl, K, k0, k1, w)

    _per_item([cost, out], call, _split(K, _SF_T, 4 * nl), 2 * _SF_T)
    return out


def soft_field(cost: torch.Tensor, disp: torch.Tensor, out: torch.Tensor) -> None:
    """``out = sum_l softmax(-cost)_l * disp[l]`` per control point.

    Args:
        cost: (B, |L|, *G) contiguous float32.
        disp: (|L|, nd) displacement set, nd <= 3.
        out: (B, nd, *G) contiguous float32.
    """
    nl = cost.shape[1]
    K = cost[0, 0].numel()
    nd = disp.shape[1]
    d32 = disp.detach().to(device="cpu", dtype=torch.float32).contiguous()
    lib = _library()

    def call(c: int, o: int, k0: int, k1: int, w: int) -> None:
        lib.pdd_soft_field(c, d32.data_ptr(), o, nl, K, nd, k0, k1, w)

    _per_item([cost, out], call, _split(K, _SF_T, 4 * nl), 5 * _SF_T)


def minconv_backward(
    x: torch.Tensor,
    gy: torch.Tensor,
    out: torch.Tensor,
    n: int,
    nd: int,
    *,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    wa: float = 0.0,
    wb: float = 0.0,
    wm: float = 1.0,
) -> tuple[float, float, float]:
    """``out = wm * MC_x^T(gy) + wa * a + wb * b``: the gradient of :func:`minconv` at ``x``.

    Args:
        x, gy, a, b, out: (B, n**nd, *G) contiguous float32; ``a``, ``b`` may be None; ``out``
            may be ``gy``, ``a`` or ``b``.

    Returns:
        ``(sum gy * minconv(x), sum a * x, sum b * x)`` over all elements (0 for missing terms).
    """
    K = x[0, 0].numel()
    lib = _library()
    ranges = _split(K, _MB_W, 24 * n**nd)
    tasks = [
        (len(ranges) * bi + i, *[_item_ptr(t, bi) for t in (x, gy, a, b, out)], k0, k1)
        for bi in range(x.shape[0])
        for i, (k0, k1) in enumerate(ranges)
    ]
    dots = [(ctypes.c_double * 3)() for _ in tasks]

    def call(i: int, xp, gp, ap, bp, op, k0: int, k1: int, w: int) -> None:
        lib.pdd_minconv_bwd(xp, gp, ap, bp, op, K, n, nd, k0, k1, wa, wb, wm, dots[i], w)

    _tasks(call, tasks, (5 * (n + 2) ** nd + n**nd) * _MB_W)
    return tuple(float(sum(d[i] for d in dots)) for i in range(3))  # type: ignore[return-value]


def meanfield_t(
    x: torch.Tensor,
    d: torch.Tensor | None,
    c: torch.Tensor | None,
    out: torch.Tensor,
    taps: tuple[float, ...],
    wd: float = 0.0,
    wc: float = 0.0,
    wm: float = 1.0,
) -> None:
    """``out = wd * d + wc * c + wm * MF^T(x)``: the transpose (gradient) of :func:`meanfield`
    (same arguments)."""
    grid = tuple(x.shape[2:])
    nd = len(grid)
    rows = x.shape[0] * x.shape[1]
    t32 = torch.tensor(taps, dtype=torch.float32)
    g = (ctypes.c_int * nd)(*grid)
    G = x[0, 0].numel()
    lib = _library()
    ptr = [None if t is None else t.data_ptr() for t in (x, d, c, out)]

    def call(r0: int, r1: int, w: int) -> None:
        lib.pdd_meanfield_t(*ptr, nd, g, r0, r1, wd, wc, wm, t32.data_ptr(), w)

    _run(call, _split(rows, 1, 8 * G), 2 * G + 32 * (2 * grid[-1] + 2 * len(taps) + 16))


def softmax_field(
    cost: torch.Tensor, disp: torch.Tensor | None, *, prob: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``softmax(-cost, 1)`` (if ``prob``) and ``sum_l softmax(-cost)_l * disp[l]`` (if ``disp``
    is given) of a contiguous float32 (B, |L|, *G) cost, in one pass.

    Returns:
        ``(prob (B, |L|, *G) or None, field (B, nd, *G) or None)``.
    """
    nl = cost.shape[1]
    K = cost[0, 0].numel()
    p = empty_like(cost) if prob else None
    f = d32 = None
    nd = 0
    if disp is not None:
        nd = disp.shape[1]
        d32 = disp.detach().to(device="cpu", dtype=torch.float32).contiguous()
        f = cost.new_empty(cost.shape[0], nd, *cost.shape[2:])
    lib = _library()
    dp = None if d32 is None else d32.data_ptr()

    def call(c: int, o: int, fo: int, k0: int, k1: int, w: int) -> None:
        lib.pdd_softmax_field(c, dp, o, fo, nl, K, nd, k0, k1, w)

    _per_item([cost, p, f], call, _split(K, _SF_T, 4 * nl), 5 * _SF_T)
    return p, f


def softmax_backward(
    prob: torch.Tensor | None,
    cost: torch.Tensor | None,
    dprob: torch.Tensor | None,
    gfield: torch.Tensor | None,
    disp: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """``out`` = gradient w.r.t. ``cost`` of ``prob = softmax(-cost, 1)`` and
    ``field = sum_l prob_l disp[l]`` given ``dprob`` (B, |L|, *G) and ``gfield`` (B, nd, *G)
    (either may be None).  ``prob`` is used when given, else recomputed from ``cost``
    (then ``out`` must not be ``dprob``).  All contiguous float32."""
    ref = prob if prob is not None else cost
    assert ref is not None
    nl = ref.shape[1]
    K = ref[0, 0].numel()
    nd = 0
    dp = None
    if gfield is not None:
        assert disp is not None
        nd = disp.shape[1]
        d32 = disp.detach().to(device="cpu", dtype=torch.float32).contiguous()
        dp = d32.data_ptr()
    lib = _library()

    def call(p: int, c: int, g: int, gf: int, o: int, k0: int, k1: int, w: int) -> None:
        lib.pdd_softmax_bwd(p, c, g, gf, dp, o, nl, K, nd, k0, k1, w)

    _per_item([prob, cost, dprob, gfield, out], call, _split(K, _SF_T, 4 * nl), 4 * _SF_T)


def warp_ssd(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    disp: torch.Tensor,
    moving_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Warped feature SSD and its gradient with respect to the displacement.

    Args:
        fixed, moving: ``(B, *S, C)`` float32 features, channels last (2D or 3D ``S``).
        disp: ``(B, ndim, *S)`` displacement in voxels (``moving`` is sampled at ``x + disp``,
            multilinear, border padding, as ``pddreg.spatial.warp``).
        moving_mask: ``(B, 1, *S)`` float32 or None.

    Returns:
        ``ssd`` ``(B, 1, *S)``: ``sum_c (moving_c(x + disp(x)) - fixed_c(x))^2``, and ``grad``
        ``(B, ndim, *S)``: its derivative with respect to ``disp(x)`` (0 on a clamped axis);
        with ``moving_mask`` also the mask warped by ``disp`` (``(B, 1, *S)``, multilinear,
        zeros outside) and its derivative ``(B, ndim, *S)``.
    """
    nd = disp.shape[1]
    shape = tuple(disp.shape[2:])
    C = fixed.shape[-1]
    fixed, moving, disp = (t.contiguous() for t in (fixed, moving, disp))
    sizes = torch.tensor(shape, dtype=torch.int64)
    ssd = torch.empty((disp.shape[0], 1, *shape), dtype=torch.float32)
    grad = torch.empty_like(disp)
    masked = moving_mask is not None
    mk = moving_mask.contiguous() if masked else None
    wk = torch.empty_like(ssd) if masked else None
    gk = torch.empty_like(disp) if masked else None
    lib = _library()

    def call(f, m, u, s, g, k, w, h, p0: int, p1: int, work: int) -> None:
        lib.pdd_warp_ssd(f, m, u, s, g, k, w, h, nd, sizes.data_ptr(), C, p0, p1)

    tensors = [fixed, moving, disp, ssd, grad, mk, wk, gk]
    _per_item(tensors, call, _split(math.prod(shape), 1024, 8 * C), 1)
    return (ssd, grad, wk, gk) if masked else (ssd, grad)


def io_sums(
    ssd: torch.Tensor, moved_mask: torch.Tensor | None, fixed_mask: torch.Tensor | None
) -> tuple[float, float]:
    """``(sum w, sum w ssd)`` over every item, ``w = fixed_mask * moved_mask`` (None: 1), all
    ``(B, 1, *S)`` contiguous float32 (the weighted SSD of the instance optimisation)."""
    lib = _library()
    n = math.prod(ssd.shape[2:])
    out = torch.zeros(2, dtype=torch.float64)
    for b in range(ssd.shape[0]):
        ptrs = [_item_ptr(t, b) for t in (ssd, moved_mask, fixed_mask)]
        lib.pdd_io_sums(*ptrs, 0, n, out.data_ptr())
    return float(out[0]), float(out[1])


def io_grad(
    ssd: torch.Tensor,
    grad: torch.Tensor,
    moved_mask: torch.Tensor | None,
    mask_grad: torch.Tensor | None,
    fixed_mask: torch.Tensor | None,
    data: float,
    inv_norm: float,
) -> None:
    """In place on ``grad`` ``(B, ndim, *S)`` (the SSD's gradient from :func:`warp_ssd`): the
    gradient of the weighted mean ``sum(w ssd) / norm``, ``(w grad + fixed_mask mask_grad (ssd -
    data)) * inv_norm`` with ``w = fixed_mask * moved_mask`` (None: 1; ``mask_grad`` None: no
    mask term); every tensor contiguous float32, masks ``(B, 1, *S)``."""
    nd = grad.shape[1]
    n = math.prod(grad.shape[2:])
    lib = _library()

    def call(s: int, g: int, w: int, k: int, f: int, p0: int, p1: int, work: int) -> None:
        lib.pdd_io_grad(s, g, w, k, f, data, inv_norm, nd, n, p0, p1)

    tensors = [ssd, grad, moved_mask, mask_grad, fixed_mask]
    _per_item(tensors, call, _split(n, 1024, 4 * nd), 1)


def io_adam(
    params: torch.Tensor,
    grad: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    axis_weights: list[float],
    component_weights: list[float],
    betas: tuple[float, float],
    c1: float,
    c2: float,
    eps: float,
) -> None:
    """One Adam step of the instance optimisation's control field ``params`` ``(B, ndim, *G)``
    into ``out`` on ``grad`` plus the gradient of the diffusion term ``lambda * sum_j
    mean(d_j^2)`` (``d_j``: forward differences of ``params * scale`` along axis ``j``), given
    by ``axis_weights`` (``lambda * 2 / numel(d_j)``) and ``component_weights`` (``scale[a] **
    2``); ``m``, ``v``: Adam's moments (updated in place), ``c1 = lr / (1 - b1^t)``, ``c2 = 1 -
    b2^t``. Every tensor contiguous float32."""
    nd = params.shape[1]
    grid = torch.tensor(tuple(params.shape[2:]), dtype=torch.int64)
    coef = torch.tensor([*axis_weights, *component_weights], dtype=torch.float32)
    rows = math.prod(params.shape[2:-1])
    lib = _library()
    b1, b2 = betas

    def call(p: int, g: int, mm: int, vv: int, o: int, p0: int, p1: int, work: int) -> None:
        lib.pdd_io_adam(
            p,
            g,
            mm,
            vv,
            o,
            nd,
            grid.data_ptr(),
            coef.data_ptr(),
            b1,
            b2,
            1 - b1,
            1 - b2,
            c1,
            c2,
            eps,
            p0,
            p1,
        )

    _per_item([params, grad, m, v, out], call, _split(rows, 1, 12 * nd * params.shape[-1]), 1)


def sample3(image: torch.Tensor, coords: torch.Tensor, zeros: bool = False) -> torch.Tensor:
    """Trilinear samples of ``image`` ``(B, C, *S)`` at voxel coordinates ``coords``
    ``(B, 3, *T)`` (float32, contiguous, same batch): ``(B, C, *T)``, what ``grid_sample``
    (``align_corners=True``, border or zeros padding) gives on the normalised coordinates."""
    B, C = image.shape[:2]
    out_shape = tuple(coords.shape[2:])
    n = math.prod(out_shape)
    sizes = torch.tensor(tuple(image.shape[2:]), dtype=torch.int64)
    out = empty_like(image, (B, C, *out_shape))
    lib = _library()

    def call(x: int, q: int, y: int, p0: int, p1: int, work: int) -> None:
        lib.pdd_sample3(x, q, y, sizes.data_ptr(), C, n, int(zeros), p0, p1)

    _per_item([image, coords, out], call, _split(n, 1024, 8 * C), 1)
    return out


def box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Box mean over a ``(2 radius + 1)^ndim`` window with replicate borders of a float32
    ``(B, C, *S)`` tensor (``pddreg.features.mind._box_filter``'s sums in its order): one pass
    per spatial axis, the first into a new tensor, the others in place (no huge pages: these
    passes stream, and a huge-page fault can stall for compaction)."""
    x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    lib = _library()
    src = x
    threads = torch.get_num_threads()
    for axis in range(2, x.dim()):
        n = x.shape[axis]
        P = math.prod(x.shape[:axis])
        Q = math.prod(x.shape[axis + 1 :])
        if P >= 2 * threads or Q <= _BX_W:
            tasks = [(p0, p1, 0, Q) for p0, p1 in _split(P, 1, n * Q * (2 * radius + 1))]
        else:
            tasks = [(0, P, q0, q1) for q0, q1 in _split(Q, _BX_W, P * n * (2 * radius + 1))]

        def call(p0: int, p1: int, q0: int, q1: int, w: int, s=src, n=n, Q=Q) -> None:
            lib.pdd_box(s.data_ptr(), out.data_ptr(), n, Q, radius, p0, p1, q0, q1, w)

        _tasks(call, tasks, n * min(Q, _BX_W) + 2 * radius)
        src = out
    return out
