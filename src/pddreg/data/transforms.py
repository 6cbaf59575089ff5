"""Saved registrations: the files ``pddreg register`` writes so that a registration can be
applied again (``pddreg apply``) and by other tools (ITK, SimpleITK, ANTs, 3D Slicer).

Files in a registration folder (all on the fixed grid):

* ``disp.npy``: ``(ndim, *S)`` float32, fixed voxels, ``warped(x) = moving_world(x + d(x))``
  (:mod:`pddreg.spatial.world`; the global stage composed in);
* ``disp_mm.npy``: the same field as world displacements in mm, ``(ndim, *S)``;
* ``disp_itk.nii.gz``: ITK displacement field: a vector image over the fixed grid (ITK index
  order, the fixed image's origin, spacing and direction), each vector the displacement in
  ITK's physical frame (LPS, mm) from the fixed point to the moving point, stored raw with
  intent ``NIFTI_INTENT_VECTOR`` as ANTs writes its warps: ``antsApplyTransforms -t
  disp_itk.nii.gz``, ``sitk.DisplacementFieldTransform`` and 3D Slicer apply it directly;
* ``affine.txt`` (when the global stage ran): the world map ``(ndim + 1, ndim + 1)`` from fixed
  world points to moving world points (mm, NIfTI's RAS frame; a 2D homography of the global
  stage has a perspective last row: divide by the last coordinate), and ``affine.tfm``: the
  same map as an ITK ``AffineTransform`` (LPS, fixed -> moving point, as ITK's resamplers take
  it; not written for a homography);
* ``transform.json``: the grids (fixed shape and index-to-world matrix, the moving image's
  shape and matrix), whether the headers were used (``"space": "world"``) or both arrays were
  one index grid (``"index"``), and the names of the files above.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = [
    "SavedRegistration",
    "itk_affine_text",
    "read_registration",
    "write_affine",
    "write_itk_displacement",
    "write_registration",
]

FORMAT_VERSION = 1
_NIFTI_INTENT_VECTOR = 1007


@dataclass
class SavedRegistration:
    """A registration read back from its folder (see the module docstring).

    Attributes:
        disp: ``(ndim, *S)`` float32 fixed voxels.
        fixed_shape, fixed_world: the fixed grid.
        moving_shape, moving_world: the grid of the moving image it was registered with.
        space: ``"world"`` (headers used) or ``"index"`` (both arrays one index grid).
        folder: where it was read from.
    """

    disp: np.ndarray
    fixed_shape: tuple[int, ...]
    fixed_world: np.ndarray
    moving_shape: tuple[int, ...]
    moving_world: np.ndarray
    space: str
    folder: Path

    @property
    def ndim(self) -> int:
        return len(self.fixed_shape)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def itk_affine_text(world_map: np.ndarray) -> str:
    """An ITK transform file (``.tfm``) for a world map fixed -> moving (RAS, mm)."""
    w = np.asarray(world_map, dtype=np.float64)
    n = w.shape[0] - 1
    flip = np.diag([-1.0, -1.0] + [1.0] * (n - 2) + [1.0])
    lps = flip @ w @ flip
    params = [*lps[:n, :n].ravel(), *lps[:n, n]]
    fmt = " ".join(f"{v:.17g}" for v in params)
    return (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        f"Transform: AffineTransform_double_{n}_{n}\n"
        f"Parameters: {fmt}\n"
        f"FixedParameters: {' '.join(['0'] * n)}\n"
    )


def write_affine(folder: str | os.PathLike, world_map: np.ndarray) -> list[Path]:
    """Write ``affine.txt`` (RAS world map, one row a line) and ``affine.tfm`` (ITK).

    A projective map (the 2D global stage's homography) goes to ``affine.txt`` only, marked in
    its header (a point maps to ``q[:n] / q[n]``): ITK's transform files have no homography,
    and ``disp_itk.nii.gz`` holds the whole map for the ITK tools.
    """
    from pddreg.spatial import is_projective

    folder = Path(folder)
    w = np.asarray(world_map, dtype=np.float64)
    rows = "\n".join(" ".join(f"{v:.10g}" for v in row) for row in w)
    header = (
        "# pddreg global stage: world map from fixed to moving points (mm, NIfTI RAS), "
        "homogeneous\n"
    )
    txt, tfm = folder / "affine.txt", folder / "affine.tfm"
    projective = is_projective(w)
    if projective:
        header += (
            "# projective (homography): q = M [p, 1], the moving point is q[:n] / q[n]; no "
            "affine.tfm (ITK has no such transform file), disp_itk.nii.gz holds the whole map\n"
        )
    _atomic_text(txt, header + rows + "\n")
    if projective:
        return [txt]
    _atomic_text(tfm, itk_affine_text(w))
    return [txt, tfm]


def write_itk_displacement(
    path: str | os.PathLike,
    disp_mm: np.ndarray,
    itk_physical: np.ndarray,
    itk_order: tuple[int, ...],
    world_to_itk: np.ndarray,
) -> Path:
    """Write a world displacement field as an ITK displacement field (NIfTI vector image).

    Args:
        path: the ``.nii.gz`` file (written atomically).
        disp_mm: ``(ndim, *S)`` displacements in mm in the world frame of ``world_to_itk``.
        itk_physical: ``(ndim + 1, ndim + 1)`` the fixed image's index -> ITK physical (LPS)
            matrix over its array axes (:attr:`pddreg.data.Image.itk_physical`).
        itk_order: the array axis of each ITK index axis (:attr:`pddreg.data.Image.itk_order`).
        world_to_itk: ``(ndim, ndim)`` linear map of world vectors to ITK physical vectors.
    """
    import nibabel as nib

    ndim = disp_mm.shape[0]
    vec = np.einsum("ij,j...->i...", np.asarray(world_to_itk, np.float64), disp_mm)
    vec = np.transpose(vec, (0, *[1 + a for a in itk_order]))  # ITK index order
    lin = np.asarray(itk_physical, np.float64)[:ndim][:, [*itk_order, ndim]]  # LPS over ITK axes
    ras = np.eye(4)
    flip = np.diag([-1.0, -1.0, 1.0])[:ndim, :ndim] if ndim >= 2 else np.eye(ndim)
    ras[:ndim, :ndim] = flip @ lin[:, :ndim]
    ras[:ndim, 3] = flip @ lin[:, ndim]
    data = np.moveaxis(vec, 0, -1).astype(np.float32)  # (*S_itk, ndim)
    spatial = data.shape[:-1] + (1,) * (3 - ndim)
    data = data.reshape(*spatial, 1, ndim)  # (X, Y, Z, t=1, components)
    img = nib.Nifti1Image(np.ascontiguousarray(data), ras)
    img.header.set_intent(_NIFTI_INTENT_VECTOR)
    img.header.set_xyzt_units("mm")
    out = Path(path)
    tmp = out.with_name(".tmp_" + out.name)
    nib.save(img, str(tmp))
    os.replace(tmp, out)
    return out


def write_registration(
    folder: str | os.PathLike,
    disp: np.ndarray,
    fixed_world: np.ndarray,
    moving_shape: tuple[int, ...],
    moving_world: np.ndarray,
    space: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``disp.npy`` and ``transform.json`` (the grids) into ``folder``."""
    folder = Path(folder)
    tmp = folder / ".disp.npy.tmp"
    with open(tmp, "wb") as f:  # a temporary name, then renamed: never a half-written field
        np.save(f, np.ascontiguousarray(disp, dtype=np.float32))
    os.replace(tmp, folder / "disp.npy")
    doc = {
        "format": "pddreg-registration",
        "version": FORMAT_VERSION,
        "space": space,
        "ndim": int(disp.shape[0]),
        "fixed_shape": [int(s) for s in disp.shape[1:]],
        "fixed_world": np.asarray(fixed_world, np.float64).tolist(),
        "moving_shape": [int(s) for s in moving_shape],
        "moving_world": np.asarray(moving_world, np.float64).tolist(),
        "disp": "disp.npy",
        **(extra or {}),
    }
    path = folder / "transform.json"
    _atomic_text(path, json.dumps(doc, indent=2) + "\n")
    return path


def read_registration(folder: str | os.PathLike) -> SavedRegistration:
    """Read a registration folder written by ``pddreg register``.

    Raises:
        InputError: the folder, ``transform.json`` or the field is missing or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such registration folder")
    meta_path = folder / "transform.json"
    if not meta_path.is_file():
        raise InputError(
            f"{folder}: not a registration folder (no transform.json; write one with "
            "pddreg register)"
        )
    try:
        meta = json.loads(meta_path.read_text())
        ndim = int(meta["ndim"])
        fixed_shape = tuple(int(s) for s in meta["fixed_shape"])
        fixed_world = np.asarray(meta["fixed_world"], np.float64)
        moving_shape = tuple(int(s) for s in meta["moving_shape"])
        moving_world = np.asarray(meta["moving_world"], np.float64)
        space = str(meta["space"])
        disp_name = str(meta.get("disp", "disp.npy"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{meta_path}: malformed registration metadata ({err})") from None
    if space not in ("world", "index") or fixed_world.shape != (ndim + 1, ndim + 1):
        raise InputError(f"{meta_path}: malformed registration metadata")
    disp_path = folder / disp_name
    try:
        disp = np.load(disp_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"{disp_path}: cannot read the field ({err})") from None
    if disp.shape != (ndim, *fixed_shape) or not np.all(np.isfinite(disp)):
        raise InputError(
            f"{disp_path}: expected a finite field of shape {(ndim, *fixed_shape)}, got "
            f"{disp.shape}"
        )
    return SavedRegistration(
        disp=disp.astype(np.float32, copy=False),
        fixed_shape=fixed_shape,
        fixed_world=fixed_world,
        moving_shape=moving_shape,
        moving_world=moving_world,
        space=space,
        folder=folder,
    )
