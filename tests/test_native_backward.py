"""Native backward kernels (pddreg.cost._autograd): gradients equal those of the PyTorch path.

The reference is PyTorch autograd of the PyTorch formulation in float64 on the same (float32)
inputs.  The min-convolution selects a minimum of a filtered signal, so its gradient jumps where
two candidates are equal: at a near-tie (closer than the float32 rounding of the filtered signal)
the native kernels and the reference may pick different candidates, both correct.  Random costs
have such near-ties (their filtered signal is smooth), so the tests either give those outputs a
zero upstream gradient (the min-convolution alone), use inputs without near-ties (small composite
cases, found by a seed search), or compare with the autograd composition of the native operators
(each checked against the reference here).  Exact ties are tested on zero costs, where both paths
compute exactly zero filtered signals and PyTorch splits the gradient at every tie.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from pddreg.cost import (
    _autograd,
    _native,
    correlation,
    displacement_set,
    expected_values,
    meanfield,
    minconv,
    probabilities,
    probabilities_and_field,
    regularise,
    soft_field,
)
from pddreg.cost.regularise import _K13

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "cc").split()[0]) is None or not _native.available(),
    reason="no C compiler: the PyTorch kernels are the only path",
)

ALPHAS = [[0.5, 1.0, 0.0, 1.0, 2.0, 16.0], [0.3, 0.8, 0.2, 1.1, 1.7, 5.0]]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def grads(fn, inputs, weights):
    """Outputs of ``fn(*inputs)`` and the gradients of ``sum_i <out_i, weights_i>`` w.r.t. the
    inputs (all given inputs are differentiated; weights may be None for unused outputs)."""
    ins = [x.detach().clone().requires_grad_() for x in inputs]
    outs = fn(*ins)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum(
        (o * w.to(o.dtype)).sum() for o, w in zip(outs, weights, strict=True) if w is not None
    )
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, ins))


def node_names(t: torch.Tensor) -> set[str]:
    """Names of all autograd nodes behind ``t``."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def native_nodes(t: torch.Tensor) -> set[str]:
    return {n for n in node_names(t) if n.lstrip("_").split("Backward")[0] in _NATIVE_OPS}


_NATIVE_OPS = {
    "Correlation",
    "ExpectedValues",
    "ProbField",
    "Minconv",
    "Meanfield",
    "Regularise",
    "Resample",
}


def compare(fn, inputs, *, rel=2e-5, weights=None, seed=0):
    """Native float32 outputs and gradients of ``fn`` against the float64 PyTorch path."""
    torch.manual_seed(seed)
    with torch.no_grad():
        probe = fn(*inputs)
    probe = probe if isinstance(probe, tuple) else (probe,)
    if weights is None:
        weights = [torch.randn(o.shape) for o in probe]
    out32, g32 = grads(fn, inputs, weights)
    out64, g64 = grads(fn, [x.double() for x in inputs], weights)
    for a, b in zip(out32, out64, strict=True):
        assert a.dtype == torch.float32 and b.dtype == torch.float64
        assert rel_err(a, b) < rel, ("output", rel_err(a, b))
    for i, (a, b) in enumerate(zip(g32, g64, strict=True)):
        assert a.shape == b.shape
        assert rel_err(a, b) < rel, (f"gradient {i}", rel_err(a, b))
    return g32


# ------------------------------------------------------------ near-ties of the min-convolution
def _fir_matrix(n: int) -> torch.Tensor:
    """(n + 2, n) float64: replicate-pad 5 and the 9-tap [1 2 3 4 5 4 3 2 1] / 25 filter."""
    m = torch.zeros(n + 2, n, dtype=torch.float64)
    for i in range(n + 2):
        for t, w in enumerate((1, 2, 3, 4, 5, 4, 3, 2, 1)):
            m[i, min(max(i + t - 5, 0), n - 1)] += w / 25
    return m


def minconv_gaps(cost: torch.Tensor) -> torch.Tensor:
    """(B, |L|, K) float64: per output of the min-convolution the gap between the smallest and the
    second smallest filtered value of its 3^nd neighbourhood (written independently of the
    library)."""
    B, nl = cost.shape[:2]
    nd = cost.dim() - 2
    n = round(nl ** (1.0 / nd))
    y = cost.detach().double().reshape(B, *([n] * nd), -1)
    m = _fir_matrix(n)
    for ax in range(nd):
        y = torch.movedim(torch.tensordot(m, torch.movedim(y, 1 + ax, 0), dims=1), 0, 1 + ax)
    for ax in range(nd):
        y = y.unfold(1 + ax, 3, 1)
    y = y.reshape(B, nl, -1, 3**nd)
    if 3**nd < 2:
        return torch.full(y.shape[:3], math.inf, dtype=torch.float64)
    low = y.topk(2, dim=-1, largest=False).values
    return low[..., 1] - low[..., 0]


def tie_free(cost: torch.Tensor) -> bool:
    """No near-tie that float32 rounding could flip (gap above 1e-5 of the largest cost)."""
    return bool(minconv_gaps(cost).min() > 1e-5 * float(cost.abs().max()))


def first_round(d: torch.Tensor, alpha) -> torch.Tensor:
    """c1 = a0 D + a1 MF(MC(D)) of ``regularise`` (float64, PyTorch path)."""
    d = d.double()
    return alpha[0] * d + alpha[1] * meanfield(minconv(d))


# (shape of a cost volume (B, n**nd, *G), n): 1D..3D, batch 2, odd sizes, a grid axis of 1,
# radius 0, a large radius
COST_CASES = [
    ((1, 7, 40), 7),
    ((2, 121, 13, 17), 11),
    ((1, 25, 3, 70), 5),
    ((2, 125, 6, 7, 9), 5),
    ((1, 3375, 5, 4, 33), 15),
    ((1, 9**3, 2, 3, 2), 9),
    ((1, 27, 1, 5, 9), 3),
    ((2, 1, 4, 6), 1),
]


@pytest.mark.parametrize("shape,n", COST_CASES)
def test_minconv_gradient_matches_torch(shape, n):
    torch.manual_seed(0)
    x = torch.rand(shape) * 5
    gy = torch.randn(shape)
    gy[(minconv_gaps(x) < 1e-5 * 5).view(shape)] = 0.0  # no gradient through near-ties
    compare(minconv, [x], weights=[gy], rel=2e-6)
    out = minconv(x.clone().requires_grad_())
    assert native_nodes(out) == {"_MinconvBackward"}


@pytest.mark.parametrize(
    "shape,n",
    [((2, 11, 5), 11), ((1, 121, 3, 4), 11), ((2, 343, 2, 3, 2), 7), ((2, 125, 2, 1, 3), 5)],
)
def test_minconv_gradient_at_exact_ties(shape, n):
    """Costs that are zero over the low displacements of the first axis: the filtered signal is
    exactly 0 in both paths wherever the filter does not reach the nonzero costs, so the minima
    there are exact ties, where PyTorch's torch.minimum gives each side half.  (Ties of nonzero
    values would be ties in exact arithmetic only: each path rounds them its own way.)"""
    torch.manual_seed(1)
    nd = len(shape) - 2
    first = torch.arange(n**nd) // n ** (nd - 1)  # displacement index along axis 0
    for cut in (n, n - 2):  # all zero; zero but for the last two displacements of axis 0
        x = torch.rand(shape) * (first >= cut).view(1, -1, *([1] * nd))
        gaps = minconv_gaps(x).view(shape)
        assert bool((gaps == 0).any()) or n < 7  # small n: every filter tap reaches every cost
        gy = torch.randn(shape) * ((gaps == 0) | (gaps > 1e-5))  # exact ties and clear minima
        ours = grads(minconv, [x], [gy])[1][0]
        ref = grads(minconv, [x.double()], [gy])[1][0]
        assert rel_err(ours, ref) < 2e-6


@pytest.mark.parametrize("shape,n", COST_CASES)
def test_meanfield_gradient_matches_torch(shape, n):
    x = torch.rand(shape) * 5
    compare(meanfield, [x], rel=5e-6)
    assert native_nodes(meanfield(x.clone().requires_grad_())) == {"_MeanfieldBackward"}


# small composite cases without near-ties (seed search below), 1D..3D, batch 2
SMALL_CASES = [
    (2, 7, 9),
    (1, 9, 11),
    (2, 25, 4, 5),
    (1, 49, 3, 4),
    (2, 27, 2, 3, 3),
    (1, 125, 2, 1, 3),
]


def tie_free_cost(shape, alpha, scale=3.0):
    """A random cost of ``shape`` whose two min-convolutions in ``regularise`` have no
    near-ties (the first of 200 seeds)."""
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(shape, generator=g) * scale
        if tie_free(x) and tie_free(first_round(x, alpha)):
            return x
    raise AssertionError(f"no tie-free cost of shape {shape} in 200 seeds")


@pytest.fixture(params=["keep c1", "recompute c1"])
def first_round_policy(request, monkeypatch):
    """Both backward variants of ``regularise``: small volumes keep the first round, large ones
    (above KEEP_FIRST_ROUND_BYTES) recompute it."""
    if request.param == "recompute c1":
        monkeypatch.setattr(_autograd, "KEEP_FIRST_ROUND_BYTES", 0)
    return request.param


@pytest.mark.parametrize("shape", SMALL_CASES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_regularise_gradient_matches_torch(shape, alpha, first_round_policy):
    a = torch.tensor(alpha)
    x = tie_free_cost(shape, alpha)
    compare(regularise, [x, a], rel=2e-5)
    out = regularise(x.clone().requires_grad_(), a.clone().requires_grad_())
    assert native_nodes(out) == {"_RegulariseBackward"}


class _WeightedMeanfield(torch.autograd.Function):
    """out = wd * d + wm * MF(x) by the very kernel call of the fused forward (bitwise the same
    first round, hence the same minima in the second min-convolution)."""

    @staticmethod
    def forward(ctx, x, d, wd, wm):
        ctx.w = (wd, wm)
        out = _native.empty_like(x)
        _native.meanfield(x.contiguous(), d.contiguous(), None, out, _K13, wd=wd, wm=wm)
        return out

    @staticmethod
    def backward(ctx, g):
        wd, wm = ctx.w
        gx = torch.empty_like(g)
        _native.meanfield_t(g.contiguous(), None, None, gx, _K13, wm=wm)
        return gx, wd * g, None, None


def _regularise_composed(d, alpha):
    """regularise from the separately tested native operators, composed by autograd (the alpha
    gradients by autograd too, through a tensor-valued rescaling)."""
    n = round(d.shape[1] ** (1.0 / (d.dim() - 2)))
    nd = d.dim() - 2
    a = [float(v) for v in alpha.detach()]
    scale = alpha / alpha.detach()  # 1, but carries the gradient of each weight
    c1 = _WeightedMeanfield.apply(_autograd.minconv(d, n, nd), d, a[0], a[1])
    c1 = c1 + (scale[0] - 1) * a[0] * d + (scale[1] - 1) * (c1 - a[0] * d).detach()
    r1 = _autograd.meanfield(_autograd.minconv(c1, n, nd), _K13)
    return alpha[5] * (alpha[2] * d + alpha[3] * c1 + alpha[4] * r1)


@pytest.mark.parametrize("shape,n", COST_CASES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_regularise_gradient_equals_composition_of_native_operators(
    shape, n, alpha, first_round_policy
):
    """Large cases (with near-ties): the fused backward against autograd through the native
    min-convolution and mean-field (the same float32 filtered signals, so the same minima)."""
    torch.manual_seed(2)
    x = torch.rand(shape) * 3
    a = torch.tensor(alpha) + 0.01  # no zero weight (the rescaling above divides by it)
    w = torch.randn(shape)
    (o1,), (gx1, ga1) = grads(regularise, [x, a], [w])
    (o2,), (gx2, ga2) = grads(_regularise_composed, [x, a], [w])
    assert rel_err(o1, o2) < 1e-6
    assert rel_err(gx1, gx2) < 1e-5
    assert rel_err(ga1, ga2) < 1e-4


@pytest.mark.parametrize("shape,n", COST_CASES)
def test_probabilities_and_soft_field_gradients_match_torch(shape, n):
    torch.manual_seed(3)
    x = torch.rand(shape) * 20 - 5  # peaked: probabilities over a wide range
    r = (n - 1) // 2
    compare(probabilities, [x], rel=1e-5)
    for spacing in (1.0, 0.5):
        compare(lambda c, s=spacing: soft_field(c, r, s), [x], rel=1e-5)
    disp = displacement_set(r, 0.7, x.dim() - 2)
    compare(lambda c: probabilities_and_field(c, disp), [x], rel=1e-5)  # both outputs
    prob_only = [torch.randn(shape), None]
    field_only = [None, torch.randn(shape[0], x.dim() - 2, *shape[2:])]
    for weights in (prob_only, field_only):
        compare(lambda c: probabilities_and_field(c, disp), [x], rel=1e-5, weights=weights)
    prob, field = probabilities_and_field(x.clone().requires_grad_(), disp)
    assert native_nodes(prob) == native_nodes(field) == {"_ProbFieldBackward"}


CORRELATION_CASES = [
    ((1, 3, 19), (1, 3, 38), 3, 1.0),
    ((2, 8, 10, 12), (2, 8, 20, 24), 4, 1.0),
    ((1, 5, 9, 11), (1, 5, 9, 11), 2, 2.0),
    ((1, 16, 12, 10, 9), (1, 16, 12, 10, 9), 3, 1.0),
    ((1, 4, 6, 7, 8), (1, 4, 12, 14, 16), 2, 0.5),
    ((2, 6, 5, 6, 17), (2, 6, 10, 12, 34), 5, 1.0),
    ((2, 4, 9, 11), (2, 4, 25, 31), 3, 0.7),  # no common lattice step: product lattice
    ((1, 3, 7, 5, 6), (1, 3, 20, 14, 17), 2, 1.3),
]


@pytest.mark.parametrize("fixed,moving,radius,spacing", CORRELATION_CASES)
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_correlation_and_expected_values_gradients_match_torch(
    fixed, moving, radius, spacing, padding
):
    torch.manual_seed(4)
    ff, fm = torch.rand(fixed), torch.rand(moving)
    compare(lambda a, b: correlation(a, b, radius, spacing, padding=padding), [ff, fm], rel=2e-5)
    nl = (2 * radius + 1) ** (len(fixed) - 2)
    prob = torch.softmax(torch.randn(fixed[0], nl, *fixed[2:]) * 3, 1)
    values = torch.rand(moving[0], 3, *moving[2:])
    fn = lambda p, v: expected_values(v, p, radius, spacing, padding=padding)  # noqa: E731
    compare(fn, [prob, values], rel=2e-5)
    out = correlation(ff.requires_grad_(), fm.requires_grad_(), radius, spacing, padding=padding)
    assert {"_CorrelationBackward", "_ResampleBackward"} <= native_nodes(out)
    assert "_ExpectedValuesBackward" in native_nodes(fn(prob.requires_grad_(), values))


def _chain(ff, fm, alpha, radius, spacing, padding, labels, moving_labels):
    """Features -> correlation -> regularise -> probabilities and field -> a training loss (the
    non-local label loss on the probabilities + diffusion of the field)."""
    from pddreg.losses import diffusion

    nd = ff.dim() - 2
    cost = regularise(correlation(ff, fm, radius, spacing, padding=padding), alpha)
    prob, field = probabilities_and_field(cost, displacement_set(radius, spacing, nd))
    expected = expected_values(moving_labels.to(prob.dtype), prob, radius, spacing)
    return ((expected - labels.to(prob.dtype)) ** 2).mean() + 0.1 * diffusion(field)


@pytest.mark.parametrize(
    "grid,size,radius,spacing",
    [
        ((9,), (18,), 2, 1.0),
        ((4, 5), (8, 10), 2, 1.0),
        ((5, 4), (5, 4), 1, 0.5),
        ((2, 3, 3), (4, 6, 6), 1, 1.0),
    ],
)
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_training_chain_gradients_match_torch(grid, size, radius, spacing, padding):
    """Batch 2: gradients w.r.t. both feature maps and the six weights, native vs PyTorch."""
    alpha = ALPHAS[1]
    nl = (2 * radius + 1) ** len(grid)
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        ff = torch.rand(2, 4, *grid, generator=g)
        fm = torch.rand(2, 4, *size, generator=g)
        with torch.no_grad():
            d = correlation(ff.double(), fm.double(), radius, spacing, padding=padding)
        if tie_free(d) and tie_free(first_round(d, alpha)):
            break
    else:
        raise AssertionError("no tie-free case in 200 seeds")
    assert d.shape[1] == nl
    labels = torch.rand(2, 3, *grid, generator=g)
    moving_labels = torch.rand(2, 3, *size, generator=g)
    a = torch.tensor(alpha)

    def fn(f, m, al):
        return _chain(f, m, al, radius, spacing, padding, labels, moving_labels)

    compare(fn, [ff, fm, a], rel=5e-5, weights=[torch.ones(())])
    loss = fn(ff.requires_grad_(), fm.requires_grad_(), a.requires_grad_())
    expected_nodes = {"_CorrelationBackward", "_RegulariseBackward", "_ProbFieldBackward"}
    assert expected_nodes | {"_ExpectedValuesBackward"} <= native_nodes(loss)


def test_float64_and_disabled_kernels_keep_the_torch_path(monkeypatch):
    x = torch.rand(1, 25, 4, 5, dtype=torch.float64, requires_grad=True)
    assert not native_nodes(regularise(x)) and not native_nodes(probabilities(x))
    x32 = x.detach().float().requires_grad_()
    assert native_nodes(regularise(x32))
    with monkeypatch.context() as m:
        m.setenv("PDDREG_NATIVE", "0")
        assert not native_nodes(regularise(x32)) and not native_nodes(probabilities(x32))
        assert not native_nodes(correlation(x32[:, :3], x32[:, :3], 1))


def test_saved_tensors_of_the_chain_stay_small():
    """Autograd keeps the raw cost (for the regularisation) and the probabilities, and no other
    volume: the backward recomputes everything else in the kernels."""
    torch.manual_seed(5)
    ff = torch.rand(1, 4, 6, 7, 8, requires_grad=True)
    fm = torch.rand(1, 4, 6, 7, 8, requires_grad=True)
    alpha = torch.tensor(ALPHAS[0], requires_grad=True)
    volume = 7**3 * 6 * 7 * 8
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() if t.numel() >= volume else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cost = regularise(correlation(ff, fm, 3), alpha)
        prob, field = probabilities_and_field(cost, displacement_set(3, 1.0, 3))
        loss = prob[:, :1].sum() + field.square().sum()  # saves no volume itself
    assert sorted(s for s in saved if s) == [volume, volume]  # D and prob
    loss.backward()
    assert ff.grad is not None and fm.grad is not None and alpha.grad is not None


def test_pddnet_training_loss_uses_the_native_backward():
    """PDDNet.training_loss + backward (2D, both levels, non-local + warped label loss) runs on
    the native operators; its gradients equal those of the float64 model (PyTorch path)."""
    from pddreg.models import PDDNet, PDDNetConfig

    torch.manual_seed(6)
    cfg = PDDNetConfig(ndim=2, features="lecture", radius=6, grid_stride=2, levels=2, smooth=2)
    fixed, moving = torch.rand(2, 1, 32, 40), torch.rand(2, 1, 32, 40)
    fseg = (fixed * 3).long().clamp(max=2)
    mseg = (moving * 3).long().clamp(max=2)

    def run(dtype):
        torch.manual_seed(7)
        model = PDDNet(cfg).to(dtype)
        loss, _ = model.training_loss(fixed.to(dtype), moving.to(dtype), fseg, mseg, 3)
        loss.backward()
        return float(loss.detach()), {k: p.grad for k, p in model.named_parameters()}, model

    loss, g_native, model = run(torch.float32)
    out = model(fixed, moving)
    names = native_nodes(out["levels"][0]["prob"]) | native_nodes(out["levels"][1]["prob"])
    assert {"_CorrelationBackward", "_RegulariseBackward", "_ProbFieldBackward"} <= names
    loss_t, g_torch, model_t = run(torch.float64)
    assert not native_nodes(model_t(fixed.double(), moving.double())["prob"])
    assert abs(loss - loss_t) < 1e-5 * abs(loss_t)
    for k, g in g_torch.items():
        assert rel_err(g_native[k], g) < 1e-3, k


def test_multilevel_pddnet_trains_on_the_native_operators():
    """The shipped configuration (HybridNet features, the levels of discrete_register, field
    loss): native operators in the graph, gradients equal to float64 within float32 error."""
    from pddreg.models import PDDNet, default_config

    cfg = default_config(2)
    fixed, moving = torch.rand(2, 1, 32, 40), torch.rand(2, 1, 32, 40)
    fseg = (fixed * 3).long().clamp(max=2)
    mseg = (moving * 3).long().clamp(max=2)
    field = torch.randn(2, 2, 32, 40)

    def run(dtype):
        torch.manual_seed(7)
        model = PDDNet(cfg).to(dtype)
        args = (fixed.to(dtype), moving.to(dtype), fseg, mseg, 3, field.to(dtype))
        loss, _ = model.training_loss(*args)
        loss.backward()
        return float(loss.detach()), {k: p.grad for k, p in model.named_parameters()}, model

    loss, g_native, model = run(torch.float32)
    out = model(fixed, moving)
    names = set().union(*(native_nodes(lv["prob"]) for lv in out["levels"]))
    assert {"_CorrelationBackward", "_RegulariseBackward", "_ProbFieldBackward"} <= names
    loss_t, g_torch, _ = run(torch.float64)
    assert abs(loss - loss_t) < 1e-4 * abs(loss_t)
    for k, g in g_torch.items():
        assert rel_err(g_native[k], g) < 1e-2, k
