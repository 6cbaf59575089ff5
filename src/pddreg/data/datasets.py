"""Registration datasets: subjects (image, labels, spacing) with train/val/test pairs.

Readers (all behind :func:`open_dataset`):

- :class:`PhantomDataset`: synthetic abdominal CT (``"phantom2d"``, ``"phantom3d"``, with
  options, e.g. ``"phantom2d:n=40,held_out=8,seed=0,shape=256x320"``);
- :class:`pddreg.data.learn2reg.Learn2RegDataset`: a Learn2Reg ``*_dataset.json`` (or its folder);
- :class:`TensorDataset`: the lecture's 2D tutorial tensors ``*_img.pth`` (+ ``*_seg.pth``),
  and the slice datasets written by :func:`write_slices` (``pddreg slices``);
- :class:`FolderDataset`: a folder of images (NIfTI, PNG, .npy, ...) with an optional folder of
  label maps matched by file name.

Splits: ``indices(split)`` and ``pairs(split)`` for ``split`` in ``"train"``, ``"val"``,
``"test"``, ``"all"``. Unless a reader says otherwise, the last ``held_out`` subjects are held
out: with 4 or more held out, the first half of them is ``val`` and the rest ``test``; with fewer,
all are ``test`` and ``val`` is empty. Pairs of a split are all ordered pairs ``(fixed, moving)``
of distinct subjects of that split (``"all"``: of all subjects).

Subjects are read on first use and kept in a bounded LRU cache (``cache_bytes``, default
2 GiB; label maps are held as uint8/uint16 there). Images are normalised to float32 ``[0, 1]``
(:func:`pddreg.data.io.normalise_intensity`; 8-bit tensors are divided by 255, as in the
lecture), labels are int64, spacing is in mm in array-axis order.

Training loops draw pairs with :meth:`RegistrationDataset.sample_pair` (uniform over
``pairs("train")``), so a dataset's own pairing holds.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

__all__ = [
    "SPLITS",
    "FolderDataset",
    "PhantomDataset",
    "RegistrationDataset",
    "Subject",
    "TensorDataset",
    "open_dataset",
    "write_slices",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")
DEFAULT_CACHE_BYTES = 2 << 30  # 2 GiB of decoded subjects

#: File endings read as images by :class:`FolderDataset` (the readers of :mod:`pddreg.data.io`).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".npy", ".png", ".jpg", ".jpeg", ".mha", ".mhd", ".nrrd")


@dataclass
class Subject:
    """One subject of a dataset.

    Attributes:
        image: ``(*spatial)`` float32 in ``[0, 1]``.
        labels: ``(*spatial)`` int64 label map (0 background), or ``None``.
        spacing: voxel size in mm, one value per array axis.
        name: a short identifier (file stem, ``phantom0007``, ...).
    """

    image: np.ndarray
    labels: np.ndarray | None
    spacing: tuple[float, ...]
    name: str


def _check_subject(subject: Subject, label_source: str) -> Subject:
    """Validate dtypes/shapes of a freshly read subject (``label_source`` names the label file)."""
    if subject.labels is not None and subject.labels.shape != subject.image.shape:
        raise InputError(
            f"{label_source}: label map has shape {tuple(subject.labels.shape)} but its image "
            f"{subject.name!r} has shape {tuple(subject.image.shape)}"
        )
    if len(subject.spacing) != subject.image.ndim:
        raise InputError(
            f"{subject.name}: spacing {subject.spacing} does not match the "
            f"{subject.image.ndim}-D image"
        )
    return subject


def default_splits(n: int, held_out: int) -> dict[str, list[int]]:
    """Split ``range(n)``: the last ``held_out`` are held out (``val`` = first half of them when
    there are at least 4, the rest ``test``); the others are ``train``."""
    held_out = max(0, min(int(held_out), n))
    train = list(range(n - held_out))
    held = list(range(n - held_out, n))
    n_val = len(held) // 2 if len(held) >= 4 else 0
    return {"train": train, "val": held[:n_val], "test": held[n_val:], "all": list(range(n))}


def _default_held_out(n: int) -> int:
    """About 20% of the subjects, at least 2 (when there are 4 or more)."""
    if n < 4:
        return 0
    return max(2, int(round(0.2 * n)))


def _all_pairs(indices: Sequence[int]) -> list[tuple[int, int]]:
    return [(int(i), int(j)) for i in indices for j in indices if i != j]


class RegistrationDataset:
    """Base class: subjects with splits and (fixed, moving) pairs.

    Subclasses call ``super().__init__`` with the subject names, ``ndim``, ``label_names``
    (``None``: unknown, inferred on first use; ``()``: no label maps) and splits (and explicit
    pairs where the format defines them) and implement :meth:`_load`.

    Attributes:
        ndim: spatial dimensions (2 or 3).
        label_names: names indexed by label value, ``label_names[0] == "background"``.
        num_labels: number of label classes including background (``len(label_names)``);
            0 when the dataset has no label maps.
    """

    def __init__(
        self,
        names: Sequence[str],
        ndim: int,
        label_names: Sequence[str] | None,
        splits: dict[str, list[int]],
        pairs: dict[str, list[tuple[int, int]]] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.names = list(names)
        self.ndim = int(ndim)
        self._label_names = None if label_names is None else tuple(label_names)
        self._splits = {k: list(splits.get(k, [])) for k in SPLITS}
        if not self._splits["all"]:
            self._splits["all"] = list(range(len(self.names)))
        self._pairs = dict(pairs or {})
        self._cache: OrderedDict[int, Subject] = OrderedDict()
        self._pair_cache: dict[str, list[tuple[int, int]]] = {}
        self._cache_bytes = int(cache_bytes)

    # -- protocol ---------------------------------------------------------------------------
    @property
    def label_names(self) -> tuple[str, ...]:
        """Names indexed by label value (``()`` without label maps). Readers that do not know
        them name ``background, label1..labelK``, K the largest label of the first labelled
        subject (read on first use)."""
        if self._label_names is None:
            self._label_names = ()
            for i in range(len(self)):
                labels = self.subject(i).labels
                if labels is not None:
                    top = int(labels.max()) if labels.size else 0
                    self._label_names = ("background", *(f"label{k}" for k in range(1, top + 1)))
                    break
        return self._label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self._splits.items())
        return (
            f"{type(self).__name__}({len(self)} subjects, ndim={self.ndim}, "
            f"num_labels={self.num_labels}, {sizes})"
        )

    def subject(self, i: int) -> Subject:
        """Subject ``i`` (read on first use, then cached).

        The cache keeps label maps in the smallest integer type that holds them (int64 label
        maps of 3D volumes are 8x larger than needed); the returned labels are int64.
        """
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"subject(): index {i} out of range for {len(self)} subjects")
        hit = self._cache.get(i)
        if hit is None:
            hit = self._load(i)
            self._remember(i, hit)
        else:
            self._cache.move_to_end(i)
        if hit.labels is None or hit.labels.dtype == np.int64:
            return hit
        return Subject(hit.image, hit.labels.astype(np.int64), hit.spacing, hit.name)

    def indices(self, split: str = "all") -> list[int]:
        """Subject indices of ``split`` (``"train"``, ``"val"``, ``"test"`` or ``"all"``)."""
        return list(self._splits[self._check_split(split)])

    def pairs(self, split: str = "all") -> list[tuple[int, int]]:
        """``(fixed, moving)`` subject indices of ``split``."""
        split = self._check_split(split)
        if split in self._pairs:
            return list(self._pairs[split])
        return _all_pairs(self._splits[split])

    def landmarks(self, i: int) -> np.ndarray | None:
        """Landmarks of subject ``i`` as ``(N, ndim)`` float64 voxel coordinates (array axis
        order), row ``n`` corresponding to row ``n`` of the other subjects' files; None where
        the dataset has none (the default; Learn2Reg tasks read their ``keypoints*`` folders)."""
        return None

    def sample_pair(self, gen, split: str = "train"):
        """A random ``(fixed, moving)`` pair of ``pairs(split)`` (uniform) as tensors.

        Returns ``(fixed, moving, fixed_labels, moving_labels)``, each ``(1, *spatial)``: images
        float32 in [0, 1], labels int64 (copies: callers may modify them). ``gen`` is a
        ``torch.Generator``. Training loops use this so that a dataset's own pairing holds
        (slices at the same position, paired Learn2Reg tasks).
        """
        import torch

        pairs = self._pair_cache.get(split)
        if pairs is None:
            pairs = self._pair_cache[split] = self.pairs(split)
        if not pairs:
            raise InputError(f"dataset: no '{split}' pairs to sample from ({self!r})")
        k = int(torch.randint(0, len(pairs), (1,), generator=gen))
        out_img, out_lab = [], []
        for i in pairs[k]:
            s = self.subject(i)
            if s.labels is None:
                raise InputError(
                    f"dataset subject {s.name!r}: has no label map (training needs labels)"
                )
            out_img.append(torch.from_numpy(np.array(s.image, np.float32))[None])
            out_lab.append(torch.from_numpy(np.array(s.labels, np.int64))[None])
        return out_img[0], out_img[1], out_lab[0], out_lab[1]

    # -- helpers ----------------------------------------------------------------------------
    def _load(self, i: int) -> Subject:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _check_split(split: str) -> str:
        if split not in SPLITS:
            raise InputError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
        return split

    def _remember(self, i: int, subject: Subject) -> None:
        labels = subject.labels
        if labels is not None and labels.size:
            top = int(labels.max())
            small = np.uint8 if top < 256 else np.uint16 if top < 65536 else None
            if small is not None and labels.min() >= 0:
                labels = labels.astype(small)
        entry = Subject(subject.image, labels, subject.spacing, subject.name)
        size = _nbytes(entry)
        if size > self._cache_bytes:
            return
        self._cache[i] = entry
        total = sum(_nbytes(s) for s in self._cache.values())
        while total > self._cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            total -= _nbytes(old)


def _nbytes(s: Subject) -> int:
    return s.image.nbytes + (0 if s.labels is None else s.labels.nbytes)


# ----------------------------------------------------------------------------------------------
# Phantoms
# ----------------------------------------------------------------------------------------------
class PhantomDataset(RegistrationDataset):
    """Synthetic abdominal CT subjects (:func:`pddreg.data.phantom.make_phantom`).

    Subject ``i`` is ``make_phantom((seed, i), ndim, shape)``. As in the lecture's tutorial,
    the first ``n - held_out`` subjects train (all ordered pairs) and the last ``held_out`` are
    held out (see the module docstring for val/test). ``held_out`` defaults to 8, at most half
    of ``n``.
    """

    def __init__(
        self,
        n: int = 40,
        held_out: int | None = None,
        ndim: int = 2,
        shape: Sequence[int] | None = None,
        seed: int = 0,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        from .phantom import LABEL_NAMES, _check_shape

        if int(n) < 1:
            raise InputError(f"n: need at least one subject, got {n!r}")
        if held_out is None:
            held_out = min(8, int(n) // 2)
        if not 0 <= int(held_out) <= int(n):
            raise InputError(f"held_out: must lie in [0, n={n}], got {held_out!r}")
        if int(seed) < 0:
            raise InputError(f"seed: must be non-negative, got {seed!r}")
        self.shape = _check_shape(ndim, shape)
        self.seed = int(seed)
        names = [f"phantom{self.seed}_{i:04d}" for i in range(int(n))]
        super().__init__(
            names, ndim, LABEL_NAMES, default_splits(int(n), int(held_out)), None, cache_bytes
        )

    def _load(self, i: int) -> Subject:
        from .phantom import make_phantom, phantom_spacing

        image, labels = make_phantom((self.seed, i), self.ndim, self.shape)
        return Subject(image, labels, phantom_spacing(self.ndim, self.shape), self.names[i])


# ----------------------------------------------------------------------------------------------
# Lecture tensors (*_img.pth / *_seg.pth) and slice datasets
# ----------------------------------------------------------------------------------------------
def _one_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception message, shortened (user errors stay on one line)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _torch_load(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one line
        why = _one_line(exc)
        if why.startswith("Weights only load failed"):
            why = "not a torch.save file of plain tensors"
        raise InputError(f"{path}: cannot read as a torch tensor file ({why})") from None


def _as_stack(obj, path: Path) -> np.ndarray:
    import torch

    if isinstance(obj, torch.Tensor):
        arr = obj.detach().cpu().numpy()
    elif isinstance(obj, np.ndarray):
        arr = obj
    else:
        raise InputError(f"{path}: expected a tensor of shape (N, H, W), got {type(obj).__name__}")
    if arr.ndim == 4 and arr.shape[1] == 1:  # (N, 1, H, W)
        arr = arr[:, 0]
    if arr.ndim not in (3, 4) or arr.shape[0] == 0:
        raise InputError(
            f"{path}: expected a tensor of shape (N, H, W) (or (N, D, H, W)), got {arr.shape}"
        )
    return arr


def _seg_path_for(img_path: Path) -> Path | None:
    name = img_path.name
    for a, b in (("_img.", "_seg."), ("img", "seg"), ("image", "label")):
        if a in name:
            cand = img_path.with_name(name.replace(a, b, 1))
            if cand != img_path and cand.exists():
                return cand
    return None


class TensorDataset(RegistrationDataset):
    """The lecture's 2D tutorial tensors: ``images`` ``(N, H, W)`` (uint8 or float) and
    ``labels`` ``(N, H, W)`` integer, each saved with ``torch.save``.

    Each slice is a subject. 8-bit images are divided by 255 (the lecture's scaling); other
    images are normalised per slice with :func:`pddreg.data.io.normalise_intensity`.

    A sidecar ``<prefix>_meta.json`` (written by :func:`write_slices`) adds spacing, label names,
    the source subject of each slice and the split: pairs then join slices at the same position
    of different source subjects of the same split. Without it, the last ``held_out`` slices are
    held out and pairs are all ordered pairs within a split (the lecture's slices are
    pre-registered through-plane, so any two correspond).

    Args:
        images: path of the image tensor file (``*_img.pth``).
        labels: path of the label tensor file; default: the ``*_seg.pth`` next to ``images``
            when it exists.
        held_out: subjects held out (default about 20%); ignored with a sidecar.
        spacing: pixel spacing (mm) when there is no sidecar; default 1.
        label_names: names indexed by label value; default: the sidecar's, else
            ``background, label1, ...`` (the lecture's files do not name their 9 classes).
    """

    def __init__(
        self,
        images: str | os.PathLike,
        labels: str | os.PathLike | None = None,
        held_out: int | None = None,
        spacing: Sequence[float] | None = None,
        label_names: Sequence[str] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        given_names = tuple(label_names) if label_names else None
        self.image_path = Path(images)
        self.label_path = Path(labels) if labels is not None else _seg_path_for(self.image_path)
        imgs = _as_stack(_torch_load(self.image_path), self.image_path)
        segs = None
        if self.label_path is not None:
            segs = _as_stack(_torch_load(self.label_path), self.label_path)
            if segs.shape != imgs.shape:
                raise InputError(
                    f"{self.label_path}: labels have shape {segs.shape} but the images "
                    f"{self.image_path.name} have shape {imgs.shape}"
                )
            if not (np.issubdtype(segs.dtype, np.integer) or segs.dtype == np.bool_):
                rounded = np.round(segs)
                if not np.array_equal(rounded, segs):
                    raise InputError(f"{self.label_path}: label values must be integers")
                segs = rounded
            if segs.size and segs.min() < 0:
                raise InputError(f"{self.label_path}: label values must be >= 0")
        self._images = imgs
        self._labels = segs
        n = imgs.shape[0]
        ndim = imgs.ndim - 1
        meta = self._read_meta()
        names = [f"{self.image_path.stem}_{i:04d}" for i in range(n)]
        pairs = None
        if meta is not None:
            self._spacing = tuple(float(s) for s in meta.get("spacing", (1.0,) * ndim))
            label_names = meta.get("label_names")
            entries = meta.get("slices", [])
            if len(entries) != n:
                raise InputError(
                    f"{self._meta_path}: lists {len(entries)} slices but "
                    f"{self.image_path.name} holds {n}"
                )
            names = [f"{e['subject']}_{int(e['index']):04d}" for e in entries]
            splits, pairs = self._splits_from_meta(entries)
        else:
            self._spacing = tuple(float(s) for s in (spacing or (1.0,) * ndim))
            label_names = None
            held = _default_held_out(n) if held_out is None else int(held_out)
            if not 0 <= held <= n:
                raise InputError(f"held_out: must lie in [0, {n}], got {held_out!r}")
            splits = default_splits(n, held)
        if given_names is not None:
            label_names = given_names
        if segs is not None and not label_names:
            top = int(segs.max()) if segs.size else 0
            label_names = ["background"] + [f"label{k}" for k in range(1, top + 1)]
        if segs is None:
            label_names = ()
        if len(self._spacing) != ndim:
            raise InputError(f"spacing: expected {ndim} values, got {self._spacing}")
        super().__init__(names, ndim, label_names, splits, pairs, cache_bytes)

    @property
    def _meta_path(self) -> Path:
        stem = self.image_path.name.rsplit("_img", 1)[0] if "_img" in self.image_path.name else ""
        return self.image_path.with_name(f"{stem or self.image_path.stem}_meta.json")

    def _read_meta(self) -> dict | None:
        path = self._meta_path
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read the slice index ({_one_line(exc)})") from None

    @staticmethod
    def _splits_from_meta(entries: list[dict]):
        splits: dict[str, list[int]] = {k: [] for k in SPLITS}
        groups: dict[tuple[str, int], list[tuple[int, str]]] = {}
        for k, e in enumerate(entries):
            split = e.get("split", "train")
            if split not in ("train", "val", "test"):
                split = "train"
            splits[split].append(k)
            splits["all"].append(k)
            groups.setdefault((split, int(e["index"])), []).append((k, str(e["subject"])))
        pairs: dict[str, list[tuple[int, int]]] = {k: [] for k in SPLITS}
        for (split, _), members in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            for a, sa in members:
                for b, sb in members:
                    if sa != sb:
                        pairs[split].append((a, b))
        # "all": slices at the same position across every split
        by_pos: dict[int, list[tuple[int, str]]] = {}
        for k, e in enumerate(entries):
            by_pos.setdefault(int(e["index"]), []).append((k, str(e["subject"])))
        for _, members in sorted(by_pos.items()):
            pairs["all"].extend((a, b) for a, sa in members for b, sb in members if sa != sb)
        return splits, pairs

    def _load(self, i: int) -> Subject:
        raw = self._images[i]
        if raw.dtype == np.uint8:
            image = raw.astype(np.float32) / 255.0
        else:
            from .io import normalise_intensity

            image = normalise_intensity(raw.astype(np.float32))
        labels = None if self._labels is None else self._labels[i].astype(np.int64)
        subject = Subject(
            np.ascontiguousarray(image, np.float32), labels, self._spacing, self.names[i]
        )
        return _check_subject(subject, str(self.label_path))


# ----------------------------------------------------------------------------------------------
# Folder of images (+ folder of label maps)
# ----------------------------------------------------------------------------------------------
def _strip_suffix(name: str) -> str:
    low = name.lower()
    for suf in IMAGE_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES)
    )


_CHANNEL = re.compile(r"_\d{4}$")  # nnU-Net / Learn2Reg channel suffix of image names


def _match_label(image: Path, labels: dict[str, Path]) -> Path | None:
    """The label file of ``image``: same file name, else same stem (also without ``_0000``)."""
    if image.name in labels:
        return labels[image.name]
    stem = _strip_suffix(image.name)
    by_stem = {_strip_suffix(n): p for n, p in labels.items()}
    for cand in (stem, _CHANNEL.sub("", stem)):
        for suffix in ("", "_seg", "_label", "_labels", "_mask"):
            if cand + suffix in by_stem:
                return by_stem[cand + suffix]
    return None


_IMAGE_DIRS = ("imagesTr", "images", "image", "img", "imgs")
_LABEL_DIRS = ("labelsTr", "labels", "label", "seg", "segs", "segmentations", "masks")


class FolderDataset(RegistrationDataset):
    """Images in a folder, with label maps in another folder matched by file name.

    Label files match an image by identical file name, or by the same name without the
    extension (optionally without a ``_0000`` channel suffix, with ``_seg``/``_label``/``_mask``
    added). All images must have the same number of dimensions.

    Args:
        images: folder of images (NIfTI, PNG/JPEG, .npy, ...: whatever
            :func:`pddreg.data.io.read_image` reads).
        labels: folder of label maps, or ``None`` (no labels).
        held_out: subjects held out (default about 20%).
        label_names: names indexed by label value; default ``background, label1, ...``.
    """

    def __init__(
        self,
        images: str | os.PathLike,
        labels: str | os.PathLike | None = None,
        held_out: int | None = None,
        label_names: Sequence[str] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.image_dir = Path(images)
        self.label_dir = Path(labels) if labels is not None else None
        if not self.image_dir.is_dir():
            raise InputError(f"{self.image_dir}: image folder not found")
        if self.label_dir is not None and not self.label_dir.is_dir():
            raise InputError(f"{self.label_dir}: label folder not found")
        self.image_files = _list_images(self.image_dir)
        if not self.image_files:
            raise InputError(
                f"{self.image_dir}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})"
            )
        self.label_files: list[Path | None] = [None] * len(self.image_files)
        if self.label_dir is not None:
            table = {p.name: p for p in _list_images(self.label_dir)}
            for k, img in enumerate(self.image_files):
                lab = _match_label(img, table)
                if lab is None:
                    raise InputError(
                        f"{img}: no label map with a matching name in {self.label_dir}"
                    )
                self.label_files[k] = lab
        n = len(self.image_files)
        held = _default_held_out(n) if held_out is None else int(held_out)
        if not 0 <= held <= n:
            raise InputError(f"held_out: must lie in [0, {n}], got {held_out!r}")
        first = self._read(0)
        ndim = first.image.ndim
        names = [_strip_suffix(p.name) for p in self.image_files]
        if self.label_dir is None:
            label_names = ()
        super().__init__(names, ndim, label_names, default_splits(n, held), None, cache_bytes)
        self._remember(0, first)

    def _read(self, i: int) -> Subject:
        image_path = self.image_files[i]
        label_path = self.label_files[i]
        image, labels, spacing = _read_pair(image_path, label_path)
        subject = Subject(image, labels, spacing, _strip_suffix(image_path.name))
        return _check_subject(subject, str(label_path))

    def _load(self, i: int) -> Subject:
        subject = self._read(i)
        if subject.image.ndim != self.ndim:
            raise InputError(
                f"{self.image_files[i]}: {subject.image.ndim}-D image in a folder of "
                f"{self.ndim}-D images"
            )
        return subject


def _read_pair(
    image_path: Path, label_path: Path | None
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...]]:
    """Read and normalise one image (+ labels): ``(image float32 [0,1], labels int64, spacing)``."""
    from .io import normalise_intensity, read_image, read_labels

    if not image_path.exists():
        raise InputError(f"{image_path}: file not found")
    img = read_image(str(image_path))
    array = np.asarray(img.array)
    image = normalise_intensity(array)
    labels = None
    if label_path is not None:
        if not label_path.exists():
            raise InputError(f"{label_path}: file not found")
        lab = read_labels(str(label_path))
        labels = np.asarray(lab.array).astype(np.int64, copy=False)
        if labels.shape != image.shape:
            raise InputError(
                f"{label_path}: label map has shape {labels.shape} but the image "
                f"{image_path.name} has shape {image.shape}"
            )
    spacing = tuple(float(s) for s in (img.spacing or (1.0,) * image.ndim))
    if len(spacing) != image.ndim:
        spacing = (1.0,) * image.ndim
    return np.ascontiguousarray(image, np.float32), labels, spacing


# ----------------------------------------------------------------------------------------------
# 2D slices cut from 3D volumes
# ----------------------------------------------------------------------------------------------
def write_slices(
    dataset: RegistrationDataset,
    out: str | os.PathLike,
    axis: int = 2,
    every: int = 1,
    min_label_fraction: float = 0.0,
    prefix: str = "slices",
    progress: bool = False,
    transpose: bool = False,
) -> Path:
    """Cut 2D slices from a 3D dataset and write them in the lecture's tensor format.

    Writes ``OUT/<prefix>_img.pth`` (uint8 ``(N, H, W)``, image x 255), ``OUT/<prefix>_seg.pth``
    (integer labels, when the dataset has them) and ``OUT/<prefix>_meta.json`` (spacing, label
    names, and per slice its source subject, position and split): :func:`open_dataset` on
    ``OUT`` reads it back as a :class:`TensorDataset` whose pairs join slices at the same
    position of different subjects within a split.

    Args:
        dataset: a 3D dataset. out: output folder (created).
        axis: array axis to cut across (0, 1 or 2); the slice keeps the other two in order.
        every: keep every ``every``-th position.
        min_label_fraction: keep a slice only if at least this fraction of its pixels is
            labelled (> 0) in that subject (needs label maps when > 0). In a dataset with
            labels, subjects without a label map (e.g. Learn2Reg test images) are left out.
        prefix: file name prefix.
        transpose: swap the two in-plane axes of every slice (e.g. axial slices of ``(X, Y, Z)``
            volumes become ``(Y, X)``, the layout of the 2D phantoms: rows anterior→posterior).

    Returns:
        The path of the image tensor file.
    """
    import torch

    if dataset.ndim != 3:
        raise InputError(f"dataset: slices are cut from 3D volumes, got a {dataset.ndim}-D dataset")
    if axis not in (0, 1, 2):
        raise InputError(f"--axis: must be 0, 1 or 2, got {axis!r}")
    if int(every) < 1:
        raise InputError(f"--every: must be at least 1, got {every!r}")
    if not 0.0 <= float(min_label_fraction) <= 1.0:
        raise InputError(f"--min-label-fraction: must lie in [0, 1], got {min_label_fraction!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise InputError(f"prefix: use letters, digits, '_', '-', '.' only, got {prefix!r}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    split_of = {}
    for split in ("test", "val", "train"):  # a subject in several splits keeps the first seen
        for i in dataset.indices(split):
            split_of.setdefault(i, split)

    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    entries: list[dict] = []
    spacing2d: tuple[float, ...] | None = None
    shape2d: tuple[int, ...] | None = None
    has_labels = dataset.num_labels > 0
    skipped = 0
    order: Iterable[int] = range(len(dataset))
    if progress:
        from tqdm import tqdm

        order = tqdm(order, desc="slices", unit="subject")
    for i in order:
        s = dataset.subject(i)
        if s.labels is None and (has_labels or min_label_fraction > 0):
            # e.g. Learn2Reg test images: no labels to train or evaluate with
            log.warning("%s: has no label map; its slices are left out", s.name)
            skipped += 1
            continue
        sp = tuple(v for k, v in enumerate(s.spacing) if k != axis)
        if transpose:
            sp = sp[::-1]
        img8 = np.round(np.clip(s.image, 0.0, 1.0) * 255.0).astype(np.uint8)
        for pos in range(0, s.image.shape[axis], int(every)):
            sl = np.take(img8, pos, axis=axis)
            lab = None if s.labels is None else np.take(s.labels, pos, axis=axis)
            if transpose:
                sl = sl.T
                lab = None if lab is None else lab.T
            if min_label_fraction > 0 and float((lab > 0).mean()) < min_label_fraction:
                continue
            if shape2d is None:
                shape2d, spacing2d = sl.shape, sp
            elif sl.shape != shape2d:
                raise InputError(
                    f"{s.name}: slices of shape {sl.shape} differ from the first ones "
                    f"{shape2d}; resample the volumes to one shape first"
                )
            images.append(sl)
            if lab is not None:
                labels.append(lab)
            entries.append({"subject": s.name, "index": pos, "split": split_of.get(i, "train")})
    if not images:
        why = (
            "no subject has a label map"
            if skipped == len(dataset)
            else (f"no slice passed --min-label-fraction {min_label_fraction}")
        )
        raise InputError(f"dataset: {why} (nothing written)")
    img_path = out_dir / f"{prefix}_img.pth"
    _atomic_torch_save(torch.from_numpy(np.stack(images)), img_path)
    if labels:
        lab_stack = np.stack(labels)
        dtype = np.uint8 if lab_stack.max() < 256 else np.int64
        _atomic_torch_save(torch.from_numpy(lab_stack.astype(dtype)), out_dir / f"{prefix}_seg.pth")
    meta = {
        "format": "pddreg-slices-1",
        "axis": int(axis),
        "every": int(every),
        "transpose": bool(transpose),
        "min_label_fraction": float(min_label_fraction),
        "spacing": list(spacing2d or ()),
        "label_names": list(dataset.label_names) if labels else [],
        "slices": entries,
    }
    tmp = out_dir / f".{prefix}_meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out_dir / f"{prefix}_meta.json")
    log.info("wrote %d slices of %d subjects to %s", len(images), len(dataset), out_dir)
    return img_path


def _atomic_torch_save(tensor, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(tensor, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# open_dataset
# ----------------------------------------------------------------------------------------------
def _parse_options(spec: str, text: str, allowed: dict[str, Callable[[str], object]]) -> dict:
    out: dict[str, object] = {}
    if not text:
        return out
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise InputError(f"dataset {spec!r}: option {item!r} is not key=value")
        key, value = (t.strip() for t in item.split("=", 1))
        if key not in allowed:
            raise InputError(
                f"dataset {spec!r}: unknown option {key!r} (known: {', '.join(allowed)})"
            )
        try:
            out[key] = allowed[key](value)
        except ValueError:
            raise InputError(f"dataset {spec!r}: bad value {value!r} for {key!r}") from None
    return out


def _parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.split(r"[x×*]", text.lower()) if v)


def open_dataset(spec: str | os.PathLike, **kwargs) -> RegistrationDataset:
    """Open a dataset from a specification string.

    Accepted:

    - ``"phantom2d"`` / ``"phantom3d"`` with options after a colon:
      ``"phantom2d:n=40,held_out=8,seed=0,shape=256x320"``;
    - a Learn2Reg ``*_dataset.json`` or the folder holding one;
    - a lecture tensor file ``*_img.pth`` (labels from the ``*_seg.pth`` beside it) or a folder
      holding one (e.g. the output of ``pddreg slices``);
    - a folder with an image folder (``imagesTr``, ``images``, ``img``, ...) and optionally a
      label folder (``labelsTr``, ``labels``, ``seg``, ...), or a folder of images.

    ``kwargs`` go to the reader (e.g. ``held_out``, ``cache_bytes``).
    """
    text = os.fspath(spec)
    low = text.lower()
    for kind, ndim in (("phantom2d", 2), ("phantom3d", 3)):
        if low == kind or low.startswith(kind + ":"):
            opts = _parse_options(
                text,
                text[len(kind) + 1 :],
                {"n": int, "held_out": int, "seed": int, "shape": _parse_shape},
            )
            opts.update(kwargs)
            return PhantomDataset(ndim=ndim, **opts)  # type: ignore[arg-type]

    path = Path(text).expanduser()
    if not path.exists():
        raise InputError(
            f"dataset {text!r}: no such file or folder (expected a path, 'phantom2d' or "
            "'phantom3d')"
        )
    if path.is_file():
        if low.endswith(".json"):
            from .learn2reg import Learn2RegDataset

            return Learn2RegDataset(path, **kwargs)
        if low.endswith((".pth", ".pt")):
            return TensorDataset(path, **kwargs)
        raise InputError(
            f"{path}: not a dataset (expected a Learn2Reg *_dataset.json, a *_img.pth tensor "
            "file or a folder)"
        )
    jsons = sorted(path.glob("*_dataset.json"))
    if len(jsons) == 1:
        from .learn2reg import Learn2RegDataset

        return Learn2RegDataset(jsons[0], **kwargs)
    if len(jsons) > 1:
        names = ", ".join(p.name for p in jsons)
        raise InputError(f"{path}: several Learn2Reg json files ({names}); name one")
    tensors = sorted(p for p in path.glob("*_img.pth"))
    if len(tensors) == 1:
        return TensorDataset(tensors[0], **kwargs)
    if len(tensors) > 1:
        names = ", ".join(p.name for p in tensors)
        raise InputError(f"{path}: several tensor files ({names}); name one")
    image_dir = next((path / d for d in _IMAGE_DIRS if (path / d).is_dir()), None)
    if image_dir is not None:
        label_dir = next((path / d for d in _LABEL_DIRS if (path / d).is_dir()), None)
        return FolderDataset(image_dir, label_dir, **kwargs)
    return FolderDataset(path, None, **kwargs)
