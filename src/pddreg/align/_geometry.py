"""Homogeneous matrices of the global stage: parametrisations, index <-> physical frames.

Convention:
    * A map is an ``(ndim + 1, ndim + 1)`` float64 homogeneous matrix acting on column vectors
      ``[x_0, ..., x_{ndim-1}, 1]``, coordinates in the array axis order (axis 0 first), as in
      :mod:`pddreg.spatial`.
    * The fixed physical frame is ``p = spacing * index`` (mm along the fixed array axes, origin
      at voxel 0); transforms ``T`` of the global stage act on it, about a centre ``c``:
      ``T(p) = A (p - c) + c + t``.
    * The full map from fixed voxel index to moving voxel index is
      ``init @ inv(S_f) @ T @ S_f`` with ``S_f = diag(fixed_spacing, 1)``: ``T`` corrects the
      initial (world) alignment in the fixed image's own physical frame, so a rigid ``T`` is a
      rigid motion in mm whatever the voxel sizes.
    * The ``projective`` model (2D photographs under a change of viewpoint, a homography) has a
      last row other than ``[0, ..., 0, 1]``: a point maps to ``q[:ndim] / q[ndim]`` with
      ``q = T [p, 1]`` (:func:`apply_h`); the other models keep that row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from pddreg.spatial import is_projective

__all__ = [
    "MODES",
    "apply_h",
    "decompose",
    "diag_h",
    "increment",
    "n_params",
    "rotation_matrix",
    "rotation_vector",
    "unravel",
]

#: The transform models, simplest first.
MODES = ("translation", "rigid", "similarity", "affine", "projective")


def unravel(flat: Tensor, shape: Sequence[int]) -> Tensor:
    """Array indices ``(*flat.shape, ndim)`` of the flat (C-order) indices ``flat`` into
    ``shape`` (``torch.unravel_index`` imports sympy on its first call: a second or so)."""
    out = []
    rest = flat
    for size in reversed(tuple(int(s) for s in shape)):
        out.append(rest % size)
        rest = torch.div(rest, size, rounding_mode="floor")
    return torch.stack(out[::-1], dim=-1)


def n_params(mode: str, ndim: int) -> int:
    """Number of parameters of a model: ndim, ndim + ndim(ndim-1)/2 or ndim + ndim^2."""
    if mode == "translation":
        return ndim
    if mode == "rigid":
        return ndim + ndim * (ndim - 1) // 2
    if mode == "similarity":
        return ndim + ndim * (ndim - 1) // 2 + 1
    if mode == "affine":
        return ndim + ndim * ndim
    if mode == "projective":
        return 2 * ndim + ndim * ndim
    raise ValueError(f"unknown transform mode {mode!r}; expected one of {MODES}")


def apply_h(matrix: Tensor, points: Tensor) -> Tensor:
    """``points`` ``(..., ndim)`` mapped by a homogeneous ``matrix`` (with the perspective
    division where the last row asks for it), in ``points``' dtype."""
    ndim = points.shape[-1]
    m = matrix.to(points.device, points.dtype)
    out = points @ m[:ndim, :ndim].t() + m[:ndim, -1]
    if is_projective(matrix):
        w = points @ m[ndim, :ndim] + m[ndim, -1]
        out = out / w.unsqueeze(-1)
    return out


def diag_h(values: Sequence[float]) -> Tensor:
    """``diag(values, 1)`` as a float64 homogeneous matrix."""
    return torch.diag(torch.tensor([*map(float, values), 1.0], dtype=torch.float64))


def translation_h(t: Sequence[float] | Tensor) -> Tensor:
    """Homogeneous translation by ``t`` (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    out = torch.eye(t.numel() + 1, dtype=torch.float64)
    out[:-1, -1] = t
    return out


def about(linear: Tensor, centre: Tensor, shift: Tensor | None = None) -> Tensor:
    """Homogeneous ``p -> linear (p - centre) + centre + shift``."""
    ndim = linear.shape[0]
    out = torch.eye(ndim + 1, dtype=torch.float64)
    out[:ndim, :ndim] = linear
    t = centre - linear @ centre
    if shift is not None:
        t = t + shift
    out[:ndim, -1] = t
    return out


def _skew_basis(ndim: int) -> list[Tensor]:
    """Generators of so(ndim): E_k = e_i e_j^T - e_j e_i^T for the pairs (i, j), i < j.

    3D order: rotation-vector components about axes 0, 1, 2, i.e. pairs (1, 2), (2, 0), (0, 1)
    (right-handed in the array axis order), so ``sum w_k E_k = [w]_x``.
    """
    if ndim == 2:
        pairs = [(0, 1)]
    elif ndim == 3:
        pairs = [(1, 2), (2, 0), (0, 1)]
    else:
        pairs = [(i, j) for i in range(ndim) for j in range(i + 1, ndim)]
    out = []
    for i, j in pairs:
        e = torch.zeros(ndim, ndim, dtype=torch.float64)
        e[i, j] = -1.0
        e[j, i] = 1.0
        out.append(e)
    return out


def rotation_matrix(params: Sequence[float] | Tensor, ndim: int) -> Tensor:
    """Rotation ``exp(sum_k params_k E_k)``: 2D one angle (radians, from axis 0 towards axis 1),
    3D a rotation vector (radians, components about array axes 0, 1, 2). Float64 (ndim, ndim)."""
    w = torch.as_tensor(params, dtype=torch.float64).reshape(-1)
    basis = _skew_basis(ndim)
    if w.numel() != len(basis):
        raise ValueError(
            f"rotation_matrix(): {ndim}-D needs {len(basis)} parameters, got {w.numel()}"
        )
    gen = sum(
        (wk * e for wk, e in zip(w, basis, strict=True)), torch.zeros(ndim, ndim, dtype=w.dtype)
    )
    return torch.linalg.matrix_exp(gen)


def rotation_vector(rot: Tensor) -> Tensor:
    """Inverse of :func:`rotation_matrix` (principal log), radians; 2D: one angle."""
    rot = rot.to(torch.float64)
    ndim = rot.shape[0]
    if ndim == 2:
        return torch.atan2(rot[1, 0], rot[0, 0]).reshape(1)
    if ndim != 3:
        raise ValueError("rotation_vector(): only 2D and 3D")
    cos = ((torch.trace(rot) - 1.0) / 2.0).clamp(-1.0, 1.0)
    angle = torch.acos(cos)
    w = torch.stack([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    s = torch.sin(angle)
    if float(s) < 1e-9:
        if float(angle) < 1e-6:
            return w / 2.0
        # angle ~ pi: axis from the symmetric part
        b = (rot + torch.eye(3, dtype=rot.dtype)) / 2.0
        axis = b[torch.argmax(torch.diagonal(b))]
        return axis / axis.norm() * angle
    return w * (angle / (2.0 * s))


def increment(mode: str, ndim: int, theta: Tensor, centre: Tensor, scale: float) -> Tensor:
    """The small transform ``delta(theta)`` about ``centre`` (homogeneous, fixed physical frame).

    ``theta`` (P,) float64, ordered translation (mm) first, then rotation (rigid, radians times
    ``scale`` mm: a rotation parameter moves points at distance ``scale`` by about that many mm)
    or the linear part (affine, row-major, times ``scale``).
    """
    t = theta[:ndim]
    if mode == "translation":
        return translation_h(t)
    rest = theta[ndim:] / scale
    if mode == "rigid":
        return about(rotation_matrix(rest, ndim), centre, t)
    if mode == "similarity":
        return about(torch.exp(rest[-1]) * rotation_matrix(rest[:-1], ndim), centre, t)
    if mode == "projective":
        # p -> c + (A (p - c) + t) / (1 + v . (p - c) / scale): the affine increment about c
        # with a perspective row, v = rest[ndim^2:] (so a parameter of 1 moves points at
        # distance ``scale`` by about 1 mm, as the linear ones)
        lin = torch.eye(ndim, dtype=torch.float64) + rest[: ndim * ndim].reshape(ndim, ndim)
        mid = torch.eye(ndim + 1, dtype=torch.float64)
        mid[:ndim, :ndim] = lin
        mid[:ndim, -1] = t
        mid[ndim, :ndim] = rest[ndim * ndim :] / scale
        c = centre.to(torch.float64)
        return translation_h(c) @ mid @ translation_h(-c)
    lin = torch.eye(ndim, dtype=torch.float64) + rest.reshape(ndim, ndim)
    return about(lin, centre, t)


def jacobian_basis(mode: str, ndim: int) -> list[Tensor]:
    """d delta(p) / d theta_k at theta = 0 is ``B_k (p - c) / scale`` (translation: ``e_k``).

    Returns the (ndim, ndim) matrices ``B_k`` for the non-translation parameters (projective:
    those of its linear part; the perspective parameters have the columns
    ``-(p - c) ((p - c) / scale)_j / scale``, see ``_refine._dpdt``).
    """
    if mode == "translation":
        return []
    if mode == "rigid":
        return _skew_basis(ndim)
    if mode == "similarity":
        return _skew_basis(ndim) + [torch.eye(ndim, dtype=torch.float64)]
    if mode not in ("affine", "projective"):
        raise ValueError(f"unknown transform mode {mode!r}; expected one of {MODES}")
    out = []
    for i in range(ndim):
        for j in range(ndim):
            e = torch.zeros(ndim, ndim, dtype=torch.float64)
            e[i, j] = 1.0
            out.append(e)
    return out


def decompose(transform: Tensor, centre: Tensor) -> dict:
    """Describe ``T(p) = A (p - c) + c + t`` in the fixed physical frame.

    ``A = R K`` with ``R`` a rotation and ``K`` upper triangular with positive diagonal
    (``scales``) and ``shear = K_ij / K_ii`` (i < j); a reflection, if any, is folded into the
    last scale (negative). Angles in degrees: 2D one angle, 3D the rotation vector and its norm.
    """
    ndim = transform.shape[0] - 1
    lin = transform[:ndim, :ndim].to(torch.float64)
    t = transform[:ndim, -1] - (centre - lin @ centre)
    q, r = torch.linalg.qr(lin)
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    q = q * sign
    r = sign[:, None] * r
    if float(torch.det(q)) < 0:
        q[:, -1] = -q[:, -1]
        r[-1] = -r[-1]
    scales = torch.diagonal(r).clone()
    shear = [float(r[i, j] / r[i, i]) for i in range(ndim) for j in range(i + 1, ndim)]
    rv = rotation_vector(q) * (180.0 / math.pi)
    return {
        "translation_mm": [float(v) for v in t],
        "rotation_deg": [float(v) for v in rv],
        "rotation_angle_deg": float(rv.norm()),
        "scales": [float(v) for v in scales],
        "shear": shear,
        "centre_mm": [float(v) for v in centre],
        "matrix_mm": [[float(v) for v in row] for row in transform],
        # the last row (perspective part of a projective map; [0, .., 0, 1] otherwise)
        "perspective": [float(v) for v in transform[-1]],
    }
