"""Regularisation of a cost volume without learned filters: min-convolution and mean-field.

The lecture's 2D formulation (reproduced exactly, in any dimension):

* ``minconv``: over the ``(2r+1)^ndim`` displacement axes of each control point, replicate-pad 5,
  box-5 average, box-5 average, then a 3-wide min-pool.  Pad-then-two-valid-box-5 equals one
  valid 9-tap filter ``[1,2,3,4,5,4,3,2,1]/25`` per axis on the padded signal; with the
  replicate padding folded in it is a ``(n+2, n)`` matrix per axis, applied as a matmul.  The
  min-pool then acts on the ``(n+2)^ndim`` filtered signal (as the lecture's ``MaxPool`` on the
  negated cost), separably.
* ``meanfield``: over the grid axes of each displacement, replicate-pad 6 and three box-5
  averages, i.e. one valid 13-tap filter (the convolution of three box-5 kernels) per axis,
  again a ``(G, G)`` matrix per axis with the padding folded in.

Cost volumes are ``(B, |L|, *G)``; the min-convolution works on chunks of control points
(columns), the mean-field on chunks of displacements (rows), so each chunk stays in cache.
Float32 CPU tensors run the same operators in the native kernels of ``_native.c`` where
they are available (see ``_native.py``), under autograd with native backward kernels
(``_autograd.py``); float64 (``gradcheck``) and CUDA keep this PyTorch formulation.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import torch

from ..errors import InputError
from . import _autograd, _native
from ._lattice import DEFAULT_MAX_MEMORY, checkpointed, wants_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ALPHA",
    "EXACT_WEIGHT",
    "meanfield",
    "minconv",
    "minconv_exact",
    "regularise",
]

# Six scalar weights of ``regularise`` (see its docstring for the formula).  Chosen for SSD of
# features in [0, 1] with about 12 channels (multi-scale MIND-SSC: the SSD of a good match is
# ~0.2, the mean over the displacement set ~1.9) by a grid search (``python
# benchmarks/bench_cost.py --calibrate``: a0 in {.25..1}, a2 in {0..0.5}, a4 in {.5..4},
# a5 in {4..64}; a1 = a3 = 1, the overall scale is a5) on six synthetic smooth deformations (up
# to 4 and 7 feature voxels) of a real brain MRI slice, minimising the mean end-point error of
# ``soft_field`` (1.69 -> 0.75 voxels for the small, 2.96 -> 1.25 for the large ones); the best
# of the grid was 1% better.  For features with twice the channels (same per-channel contrast)
# halve a5.
DEFAULT_ALPHA: list[float] = [0.5, 1.0, 0.0, 1.0, 2.0, 16.0]

# Weight of ``minconv_exact`` used by ``regularise(exact=True)``, per squared displacement step
# (index units).  The lecture's approximate min-convolution is linear in the cost scale while the
# exact one has a fixed quadratic penalty; 0.3 minimised the mean |approx - exact| on the same
# MIND SSD costs (0.36 against 0.39 at 0.2 and 0.5, 1.0 at 0.02; benchmarks/bench_cost.py).
# On those cases ``regularise(exact=True)`` with DEFAULT_ALPHA even gave a lower end-point error
# (0.68 against 1.00 voxels), at about 17x the time (2D, 169 displacements, 64x64 grid).
EXACT_WEIGHT: float = 0.3

# Working-set budget of one chunk of the min-convolution / mean-field (bytes; 8 MiB was faster
# than 2 and no slower than 32 in 3D on 2 cores).
_CHUNK_BYTES = 8 * 2**20


def _shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _side(fn: str, cost: torch.Tensor) -> int:
    """Side ``2r+1`` of the displacement cube of a cost volume (B, |L|, *G)."""
    if not isinstance(cost, torch.Tensor) or cost.dim() < 3:
        got = _shape_str(cost) if isinstance(cost, torch.Tensor) else type(cost).__name__
        raise ValueError(f"{fn}: 'cost' must have shape (B, |L|, *grid), got {got}")
    nd = cost.dim() - 2
    n = round(cost.shape[1] ** (1.0 / nd))
    for c in (n - 1, n, n + 1):
        if c > 0 and c**nd == cost.shape[1] and c % 2 == 1:
            return c
    raise ValueError(
        f"{fn}: 'cost' must have shape (B, (2r+1)**{nd}, *grid) in {nd}D, got {_shape_str(cost)}"
    )


@functools.lru_cache(maxsize=64)
def _filter_matrix_cpu(n: int, taps: tuple[float, ...], pad: int, out: int) -> torch.Tensor:
    """(out, n) float64 matrix of a valid FIR filter on the replicate-padded signal."""
    m = torch.zeros(out, n, dtype=torch.float64)
    for i in range(out):
        for t, w in enumerate(taps):
            j = min(max(i + t - pad, 0), n - 1)
            m[i, j] += w
    return m


def _kernel(boxes: int) -> tuple[float, ...]:
    k = torch.ones(1, dtype=torch.float64)
    box = torch.ones(5, dtype=torch.float64) / 5.0
    for _ in range(boxes):
        k = torch.nn.functional.conv1d(k.view(1, 1, -1), box.view(1, 1, -1), padding=4).view(-1)
    return tuple(k.tolist())


_K9 = _kernel(2)  # [1,2,3,4,5,4,3,2,1] / 25
_K13 = _kernel(3)


def _mat(n: int, kind: str, device, dtype) -> torch.Tensor:
    if kind == "minconv":
        m = _filter_matrix_cpu(n, _K9, 5, n + 2)
    else:
        m = _filter_matrix_cpu(n, _K13, 6, n)
    return m.to(device=device, dtype=dtype)


def _apply_axis(x: torch.Tensor, m: torch.Tensor, dim: int) -> torch.Tensor:
    """Multiply axis ``dim`` of ``x`` by the matrix ``m`` (out, n)."""
    shape = x.shape
    p = math.prod(shape[:dim])
    q = math.prod(shape[dim + 1 :])
    if q == 1:
        y = x.reshape(p, shape[dim]) @ m.t()
    else:
        y = torch.matmul(m, x.reshape(p, shape[dim], q))
    return y.view(*shape[:dim], m.shape[0], *shape[dim + 1 :])


def _min3(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """Valid 3-wide min-pool along ``dim`` (length n + 2 -> n)."""
    return torch.minimum(
        torch.minimum(x.narrow(dim, 0, n), x.narrow(dim, 1, n)), x.narrow(dim, 2, n)
    )


def _minconv_block(x: torch.Tensor, n: int, nd: int, mat: torch.Tensor) -> torch.Tensor:
    """x (B, |L|, Kc) -> lecture min-convolution over the displacement axes, same shape."""
    B, nl, kc = x.shape
    y = x.reshape(B, *([n] * nd), kc)
    for ax in range(nd):
        y = _apply_axis(y, mat, 1 + ax)
    for ax in range(nd):
        y = _min3(y, 1 + ax, n)
    return y.reshape(B, nl, kc)


def _meanfield_block(x: torch.Tensor, mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """x (P, *G) -> mean-field (13-tap replicate-padded) over every grid axis."""
    for ax, m in enumerate(mats):
        x = _apply_axis(x, m, 1 + ax)
    return x


def _meanfield_rows(rows: torch.Tensor, *mats: torch.Tensor) -> torch.Tensor:
    """rows (B, Lc, *G) -> mean-field of each row, same shape."""
    return _meanfield_block(rows.reshape(-1, *rows.shape[2:]), mats).view(rows.shape)


def _column_chunk(cost: torch.Tensor, max_memory: int | None) -> int:
    budget = min(_CHUNK_BYTES, max_memory or DEFAULT_MAX_MEMORY)
    per_col = 4 * cost.shape[0] * cost.shape[1] * cost.element_size()
    return max(1, budget // per_col)


def _row_chunk(cost: torch.Tensor, max_memory: int | None) -> int:
    budget = min(_CHUNK_BYTES, max_memory or DEFAULT_MAX_MEMORY)
    per_row = 3 * cost.shape[0] * math.prod(cost.shape[2:]) * cost.element_size()
    return max(1, budget // per_row)


def _needs_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def minconv(cost: torch.Tensor, *, max_memory: int | None = None) -> torch.Tensor:
    """The lecture's approximate min-convolution over the displacement axes.

    Per control point, over the ``(2r+1,) * ndim`` displacement cube: replicate-pad 5, two box-5
    averages, 3-wide min-pool (``-maxpool(-x)``), exactly as the lecture's
    ``minconv = nn.Sequential(pad1, avg1, avg1, max1)`` applied to ``-cost``.

    Args:
        cost: (B, |L|, *G) with ``|L| = (2r+1)**ndim``.
        max_memory: bound on the chunk working memory in bytes.

    Returns:
        (B, |L|, *G).
    """
    n = _side("minconv()", cost)
    nd = cost.dim() - 2
    B, nl = cost.shape[:2]
    flat = cost.reshape(B, nl, -1)
    K = flat.shape[2]
    mat = _mat(n, "minconv", cost.device, cost.dtype)
    kc = _column_chunk(cost, max_memory)
    if _needs_grad(cost):
        if nd <= 3 and _native.supports(cost):  # native backward
            return _autograd.minconv(flat, n, nd).view(cost.shape)
        ckpt = wants_checkpoint(cost.numel() * cost.element_size(), cost)
        if not ckpt:
            return _minconv_block(flat, n, nd, mat).view(cost.shape)
        kc = max(kc, 16 * kc)  # fewer, larger chunks: each is recomputed in backward
        parts = [checkpointed(_minconv_block, x, n, nd, mat) for x in flat.split(kc, 2)]
        return torch.cat(parts, 2).view(cost.shape)
    out = torch.empty_like(flat)
    if nd <= 3 and _native.usable(cost):
        _native.minconv(flat.contiguous(), out, n, nd)
        return out.view(cost.shape)
    for k in range(0, K, kc):
        out[:, :, k : k + kc] = _minconv_block(flat[:, :, k : k + kc], n, nd, mat)
    return out.view(cost.shape)


def meanfield(cost: torch.Tensor, *, max_memory: int | None = None) -> torch.Tensor:
    """The lecture's mean-field step over the control-grid axes of each displacement.

    Replicate-pad 6, then three box-5 averages (stride 1) per grid axis, exactly as the
    lecture's ``meanfield = nn.Sequential(pad2, avg1, avg1, avg1)``.

    Args:
        cost: (B, |L|, *G).

    Returns:
        (B, |L|, *G).
    """
    if not isinstance(cost, torch.Tensor) or cost.dim() < 3:
        got = _shape_str(cost) if isinstance(cost, torch.Tensor) else type(cost).__name__
        raise ValueError(f"meanfield(): 'cost' must have shape (B, |L|, *grid), got {got}")
    B, nl = cost.shape[:2]
    grid = tuple(cost.shape[2:])
    mats = [_mat(g, "meanfield", cost.device, cost.dtype) for g in grid]
    lc = _row_chunk(cost, max_memory)
    if _needs_grad(cost):
        if len(grid) <= 3 and _native.supports(cost):  # native backward
            return _autograd.meanfield(cost, _K13)
        if not wants_checkpoint(cost.numel() * cost.element_size(), cost):
            return _meanfield_rows(cost, *mats)
        lc = 16 * lc
        parts = [checkpointed(_meanfield_rows, x, *mats) for x in cost.split(lc, 1)]
        return torch.cat(parts, 1)
    out = torch.empty_like(cost)
    if len(grid) <= 3 and _native.usable(cost):
        _native.meanfield(cost.contiguous(), None, None, out, _K13)
        return out
    for l in range(0, nl, lc):
        blk = cost[:, l : l + lc]
        out[:, l : l + lc] = _meanfield_block(blk.reshape(-1, *grid), mats).view(blk.shape)
    return out


def _fh_argmin(f: torch.Tensor, w: float) -> torch.Tensor:
    """Felzenszwalb-Huttenlocher: for each row of f (N, n), argmin_q f[q] + w (p - q)^2 per p.

    The lower envelope of the parabolas rooted at each q is built left to right for all rows
    at once (vectorised over rows, loops only over the n positions); returns (N, n) int64.
    """
    N, n = f.shape
    dev = f.device
    f = f.to(torch.float64)
    q = torch.arange(n, device=dev, dtype=torch.float64)
    h = f + w * q * q
    rows = torch.arange(N, device=dev)
    v = torch.zeros(N, n, dtype=torch.long, device=dev)
    z = torch.full((N, n + 1), math.inf, dtype=torch.float64, device=dev)
    z[:, 0] = -math.inf
    k = torch.zeros(N, dtype=torch.long, device=dev)
    for qi in range(1, n):
        while True:
            vk = v[rows, k]
            s = (h[:, qi] - h[rows, vk]) / (2.0 * w * (qi - vk).to(torch.float64))
            pop = s <= z[rows, k]
            if not bool(pop.any()):
                break
            k = k - pop.long()
        k = k + 1
        v[rows, k] = qi
        z[rows, k] = s
        z[rows, k + 1] = math.inf
    k = torch.zeros(N, dtype=torch.long, device=dev)
    out = torch.empty(N, n, dtype=torch.long, device=dev)
    for p in range(n):
        while True:
            step = z[rows, k + 1] < p
            if not bool(step.any()):
                break
            k = k + step.long()
        out[:, p] = v[rows, k]
    return out


def _exact_axis(x: torch.Tensor, dim: int, w: float) -> torch.Tensor:
    """Exact 1D min-convolution along ``dim`` with penalty w * (p - q)^2 (index units)."""
    n = x.shape[dim]
    xm = x.movedim(dim, -1)
    shape = xm.shape
    flat = xm.reshape(-1, n)
    if w <= 0:
        res = flat.min(1, keepdim=True).values.expand(-1, n)
    else:
        with torch.no_grad():
            arg = _fh_argmin(flat.detach(), w)
        p = torch.arange(n, device=x.device, dtype=x.dtype)
        res = flat.gather(1, arg) + w * (p - arg.to(x.dtype)) ** 2
    return res.reshape(shape).movedim(-1, dim)


def minconv_exact(
    cost: torch.Tensor,
    weight: float,
    spacing: float = 1.0,
    *,
    max_memory: int | None = None,
) -> torch.Tensor:
    """Exact min-convolution ``min_d' cost(d') + weight * |d - d'|^2`` over the displacement set.

    ``d`` in voxels (``spacing`` times the index), so the penalty per index step is
    ``weight * spacing**2``.  The squared Euclidean distance is separable, so it runs as one 1D
    lower envelope of parabolas (Felzenszwalb & Huttenlocher) per displacement axis, vectorised
    over all control points.  Differentiable w.r.t. ``cost`` (through the selected minima).

    Args:
        cost: (B, |L|, *G) with ``|L| = (2r+1)**ndim``.
        weight: non-negative penalty weight per squared voxel.
        spacing: voxels per displacement step.

    Returns:
        (B, |L|, *G).
    """
    fn = "minconv_exact()"
    n = _side(fn, cost)
    weight = float(weight)
    if not (math.isfinite(weight) and weight >= 0):
        raise InputError(f"{fn}: weight must be a non-negative finite number, got {weight!r}")
    if not (math.isfinite(spacing) and spacing > 0):
        raise InputError(f"{fn}: spacing must be a positive finite number, got {spacing!r}")
    nd = cost.dim() - 2
    B, nl = cost.shape[:2]
    flat = cost.reshape(B, nl, -1)
    w = weight * spacing * spacing
    budget = max_memory or DEFAULT_MAX_MEMORY
    kc = max(1, budget // (40 * B * nl * 8))
    parts = []
    for x in flat.split(kc, 2):
        y = x.reshape(B, *([n] * nd), -1)
        for ax in range(nd):
            y = _exact_axis(y, 1 + ax, w)
        parts.append(y.reshape(B, nl, -1))
    return torch.cat(parts, 2).view(cost.shape)


def _check_alpha(alpha, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(alpha, torch.Tensor):
        alpha = torch.as_tensor(alpha, dtype=like.dtype, device=like.device)
    if alpha.shape != (6,):
        raise ValueError(f"regularise(): 'alpha' must have shape (6,), got {_shape_str(alpha)}")
    return alpha.to(device=like.device, dtype=like.dtype)


def regularise(
    cost: torch.Tensor,
    alpha: torch.Tensor | Sequence[float] | None = None,
    *,
    use_meanfield: bool = True,
    exact: bool = False,
    max_memory: int | None = None,
) -> torch.Tensor:
    """Two rounds of min-convolution + mean-field with six scalar weights.

    With ``R(x) = meanfield(minconv(x))``::

        c1 = a0 * D + a1 * R(D)
        c2 = a2 * D + a3 * c1 + a4 * R(c1)
        return a5 * c2               # P = softmax(-return, dim=1)

    ``use_meanfield=False`` replaces ``meanfield`` by the identity (the paper's ablation);
    ``exact=True`` replaces the lecture's approximate ``minconv`` by
    ``minconv_exact(x, EXACT_WEIGHT)`` (penalty per squared displacement step: the approximate
    operator works in index units too, and ``EXACT_WEIGHT`` is the weight that fits it best on
    typical feature SSD costs).

    Args:
        cost: (B, |L|, *G) cost volume ``D`` (e.g. from :func:`correlation`).
        alpha: (6,) weights (a tensor to learn them; default ``DEFAULT_ALPHA``).
        max_memory: chunk bound in bytes.

    Returns:
        (B, |L|, *G), differentiable w.r.t. ``cost`` and ``alpha``.
    """
    n = _side("regularise()", cost)
    a = _check_alpha(DEFAULT_ALPHA if alpha is None else alpha, cost)
    native = cost.dim() <= 5 and _native.supports(cost, a)
    if _needs_grad(cost, a) and native and use_meanfield and not exact:  # native backward
        return _autograd.regularise(cost, a, n, _K13, _regularise_native)
    if _needs_grad(cost, a) or exact or not use_meanfield:
        return _regularise_graph(cost, a, use_meanfield, exact, max_memory)
    return _regularise_fused(cost, a, max_memory)


def _combine(
    w: torch.Tensor, m: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None, mf: bool, *mats
) -> torch.Tensor:
    """w[0] * d + w[1] * c + w[2] * MF(m) on rows (B, Lc, *G) (MF = identity if not ``mf``)."""
    out = _meanfield_rows(m, *mats) if mf else m
    out = w[2] * out + w[0] * d
    return out if c is None else out + w[1] * c


def _regularise_graph(
    d: torch.Tensor, a: torch.Tensor, use_meanfield: bool, exact: bool, max_memory: int | None
) -> torch.Tensor:
    """Autograd path: each round stores only its min-convolution and its result."""
    nl = d.shape[1]
    mats = [_mat(g, "meanfield", d.device, d.dtype) for g in d.shape[2:]]
    ckpt = wants_checkpoint(d.numel() * d.element_size(), d, a)
    lc = 16 * _row_chunk(d, max_memory) if ckpt else nl

    def mc(x: torch.Tensor) -> torch.Tensor:
        if exact:
            return minconv_exact(x, EXACT_WEIGHT, max_memory=max_memory)
        return minconv(x, max_memory=max_memory)

    def rows(w: torch.Tensor, m: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        cs = [None] * len(ds) if c is None else c.split(lc, 1)
        parts = [
            checkpointed(_combine, w, mi, di, ci, use_meanfield, *mats, enabled=ckpt)
            for mi, di, ci in zip(m.split(lc, 1), ds, cs, strict=True)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    ds = d.split(lc, 1)
    zero = a[0] * 0
    c1 = rows(torch.stack([a[0], zero, a[1]]), mc(d), None)
    return rows(torch.stack([a[2] * a[5], a[3] * a[5], a[4] * a[5]]), mc(c1), c1)


def _regularise_native(d: torch.Tensor, a: tuple[float, ...], n: int) -> torch.Tensor:
    """Inference path with the native kernels: three volumes (D and two buffers)."""
    a0, a1, a2, a3, a4, a5 = a
    nd = d.dim() - 2
    buf1 = _native.empty_like(d)
    buf2 = _native.empty_like(d)
    _native.minconv(d, buf1, n, nd)  # MC(D)
    _native.meanfield(buf1, d, None, buf2, _K13, wd=a0, wm=a1)  # c1
    _native.minconv(buf2, buf1, n, nd)  # MC(c1)
    dd = d if a2 != 0.0 else None
    _native.meanfield(buf1, dd, buf2, buf2, _K13, wd=a2 * a5, wc=a3 * a5, wm=a4 * a5)
    return buf2


def _regularise_fused(d: torch.Tensor, a: torch.Tensor, max_memory: int | None) -> torch.Tensor:
    """Inference path: two preallocated buffers, every pass written in place, chunk by chunk."""
    a0, a1, a2, a3, a4, a5 = (float(x) for x in a.tolist())
    n = _side("regularise()", d)
    nd = d.dim() - 2
    B, nl = d.shape[:2]
    grid = tuple(d.shape[2:])
    d = d.contiguous()
    if nd <= 3 and _native.usable(d):
        return _regularise_native(d, (a0, a1, a2, a3, a4, a5), n)
    dflat = d.view(B, nl, -1)
    K = dflat.shape[2]
    mc_mat = _mat(n, "minconv", d.device, d.dtype)
    mf_mats = [_mat(g, "meanfield", d.device, d.dtype) for g in grid]
    kc = _column_chunk(d, max_memory)
    lc = _row_chunk(d, max_memory)
    # MF is linear: fold the weights into its first-axis matrix, the rest into fused adds
    mf1 = [mf_mats[0] * a1, *mf_mats[1:]]
    mf2 = [mf_mats[0] * (a4 * a5), *mf_mats[1:]]
    buf1 = torch.empty_like(dflat)  # MC(D), then a5 * (a2*D + a3*c1), then the result
    buf2 = torch.empty_like(dflat)  # c1, then MC(c1) in place
    for k in range(0, K, kc):
        buf1[:, :, k : k + kc] = _minconv_block(dflat[:, :, k : k + kc], n, nd, mc_mat)
    for l in range(0, nl, lc):
        rows = buf1[:, l : l + lc]
        mf = _meanfield_block(rows.reshape(-1, *grid), mf1).view(rows.shape)
        dr = dflat[:, l : l + lc]
        c1 = buf2[:, l : l + lc]
        torch.add(mf, dr, alpha=a0, out=c1)
        torch.mul(c1, a3 * a5, out=rows)
        if a2 != 0.0:
            rows.add_(dr, alpha=a2 * a5)
    for k in range(0, K, kc):
        buf2[:, :, k : k + kc] = _minconv_block(buf2[:, :, k : k + kc], n, nd, mc_mat)
    for l in range(0, nl, lc):
        rows = buf2[:, l : l + lc]
        buf1[:, l : l + lc].add_(_meanfield_block(rows.reshape(-1, *grid), mf2).view(rows.shape))
    del buf2
    return buf1.view(d.shape)
