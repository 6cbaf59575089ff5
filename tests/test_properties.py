"""Properties that must hold for any input (hypothesis, a few small examples each):

* warping by a field and then by its numerical inverse is near the identity;
* composition of fields is associative within interpolation tolerance;
* Dice is symmetric and lies in [0, 1];
* correlation, regularisation and the soft field do not depend on the chunk size (PyTorch
  path) or the thread count (native path);
* resampling between two grids placed in the world by their matrices round-trips.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pddreg.cost import correlation, regularise, soft_field
from pddreg.metrics import dice
from pddreg.spatial import compose, grid_map, map_coords, sample, warp

FEW = settings(max_examples=12, deadline=None, derandomize=True)


#: Largest voxel-to-voxel change of the test fields: the maps stay invertible and smooth.
MAX_GRADIENT = 0.3


def _cosines(shape: tuple[int, ...], g: torch.Generator, max_frequency: float) -> torch.Tensor:
    """``(*shape)`` float64: a sum of three cosines of random direction, frequency (at most
    ``max_frequency`` radians per voxel) and phase."""
    axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    out = torch.zeros(shape, dtype=torch.float64)
    for _ in range(3):
        k = (torch.rand(len(shape), generator=g, dtype=torch.float64) * 2 - 1) * max_frequency
        phase = float(torch.rand(1, generator=g)) * 2 * math.pi
        out = out + torch.cos(sum(ki * a for ki, a in zip(k, axes, strict=True)) + phase)
    return out


def smooth_field(seed: int, shape: tuple[int, ...], amplitude: float) -> torch.Tensor:
    """``(1, ndim, *shape)`` float64: smooth random components scaled to ``|u| <= amplitude``
    and differences between neighbours ``<= MAX_GRADIENT`` (an invertible map)."""
    g = torch.Generator().manual_seed(seed)
    ndim = len(shape)
    field = torch.stack([_cosines(shape, g, 0.3) for _ in range(ndim)])[None]
    grad = max(float(field.diff(dim=2 + ax).abs().max()) for ax in range(ndim))
    scale = min(amplitude / float(field.abs().max()), MAX_GRADIENT / max(grad, 1e-12))
    return field * scale


def smooth_image(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """``(1, 1, *shape)`` float64, a few low-frequency cosines."""
    return _cosines(shape, torch.Generator().manual_seed(seed + 7), 0.25)[None, None]


def interior(x: torch.Tensor, margin: int) -> torch.Tensor:
    return x[(..., *[slice(margin, -margin)] * (x.dim() - 2))]


def inverse(u: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """Numerical inverse ``v`` of ``u`` by the fixed point ``v(x) = -u(x + v(x))``, so that
    ``compose(u, v) = v + u(x + v) = 0``: warping by ``u`` then by ``v`` is the identity."""
    v = -u
    for _ in range(iters):
        v = -warp(u, v)
    return v


shapes2 = st.tuples(st.integers(20, 32), st.integers(20, 32))
shapes3 = st.tuples(st.integers(10, 14), st.integers(10, 14), st.integers(10, 14))


@FEW
@given(
    seed=st.integers(0, 2**16),
    shape=st.one_of(shapes2, shapes3),
    amplitude=st.floats(0.2, 2.0),
)
def test_warping_by_a_field_and_its_inverse_is_near_the_identity(seed, shape, amplitude):
    u = smooth_field(seed, shape, amplitude)
    v = inverse(u)
    margin = 3
    assert float(interior(compose(u, v), margin).abs().max()) < 1e-6  # right inverse
    left = float(interior(compose(v, u), margin).abs().max())
    assert left < 0.05 * amplitude + 0.01, left  # a left inverse, to interpolation error
    image = smooth_image(shape, seed)
    there_and_back = warp(warp(image, u), v)
    err = float(interior(there_and_back - image, margin).abs().max())
    assert err < 0.03 * float(image.abs().max()) * max(1.0, amplitude), err
    # and the inverse is not trivial: u alone moves the image
    assert float(interior(warp(image, u) - image, margin).abs().max()) > err


@FEW
@given(
    seeds=st.tuples(st.integers(0, 2**16), st.integers(0, 2**16), st.integers(0, 2**16)),
    shape=st.one_of(shapes2, shapes3),
    amplitude=st.floats(0.1, 1.5),
)
def test_composition_is_associative(seeds, shape, amplitude):
    a, b, c = (smooth_field(s, shape, amplitude) for s in seeds)
    left = compose(compose(a, b), c)
    right = compose(a, compose(b, c))
    margin = 3
    diff = float(interior(left - right, margin).abs().max())
    assert diff < 0.02 * amplitude + 0.01, diff
    # the definition composes warps: one warp by the composition equals the three warps
    image = smooth_image(shape, seeds[0])
    three = warp(warp(warp(image, a), b), c)
    err = float(interior(warp(image, left) - three, margin).abs().max())
    assert err < 0.03 * float(image.abs().max()) * max(1.0, amplitude), err


@FEW
@given(
    a=arrays(np.int64, (7, 9), elements=st.integers(0, 3)),
    b=arrays(np.int64, (7, 9), elements=st.integers(0, 3)),
)
def test_dice_is_symmetric_and_in_0_1(a, b):
    ab, ba = dice(a, b), dice(b, a)
    assert ab.keys() == ba.keys()
    for label, value in ab.items():
        other = ba[label]
        assert (math.isnan(value) and math.isnan(other)) or value == pytest.approx(other)
        assert math.isnan(value) or 0.0 <= value <= 1.0
    for label, value in dice(a, a).items():
        assert value == 1.0, label  # every label present in a matches itself


def _cost_inputs(seed, ndim, grid, channels, dtype):
    g = torch.Generator().manual_seed(seed)
    size = [2 * s for s in grid]
    fixed = torch.rand(1, channels, *grid, generator=g, dtype=dtype)
    moving = torch.rand(1, channels, *size, generator=g, dtype=dtype)
    return fixed, moving


@FEW
@given(
    seed=st.integers(0, 2**16),
    ndim=st.sampled_from([2, 3]),
    grid=st.integers(3, 6),
    radius=st.integers(1, 3),
    spacing=st.sampled_from([1.0, 2.0, 0.5]),
    channels=st.integers(1, 4),
    chunk=st.sampled_from([2**10, 2**13, 2**16]),
)
def test_cost_volumes_do_not_depend_on_chunk_size_or_threads(
    seed, ndim, grid, radius, spacing, channels, chunk
):
    if ndim == 3 and radius == 3:
        radius = 2  # keep the example small
    gshape = (grid,) * ndim
    threads = torch.get_num_threads()
    for dtype in (torch.float64, torch.float32):  # PyTorch path (chunks), native path (threads)
        fixed, moving = _cost_inputs(seed, ndim, gshape, channels, dtype)
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        runs = []
        for mem, nthreads in ((None, 1), (chunk, 1), (None, 2), (chunk, 3)):
            torch.set_num_threads(nthreads)
            try:
                cost = correlation(fixed, moving, radius, spacing, max_memory=mem)
                reg = regularise(cost, max_memory=mem)
                disp = soft_field(reg, radius, spacing, max_memory=mem)
            finally:
                torch.set_num_threads(threads)
            runs.append((cost, reg, disp))
        for other in runs[1:]:
            for x, y in zip(runs[0], other, strict=True):
                scale = float(x.abs().max().clamp_min(1.0))
                assert float((x - y).abs().max()) <= tol * scale


@FEW
@given(
    ndim=st.sampled_from([2, 3]),
    angle=st.floats(-0.5, 0.5),
    shift=st.floats(-2.0, 2.0),
    spacing=st.floats(0.6, 1.6),
    refine=st.sampled_from([1.0, 0.5]),
)
def test_world_coordinate_resampling_round_trips(ndim, angle, shift, spacing, refine):
    shape_a = (24, 28) if ndim == 2 else (14, 16, 18)
    world_a = np.diag([spacing] * ndim + [1.0])
    world_a[:ndim, ndim] = [10.0, -4.0, 2.0][:ndim]
    rot = np.eye(ndim + 1)
    c, s = math.cos(angle), math.sin(angle)
    rot[:2, :2] = [[c, -s], [s, c]]
    rot[:ndim, ndim] = shift
    # grid b: the same field of view, rotated and shifted in the world, finer voxels
    shape_b = tuple(int(round(n / refine)) for n in shape_a)
    world_b = rot @ world_a @ np.diag([refine] * ndim + [1.0])
    a_to_b, b_to_a = grid_map(world_a, world_b), grid_map(world_b, world_a)
    np.testing.assert_allclose(a_to_b @ b_to_a, np.eye(ndim + 1), atol=1e-12)
    # coordinates: a voxel of a, mapped into b and back, is the same voxel
    coords_a = map_coords(np.eye(ndim + 1), shape_a, dtype=torch.float64)
    pos_b = map_coords(a_to_b, shape_a, dtype=torch.float64)
    back = torch.einsum("ij,bj...->bi...", torch.from_numpy(b_to_a[:ndim, :ndim]), pos_b)
    back = back + torch.from_numpy(b_to_a[:ndim, ndim]).view(1, ndim, *[1] * ndim)
    assert float((back - coords_a).abs().max()) < 1e-9
    # the image itself: a -> b (sampled on b's voxels) -> a (sampled on a's voxels)
    image = smooth_image(shape_a, 1)
    on_b = sample(image, map_coords(b_to_a, shape_b, dtype=torch.float64))
    on_a = sample(on_b, map_coords(a_to_b, shape_a, dtype=torch.float64))
    # voxels of a whose trip through b stays inside b (and back inside a) by a margin
    inside = torch.ones(shape_a, dtype=torch.bool)
    for i, n in enumerate(shape_b):
        inside &= (pos_b[0, i] >= 1.5) & (pos_b[0, i] <= n - 2.5)
    for i, n in enumerate(shape_a):
        inside &= (coords_a[0, i] >= 1) & (coords_a[0, i] <= n - 2)
    assert int(inside.sum()) > 0.1 * inside.numel()
    err = float((on_a - image)[0, 0][inside].abs().max())
    assert err < 0.03 * float(image.abs().max()), err
