"""Landmarks: TRE of a registration on a known field (world coordinates), Learn2Reg keypoint
folders, and TRE in ``evaluate``'s records and table."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from pddreg.cli import main
from pddreg.data import open_dataset
from pddreg.report.evaluate import evaluate_method, format_table, summarise

SHAPE = (16, 14, 12)
ZOOMS = (2.0, 1.5, 2.5)
SHIFT = np.array([2.0, -1.0, 1.0])  # voxels: moving(y) = fixed(y - SHIFT)


def _task(root):
    """Two subjects, no label maps, a keypoint file each; subject 2 is subject 1 shifted."""
    rng = np.random.default_rng(0)
    vol = ndimage.gaussian_filter(rng.random(SHAPE), 1.0).astype(np.float32)
    moved = ndimage.shift(vol, SHIFT, order=1, mode="nearest")
    pts = np.array([[5.0, 6.0, 4.0], [10.0, 4.0, 7.5], [8.0, 9.0, 6.0], [6.5, 7.0, 5.0]])
    (root / "imagesTr").mkdir(parents=True)
    (root / "keypointsTr").mkdir()
    for k, (image, p) in enumerate(((vol, pts), (moved, pts + SHIFT)), start=1):
        name = f"Kp_{k:04d}_0000"
        nib.save(
            nib.Nifti1Image(image, np.diag([*ZOOMS, 1.0])),
            str(root / "imagesTr" / f"{name}.nii.gz"),
        )
        (root / "keypointsTr" / f"{name}.csv").write_text(
            "\n".join(",".join(f"{v:.3f}" for v in row) for row in p) + "\n"
        )
    meta = {
        "name": "Kp",
        "tensorImageShape": {"0": list(SHAPE)},
        "training": [{"image": f"./imagesTr/Kp_{k:04d}_0000.nii.gz"} for k in (1, 2)],
        "registration_val": [
            {"fixed": "./imagesTr/Kp_0001_0000.nii.gz", "moving": "./imagesTr/Kp_0002_0000.nii.gz"}
        ],
    }
    (root / "Kp_dataset.json").write_text(json.dumps(meta))
    return root / "Kp_dataset.json"


def test_learn2reg_keypoints_give_tre_in_evaluate(tmp_path, capsys):
    ds = open_dataset(str(_task(tmp_path)))
    assert ds.landmarks(0).shape == (4, 3)
    assert np.allclose(ds.landmarks(1) - ds.landmarks(0), SHIFT, atol=1e-3)
    pairs = ds.pairs("val")

    def zero(fixed, moving):
        return torch.zeros(1, 3, *fixed.shape[2:])

    def oracle(fixed, moving):  # the known field
        return torch.tensor(SHIFT, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *SHAPE)

    records = evaluate_method(ds, "none", zero, pairs) + evaluate_method(
        ds, "oracle", oracle, pairs
    )
    want = float(np.linalg.norm(SHIFT * ZOOMS))
    assert records[0]["landmarks"] == 4
    assert abs(records[0]["tre_before"] - want) < 1e-2 and abs(records[0]["tre"] - want) < 1e-2
    assert records[1]["tre"] < 1e-2
    rows = summarise(records)
    assert abs(rows[1]["tre"]) < 1e-2 and abs(rows[1]["tre_before"] - want) < 1e-2
    table = format_table(rows)
    assert "TRE mm" in table.splitlines()[0]
    # the command: pairs with keypoints need no label maps
    assert main(["evaluate", str(tmp_path), "--method", "none", "--pairs", "val"]) == 0
    out = capsys.readouterr().out
    assert "TRE" in out and f"{want:.2f}" in out


def test_landmark_errors_on_a_known_field_in_mm():
    from pddreg.api import RegistrationResult
    from pddreg.report.landmarks import landmark_errors

    shape = (20, 24, 16)
    rng = np.random.default_rng(0)
    coarse = rng.normal(0, 2.0, (3, 3, 3, 3))
    disp = np.stack([ndimage.zoom(c, [s / 3 for s in shape], order=1) for c in coarse])
    disp = disp.astype(np.float32)
    world_f = np.diag([1.5, 1.0, 2.0, 1.0])
    world_f[:3, 3] = [5.0, -3.0, 1.0]
    world_m = np.diag([1.0, 1.0, 1.0, 1.0])  # another grid: the moving points are in its voxels
    result = RegistrationResult(
        disp=disp, warped=np.zeros(shape, np.float32), warped_seg=None, metrics=None,
        runtime_s=0.0, method="mind", fixed_world=world_f, moving_world=world_m,
    )  # fmt: skip
    fixed_vox = np.array([[4.0, 5.0, 6.0], [10.0, 12.0, 8.0], [15.0, 20.0, 3.0]])
    idx = tuple(fixed_vox.T.astype(int))
    moved_vox = fixed_vox + disp[(slice(None), *idx)].T  # fixed index frame of moving_world
    moving_mm = moved_vox @ world_f[:3, :3].T + world_f[:3, 3]
    moving_vox = moving_mm  # world_m is the identity
    before, after = landmark_errors(result, fixed_vox, moving_vox, "voxel", "voxel")
    assert np.allclose(after, 0.0, atol=1e-4)
    want = np.linalg.norm((moved_vox - fixed_vox) * [1.5, 1.0, 2.0], axis=1)
    assert np.allclose(before, want, atol=1e-6)
    fixed_mm = fixed_vox @ world_f[:3, :3].T + world_f[:3, 3]
    _, after_mm = landmark_errors(result, fixed_mm, moving_mm, "mm", "mm")
    assert np.allclose(after_mm, 0.0, atol=1e-4)
