"""Sampling, warping, composition and resizing of displacement fields.

Convention:
    Displacements are ``(B, ndim, *spatial)`` in voxel units, component ``i`` along array axis
    ``i``; ``warped(x) = moving(x + u(x))``. Coarse grids relate to fine ones as
    ``F.interpolate(..., align_corners=False)`` does: point ``k`` of a grid of size ``G`` sits at
    voxel ``(k + 0.5) * S / G - 0.5`` of a grid of size ``S``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .grid import identity_grid, voxel_to_normalised

__all__ = ["compose", "resize_field", "sample", "sample_labels", "warp", "warp_labels"]

_MODES = {"linear": "bilinear", "nearest": "nearest"}
_PADDINGS = {"border": "border", "zeros": "zeros"}
_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _check_image(image: torch.Tensor, fn: str, name: str = "image") -> int:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{fn}: '{name}' must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() < 3:
        raise ValueError(
            f"{fn}: '{name}' must have shape (B, C, *spatial), got {tuple(image.shape)}"
        )
    return image.dim() - 2


def _check_disp(disp: torch.Tensor, ndim: int, fn: str, name: str = "disp") -> None:
    if not isinstance(disp, torch.Tensor):
        raise TypeError(f"{fn}: '{name}' must be a torch.Tensor, got {type(disp).__name__}")
    if disp.dim() != ndim + 2 or disp.shape[1] != ndim:
        raise ValueError(
            f"{fn}: '{name}' must have shape (B, {ndim}, *spatial), got {tuple(disp.shape)}"
        )
    if not disp.is_floating_point():
        raise ValueError(f"{fn}: '{name}' must be floating point, got {disp.dtype}")


def _match_batch(
    a: torch.Tensor, b: torch.Tensor, fn: str, names: tuple[str, str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast a batch of 1 against a batch of B."""
    if a.shape[0] == b.shape[0]:
        return a, b
    if a.shape[0] == 1:
        return a.expand(b.shape[0], *a.shape[1:]), b
    if b.shape[0] == 1:
        return a, b.expand(a.shape[0], *b.shape[1:])
    raise ValueError(
        f"{fn}: batch sizes of '{names[0]}' ({a.shape[0]}) and '{names[1]}' ({b.shape[0]}) differ"
    )


def sample(
    image: torch.Tensor,
    coords: torch.Tensor,
    mode: str = "linear",
    padding: str = "border",
) -> torch.Tensor:
    """Sample an image at voxel coordinates.

    Args:
        image: ``(B, C, *S)`` floating-point image.
        coords: ``(B, ndim, *out)`` voxel coordinates into ``image`` (component ``i`` along
            array axis ``i``); a batch of 1 on either side broadcasts against the other.
        mode: ``"linear"`` (bi/trilinear) or ``"nearest"``.
        padding: ``"border"`` (repeat edge voxels) or ``"zeros"`` outside the image.

    Returns:
        ``(B, C, *out)`` samples, same dtype as ``image``. Differentiable w.r.t. ``image`` and
        ``coords`` (linear mode).

    Convention: voxel units, axis order of the array; see :mod:`pddreg.spatial`.
    """
    fn = "sample()"
    ndim = _check_image(image, fn)
    if mode not in _MODES:
        raise ValueError(f"{fn}: 'mode' must be 'linear' or 'nearest', got {mode!r}")
    if padding not in _PADDINGS:
        raise ValueError(f"{fn}: 'padding' must be 'border' or 'zeros', got {padding!r}")
    if ndim not in (1, 2, 3):
        raise ValueError(f"{fn}: only 1-D, 2-D and 3-D images are supported, got {ndim}-D")
    _check_disp(coords, ndim, fn, "coords")
    if not image.is_floating_point():
        raise ValueError(f"{fn}: 'image' must be floating point, got {image.dtype}")
    if ndim == 1:
        # grid_sample has no 1-D form: add a trailing axis of size 1 (coordinate 0 on it).
        coords2 = torch.cat([coords, torch.zeros_like(coords)], dim=1).unsqueeze(-1)
        return sample(image.unsqueeze(-1), coords2, mode, padding).squeeze(-1)
    image, coords = _match_batch(image, coords, fn, ("image", "coords"))
    if ndim == 3 and mode == "linear":
        out = _native_sample(image, coords, padding)
        if out is not None:
            return out
    # Coordinates stay in at least float32 (float16 voxel coordinates are off by up to 1/8
    # voxel at 256). grid_sample wants the grid in the image's dtype, and a float16/bfloat16
    # grid misplaces samples by up to a voxel: such images are sampled in float32 and the
    # result is cast back.
    work = _coord_dtype(coords.dtype, image.dtype)
    coords = coords.to(work)
    src = image if image.dtype in (torch.float32, torch.float64) else image.to(work)
    grid = voxel_to_normalised(coords, image.shape[2:]).to(src.dtype)
    out = F.grid_sample(
        src, grid, mode=_MODES[mode], padding_mode=_PADDINGS[padding], align_corners=True
    )
    return out.to(image.dtype)


def _native_sample(image: torch.Tensor, coords: torch.Tensor, padding: str) -> torch.Tensor | None:
    """3D linear sampling on the native kernel (float32 CPU tensors outside autograd: 3-4x
    faster than ``grid_sample`` for multi-channel feature maps, the weights of the eight
    corners computed once per point for every channel), or None where it does not apply.
    Equal to ``grid_sample`` up to its float32 rounding of the normalised coordinates
    (about 1e-5 of the intensity range)."""
    from pddreg.cost import _native

    if coords.dtype != torch.float32 or not _native.usable(image, coords):
        return None

    def inner(t: torch.Tensor) -> torch.Tensor:
        # a batch broadcast by expand keeps stride 0 on the batch axis (no copy)
        if t.stride(0) == 0 and t[:1].is_contiguous():
            return t
        return t.contiguous()

    return _native.sample3(inner(image), inner(coords), zeros=padding == "zeros")


def _coord_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32 (never half precision for coordinates)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _coords(disp: torch.Tensor) -> torch.Tensor:
    """``identity + disp`` as ``(B, ndim, *T)`` in float32 or float64."""
    dtype = _coord_dtype(disp.dtype)
    return identity_grid(disp.shape[2:], disp.device, dtype).unsqueeze(0) + disp.to(dtype)


def warp(
    image: torch.Tensor,
    disp: torch.Tensor,
    mode: str = "linear",
    padding: str = "border",
) -> torch.Tensor:
    """Warp an image by a displacement field: ``warped(x) = image(x + disp(x))``.

    Args:
        image: ``(B, C, *S)`` floating-point moving image.
        disp: ``(B, ndim, *T)`` displacement in voxels of ``image``, defined on the output grid
            ``T`` (normally ``T == S``); a batch of 1 broadcasts.
        mode: ``"linear"`` or ``"nearest"``; padding: ``"border"`` or ``"zeros"``.

    Returns:
        ``(B, C, *T)`` warped image. Differentiable w.r.t. ``image`` and ``disp``.

    Convention: voxel units, axis ``i`` component ``i``, backward mapping; see
    :mod:`pddreg.spatial`.
    """
    ndim = _check_image(image, "warp()")
    _check_disp(disp, ndim, "warp()")
    return sample(image, _coords(disp), mode=mode, padding=padding)


def warp_labels(labels: torch.Tensor, disp: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Warp an integer label map: ``out(x) = labels(x + disp(x))`` without mixing labels.

    Args:
        labels: ``(B, 1, *S)`` (or ``(B, C, *S)`` for ``"nearest"``) integer or bool label map.
        disp: ``(B, ndim, *T)`` displacement in voxels; a batch of 1 broadcasts.
        mode: ``"nearest"`` (default): the label of the nearest voxel, ``round(x + disp(x))``;
            ``"onehot"``: every label's indicator is warped linearly and the largest wins
            (smoother boundaries, memory grows with the number of labels).

    Returns:
        ``(B, C, *T)`` with the dtype of ``labels`` (values are copied, never interpolated;
        positions outside the image take the nearest border voxel; non-finite displacements
        read voxel 0).

    Convention: see :mod:`pddreg.spatial`.
    """
    fn = "warp_labels()"
    ndim = _check_image(labels, fn, "labels")
    _check_disp(disp, ndim, fn)
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{fn}: 'labels' must be an integer tensor, got {labels.dtype}")
    if mode not in ("nearest", "onehot"):
        raise ValueError(f"{fn}: 'mode' must be 'nearest' or 'onehot', got {mode!r}")
    labels, disp = _match_batch(labels, disp, fn, ("labels", "disp"))
    if mode == "onehot":
        return _warp_labels_onehot(labels, disp, fn)
    return sample_labels(labels, _coords(disp))


def sample_labels(
    labels: torch.Tensor, coords: torch.Tensor, padding: str = "border"
) -> torch.Tensor:
    """Sample an integer label map at voxel coordinates by nearest neighbour (values copied).

    Args:
        labels: ``(B, C, *S)`` integer or bool label map.
        coords: ``(B, ndim, *T)`` voxel coordinates into ``labels`` (a batch of 1 broadcasts).
        padding: ``"border"`` (the nearest border voxel) or ``"zeros"`` (label 0 outside
            ``[-0.5, S - 0.5]`` on any axis).

    Returns:
        ``(B, C, *T)`` with the dtype of ``labels``; rounding is half to even, as
        ``grid_sample(mode="nearest")``; non-finite coordinates read voxel 0.
    """
    fn = "sample_labels()"
    ndim = _check_image(labels, fn, "labels")
    _check_disp(coords, ndim, fn, "coords")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{fn}: 'labels' must be an integer tensor, got {labels.dtype}")
    if padding not in _PADDINGS:
        raise ValueError(f"{fn}: 'padding' must be 'border' or 'zeros', got {padding!r}")
    labels, coords = _match_batch(labels, coords, fn, ("labels", "coords"))
    b, c = labels.shape[:2]
    in_shape = labels.shape[2:]
    out_shape = coords.shape[2:]
    coords = torch.nan_to_num(coords.to(_coord_dtype(coords.dtype)), nan=0.0)
    index = torch.zeros((b,) + tuple(out_shape), dtype=torch.long, device=labels.device)
    inside = None
    for i, size in enumerate(in_shape):
        rounded = torch.round(coords[:, i])
        if padding == "zeros":
            ok = (coords[:, i] >= -0.5) & (coords[:, i] <= size - 0.5)
            inside = ok if inside is None else inside & ok
        idx = rounded.clamp_(0, size - 1).long()
        index = index * size + idx
    flat = labels.reshape(b, c, -1)
    out = torch.gather(flat, 2, index.reshape(b, 1, -1).expand(b, c, -1))
    out = out.reshape((b, c) + tuple(out_shape))
    if inside is not None:
        out = out * inside.unsqueeze(1).to(out.dtype)
    return out


def _warp_labels_onehot(labels: torch.Tensor, disp: torch.Tensor, fn: str) -> torch.Tensor:
    if labels.shape[1] != 1:
        raise ValueError(
            f"{fn}: mode 'onehot' needs 'labels' of shape (B, 1, *spatial), got "
            f"{tuple(labels.shape)}"
        )
    ndim = disp.shape[1]
    values = torch.unique(labels)
    dtype = _coord_dtype(disp.dtype)
    onehot = (labels == values.view((1, -1) + (1,) * ndim)).to(dtype)
    warped = warp(onehot, disp)
    return values[warped.argmax(dim=1, keepdim=True)].to(labels.dtype)


def compose(first: torch.Tensor, second: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Compose two displacement fields so that one warp equals two.

    ``warp(warp(m, first), second) == warp(m, compose(first, second))``, i.e.
    ``c(x) = second(x) + first(x + second(x))`` = ``second + warp(first, second)``.

    Args:
        first: ``(B, ndim, *S)`` the displacement applied first to the moving image.
        second: ``(B, ndim, *S)`` the displacement applied to the result.
        padding: how ``first`` is extended outside its grid (``"border"`` or ``"zeros"``).

    Returns:
        ``(B, ndim, *S)`` composed displacement in voxels.

    Convention: see :mod:`pddreg.spatial`.
    """
    ndim = _check_image(first, "compose()", "first")
    _check_disp(first, ndim, "compose()", "first")
    _check_disp(second, ndim, "compose()", "second")
    return second + warp(first, second, mode="linear", padding=padding)


def resize_field(disp: torch.Tensor, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """Resample a displacement field to another grid size and rescale its vectors.

    Args:
        disp: ``(B, ndim, *G)`` displacement in voxels of a grid of size ``G``.
        shape: the target spatial shape ``(*S)``.

    Returns:
        ``(B, ndim, *S)`` displacement in voxels of the ``S`` grid: values interpolated
        (bi/trilinear, ``align_corners=False``, so point ``k`` of ``G`` sits at voxel
        ``(k + 0.5) * S / G - 0.5``) and component ``i`` multiplied by ``S[i] / G[i]``.

    Convention: see :mod:`pddreg.spatial`.
    """
    fn = "resize_field()"
    ndim = _check_image(disp, fn, "disp")
    _check_disp(disp, ndim, fn)
    target = tuple(int(s) for s in shape)
    if len(target) != ndim or any(s < 1 for s in target):
        raise ValueError(f"{fn}: 'shape' must hold {ndim} positive sizes, got {tuple(shape)}")
    grid = tuple(disp.shape[2:])
    if target == grid:
        return disp.clone()
    if ndim not in _INTERP:
        raise ValueError(f"{fn}: only 1-D, 2-D and 3-D fields are supported, got {ndim}-D")
    out = F.interpolate(disp, size=target, mode=_INTERP[ndim], align_corners=False)
    return torch.stack(
        [out[:, i] * (t / g) for i, (t, g) in enumerate(zip(target, grid, strict=True))], dim=1
    )
