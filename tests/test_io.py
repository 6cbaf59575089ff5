"""Tests of pddreg.data.io: round trips, geometry kept, and one-line errors naming the file."""

from __future__ import annotations

import builtins
import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from pddreg.data.io import (
    Image,
    check_image,
    normalise_intensity,
    read_image,
    read_labels,
    write_image,
)
from pddreg.errors import InputError


def an_affine(spacing=(1.5, 0.8, 2.5)):
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot * np.asarray(spacing)[None, :]
    affine[:3, 3] = [-90.0, 12.5, 40.0]
    return affine


def save_nifti(path, arr, affine=None):
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))


def no_temp_files(folder):
    return not [f for f in os.listdir(folder) if ".tmp" in f]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["vol.nii.gz", "vol.nii"])
def test_nifti_round_trip_keeps_affine_spacing_and_values(tmp_path, name):
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(6, 7, 5)).astype(np.float32) * 100
    affine = an_affine()
    save_nifti(tmp_path / "in.nii.gz", arr, affine)
    img = read_image(tmp_path / "in.nii.gz")
    assert img.array.dtype == np.float32 and img.array.shape == (6, 7, 5)
    assert np.allclose(img.affine, affine)
    assert img.spacing == pytest.approx((1.5, 0.8, 2.5))
    assert img.path == str(tmp_path / "in.nii.gz")
    out = tmp_path / name
    write_image(out, img.array, like=img)
    back = read_image(out)
    assert np.array_equal(back.array, arr)
    assert np.allclose(back.affine, affine)
    assert back.spacing == pytest.approx(img.spacing)
    assert no_temp_files(tmp_path)


def test_nifti_labels_round_trip_stay_integer(tmp_path):
    labels = np.random.default_rng(1).integers(0, 14, size=(5, 6, 7))
    like = Image(np.zeros((5, 6, 7), np.float32), (2.0, 2.0, 3.0), an_affine((2, 2, 3)), None)
    write_image(tmp_path / "seg.nii.gz", torch.from_numpy(labels)[None, None], like=like)
    raw = nib.load(str(tmp_path / "seg.nii.gz"))
    assert np.issubdtype(raw.get_data_dtype(), np.integer)
    seg = read_labels(tmp_path / "seg.nii.gz")
    assert seg.array.dtype == np.int64 and np.array_equal(seg.array, labels)
    assert seg.spacing == pytest.approx((2.0, 2.0, 3.0))


def test_float_nifti_labels_with_integer_values_are_accepted(tmp_path):
    labels = np.random.default_rng(2).integers(0, 5, size=(4, 5, 6)).astype(np.float32)
    save_nifti(tmp_path / "seg.nii.gz", labels)
    seg = read_labels(tmp_path / "seg.nii.gz")
    assert seg.array.dtype == np.int64 and np.array_equal(seg.array, labels.astype(np.int64))


def test_nifti_trailing_singleton_axes_are_dropped(tmp_path):
    arr = np.random.default_rng(3).random((6, 7, 5, 1)).astype(np.float32)
    save_nifti(tmp_path / "a.nii.gz", arr)
    img = read_image(tmp_path / "a.nii.gz")
    assert img.array.shape == (6, 7, 5) and len(img.spacing) == 3
    save_nifti(tmp_path / "b.nii.gz", arr[:, :, :1])  # (6, 7, 1, 1): a 2-D slice
    assert read_image(tmp_path / "b.nii.gz").array.shape == (6, 7)


def test_png_round_trip_image_and_labels(tmp_path):
    rng = np.random.default_rng(4)
    arr = rng.random((9, 11)).astype(np.float32)
    write_image(tmp_path / "im.png", arr)
    img = read_image(tmp_path / "im.png")
    assert img.array.dtype == np.float32 and img.array.shape == (9, 11)
    assert img.spacing == (1.0, 1.0) and img.affine is None
    assert np.allclose(img.array, np.round(arr * 255), atol=0)  # floats in [0, 1] -> 0..255
    labels = rng.integers(0, 9, size=(9, 11))
    write_image(tmp_path / "seg.png", labels)
    assert np.array_equal(read_labels(tmp_path / "seg.png").array, labels)
    assert no_temp_files(tmp_path)


def test_rgb_png_and_jpeg_are_read_as_grey(tmp_path):
    rgb = np.zeros((8, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    rgb[:4, :, 2] = 50
    PILImage.fromarray(rgb).save(tmp_path / "c.png")
    grey = read_image(tmp_path / "c.png").array
    assert grey.shape == (8, 10)
    assert grey[5, 5] == pytest.approx(0.299 * 200 + 0.587 * 100, abs=1e-3)
    assert grey[0, 0] == pytest.approx(0.299 * 200 + 0.587 * 100 + 0.114 * 50, abs=1e-3)
    ramp = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))
    PILImage.fromarray(ramp).convert("RGB").save(tmp_path / "r.jpg", quality=98)
    back = read_image(tmp_path / "r.jpg").array
    assert back.shape == (16, 16) and np.abs(back - ramp).max() < 8
    with pytest.raises(InputError, match=r"c\.png: colour label maps"):
        read_labels(tmp_path / "c.png")


def test_npy_round_trip(tmp_path):
    arr = np.random.default_rng(5).random((4, 5, 6))
    write_image(tmp_path / "a.npy", arr)
    img = read_image(tmp_path / "a.npy")
    assert np.allclose(img.array, arr, atol=1e-6) and img.spacing == (1.0, 1.0, 1.0)
    assert np.array_equal(np.load(tmp_path / "a.npy"), arr)  # written as is
    write_image(tmp_path / "l.npy", np.arange(20).reshape(4, 5))
    assert np.array_equal(read_labels(tmp_path / "l.npy").array, np.arange(20).reshape(4, 5))


def test_write_png_rescales_out_of_range_floats(tmp_path):
    arr = np.linspace(-1000, 1000, 30).reshape(5, 6)  # e.g. CT in HU
    write_image(tmp_path / "ct.png", arr)
    back = read_image(tmp_path / "ct.png").array
    assert back.min() == 0 and back.max() == 255


def test_write_is_atomic_on_failure(tmp_path):
    target = tmp_path / "keep.png"
    write_image(target, np.eye(5))
    before = target.read_bytes()
    with pytest.raises(InputError, match=r"keep\.png: .*2-D"):
        write_image(target, np.zeros((3, 4, 5)) + 0.5)  # a volume cannot go into a PNG
    assert target.read_bytes() == before
    assert no_temp_files(tmp_path)


def test_write_creates_folders_and_rejects_unknown_types(tmp_path):
    write_image(tmp_path / "a" / "b" / "x.nii.gz", np.ones((3, 4, 5), np.float32))
    assert (tmp_path / "a" / "b" / "x.nii.gz").exists()
    with pytest.raises(InputError, match=r"x\.xyz"):
        write_image(tmp_path / "x.xyz", np.ones((3, 4)))


# ---------------------------------------------------------------- normalise_intensity


def test_normalise_intensity_ct_and_mri_ranges():
    rng = np.random.default_rng(6)
    ct = rng.normal(40, 300, size=(20, 20, 20)).astype(np.float32)
    ct[0, 0, 0] = 30000.0  # one outlier does not squash the range
    out = normalise_intensity(ct)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    lo, hi = np.percentile(ct, [0.5, 99.5])
    inside = (ct > lo) & (ct < hi)
    assert np.allclose(out[inside], (ct[inside] - lo) / (hi - lo), atol=1e-5)
    assert np.median(out) == pytest.approx(0.5, abs=0.05)
    mri = rng.gamma(2.0, 200.0, size=(30, 30)).astype(np.float64)
    out = normalise_intensity(mri, low=0, high=100)
    assert out.min() == 0 and out.max() == 1
    assert np.allclose(out, (mri - mri.min()) / (mri.max() - mri.min()), atol=1e-6)


def test_normalise_intensity_degenerate_inputs_and_torch():
    assert np.array_equal(normalise_intensity(np.full((4, 4), 7.0)), np.zeros((4, 4)))
    mostly_zero = np.zeros((100, 100))
    mostly_zero[0, :3] = [1.0, 2.0, 3.0]  # percentiles coincide: fall back to min..max
    out = normalise_intensity(mostly_zero)
    assert out.max() == 1.0 and out[0, 1] == pytest.approx(2 / 3)
    t = torch.arange(12.0).view(3, 4)
    out = normalise_intensity(t, low=0, high=100)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert torch.allclose(out, t / 11)


# ---------------------------------------------------------------- errors name the file


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nothere\.nii\.gz: no such file"):
        read_image(tmp_path / "nothere.nii.gz")


@pytest.mark.parametrize("name", ["bad.nii.gz", "bad.nii", "bad.png", "bad.npy", "bad.jpg"])
def test_unreadable_file(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(b"this is not a nifti file" * 20)
    else:
        path.write_bytes(b"garbage \x00\x01\x02" * 20)
    with pytest.raises(InputError, match=rf"{name.replace('.', r'.')}: cannot read") as info:
        read_image(path)
    assert "\n" not in str(info.value)


def test_unsupported_extension(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match=r"notes\.txt: unsupported file type '\.txt'"):
        read_image(tmp_path / "notes.txt")


def test_nan_image(tmp_path):
    arr = np.ones((4, 5, 6), np.float32)
    arr[1, 2, 3] = np.nan
    save_nifti(tmp_path / "fixed.nii.gz", arr)
    with pytest.raises(InputError, match=r"fixed\.nii\.gz: contains NaN or Inf values"):
        read_image(tmp_path / "fixed.nii.gz")
    np.save(tmp_path / "inf.npy", np.where(np.eye(4) > 0, np.inf, 1.0))
    with pytest.raises(InputError, match=r"inf\.npy: contains NaN or Inf"):
        read_image(tmp_path / "inf.npy")


def test_non_integer_labels(tmp_path):
    save_nifti(tmp_path / "seg.nii.gz", np.full((3, 4, 5), 0.5, np.float32))
    with pytest.raises(InputError, match=r"seg\.nii\.gz: label map has non-integer values"):
        read_labels(tmp_path / "seg.nii.gz")
    np.save(tmp_path / "neg.npy", -np.ones((3, 3), np.int64))
    with pytest.raises(InputError, match=r"neg\.npy: label map has negative values"):
        read_labels(tmp_path / "neg.npy")


def test_4d_nifti_is_rejected(tmp_path):
    save_nifti(tmp_path / "series.nii.gz", np.random.rand(4, 5, 6, 3).astype(np.float32))
    with pytest.raises(InputError, match=r"series\.nii\.gz: 4-D data of shape \(4, 5, 6, 3\)"):
        read_image(tmp_path / "series.nii.gz")


def test_empty_and_1d_and_constant(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 5)))
    with pytest.raises(InputError, match=r"empty\.npy: image is empty"):
        read_image(tmp_path / "empty.npy")
    np.save(tmp_path / "line.npy", np.arange(5.0))
    with pytest.raises(InputError, match=r"line\.npy: expected a 2-D or 3-D image"):
        read_image(tmp_path / "line.npy")
    np.save(tmp_path / "flat.npy", np.full((5, 5), 3.0))
    with pytest.raises(InputError, match=r"flat\.npy: image is constant"):
        read_image(tmp_path / "flat.npy")
    read_labels(tmp_path / "flat.npy")  # a constant label map is fine


def test_check_image_messages():
    with pytest.raises(
        InputError, match=r"^fixed.nii.gz: contains NaN or Inf values \(1 of 4 voxels\)"
    ):
        check_image(np.array([[1.0, np.nan], [0.0, 1.0]]), "fixed.nii.gz")
    with pytest.raises(InputError, match="^moving: image is empty"):
        check_image(np.zeros((0, 3)), "moving")
    with pytest.raises(
        InputError, match=r"^moving: expected a 2-D or 3-D image, got shape \(2, 2, 2, 2\)"
    ):
        check_image(np.random.rand(2, 2, 2, 2), "moving")
    with pytest.raises(InputError, match="^m: image is constant"):
        check_image(torch.zeros(4, 4), "m")
    check_image(torch.rand(4, 4, 4), "ok")


def test_simpleitk_formats_need_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "SimpleITK":
            raise ImportError("No module named 'SimpleITK'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    (tmp_path / "ct.mha").write_bytes(b"x")
    with pytest.raises(InputError, match=r"ct\.mha: .*install pddreg\[itk\]"):
        read_image(tmp_path / "ct.mha")
    os.mkdir(tmp_path / "dicom")
    with pytest.raises(InputError, match=r"dicom: .*install pddreg\[itk\]"):
        read_image(tmp_path / "dicom")
    with pytest.raises(InputError, match=r"out\.nrrd: .*install pddreg\[itk\]"):
        write_image(tmp_path / "out.nrrd", np.ones((3, 4, 5)))
    assert no_temp_files(tmp_path)


def test_simpleitk_round_trip_matches_nifti_geometry(tmp_path):
    pytest.importorskip("SimpleITK")
    arr = np.random.default_rng(7).random((6, 7, 5)).astype(np.float32)
    affine = an_affine()
    like = Image(arr, (1.5, 0.8, 2.5), affine, None)
    write_image(tmp_path / "v.mha", arr, like=like)
    img = read_image(tmp_path / "v.mha")
    assert np.array_equal(img.array, arr)
    assert img.spacing == pytest.approx((1.5, 0.8, 2.5))
    assert np.allclose(img.affine, affine)
