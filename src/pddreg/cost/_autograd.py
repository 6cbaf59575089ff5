"""Differentiable operators on the native CPU kernels (float32, autograd): training throughput.

Each ``torch.autograd.Function`` runs the forward of ``_native`` and a native backward; the
public operators of ``pddreg.cost`` call them under autograd when ``_native.supports`` their
float32 CPU inputs (everything else, float64 ``gradcheck`` included, keeps the PyTorch
formulation, which is the reference: ``tests/test_native_backward.py`` checks the gradients
against it).

Memory: a cost volume of 32^3 points x 15^3 displacements is 442 MB, so each operator saves
only its inputs (the regularisation: the raw cost and the weights; the probabilities: their own
output) and recomputes the rest in the backward, block by block inside the kernels (the
min-convolution's filtered signal and min-pools per block of control points, the first round
of the regularisation per volume); the backward of the regularisation holds two volumes of its
own beside its input and the incoming gradient.  Gradients of the six weights are reductions
fused into the kernels.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _native
from ._lattice import CHECKPOINT_BYTES

# The backward of ``regularise`` recomputes its first round c1 (two kernel passes) for volumes
# above this many bytes and keeps it (one more volume alive from the forward to the backward)
# up to it.  At the 3D scale of 32^3 points x 15^3 displacements (442 MB) keeping it saved
# about a tenth of a training step and raised the peak from 4 to 5 volumes (1.7 -> 2.15 GB).
KEEP_FIRST_ROUND_BYTES = CHECKPOINT_BYTES

__all__ = [
    "correlation",
    "resample_axis",
    "expected_values",
    "meanfield",
    "minconv",
    "probabilities_and_field",
    "regularise",
    "warp_ssd",
]


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


class _Correlation(torch.autograd.Function):
    """cost[l, k] = sum_c (f[c, k] - g[c, a k + b j_l])^2 on a lattice ``g``."""

    @staticmethod
    def forward(ctx, fixed, lattice, a, b, n, plen):
        ctx.save_for_backward(fixed, lattice)
        ctx.geom = (a, b, n, plen)
        return _native.correlation(fixed, lattice, a, b, n, plen)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        fixed, lattice = ctx.saved_tensors
        a, b, n, plen = ctx.geom
        nodes = tuple(lattice.shape[2:])
        want = ("TS" if ctx.needs_input_grad[0] else "") + ("UW" if ctx.needs_input_grad[1] else "")
        sums = _native.lattice_sums(_c(grad), fixed, lattice, nodes, a, b, n, plen, want=want)
        gf = gl = None
        if ctx.needs_input_grad[0]:  # 2 sum_l g_l (f - m_l)
            gf = (fixed * sums["S"]).sub_(sums["T"]).mul_(2.0)
        if ctx.needs_input_grad[1]:  # -2 sum_{k,l -> m} g (f - m)
            gl = (lattice * sums["W"]).sub_(sums["U"]).mul_(2.0)
        return gf, gl, None, None, None, None


def correlation(fixed, lattice, a, b, n, plen) -> torch.Tensor:
    """Differentiable ``_native.correlation`` (SSD) of (B, C, *G) fixed features and a
    (B, C, *N) lattice of moving features (last axis phase-major, see there)."""
    return _Correlation.apply(_c(fixed), _c(lattice), tuple(a), tuple(b), n, plen)


class _Resample(torch.autograd.Function):
    """Linear resampling along one axis with fixed taps (``_lattice.linear_taps``)."""

    @staticmethod
    def forward(ctx, x, dim, taps):
        ctx.dim, ctx.taps, ctx.size = dim, taps, x.shape[dim]
        return _native.resample_axis(x, dim, *taps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _native.resample_axis_t(grad, ctx.dim, ctx.size, *ctx.taps), None, None


def resample_axis(x: torch.Tensor, dim: int, taps) -> torch.Tensor:
    """Differentiable native linear resampling of ``x`` along ``dim`` (taps ``(i0, w0, i1,
    w1)``)."""
    return _Resample.apply(_c(x), dim, tuple(taps))


class _ExpectedValues(torch.autograd.Function):
    """E[c, k] = sum_l prob[l, k] v[c, a k + b j_l] on a lattice ``v``."""

    @staticmethod
    def forward(ctx, prob, lattice, a, b, n, plen):
        ctx.save_for_backward(prob, lattice)
        ctx.geom = (a, b, n, plen)
        nodes = tuple(lattice.shape[2:])
        return _native.lattice_sums(prob, None, lattice, nodes, a, b, n, plen, want="T")["T"]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        prob, lattice = ctx.saved_tensors
        a, b, n, plen = ctx.geom
        grad = _c(grad)
        gp = gl = None
        if ctx.needs_input_grad[0]:
            gp = _native.correlation(grad, lattice, a, b, n, plen, dot=True)
        if ctx.needs_input_grad[1]:
            nodes = tuple(lattice.shape[2:])
            gl = _native.lattice_sums(prob, grad, None, nodes, a, b, n, plen, want="U")["U"]
        return gp, gl, None, None, None, None


def expected_values(prob, lattice, a, b, n, plen) -> torch.Tensor:
    """Differentiable expected values (B, C, *G) of a (B, C, *N) lattice (last axis
    phase-major) under (B, |L|, *G) probabilities."""
    return _ExpectedValues.apply(_c(prob), _c(lattice), tuple(a), tuple(b), n, plen)


class _ProbField(torch.autograd.Function):
    """prob = softmax(-cost, 1) and/or field = sum_l prob_l disp[l]."""

    @staticmethod
    def forward(ctx, cost, disp, want_prob):
        ctx.set_materialize_grads(False)
        prob, field = _native.softmax_field(cost, disp, prob=want_prob)
        ctx.disp = disp
        if want_prob:
            ctx.save_for_backward(prob)
            ctx.from_cost = False
        else:  # the field alone: keep the cost, recompute the probabilities in the backward
            ctx.save_for_backward(cost)
            ctx.from_cost = True
        if disp is None:
            return prob
        if not want_prob:
            return field
        return prob, field

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        if ctx.disp is None:
            gp, gf = grads[0], None
        elif ctx.from_cost:
            gp, gf = None, grads[0]
        else:
            gp, gf = grads
        if gp is None and gf is None:
            return None, None, None
        (saved,) = ctx.saved_tensors
        gp = None if gp is None else _c(gp)
        gf = None if gf is None else _c(gf)
        out = _native.empty_like(saved)
        if ctx.from_cost:
            _native.softmax_backward(None, saved, gp, gf, ctx.disp, out)
        else:
            _native.softmax_backward(saved, None, gp, gf, ctx.disp, out)
        return out, None, None


def probabilities_and_field(
    cost: torch.Tensor, disp: torch.Tensor | None, *, prob: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Differentiable ``(softmax(-cost, 1), sum_l softmax(-cost)_l disp[l])``; ``prob=False``
    leaves the probabilities out (the soft field alone), ``disp=None`` the field."""
    cost = _c(cost)
    if disp is not None:
        disp = disp.detach().to(dtype=torch.float32).contiguous()
    res = _ProbField.apply(cost, disp, prob)
    if disp is None:
        return res, None
    if not prob:
        return None, res
    return res[0], res[1]


class _Minconv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n, nd):
        ctx.save_for_backward(x)
        ctx.geom = (n, nd)
        out = _native.empty_like(x)
        _native.minconv(x, out, n, nd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        out = _native.empty_like(x)
        _native.minconv_backward(x, _c(grad), out, *ctx.geom)
        return out, None, None


def minconv(x: torch.Tensor, n: int, nd: int) -> torch.Tensor:
    """Differentiable native min-convolution of a (B, n**nd, *G) cost."""
    return _Minconv.apply(_c(x), n, nd)


class _Meanfield(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, taps):
        ctx.taps = taps
        out = _native.empty_like(x)
        _native.meanfield(x, None, None, out, taps)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad = _c(grad)
        out = _native.empty_like(grad)
        _native.meanfield_t(grad, None, None, out, ctx.taps)
        return out, None


def meanfield(x: torch.Tensor, taps: tuple[float, ...]) -> torch.Tensor:
    """Differentiable native mean-field of a (B, |L|, *G) cost (13 ``taps``)."""
    return _Meanfield.apply(_c(x), taps)


class _Regularise(torch.autograd.Function):
    """Two rounds with R = MF . MC:  c1 = a0 D + a1 R(D);  out = a5 (a2 D + a3 c1 + a4 R(c1)).

    Backward, with g the incoming gradient (each line one native pass over the volume)::

        X = MC(D); Y = c1 = a0 D + a1 MF(X)          recomputed (only D is saved; volumes up to
                                                     KEEP_FIRST_ROUND_BYTES keep c1 instead)
        X = t1 = MF^T(g)
        X = gc1 = a5 (a3 g + a4 MC_c1^T(t1))         <t1, MC(c1)> = <g, R(c1)>, <g, c1>
        Y = u = MF^T(gc1)
        X = gD = a2 a5 g + a0 gc1 + a1 MC_D^T(u)     <u, MC(D)> = <gc1, R(D)>, <gc1, D>, <g, D>
    """

    @staticmethod
    def forward(ctx, d, alpha, n, taps, fused):
        a = tuple(float(v) for v in alpha.detach().tolist())
        ctx.a, ctx.n, ctx.taps = a, n, taps
        ctx.c1 = None
        if d.numel() * d.element_size() > KEEP_FIRST_ROUND_BYTES:
            ctx.save_for_backward(d, alpha)
            return fused(d, a, n)
        # small volumes: keep the first round (one volume) instead of recomputing it
        nd = d.dim() - 2
        c1 = _native.empty_like(d)
        out = _native.empty_like(d)
        _native.minconv(d, out, n, nd)
        _native.meanfield(out, d, None, c1, taps, wd=a[0], wm=a[1])
        _native.minconv(c1, out, n, nd)
        dd = d if a[2] != 0.0 else None
        _native.meanfield(out, dd, c1, out, taps, wd=a[2] * a[5], wc=a[3] * a[5], wm=a[4] * a[5])
        ctx.c1 = c1
        ctx.save_for_backward(d, alpha)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        d, alpha = ctx.saved_tensors
        a0, a1, a2, a3, a4, a5 = ctx.a
        n, taps = ctx.n, ctx.taps
        nd = d.dim() - 2
        g = _c(grad)
        x = _native.empty_like(d)
        if ctx.c1 is None:
            y = _native.empty_like(d)
            _native.minconv(d, x, n, nd)
            _native.meanfield(x, d, None, y, taps, wd=a0, wm=a1)  # c1
        else:  # kept by the forward (a second backward, retain_graph, recomputes it)
            y, ctx.c1 = ctx.c1, None
        _native.meanfield_t(g, None, None, x, taps)  # t1
        g_rc1, g_c1, _ = _native.minconv_backward(y, x, x, n, nd, a=g, wa=a3 * a5, wm=a4 * a5)
        _native.meanfield_t(x, None, None, y, taps)  # u
        gc1_rd, gc1_d, g_d = _native.minconv_backward(
            d, y, x, n, nd, a=x, b=g, wa=a0, wb=a2 * a5, wm=a1
        )  # gD
        del y
        ga = None
        if ctx.needs_input_grad[1]:
            vals = [
                gc1_d,
                gc1_rd,
                a5 * g_d,
                a5 * g_c1,
                a5 * g_rc1,
                a2 * g_d + a3 * g_c1 + a4 * g_rc1,
            ]
            ga = torch.tensor(vals, dtype=alpha.dtype)
        return (x if ctx.needs_input_grad[0] else None), ga, None, None, None


def regularise(d: torch.Tensor, alpha: torch.Tensor, n: int, taps, fused) -> torch.Tensor:
    """Differentiable two-round regularisation of a (B, n**nd, *G) cost with (6,) weights
    (``fused(d, alpha_floats, n)``: the native inference forward)."""
    return _Regularise.apply(_c(d), alpha, n, taps, fused)


class _WarpSSD(torch.autograd.Function):
    """ssd[x] = sum_c (m_c(x + u(x)) - f_c(x))^2 (and the moving mask warped by ``u``),
    differentiable in ``u`` only (the features are constants of the instance optimisation);
    the gradients come with the forward."""

    @staticmethod
    def forward(ctx, fixed, moving, disp, moving_mask):
        out = _native.warp_ssd(fixed, moving, disp.detach(), moving_mask)
        if moving_mask is None:
            ctx.save_for_backward(out[1])
            return out[0]
        ctx.save_for_backward(out[1], out[3])
        return out[0], out[2]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ssd, grad_mask=None):
        saved = ctx.saved_tensors
        grad = saved[0] * grad_ssd
        if len(saved) > 1 and grad_mask is not None:
            grad = grad + saved[1] * grad_mask
        return None, None, grad, None


def warp_ssd(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    disp: torch.Tensor,
    moving_mask: torch.Tensor | None = None,
):
    """``(B, 1, *S)`` SSD of ``fixed`` against ``moving`` warped by ``disp`` (``(B, ndim, *S)``,
    voxels), features ``(B, *S, C)`` channels last; differentiable with respect to ``disp``.
    With ``moving_mask`` ``(B, 1, *S)`` float32: ``(ssd, mask warped by disp with zeros
    outside)``."""
    mask = None if moving_mask is None else _c(moving_mask)
    return _WarpSSD.apply(_c(fixed), _c(moving), disp, mask)
