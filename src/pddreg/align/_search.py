"""Exhaustive coarse search: a set of rotations, and for each all translations at once.

For a rotation ``R`` about the centre ``c`` the FIXED image is rotated by ``R^-1`` (on its own
coarse grid) and its MIND-SSC features are compared with those of the moving image on a grid
that extends the fixed one by the translation range on every side (computed once per base
map). Matching ``fixed(p) ~ moving(base(R (p - c) + c + tau))`` for every ``tau`` is then a
translation-only problem between the rotated fixed and the extended moving, solved by FFT:

    SSD(t) = sum_x wf(x) wm(x+t) |Ff(x) - Fm(x+t)|^2
           = corr(wf |Ff|^2, wm) - 2 sum_c corr(wf Ff_c, wm Fm_c) + corr(wf, wm |Fm|^2),
    N(t)   = corr(wf, wm)                       (the overlap, Padfield's masked correlation)

with ``corr(a, b)(t) = sum_x a(x) b(x + t)``. The score is the penalised mean
``(SSD(t) + (W - N(t)) rho) / W`` (``W = sum wf``; fixed voxels without a partner count as an
unrelated pair, ``rho``) and translations with ``N(t) < min_overlap W`` are rejected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pddreg.features.mind import mind_ssc
from pddreg.spatial import is_projective, sample

from ._geometry import about, rotation_matrix, translation_h, unravel
from ._pyramid import Level

__all__ = ["Candidate", "rotation_set", "search"]


@dataclass
class Candidate:
    """A search result: ``transform`` (homogeneous, fixed mm frame), its penalised score per
    channel, and the index of its linear map in the list searched."""

    transform: Tensor
    score: float
    linear_index: int


def rotation_set(ndim: int, range_deg: float, step_deg: float) -> list[Tensor]:
    """Rotations to try: 2D angles ``-range..range`` in steps; 3D rotation vectors on a cubic
    lattice of ``step`` degrees inside the ball of radius ``range`` (identity first)."""
    if range_deg <= 0 or step_deg <= 0:
        return [torch.eye(ndim, dtype=torch.float64)]
    k = int(math.floor(range_deg / step_deg + 1e-9))
    ticks = [i * step_deg for i in range(-k, k + 1)]
    if ndim == 2:
        vecs = [[t] for t in sorted(ticks, key=abs)]
    else:
        vecs = []
        for a in ticks:
            for b in ticks:
                for c in ticks:
                    if a * a + b * b + c * c <= range_deg**2 + 1e-6:
                        vecs.append([a, b, c])
        vecs.sort(key=lambda v: sum(x * x for x in v))
    return [rotation_matrix([math.radians(x) for x in v], ndim) for v in vecs]


def _fft_size(n: int) -> int:
    """Smallest even 2^a 3^b 5^c >= n: odd lengths are slow in real FFTs (a batch of 48 real
    volumes of 24^3 zero-padded to 45^3 took 21.5 ms, to 48^3 14.1 ms, to 40^3 8.3 ms; 2
    threads), and an odd last axis slowed a whole 3D transform by up to 1.7x."""
    m = max(2, n)
    while True:
        x = m
        for p in (2, 3, 5):
            while x % p == 0:
                x //= p
        if x == 1 and m % 2 == 0:
            return m
        m += 1


def _grid_points(
    level: Level, spacing_full: tuple[float, ...], lo: list[int], hi: list[int]
) -> Tensor:
    """mm coordinates ``(ndim, *shape)`` of level indices ``lo .. hi - 1`` per axis."""
    ndim = len(lo)
    dev, dtype = level.image.device, torch.float64
    axes = []
    for i in range(ndim):
        k = torch.arange(lo[i], hi[i], device=dev, dtype=dtype)
        axes.append((k * level.to_full[i, i] + level.to_full[i, -1]) * spacing_full[i])
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _apply(mat: Tensor, pts: Tensor) -> Tensor:
    """Apply a homogeneous matrix to ``(ndim, *S)`` points (or a batch ``(B, ndim, *S)``)."""
    ndim = mat.shape[-1] - 1
    mat = mat.to(pts.device, pts.dtype)
    lin = mat[..., :ndim, :ndim]
    off = mat[..., :ndim, -1]
    if mat.dim() == 2:
        out = torch.einsum("ij,j...->i...", lin, pts) + off.reshape((ndim,) + (1,) * ndim)
        if is_projective(mat):  # a homography (the tilted starts of the 2D global stage)
            w = torch.einsum("j,j...->...", mat[ndim, :ndim], pts) + mat[ndim, ndim]
            out = out / w
        return out
    out = torch.einsum("bij,j...->bi...", lin, pts) + off.reshape(off.shape + (1,) * ndim)
    if any(is_projective(m) for m in mat):
        w = torch.einsum("bj,j...->b...", mat[:, ndim, :ndim], pts)
        out = out / (w + mat[:, ndim, ndim].reshape((-1,) + (1,) * ndim)).unsqueeze(1)
    return out


def _inside(coords: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``coords`` ``(B, ndim, *S)`` voxel coordinates inside ``[0, shape - 1]``: ``(B, 1, *S)``."""
    ok = torch.ones_like(coords[:, :1], dtype=torch.bool)
    for i, s in enumerate(shape):
        ok &= (coords[:, i : i + 1] >= 0) & (coords[:, i : i + 1] <= s - 1)
    return ok


def _weights(level: Level, coords: Tensor) -> Tensor:
    w = _inside(coords, level.shape).to(level.image.dtype)
    if level.mask is not None:
        w = w * (sample(level.mask, coords) > 0.5).to(w.dtype)
    return w


def search(
    fixed: Level,
    moving: Level,
    fixed_spacing: tuple[float, ...],
    phys_to_moving: Tensor,
    bases: list[Tensor],
    linears: list[Tensor],
    centre: Tensor,
    translation_range: float,
    min_overlap: float,
    mind_radius: int,
    keep: int,
    channels: int | None = None,
    extra: Sequence[int] | None = None,
    batch: int = 8,
) -> list[Candidate]:
    """Best ``keep`` (linear map, translation) candidates over all bases (one per base and
    linear map at most), best first.

    ``bases``: homogeneous mm transforms around which the translations are searched (e.g. the
    initial map and the centre-of-mass alignment); ``linears``: ``(ndim, ndim)`` maps (rotations,
    rotations times scales) applied about ``centre``: candidate ``base @ about(L, c, tau)``;
    a homogeneous ``(ndim + 1, ndim + 1)`` entry of ``linears`` (a homography ``P``, already
    about its centre) gives the candidate ``base @ translation(tau) @ P``.
    """
    ndim = len(fixed.shape)
    dtype = fixed.image.dtype
    n = list(fixed.shape)
    extra = [0] * ndim if extra is None else [int(e) for e in extra]
    m = [max(1, int(math.ceil(translation_range * s)) + e) for s, e in zip(n, extra, strict=True)]
    ext = [s + 2 * k for s, k in zip(n, m, strict=True)]
    fft_shape = [_fft_size(e) for e in ext]
    dims = tuple(range(-ndim, 0))
    sf = torch.tensor(fixed_spacing, dtype=torch.float64)
    full_from_mm = torch.diag(torch.cat([1.0 / sf, torch.ones(1, dtype=torch.float64)]))
    mov_from_mm = torch.linalg.inv(moving.to_full) @ phys_to_moving  # fixed mm -> moving level
    fix_from_mm = torch.linalg.inv(fixed.to_full) @ full_from_mm  # fixed mm -> fixed level

    # fixed points (mm) of the fixed grid and of the extended grid
    pts = _grid_points(fixed, fixed_spacing, [0] * ndim, n)
    pts_ext = _grid_points(
        fixed, fixed_spacing, [-k for k in m], [s + k for s, k in zip(n, m, strict=True)]
    )

    def spectrum(x: Tensor) -> Tensor:  # zero-padded to fft_shape by rfftn itself
        return torch.fft.rfftn(x, s=fft_shape, dim=dims)

    # principal components of the unrotated fixed features
    f_img = fixed.image
    f_feat = mind_ssc(f_img, mind_radius, 1)
    if fixed.mask is not None and bool((fixed.mask > 0.5).any()):
        fv = f_feat[0][:, fixed.mask[0, 0] > 0.5]
    else:
        fv = f_feat[0].reshape(f_feat.shape[1], -1)
    proj = None
    if channels is not None and channels < fv.shape[0] and fv.shape[1] > fv.shape[0]:
        cov = torch.cov(fv.double())
        _, vecs = torch.linalg.eigh(cov)
        proj = vecs[:, -channels:].t().to(dtype)  # (k, C)
        fv = proj @ fv

    def project(feat: Tensor) -> Tensor:
        if proj is None:
            return feat
        return torch.einsum("kc,bc...->bk...", proj, feat)

    n_channels = f_feat.shape[1]

    # moving spectra per base
    moving_specs = []
    for base in bases:
        coords = _apply(mov_from_mm @ base, pts_ext).to(dtype)[None]
        img = sample(moving.image, coords)
        wm = _weights(moving, coords)
        feat = project(mind_ssc(img, mind_radius, 1))
        spec_w = spectrum(wm[0, 0])
        spec_f = spectrum(feat[0] * wm[0])  # (C, ...)
        spec_f2 = spectrum(feat[0].square().sum(0) * wm[0, 0])
        moving_specs.append((spec_w, spec_f, spec_f2))
        if len(moving_specs) == 1:
            gv = feat[0][:, wm[0, 0] > 0.5]
    # cost of a fixed voxel without partner: an unrelated pair (see _refine._unrelated_cost)
    if fv.shape[1] > 1 and gv.shape[1] > 1:
        rho_sum = float(
            (fv.var(dim=1) + gv.var(dim=1) + (fv.mean(dim=1) - gv.mean(dim=1)).square()).sum()
        )
    else:
        rho_sum = float(n_channels)

    best: list[tuple[float, int, int, list[int]]] = []  # (score, rotation, base, t)
    out_sl = tuple(slice(0, 2 * k + 1) for k in m)
    for start in range(0, len(linears), batch):
        rots = linears[start : start + batch]
        # fixed mapped by L^-1 about c: f_L(q) = fixed(L^-1 (q - c) + c)
        inv = torch.stack(
            [
                torch.linalg.inv(r) if r.shape[0] > ndim else about(torch.linalg.inv(r), centre)
                for r in rots
            ]
        )  # (B, n+1, n+1)
        mats = fix_from_mm[None] @ inv
        coords = _apply(mats, pts).to(dtype)
        img = sample(f_img, coords)
        wf = _weights(fixed, coords)
        feat = project(mind_ssc(img, mind_radius, 1))  # (B, k, *n)
        total = wf.flatten(1).sum(1)  # (B,)
        spec_w = spectrum(wf[:, 0]).conj()
        spec_f = spectrum(feat * wf).conj()
        spec_f2 = spectrum(feat.square().sum(1) * wf[:, 0]).conj()
        for bi, (mw, mf, mf2) in enumerate(moving_specs):
            num_spec = spec_f2 * mw - 2.0 * (spec_f * mf).sum(1) + spec_w * mf2
            num = torch.fft.irfftn(num_spec, s=fft_shape, dim=dims)
            ov = torch.fft.irfftn(spec_w * mw, s=fft_shape, dim=dims)
            num = num[(slice(None),) + out_sl]
            ov = ov[(slice(None),) + out_sl]
            tot = total.reshape((-1,) + (1,) * ndim)
            score = (num + (tot - ov) * rho_sum) / tot.clamp(min=1.0)
            score = torch.where(ov >= min_overlap * tot, score, torch.full_like(score, math.inf))
            flat = score.flatten(1)
            vals, idx = flat.min(dim=1)
            shifts = unravel(idx, score.shape[1:]).tolist()
            for j in range(len(rots)):
                v = float(vals[j])
                if not math.isfinite(v):
                    continue
                best.append((v, start + j, bi, shifts[j]))
    best.sort(key=lambda x: x[0])
    out: list[Candidate] = []
    step_mm = [fixed.to_full[i, i].item() * fixed_spacing[i] for i in range(ndim)]
    for v, ri, bi, t in best[:keep]:
        tau = torch.tensor([(t[i] - m[i]) * step_mm[i] for i in range(ndim)], dtype=torch.float64)
        lin = linears[ri]
        rot = translation_h(tau) @ lin if lin.shape[0] > ndim else about(lin, centre, tau)
        out.append(Candidate(bases[bi] @ rot, v / n_channels, ri))
    return out
