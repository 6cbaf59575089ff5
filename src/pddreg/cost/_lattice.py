"""Private machinery shared by the correlation layer and ``expected_values``.

Convention: control point ``k`` of a grid of size ``G`` inside a moving map of size ``S`` sits at
``p_k = (k + 0.5) * S / G - 0.5`` per axis (``align_corners=False``); displacement ``j`` (index
``0 .. 2r``) adds ``(j - r) * spacing``.  Every needed sample position ``p_k + d_j`` lies on a
regular 1D *lattice* per axis, ``x_n = offset + h * n`` with ``S / G = a * h`` and
``spacing = b * h`` for integers ``a, b`` (``h`` is the rational gcd of the two), so that the
sample of point ``k`` at displacement ``j`` is lattice node ``n = a * k + b * j``.

The moving features are resampled once onto that lattice (separable linear interpolation, an
exact copy when the nodes are integer voxels), then the control grid is cut into *tiles* of
``T`` points per axis.  Each tile needs a window of ``W = a * (T - 1) + 2 * r * b + 1`` lattice
nodes per axis; one batched matmul of the tile's (augmented) fixed features with the window's
(augmented) moving features gives every (point, node) product at once, and a gather with a
precomputed index ``(point in tile, displacement) -> node in window`` keeps the ones needed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.utils.checkpoint

from . import _native

# Default bound on the extra working memory of one chunk (bytes).
DEFAULT_MAX_MEMORY = 256 * 2**20

# Preferred working set of one correlation chunk (bytes): in 3D on 2 cores 32-64 MiB chunks ran
# 2.5x faster than 256 MiB ones (cache reuse of the window copies) and than 2-8 MiB ones.
CORRELATION_CHUNK_BYTES = 48 * 2**20

# Largest lattice step ratios handled by the tiled path; beyond it the direct path samples the
# moving map at every (point, displacement) per chunk of displacements.
_MAX_RATIO = 16


def _as_fraction(x: float) -> Fraction | None:
    """Rational value of ``x`` when it is one with a small denominator (within 1e-9), else None."""
    f = Fraction(x).limit_denominator(64)
    if abs(float(f) - x) > 1e-9 * max(1.0, abs(x)):
        return None
    return f


def _frac_gcd(x: Fraction, y: Fraction) -> Fraction:
    return Fraction(
        math.gcd(x.numerator * y.denominator, y.numerator * x.denominator),
        x.denominator * y.denominator,
    )


@dataclass(frozen=True)
class AxisLattice:
    """One axis: node ``n`` at ``offset + h * n``; point k, displacement j -> node a*k + b*j."""

    offset: float
    h: float
    a: int
    b: int


def axis_lattice(size: int, grid: int, radius: int, spacing: float) -> AxisLattice | None:
    """The lattice of one axis, or None when stride and spacing have no small common step."""
    stride = Fraction(size, grid)
    if radius == 0:
        h = stride
    else:
        sp = _as_fraction(spacing)
        if sp is None:
            return None
        h = _frac_gcd(stride, sp)
    a = int(stride / h)
    b = int(Fraction(spacing).limit_denominator(64) / h) if radius > 0 else 1
    if a > _MAX_RATIO or b > _MAX_RATIO:
        return None
    offset = (float(stride) * 0.5 - 0.5) - radius * spacing
    return AxisLattice(offset=offset, h=float(h), a=a, b=b)


def linear_taps(
    positions: torch.Tensor, size: int, padding: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two taps of linear interpolation at voxel ``positions`` (float64, 1D) on an axis of
    ``size``: ``(i0, w0, i1, w1)``, indices clamped into the axis, weights 0 for taps outside
    it (``padding="zeros"``, as ``grid_sample``); ``"border"`` clamps the positions instead."""
    pos = positions.to(torch.float64)
    if padding == "border":
        pos = pos.clamp(0, size - 1)
    f0 = torch.floor(pos)
    frac = pos - f0
    i0 = f0.long()
    i1 = i0 + 1
    w0 = (1.0 - frac) * ((i0 >= 0) & (i0 < size))
    w1 = frac * ((i1 >= 0) & (i1 < size))
    return i0.clamp(0, size - 1), w0, i1.clamp(0, size - 1), w1


def resample_axis(x: torch.Tensor, dim: int, positions: torch.Tensor, padding: str) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` at voxel ``positions`` (float64, 1D).

    ``padding="zeros"``: samples outside contribute 0 (as ``grid_sample``); ``"border"``: the
    coordinate is clamped to the edge.  Integer positions give an exact copy.  Float32 CPU
    tensors run the native kernel (under autograd with its native transpose).
    """
    size = x.shape[dim]
    taps = linear_taps(positions, size, padding)
    if _native.usable(x):
        return _native.resample_axis(x.contiguous(), dim, *taps)
    if _native.supports(x):  # autograd: native backward
        from . import _autograd  # (imports this module)

        return _autograd.resample_axis(x, dim, taps)
    i0, w0, i1, w1 = taps
    shape = [1] * x.dim()
    shape[dim] = -1
    integer = bool((w1 == 0).all())
    out = None
    for idx, w in [(i0, w0)] if integer else [(i0, w0), (i1, w1)]:
        vals = x.index_select(dim, idx.to(x.device))
        if not (integer and bool((w == 1).all())):
            vals = vals * w.to(device=x.device, dtype=x.dtype).view(shape)
        out = vals if out is None else out + vals
    assert out is not None
    return out


@dataclass
class TilePlan:
    """How the control grid is cut into tiles and where each tile's lattice window lies."""

    ndim: int
    grid: tuple[int, ...]  # G
    radius: int
    axes: tuple[AxisLattice, ...]
    tile: tuple[int, ...]  # T
    ntiles: tuple[int, ...]  # nT
    window: tuple[int, ...]  # W
    nodes: tuple[int, ...]  # lattice size N per axis

    @property
    def padded_grid(self) -> tuple[int, ...]:
        return tuple(t * n for t, n in zip(self.tile, self.ntiles, strict=True))

    @property
    def tile_points(self) -> int:
        return math.prod(self.tile)

    @property
    def window_nodes(self) -> int:
        return math.prod(self.window)

    def index(self, device: torch.device) -> torch.Tensor:
        """(Kt, |L|) int64: node in the flattened window of (point in tile, displacement)."""
        n = 2 * self.radius + 1
        # build explicitly with broadcasting: shape (*tile, *(n,)*ndim)
        parts = []
        for ax in range(self.ndim):
            stride = math.prod(self.window[ax + 1 :])
            shape_t = [1] * (2 * self.ndim)
            shape_t[ax] = self.tile[ax]
            shape_j = [1] * (2 * self.ndim)
            shape_j[self.ndim + ax] = n
            t = (torch.arange(self.tile[ax]) * self.axes[ax].a * stride).view(shape_t)
            j = (torch.arange(n) * self.axes[ax].b * stride).view(shape_j)
            parts.append(t + j)
        idx = parts[0]
        for p in parts[1:]:
            idx = idx + p
        return idx.reshape(self.tile_points, n**self.ndim).to(device)

    def lattice_positions(self, ax: int) -> torch.Tensor:
        """Voxel positions (float64) of the lattice nodes of axis ``ax``."""
        lat = self.axes[ax]
        return lat.offset + lat.h * torch.arange(self.nodes[ax], dtype=torch.float64)


def _tile_cost(tile: Sequence[int], axes: Sequence[AxisLattice], grid, radius, channels) -> float:
    """Rough time model of one plan (arbitrary units per control point)."""
    win = [lat.a * (t - 1) + 2 * radius * lat.b + 1 for t, lat in zip(tile, axes, strict=True)]
    kt = math.prod(tile)
    wt = math.prod(win)
    pad = math.prod(math.ceil(g / t) * t / g for g, t in zip(grid, tile, strict=True))
    # matmul MACs per point + copying the window (amortised over the tile) + the output rows
    per_point = wt * channels + 6.0 * (channels * wt / kt + wt)
    return per_point * pad


def make_plan(
    grid: Sequence[int], size: Sequence[int], radius: int, spacing: float, channels: int
) -> TilePlan | None:
    """A tiled plan for these sizes, or None when the lattice route does not apply."""
    ndim = len(grid)
    axes = []
    for g, s in zip(grid, size, strict=True):
        lat = axis_lattice(s, g, radius, spacing)
        if lat is None:
            return None
        axes.append(lat)
    cands = []
    for g in grid:
        c = {t for t in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16) if t <= g}
        cands.append(sorted(c) or [1])
    best = None
    for tile in itertools.product(*cands):
        if math.prod(tile) > 512:
            continue
        cost = _tile_cost(tile, axes, grid, radius, channels + 2)
        if best is None or cost < best[0]:
            best = (cost, tile)
    assert best is not None
    tile = best[1]
    ntiles = tuple(math.ceil(g / t) for g, t in zip(grid, tile, strict=True))
    window = tuple(
        lat.a * (t - 1) + 2 * radius * lat.b + 1 for t, lat in zip(tile, axes, strict=True)
    )
    nodes = tuple(
        lat.a * t * (n - 1) + w for lat, t, n, w in zip(axes, tile, ntiles, window, strict=True)
    )
    return TilePlan(
        ndim=ndim,
        grid=tuple(grid),
        radius=radius,
        axes=tuple(axes),
        tile=tile,
        ntiles=ntiles,
        window=window,
        nodes=nodes,
    )


def to_lattice(x: torch.Tensor, plan: TilePlan, padding: str) -> torch.Tensor:
    """Resample ``x`` (B, C, *S) onto the plan's lattice -> (B, C, *N)."""
    for ax in range(plan.ndim):
        x = resample_axis(x, 2 + ax, plan.lattice_positions(ax), padding)
    return x


def phase_major(positions: torch.Tensor, a: int) -> tuple[torch.Tensor, int]:
    """The positions (float64, 1D) of an axis of lattice nodes reordered phase-major for the
    lattice step ``a`` (node ``a q + phi`` to ``phi * plen + q``, the layout of the native
    kernels' last axis; nodes past the end continue the regular spacing of the first two).
    Returns ``(positions of a * plen nodes, plen)``."""
    n = positions.numel()
    if a == 1:
        return positions, n
    plen = -(-n // a)
    h = float(positions[1] - positions[0]) if n > 1 else 1.0
    idx = torch.arange(a * plen, dtype=torch.float64).view(plen, a).t().reshape(-1)
    return positions[0] + h * idx, plen


def to_lattice_native(
    x: torch.Tensor, plan: TilePlan, padding: str
) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], int]:
    """The plan's lattice of ``x`` with its last axis phase-major (see :func:`phase_major`):
    ``(lattice (B, C, *N'), a, b, plen)``, ``a``, ``b`` the lattice steps per axis."""
    a = tuple(lat.a for lat in plan.axes)
    b = tuple(lat.b for lat in plan.axes)
    plen = plan.nodes[-1]
    for ax in range(plan.ndim):
        pos = plan.lattice_positions(ax)
        if ax == plan.ndim - 1:
            pos, plen = phase_major(pos, a[-1])
        x = resample_axis(x, 2 + ax, pos, padding)
    return x, a, b, plen


def windows(lat: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """Strided view (B, C, *nT, *W) of the tile windows of a lattice tensor (B, C, *N)."""
    v = lat
    for ax in range(plan.ndim):
        v = v.unfold(2 + ax, plan.window[ax], plan.axes[ax].a * plan.tile[ax])
    return v


def tiles_view(x: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """View (B, C, nT0, T0, nT1, T1, ...) of a grid tensor (B, C, *padded_grid)."""
    shape = list(x.shape[:2])
    for n, t in zip(plan.ntiles, plan.tile, strict=True):
        shape += [n, t]
    return x.view(shape)


def pad_grid(x: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """Zero-pad the grid axes of (B, C, *G) to the plan's padded grid."""
    pg = plan.padded_grid
    if tuple(x.shape[2:]) == pg:
        return x
    pads: list[int] = []
    for g, p in zip(reversed(plan.grid), reversed(pg), strict=True):
        pads += [0, p - g]
    return torch.nn.functional.pad(x, pads)


def chunk_shape(ntiles: Sequence[int], per_tile_bytes: int, max_memory: int) -> tuple[int, ...]:
    """Largest block of tiles (inner axes first) whose working memory fits ``max_memory``."""
    budget = max(1, max_memory // max(1, per_tile_bytes))
    shape = [1] * len(ntiles)
    for ax in reversed(range(len(ntiles))):
        inner = math.prod(shape[ax + 1 :])
        take = max(1, min(ntiles[ax], budget // inner))
        shape[ax] = take
        if take < ntiles[ax]:
            break
    return tuple(shape)


def run_chunks(
    fn: Callable[[tuple[slice, ...], list[torch.Tensor]], torch.Tensor | None],
    tensors: Sequence[torch.Tensor],
    ntiles: Sequence[int],
    chunk: Sequence[int],
) -> torch.Tensor | None:
    """Call ``fn(slices, pieces)`` on every block of tiles; concatenate the returned blocks.

    ``tensors`` have the tile axes ``(*nT, ...)`` first; they are cut with ``split`` (whose
    backward concatenates the chunk gradients once, where slicing would add a full-size zero
    gradient per chunk).
    """
    nd = len(ntiles)

    def rec(ax: int, prefix: tuple[slice, ...], ts: list[torch.Tensor]) -> torch.Tensor | None:
        if ax == nd:
            return fn(prefix, ts)
        cuts = [t.split(chunk[ax], dim=ax) for t in ts]
        parts = [
            rec(
                ax + 1,
                prefix + (slice(s, min(s + chunk[ax], ntiles[ax])),),
                [c[i] for c in cuts],
            )
            for i, s in enumerate(range(0, ntiles[ax], chunk[ax]))
        ]
        if parts[0] is None:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, ax)  # type: ignore[arg-type]

    return rec(0, (), list(tensors))


# Under autograd, chunked ops whose output exceeds this many bytes recompute each chunk in the
# backward pass (torch.utils.checkpoint) instead of storing its intermediates; smaller ones run
# as one plain autograd chunk, which is faster.
CHECKPOINT_BYTES = 32 * 2**20


def wants_checkpoint(nbytes: int, *ts: torch.Tensor | None) -> bool:
    """Whether a chunked op producing ``nbytes`` under autograd should checkpoint its chunks."""
    grads = any(t is not None and t.requires_grad for t in ts)
    return torch.is_grad_enabled() and grads and nbytes > CHECKPOINT_BYTES


def checkpointed(fn: Callable[..., torch.Tensor], *args, enabled: bool = True) -> torch.Tensor:
    """``fn(*args)``; under autograd and ``enabled``, recomputed in backward (checkpoint)."""
    grads = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    if enabled and torch.is_grad_enabled() and grads:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def interleave_perm(ndim: int, lead: int) -> list[int]:
    """Permutation taking (*lead, *nT, *T, X) to (*lead, X, nT0, T0, nT1, T1, ...)."""
    perm = list(range(lead)) + [lead + 2 * ndim]
    for ax in range(ndim):
        perm += [lead + ax, lead + ndim + ax]
    return perm
