import argparse
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from pddreg.data import (
    FolderDataset,
    PhantomDataset,
    Subject,
    TensorDataset,
    open_dataset,
    write_slices,
)
from pddreg.data.phantom import LABEL_NAMES, make_phantom
from pddreg.errors import InputError


# ------------------------------------------------------------------------------ phantoms
def test_phantom_dataset_splits_and_pairs():
    ds = PhantomDataset(n=10, held_out=4, shape=(48, 64), seed=1)
    assert len(ds) == 10 and ds.ndim == 2
    assert ds.num_labels == len(LABEL_NAMES) and ds.label_names == LABEL_NAMES
    train, val, test = ds.indices("train"), ds.indices("val"), ds.indices("test")
    assert train == list(range(6)) and val == [6, 7] and test == [8, 9]
    assert ds.indices("all") == list(range(10))
    assert len(ds.pairs("train")) == 6 * 5
    assert sorted(ds.pairs("val")) == [(6, 7), (7, 6)]
    assert sorted(ds.pairs("test")) == [(8, 9), (9, 8)]
    assert all(f != m for f, m in ds.pairs("all")) and len(ds.pairs("all")) == 90
    s = ds.subject(7)
    assert isinstance(s, Subject) and s.image.shape == (48, 64) and s.labels.dtype == np.int64
    np.testing.assert_array_equal(s.labels, make_phantom((1, 7), 2, (48, 64))[1])
    again = ds.subject(7)  # cached: same image array, labels int64 again
    assert again.image is s.image and again.labels.dtype == np.int64
    np.testing.assert_array_equal(again.labels, s.labels)
    assert ds._cache[7].labels.dtype == np.uint8  # compact in the cache
    with pytest.raises(IndexError):
        ds.subject(10)
    with pytest.raises(InputError, match="split"):
        ds.pairs("training")


def test_phantom_dataset_few_held_out_all_test():
    ds = PhantomDataset(n=5, held_out=2, shape=(32, 40))
    assert ds.indices("val") == [] and ds.indices("test") == [3, 4]
    assert ds.pairs("val") == []


def test_open_dataset_phantom_specs():
    ds = open_dataset("phantom2d:n=6,held_out=2,seed=3,shape=40x48")
    assert isinstance(ds, PhantomDataset) and len(ds) == 6 and ds.seed == 3
    assert ds.subject(0).image.shape == (40, 48)
    ds3 = open_dataset("phantom3d:n=2,held_out=0,shape=24x20x32")
    assert ds3.ndim == 3 and ds3.subject(1).image.shape == (24, 20, 32)
    assert len(ds3.subject(1).spacing) == 3
    assert len(open_dataset("phantom2d")) == 40
    for bad in ("phantom2d:n", "phantom2d:foo=1", "phantom2d:n=x", "phantom2d:shape=4x4"):
        with pytest.raises(InputError):
            open_dataset(bad)
    with pytest.raises(InputError, match="no such file"):
        open_dataset("/no/such/dataset")


def test_cache_is_bounded():
    ds = PhantomDataset(n=4, held_out=0, shape=(32, 40), cache_bytes=3 * 32 * 40 * 5)
    for i in range(4):
        ds.subject(i)
    assert len(ds._cache) <= 3 and 3 in ds._cache


# ------------------------------------------------------------------------------ lecture tensors
def _tensors(tmp_path, n=5, shape=(16, 20), seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    segs = rng.integers(0, 9, size=(n, *shape)).astype(np.int64)
    torch.save(torch.from_numpy(imgs), tmp_path / "tiny_img.pth")
    torch.save(torch.from_numpy(segs), tmp_path / "tiny_seg.pth")
    return imgs, segs


def test_tensor_dataset_reads_lecture_format(tmp_path):
    imgs, segs = _tensors(tmp_path)
    for spec in (tmp_path / "tiny_img.pth", tmp_path):
        ds = open_dataset(str(spec))
        assert isinstance(ds, TensorDataset) and len(ds) == 5 and ds.ndim == 2
        s = ds.subject(2)
        np.testing.assert_allclose(s.image, imgs[2] / 255.0, atol=1e-6)
        assert s.image.dtype == np.float32 and s.labels.dtype == np.int64
        np.testing.assert_array_equal(s.labels, segs[2])
        assert ds.num_labels == int(segs.max()) + 1 and ds.label_names[0] == "background"
        assert ds.indices("train") == [0, 1, 2] and ds.indices("test") == [3, 4]
        assert sorted(ds.pairs("test")) == [(3, 4), (4, 3)]


def test_tensor_dataset_label_names_given(tmp_path):
    _tensors(tmp_path)
    names = ["background", *(f"organ{k}" for k in range(1, 9))]
    ds = TensorDataset(tmp_path / "tiny_img.pth", label_names=names, held_out=1)
    assert ds.label_names == tuple(names) and ds.num_labels == 9
    assert ds.indices("test") == [4] and ds.pairs("test") == []


def test_tensor_dataset_float_images_normalised(tmp_path):
    vol = np.linspace(-1000, 1000, 3 * 8 * 9, dtype=np.float32).reshape(3, 8, 9)
    torch.save(torch.from_numpy(vol), tmp_path / "f_img.pth")
    ds = TensorDataset(tmp_path / "f_img.pth", held_out=0)
    s = ds.subject(1)
    assert s.labels is None and ds.num_labels == 0
    assert 0.0 <= s.image.min() < 0.05 and 0.95 < s.image.max() <= 1.0


def test_tensor_dataset_errors(tmp_path):
    torch.save(torch.zeros(3, 8, 8, dtype=torch.uint8), tmp_path / "a_img.pth")
    torch.save(torch.zeros(3, 8, 9, dtype=torch.int64), tmp_path / "a_seg.pth")
    with pytest.raises(InputError, match="a_seg.pth"):
        open_dataset(str(tmp_path / "a_img.pth"))
    (tmp_path / "b_img.pth").write_bytes(b"not a tensor")
    with pytest.raises(InputError, match="b_img.pth"):
        TensorDataset(tmp_path / "b_img.pth")
    torch.save(torch.zeros(8, dtype=torch.uint8), tmp_path / "c_img.pth")
    with pytest.raises(InputError, match="c_img.pth"):
        TensorDataset(tmp_path / "c_img.pth")


# ------------------------------------------------------------------------------ NIfTI folder
def _nifti(path, array, zooms=(2.0, 1.5, 3.0)):
    affine = np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _folder(tmp_path, n=3, shape=(10, 9, 8)):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    rng = np.random.default_rng(1)
    vols, labs = [], []
    for k in range(n):
        vol = (rng.normal(size=shape) * 100 + 40).astype(np.float32)
        lab = rng.integers(0, 4, size=shape).astype(np.uint8)
        _nifti(tmp_path / "images" / f"case_{k:04d}.nii.gz", vol)
        _nifti(tmp_path / "labels" / f"case_{k:04d}.nii.gz", lab)
        vols.append(vol)
        labs.append(lab)
    return vols, labs


def test_folder_dataset(tmp_path):
    vols, labs = _folder(tmp_path)
    ds = open_dataset(str(tmp_path))
    assert isinstance(ds, FolderDataset) and len(ds) == 3 and ds.ndim == 3
    s = ds.subject(1)
    assert s.name == "case_0001" and s.image.dtype == np.float32
    assert 0.0 <= s.image.min() and s.image.max() <= 1.0
    np.testing.assert_array_equal(s.labels, labs[1].astype(np.int64))
    assert s.labels.dtype == np.int64
    np.testing.assert_allclose(s.spacing, (2.0, 1.5, 3.0))
    # intensities keep their order (monotone normalisation)
    v = vols[1].ravel()
    i, j = int(np.argmin(v)), int(np.argmax(v))
    assert s.image.ravel()[i] < s.image.ravel()[j]
    assert ds.num_labels == 4 and ds.label_names[0] == "background"


def test_folder_dataset_labels_by_stem_and_errors(tmp_path):
    _folder(tmp_path, n=2)
    # a label named with a _seg suffix still matches
    (tmp_path / "labels" / "case_0001.nii.gz").rename(tmp_path / "labels" / "case_0001_seg.nii.gz")
    ds = FolderDataset(tmp_path / "images", tmp_path / "labels")
    assert ds.subject(1).labels is not None
    (tmp_path / "labels" / "case_0001_seg.nii.gz").unlink()
    with pytest.raises(InputError, match="case_0001"):
        FolderDataset(tmp_path / "images", tmp_path / "labels")
    _nifti(tmp_path / "labels" / "case_0001.nii.gz", np.zeros((4, 4, 4), np.uint8))
    ds = FolderDataset(tmp_path / "images", tmp_path / "labels")
    with pytest.raises(InputError, match=r"labels/case_0001\.nii\.gz"):
        ds.subject(1)
    with pytest.raises(InputError, match="no images"):
        FolderDataset(_empty(tmp_path))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_folder_without_labels(tmp_path):
    _folder(tmp_path, n=2)
    ds = open_dataset(str(tmp_path / "images"))
    assert ds.subject(0).labels is None and ds.num_labels == 0


# ------------------------------------------------------------------------------ slices
def test_slices_round_trip(tmp_path):
    src = PhantomDataset(n=4, held_out=2, ndim=3, shape=(24, 20, 16), seed=2)
    path = write_slices(src, tmp_path / "out", axis=2, every=2)
    assert path.name == "slices_img.pth"
    ds = open_dataset(str(tmp_path / "out"))
    assert isinstance(ds, TensorDataset) and ds.ndim == 2
    assert len(ds) == 4 * 8
    assert ds.label_names == LABEL_NAMES
    vol = src.subject(1)
    k = ds.names.index(f"{vol.name}_0006")
    s = ds.subject(k)
    np.testing.assert_allclose(s.image, np.round(vol.image[:, :, 6] * 255) / 255, atol=1e-6)
    np.testing.assert_array_equal(s.labels, vol.labels[:, :, 6])
    assert s.spacing == tuple(vol.spacing[:2])
    meta = json.loads((tmp_path / "out" / "slices_meta.json").read_text())
    by_index = {i: e for i, e in enumerate(meta["slices"])}
    # pairs join the same position of different subjects of one split
    for split in ("train", "test"):
        pairs = ds.pairs(split)
        assert pairs
        for f, m in pairs:
            a, b = by_index[f], by_index[m]
            assert a["index"] == b["index"] and a["subject"] != b["subject"]
            assert a["split"] == b["split"] == split
    assert len(ds.pairs("train")) == 8 * 2  # 2 train subjects, 8 positions


def test_slices_filter_and_axis(tmp_path):
    src = PhantomDataset(n=2, held_out=0, ndim=3, shape=(24, 20, 16))
    write_slices(src, tmp_path / "all", axis=0)
    write_slices(src, tmp_path / "some", axis=0, min_label_fraction=0.05)
    full = open_dataset(str(tmp_path / "all"))
    some = open_dataset(str(tmp_path / "some"))
    assert len(full) == 2 * 24 and full.subject(0).image.shape == (20, 16)
    assert 0 < len(some) < len(full)
    for i in range(len(some)):
        assert (some.subject(i).labels > 0).mean() >= 0.05
    with pytest.raises(InputError, match="3D"):
        write_slices(PhantomDataset(n=2, held_out=0, shape=(32, 32)), tmp_path / "x")
    with pytest.raises(InputError, match="axis"):
        write_slices(src, tmp_path / "y", axis=3)


def test_slices_command(tmp_path):
    from pddreg.data.command import add_subcommand

    parser = argparse.ArgumentParser()
    add_subcommand(parser.add_subparsers())
    out = tmp_path / "cmd"
    args = parser.parse_args(
        ["slices", "phantom3d:n=2,held_out=0,shape=20x16x12", "-o", str(out), "--every", "3"]
    )
    assert args.func(args) == 0
    ds = open_dataset(str(out))
    assert len(ds) == 2 * 4 and ds.subject(0).image.shape == (20, 16)
    args = parser.parse_args(
        ["slices", "phantom3d:n=2,held_out=0,shape=20x16x12", "-o", str(out), "--transpose"]
    )
    assert args.func(args) == 0
    ds = open_dataset(str(out))
    vol = open_dataset("phantom3d:n=2,held_out=0,shape=20x16x12").subject(1)
    s = ds.subject(ds.names.index(f"{vol.name}_0005"))
    assert s.image.shape == (16, 20)
    np.testing.assert_array_equal(s.labels, vol.labels[:, :, 5].T)
    assert s.spacing == (vol.spacing[1], vol.spacing[0])


def test_sample_pair_follows_the_pairs(tmp_path):
    src = PhantomDataset(n=3, held_out=0, ndim=3, shape=(16, 16, 12))
    write_slices(src, tmp_path, axis=2, every=3)
    ds = open_dataset(str(tmp_path))
    allowed = set(ds.pairs("train"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        f, m, fl, ml = ds.sample_pair(gen)
        assert f.shape == (1, 16, 16) and f.dtype == torch.float32 and fl.dtype == torch.int64
        matches = [
            (a, b)
            for a, b in allowed
            if np.array_equal(ds.subject(a).image, f[0].numpy())
            and np.array_equal(ds.subject(b).image, m[0].numpy())
        ]
        assert matches
    f[0, 0, 0] = 5.0  # a copy: the cached subject is untouched
    assert all(ds.subject(i).image.max() <= 1.0 for i in range(len(ds)))
    with pytest.raises(InputError, match="val"):
        ds.sample_pair(gen, "val")
