import json

import nibabel as nib
import numpy as np
import pytest
import torch

from pddreg.data import open_dataset
from pddreg.data.learn2reg import (
    Learn2RegDataset,
    case_id,
    displacement_filename,
    read_displacement,
    write_displacement,
)
from pddreg.errors import InputError

SHAPE = (12, 10, 8)
ZOOMS = (2.0, 2.0, 2.5)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*ZOOMS, 1.0])), str(path))


def _task(root, labels=None, extra=None, n=4):
    """A fake Learn2Reg task: 4 tiny CT volumes with labels, json like AbdomenCTCT's."""
    rng = np.random.default_rng(0)
    training = []
    for k in range(1, n + 1):
        name = f"Tiny_{k:04d}_0000.nii.gz"
        vol = (rng.normal(size=SHAPE) * 300 - 200).astype(np.int16)
        lab = rng.integers(0, 4, size=SHAPE).astype(np.uint8)
        _save(root / "imagesTr" / name, vol)
        _save(root / "labelsTr" / name, lab)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "Tiny",
        "modality": {"0": "CT"},
        "tensorImageSize": {"0": "3D"},
        "tensorImageShape": {"0": list(SHAPE)},
        "labels": labels
        if labels is not None
        else {"0": {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney"}},
        "numTraining": n,
        "training": training,
        "test": [{"image": "./imagesTs/Tiny_0031_0000.nii.gz"}],  # not distributed
        "registration_val": [
            {
                "fixed": "./imagesTr/Tiny_0003_0000.nii.gz",
                "moving": "./imagesTr/Tiny_0004_0000.nii.gz",
            },
            {
                "fixed": "./imagesTr/Tiny_0004_0000.nii.gz",
                "moving": "./imagesTr/Tiny_0003_0000.nii.gz",
            },
        ],
        "registration_test": [
            {
                "fixed": "./imagesTs/Tiny_0031_0000.nii.gz",
                "moving": "./imagesTr/Tiny_0001_0000.nii.gz",
            }
        ],
    }
    meta.update(extra or {})
    (root / "Tiny_dataset.json").write_text(json.dumps(meta))
    return root / "Tiny_dataset.json"


def test_reads_task(tmp_path):
    path = _task(tmp_path)
    for spec in (path, tmp_path):
        ds = open_dataset(str(spec))
        assert isinstance(ds, Learn2RegDataset)
        assert len(ds) == 4 and ds.ndim == 3
        assert ds.label_names == ("background", "spleen", "right kidney", "left kidney")
        assert ds.modality == {"0": "CT"} and ds.task == "Tiny"
        assert ds.num_labels == 4
        assert ds.indices("val") == [2, 3] and ds.indices("train") == [0, 1]
        assert ds.pairs("val") == [(2, 3), (3, 2)]
        assert sorted(ds.pairs("train")) == [(0, 1), (1, 0)]
        assert ds.pairs("test") == []  # the test image is not there
        s = ds.subject(2)
        assert s.name == "Tiny_0003_0000"
        assert s.image.shape == SHAPE and s.image.dtype == np.float32
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
        assert s.labels.dtype == np.int64 and s.labels.max() <= 3
        np.testing.assert_allclose(s.spacing, ZOOMS)


def test_flat_and_missing_label_names(tmp_path):
    ds = Learn2RegDataset(_task(tmp_path / "a", labels={"0": "background", "1": "liver"}))
    assert ds.label_names[:2] == ("background", "liver") and ds.num_labels == 2
    ds = Learn2RegDataset(_task(tmp_path / "b", labels={}))
    assert ds.num_labels == 4  # background + label1..3 found in the first label map
    assert ds.label_names == ("background", "label1", "label2", "label3")


def test_paired_training(tmp_path):
    extra = {
        "training_paired_images": [
            {
                "fixed": "./imagesTr/Tiny_0002_0000.nii.gz",
                "moving": "./imagesTr/Tiny_0001_0000.nii.gz",
            }
        ]
    }
    ds = Learn2RegDataset(_task(tmp_path, extra=extra))
    assert ds.pairs("train") == [(1, 0)]


def test_missing_files_named(tmp_path):
    path = _task(tmp_path)
    (tmp_path / "imagesTr" / "Tiny_0002_0000.nii.gz").unlink()
    with pytest.raises(InputError, match="Tiny_0002_0000.nii.gz"):
        Learn2RegDataset(path)


def test_bad_pair_and_bad_json(tmp_path):
    extra = {"registration_val": [{"fixed": "./imagesTr/Nope_0001_0000.nii.gz", "moving": "x"}]}
    with pytest.raises(InputError, match="Nope_0001_0000"):
        Learn2RegDataset(_task(tmp_path / "a", extra=extra))
    bad = tmp_path / "Bad_dataset.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="Bad_dataset.json"):
        open_dataset(str(bad))
    (tmp_path / "c").mkdir()
    empty = tmp_path / "c" / "E_dataset.json"
    empty.write_text(json.dumps({"name": "E"}))
    with pytest.raises(InputError, match="training"):
        open_dataset(str(empty))


def test_label_shape_mismatch_named(tmp_path):
    path = _task(tmp_path)
    _save(tmp_path / "labelsTr" / "Tiny_0001_0000.nii.gz", np.zeros((5, 5, 5), np.uint8))
    ds = Learn2RegDataset(path)
    with pytest.raises(InputError, match=r"labelsTr/Tiny_0001_0000\.nii\.gz"):
        ds.subject(0)


def test_case_ids_and_names():
    assert case_id("./imagesTr/AbdomenCTCT_0001_0000.nii.gz") == "0001"
    assert case_id("NLST_0101_0001") == "0101"
    assert case_id("scan.nii.gz") == "scan"
    assert (
        displacement_filename("AbdomenCTCT_0001_0000", "./imagesTr/AbdomenCTCT_0012_0000.nii.gz")
        == "disp_0001_0012.nii.gz"
    )


def test_displacement_round_trip_and_layout(tmp_path):
    rng = np.random.default_rng(0)
    disp = rng.normal(size=(3, *SHAPE)).astype(np.float32)
    path = write_displacement(tmp_path / "out" / "disp_0001_0002.nii.gz", disp)
    data = np.asarray(nib.load(str(path)).dataobj)
    assert data.shape == (*SHAPE, 3)
    np.testing.assert_array_equal(data[..., 1], disp[1])  # component i along array axis i
    np.testing.assert_array_equal(read_displacement(path), disp)
    # a batched tensor, double precision
    path2 = write_displacement(tmp_path / "h.nii.gz", torch.from_numpy(disp)[None], dtype=float)
    np.testing.assert_allclose(read_displacement(path2), disp)
    with pytest.raises(ValueError, match="dtype"):
        write_displacement(tmp_path / "f16.nii.gz", disp, dtype=np.float16)
    with pytest.raises(ValueError, match="disp"):
        write_displacement(tmp_path / "bad.nii.gz", np.zeros((2, *SHAPE)))
    with pytest.raises(InputError, match="missing.nii.gz"):
        read_displacement(tmp_path / "missing.nii.gz")


def test_displacement_meaning_matches_warp(tmp_path):
    """Learn2Reg: fixed voxel x maps to moving x + u(x); pddreg's warp agrees."""
    from pddreg.spatial import warp

    moving = torch.arange(np.prod(SHAPE), dtype=torch.float32).reshape(1, 1, *SHAPE)
    disp = torch.zeros(1, 3, *SHAPE)
    disp[:, 0] = 1.0  # one voxel along array axis 0
    path = write_displacement(tmp_path / "disp_0001_0002.nii.gz", disp)
    back = torch.from_numpy(read_displacement(path))[None]
    warped = warp(moving, back)
    np.testing.assert_allclose(warped[0, 0, :-1].numpy(), moving[0, 0, 1:].numpy(), atol=1e-3)


def test_dataset_writes_fields_with_fixed_affine(tmp_path):
    ds = Learn2RegDataset(_task(tmp_path))
    out = ds.write_displacement(2, 3, np.zeros((3, *SHAPE), np.float32), tmp_path / "sub")
    assert out.name == "disp_0003_0004.nii.gz"
    np.testing.assert_allclose(nib.load(str(out)).affine, np.diag([*ZOOMS, 1.0]))


def test_pair_images_outside_training_are_added(tmp_path):
    """NLST-like: a validation image only named in registration_val is read too."""
    _save(tmp_path / "imagesTr" / "Tiny_0009_0000.nii.gz", np.ones(SHAPE, np.int16))
    _save(tmp_path / "labelsTr" / "Tiny_0009_0000.nii.gz", np.ones(SHAPE, np.uint8))
    extra = {
        "registration_val": [
            {
                "fixed": "./imagesTr/Tiny_0009_0000.nii.gz",
                "moving": "./imagesTr/Tiny_0004_0000.nii.gz",
            }
        ]
    }
    ds = Learn2RegDataset(_task(tmp_path, extra=extra))
    assert len(ds) == 5 and ds.names[-1] == "Tiny_0009_0000"
    assert ds.pairs("val") == [(4, 3)] and ds.indices("train") == [0, 1, 2]
    assert ds.label_files[4] is not None


def test_test_images_present_and_slices(tmp_path):
    from pddreg.data import write_slices

    path = _task(tmp_path)
    _save(
        tmp_path / "imagesTs" / "Tiny_0031_0000.nii.gz",
        np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE),
    )
    ds = Learn2RegDataset(path)
    assert len(ds) == 5 and ds.label_files[4] is None
    assert ds.indices("test") == [0, 4] and ds.pairs("test") == [(4, 0)]
    assert ds.subject(4).labels is None
    write_slices(ds, tmp_path / "slices", axis=2, every=2)
    sl = open_dataset(str(tmp_path / "slices"))
    assert len(sl) == 4 * (SHAPE[2] // 2)  # the unlabelled test image is left out
    assert sl.label_names == ds.label_names
