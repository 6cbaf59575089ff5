"""Learn2Reg datasets (2021-2023 layout) and displacement fields in the Learn2Reg format.

A Learn2Reg task folder holds ``<Task>_dataset.json`` with (among others)::

    "tensorImageShape": {"0": [192, 160, 256]},
    "labels": {"0": {"0": "background", "1": "spleen", ...}},   (or a flat dict, or {})
    "training": [{"image": "./imagesTr/AbdomenCTCT_0001_0000.nii.gz",
                  "label": "./labelsTr/AbdomenCTCT_0001_0000.nii.gz"}, ...],
    "test": [{"image": "./imagesTs/..."}],
    "training_paired_images": [{"fixed": ..., "moving": ...}],   (paired tasks)
    "registration_val": [{"fixed": "./imagesTr/...", "moving": "./imagesTr/..."}, ...],
    "registration_test": [...]

Splits of :class:`Learn2RegDataset`: ``val`` = the subjects of ``registration_val`` with exactly
those pairs; ``test`` = the subjects of ``registration_test`` with those pairs (only where the
images are present: test images are often distributed separately); ``train`` = the other
training subjects, with ``training_paired_images`` as pairs when the task lists them, else all
ordered pairs; ``all`` = all ordered pairs of all subjects.

Landmarks: tasks with keypoints (NLST, LungCT, ...) hold ``keypoints*/<image name>.csv``
(``keypointsTr``, ``keypoints01Tr``, ...), one point per row in voxel coordinates of the image's
array axes, row ``n`` of a fixed file corresponding to row ``n`` of its moving image's file;
:meth:`Learn2RegDataset.landmarks` reads them and ``pddreg evaluate`` reports the TRE.

Displacement fields on disk (the challenge's submission format): ``disp_FFFF_MMMM.nii.gz`` with
``FFFF``/``MMMM`` the case numbers of the fixed and moving image, array shape
``(*spatial, 3)`` (``(*spatial, 2)`` for 2D), in voxels, with the Learn2Reg meaning "fixed voxel
``x`` maps to moving ``x + u(x)``", which is pddreg's ``warped(x) = moving(x + u(x))``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from .datasets import (
    DEFAULT_CACHE_BYTES,
    RegistrationDataset,
    Subject,
    _all_pairs,
    _check_subject,
    _one_line,
    _read_pair,
    _strip_suffix,
)

__all__ = [
    "Learn2RegDataset",
    "case_id",
    "displacement_filename",
    "read_displacement",
    "read_keypoints",
    "write_displacement",
]

log = logging.getLogger(__name__)

_CASE = re.compile(r"_(\d{4})(?:_\d{4})?$")


def case_id(name: str | os.PathLike) -> str:
    """The case number of a Learn2Reg file name: ``AbdomenCTCT_0001_0000.nii.gz`` -> ``"0001"``.

    Names without the ``_NNNN[_NNNN]`` ending give their stem unchanged.
    """
    stem = _strip_suffix(Path(name).name)
    m = _CASE.search(stem)
    return m.group(1) if m else stem


def displacement_filename(fixed: str | os.PathLike, moving: str | os.PathLike) -> str:
    """``disp_FFFF_MMMM.nii.gz`` for a fixed and a moving image (paths or subject names)."""
    return f"disp_{case_id(fixed)}_{case_id(moving)}.nii.gz"


def _as_numpy_field(disp) -> np.ndarray:
    if hasattr(disp, "detach"):
        disp = disp.detach().cpu().numpy()
    arr = np.asarray(disp)
    if arr.ndim >= 3 and arr.shape[0] == 1 and arr.shape[1] == arr.ndim - 2:
        arr = arr[0]  # (1, ndim, *S) -> (ndim, *S)
    if arr.ndim < 3 or arr.shape[0] != arr.ndim - 1:
        raise ValueError(
            f"write_displacement(): 'disp' must have shape (ndim, *spatial) or "
            f"(1, ndim, *spatial), got {tuple(arr.shape)}"
        )
    return arr


def write_displacement(
    path: str | os.PathLike,
    disp,
    affine: np.ndarray | None = None,
    dtype: np.dtype | type = np.float32,
) -> Path:
    """Write a displacement field as Learn2Reg NIfTI: array ``(*spatial, ndim)``, voxel units.

    Args:
        path: output file (``.nii.gz``); written atomically.
        disp: ``(ndim, *spatial)`` or ``(1, ndim, *spatial)`` array or tensor, pddreg convention
            (component i along array axis i, ``warped(x) = moving(x + u(x))``).
        affine: 4x4 voxel-to-world matrix of the fixed image; identity by default.
        dtype: stored type, ``np.float32`` or ``np.float64`` (NIfTI-1 has no float16).
    """
    import nibabel as nib

    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"write_displacement(): dtype must be float32 or float64, got {dtype}")
    arr = _as_numpy_field(disp)
    data = np.ascontiguousarray(np.moveaxis(arr, 0, -1).astype(dtype))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else np.asarray(affine, float))
    name = out.name
    tmp = out.with_name(".tmp_" + name)  # keeps the .nii.gz ending nibabel looks at
    nib.save(img, str(tmp))
    os.replace(tmp, out)
    return out


def read_displacement(path: str | os.PathLike) -> np.ndarray:
    """Read a Learn2Reg displacement field: returns ``(ndim, *spatial)`` float32 (voxels)."""
    import nibabel as nib

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: file not found")
    try:
        data = np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - one line for any unreadable file
        raise InputError(f"{p}: cannot read as NIfTI ({_one_line(exc)})") from None
    if data.ndim == 5 and data.shape[3] == 1:  # (X, Y, Z, 1, 3) as some tools write vectors
        data = data[:, :, :, 0]
    if data.ndim < 3 or data.shape[-1] != data.ndim - 1:
        raise InputError(
            f"{p}: expected a displacement field of shape (*spatial, ndim), got {data.shape}"
        )
    return np.ascontiguousarray(np.moveaxis(data, -1, 0))


def read_keypoints(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """A Learn2Reg keypoint file: one point per row (comma or white space separated), the first
    ``ndim`` numbers in voxel coordinates; a header row is skipped. Returns ``(N, ndim)``."""
    p = Path(path)
    rows = []
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read the keypoints ({_one_line(exc)})") from None
    for n, line in enumerate(lines):
        cells = [c for c in re.split(r"[,;\s]+", line.strip()) if c]
        if not cells:
            continue
        try:
            rows.append([float(c) for c in cells[:ndim]])
        except ValueError:
            if n == 0 and not rows:
                continue  # a header
            raise InputError(f"{p}: line {n + 1} is not a row of numbers") from None
    pts = np.asarray(rows, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[0] == 0 or pts.shape[1] != ndim or not np.isfinite(pts).all():
        raise InputError(f"{p}: expected rows of {ndim} finite voxel coordinates")
    return pts


def _label_names(raw) -> tuple[str, ...]:
    """Names indexed by value from ``"labels"``: flat ``{"0": "background", ...}``, nested by
    modality ``{"0": {"0": "background", ...}}``, or empty."""
    if not isinstance(raw, dict) or not raw:
        return ()
    if all(isinstance(v, dict) for v in raw.values()):
        merged: dict[str, str] = {}
        for v in raw.values():
            merged.update({str(k): str(n) for k, n in v.items()})
        raw = merged
    table = {}
    for k, v in raw.items():
        try:
            table[int(k)] = str(v)
        except (TypeError, ValueError):
            continue
    if not table:
        return ()
    top = max(table)
    names = [table.get(k, f"label{k}") for k in range(top + 1)]
    if 0 not in table:
        names[0] = "background"
    return tuple(names)


class Learn2RegDataset(RegistrationDataset):
    """A Learn2Reg task from its ``*_dataset.json`` (see the module docstring for splits).

    Args:
        json_path: the ``*_dataset.json`` file (or its folder).
        cache_bytes: bound of the subject cache.
    """

    def __init__(
        self, json_path: str | os.PathLike, cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        path = Path(json_path)
        if path.is_dir():
            found = sorted(path.glob("*_dataset.json"))
            if len(found) != 1:
                raise InputError(f"{path}: expected one *_dataset.json, found {len(found)}")
            path = found[0]
        if not path.exists():
            raise InputError(f"{path}: file not found")
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read Learn2Reg json ({_one_line(exc)})") from None
        if not isinstance(meta, dict) or "training" not in meta:
            raise InputError(f"{path}: not a Learn2Reg dataset json (no 'training' list)")
        self.json_path = path
        self.root = path.parent
        self.meta = meta
        self.task = str(meta.get("name", path.name.replace("_dataset.json", "")))
        modality = meta.get("modality")
        #: modality names by channel index, e.g. ``{"0": "CT"}`` (empty when not given)
        self.modality = dict(modality) if isinstance(modality, dict) else {}

        images: list[Path] = []
        labels: list[Path | None] = []
        index: dict[str, int] = {}

        def add(entry, key: str, required: bool) -> None:
            if not isinstance(entry, dict) or "image" not in entry:
                raise InputError(f"{path}: '{key}' entries need an 'image' path, got {entry!r}")
            img = self._resolve(entry["image"])
            if not img.exists():
                if required:
                    raise InputError(f"{img}: listed in {path.name} ('{key}') but missing")
                log.warning("%s: listed in %s ('%s') but missing; left out", img, path.name, key)
                return
            lab = entry.get("label")
            lab_path = self._resolve(lab) if lab else None
            if lab_path is not None and not lab_path.exists():
                raise InputError(f"{lab_path}: listed in {path.name} ('{key}') but missing")
            key_name = self._key(entry["image"])
            if key_name in index:
                return
            index[key_name] = len(images)
            images.append(img)
            labels.append(lab_path)

        training = meta.get("training") or []
        if not isinstance(training, list) or not training:
            raise InputError(f"{path}: 'training' must be a non-empty list")
        for e in training:
            add(e, "training", True)
        declared = meta.get("numTraining")
        if isinstance(declared, int) and declared != len(training):
            log.warning(
                "%s: numTraining is %d but 'training' lists %d images",
                path,
                declared,
                len(training),
            )
        for e in meta.get("test") or []:
            add(e, "test", False)
        self.image_files = images
        self.label_files = labels

        def pair_list(key: str, required: bool) -> list[tuple[int, int]]:
            out = []
            for e in meta.get(key) or []:
                if not isinstance(e, dict) or "fixed" not in e or "moving" not in e:
                    raise InputError(f"{path}: '{key}' entries need 'fixed' and 'moving'")
                f, m = self._key(e["fixed"]), self._key(e["moving"])
                for rel, k in ((e["fixed"], f), (e["moving"], m)):
                    if k not in index and self._resolve(rel).exists():
                        # an image only named by the pair: add it, with a label file of the
                        # same name in the matching labels folder when there is one
                        guess = str(rel).replace("images", "labels", 1)
                        has = guess != str(rel) and self._resolve(guess).exists()
                        add({"image": rel, "label": guess if has else None}, key, True)
                missing = [x for x, k in ((e["fixed"], f), (e["moving"], m)) if k not in index]
                if missing:
                    if required:
                        bad = self._resolve(missing[0])
                        raise InputError(f"{bad}: used in {path.name} ('{key}') but missing")
                    continue
                out.append((index[f], index[m]))
            return out

        val_pairs = pair_list("registration_val", True)
        test_pairs = pair_list("registration_test", False)
        train_paired = pair_list("training_paired_images", True)
        val_set = sorted({i for p in val_pairs for i in p})
        test_set = sorted({i for p in test_pairs for i in p})
        held = set(val_set) | set(test_set)
        train_ids = {
            index[self._key(e["image"])] for e in training if self._key(e["image"]) in index
        }
        train_ids |= {i for p in train_paired for i in p}
        train_set = sorted(train_ids - held)
        if train_paired:
            keep = set(train_set)
            train_pairs = [(f, m) for f, m in train_paired if f in keep and m in keep]
        else:
            train_pairs = _all_pairs(train_set)
        splits = {"train": train_set, "val": val_set, "test": test_set}
        pairs = {"train": train_pairs, "val": val_pairs, "test": test_pairs}

        ndim = self._ndim(meta, images[0])
        names = [_strip_suffix(p.name) for p in images]
        has_labels = any(lab is not None for lab in labels)
        label_names = (_label_names(meta.get("labels")) or None) if has_labels else ()
        super().__init__(names, ndim, label_names, splits, pairs, cache_bytes)

    # -- helpers ----------------------------------------------------------------------------
    def _resolve(self, rel: str) -> Path:
        p = Path(str(rel))
        return p if p.is_absolute() else (self.root / p).resolve()

    def _key(self, rel: str) -> str:
        return str(self._resolve(rel))

    @staticmethod
    def _ndim(meta: dict, first: Path) -> int:
        shapes = meta.get("tensorImageShape")
        if isinstance(shapes, dict) and shapes:
            shape = next(iter(shapes.values()))
            if isinstance(shape, Sequence) and len(shape) in (2, 3):
                return len(shape)
        try:
            import nibabel as nib

            return len(nib.load(str(first)).shape)
        except Exception:  # noqa: BLE001 - fall back to reading the image
            from .io import read_image

            return np.asarray(read_image(str(first)).array).ndim

    def _load(self, i: int) -> Subject:
        image, labels, spacing = _read_pair(self.image_files[i], self.label_files[i])
        subject = Subject(image, labels, spacing, self.names[i])
        return _check_subject(subject, str(self.label_files[i]))

    def landmarks(self, i: int) -> np.ndarray | None:
        """Keypoints of subject ``i`` from the task's ``keypoints*`` folders (``keypointsTr``,
        ``keypoints01Tr``, ...): ``<image name>.csv``, one point per row in voxel coordinates
        of the image's array axes (the Learn2Reg layout; a header row is skipped). Returns
        ``(N, ndim)`` float64 or None when the subject has no keypoint file."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"landmarks(): index {i} out of range for {len(self)} subjects")
        stem = _strip_suffix(self.image_files[i].name)
        for folder in sorted(self.root.glob("keypoints*")):
            path = folder / f"{stem}.csv"
            if path.is_file():
                return read_keypoints(path, self.ndim)
        return None

    def displacement_path(self, fixed: int, moving: int, out_dir: str | os.PathLike) -> Path:
        """``out_dir/disp_FFFF_MMMM.nii.gz`` for subjects ``fixed`` and ``moving``."""
        return Path(out_dir) / displacement_filename(self.names[fixed], self.names[moving])

    def write_displacement(
        self, fixed: int, moving: int, disp, out_dir: str | os.PathLike, **kwargs
    ) -> Path:
        """Write the field of pair ``(fixed, moving)`` with the fixed image's affine."""
        affine = None
        try:
            import nibabel as nib

            affine = nib.load(str(self.image_files[fixed])).affine
        except Exception:  # noqa: BLE001 - not NIfTI: identity affine
            affine = None
        return write_displacement(
            self.displacement_path(fixed, moving, out_dir), disp, affine=affine, **kwargs
        )
