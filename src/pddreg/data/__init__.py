"""Data: image I/O, registration datasets (Learn2Reg, lecture tensors, NIfTI folders, 2D slices,
phantoms) and synthetic abdominal CT phantoms.

- :mod:`pddreg.data.io`: ``Image``, ``read_image``, ``read_labels``, ``write_image``,
  ``normalise_intensity``, ``check_image``.
- :mod:`pddreg.data.phantom`: ``make_phantom``, ``LABEL_NAMES``, ``phantom_spacing``.
- :mod:`pddreg.data.datasets`: ``Subject``, ``RegistrationDataset`` and its readers,
  ``open_dataset``, ``write_slices``.
- :mod:`pddreg.data.cases`: known-answer cases from real images (``random_field``,
  ``affine_field``, ``compose_fields``, ``warp_image``, ``remap_intensity``, ``object_mask``,
  ``make_case``, ``KnownCase``).
- :mod:`pddreg.data.learn2reg`: ``Learn2RegDataset``, displacement fields on disk
  (``disp_FFFF_MMMM.nii.gz``).

Names are loaded on first use, so importing :mod:`pddreg.data` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "io": (
        "Image",
        "read_image",
        "read_labels",
        "write_image",
        "normalise_intensity",
        "check_image",
    ),
    "phantom": ("make_phantom", "LABEL_NAMES", "phantom_spacing"),
    "datasets": (
        "Subject",
        "RegistrationDataset",
        "PhantomDataset",
        "TensorDataset",
        "FolderDataset",
        "open_dataset",
        "write_slices",
    ),
    "cases": (
        "KnownCase",
        "affine_field",
        "carry_mask",
        "compose_fields",
        "in_domain",
        "make_case",
        "object_mask",
        "otsu_threshold",
        "random_field",
        "remap_intensity",
        "rotation_matrix",
        "warp_image",
    ),
    "learn2reg": (
        "Learn2RegDataset",
        "case_id",
        "displacement_filename",
        "write_displacement",
        "read_displacement",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pddreg.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
