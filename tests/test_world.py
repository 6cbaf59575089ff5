"""World coordinates (pddreg.spatial.world, register on different grids), apply, ITK export."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pddreg.api import apply_registration, map_points, register
from pddreg.cli import main
from pddreg.errors import InputError
from pddreg.spatial import (
    grid_map,
    map_coords,
    overlap_fraction,
    spacing_of,
    working_grid,
    working_to_fixed,
)

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def _rotation(deg: float, axis: int = 2) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _world_function(p: np.ndarray) -> np.ndarray:
    """A smooth 'anatomy' defined in world mm (so every grid samples the same object)."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    blob = np.exp(-((x - 4) ** 2 / 300 + (y + 6) ** 2 / 200 + (z - 2) ** 2 / 150))
    ring = np.exp(-(((x**2 + y**2) ** 0.5 - 18) ** 2) / 20) * np.exp(-(z**2) / 400)
    return (100 + 800 * blob + 400 * ring + 30 * np.sin(x / 7) * np.cos(y / 9)).astype(np.float32)


def _sample_grid(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return _world_function(idx @ affine[:3, :3].T + affine[:3, 3])


@pytest.fixture
def two_grids(tmp_path):
    """The same object on a fixed grid and on another grid: other spacing, size, origin and a
    header rotated by 30 degrees."""
    af = np.diag([1.5, 1.5, 2.5, 1.0])
    sf = (36, 40, 20)
    af[:3, 3] = -af[:3, :3] @ (np.array(sf) / 2)
    am = np.eye(4)
    sm = (44, 52, 30)
    am[:3, :3] = _rotation(30) @ np.diag([1.2, 1.1, 1.8])
    am[:3, 3] = -am[:3, :3] @ (np.array(sm) / 2) + np.array([3.0, -2.0, 1.5])
    paths = {"fixed": tmp_path / "fixed.nii.gz", "moving": tmp_path / "moving.nii.gz"}
    nib.save(nib.Nifti1Image(_sample_grid(sf, af), af), paths["fixed"])
    nib.save(nib.Nifti1Image(_sample_grid(sm, am), am), paths["moving"])
    seg = (_sample_grid(sm, am) > 500).astype(np.int16)
    nib.save(nib.Nifti1Image(seg, am), tmp_path / "moving_seg.nii.gz")
    paths["moving_seg"] = tmp_path / "moving_seg.nii.gz"
    return {k: str(v) for k, v in paths.items()}


def test_grid_map_and_overlap():
    af = np.diag([2.0, 2.0, 2.0, 1.0])
    am = np.diag([1.0, 1.0, 1.0, 1.0])
    am[:3, 3] = [-2.0, 0.0, 4.0]
    m = grid_map(af, am)
    # fixed voxel (1, 0, 0) is world (2, 0, 0), moving voxel (4, 0, -4)
    np.testing.assert_allclose(m @ [1, 0, 0, 1], [4, 0, -4, 1])
    assert spacing_of(af) == (2.0, 2.0, 2.0)
    assert overlap_fraction(np.eye(4), (10, 10, 10), (10, 10, 10)) == 1.0
    far = np.eye(4)
    far[:3, 3] = 100
    assert overlap_fraction(far, (10, 10, 10), (10, 10, 10)) == 0.0
    with pytest.raises(ValueError, match="singular"):
        grid_map(af, np.diag([1.0, 0.0, 1.0, 1.0]))


def test_working_grid_is_isotropic_and_bounded():
    shape, spacing = working_grid((512, 512, 48), (0.6, 0.6, 5.0), max_voxels=2_000_000)
    assert np.prod(shape) <= 2_000_000
    assert max(spacing) / min(spacing) < 1.05  # thick slices interpolated, fine ones pooled
    extent = np.array([512 * 0.6, 512 * 0.6, 48 * 5.0])
    np.testing.assert_allclose(np.array(shape) * spacing, extent)
    same, sp = working_grid((64, 80), (1.0, 1.0), max_voxels=10**6)
    assert same == (64, 80) and sp == (1.0, 1.0)
    t = working_to_fixed((32, 40), (64, 80))
    np.testing.assert_allclose(t @ [0, 0, 1], [0.5, 0.5, 1])  # (k + 0.5) * S / G - 0.5


def test_map_coords_applies_matrix_after_field():
    m = np.eye(3)
    m[:2, 2] = [1.0, -2.0]
    d = torch.zeros(1, 2, 4, 5)
    d[:, 0] = 0.5
    c = map_coords(m, (4, 5), d)
    assert torch.allclose(c[0, 0, 2, 3], torch.tensor(2 + 0.5 + 1.0))
    assert torch.allclose(c[0, 1, 2, 3], torch.tensor(3 - 2.0))


def test_other_grid_registers_back_to_itself(two_grids):
    """Same object, other spacing/size/origin and a 30-degree rotated header: warped = fixed to
    interpolation error, and the field is the pure world alignment (mind adds ~nothing)."""
    fixed = nib.load(two_grids["fixed"]).get_fdata().astype(np.float32)
    for method in ("none", "mind"):
        res = register(two_grids["fixed"], two_grids["moving"], method=method, affine="off")
        inside = res.warped != res.warped.min()
        assert inside.mean() > 0.6
        err = np.abs(res.warped - fixed)[inside]
        assert err.mean() < 0.01 * np.ptp(fixed), (method, err.mean())
        size = np.sqrt((res.disp**2).sum(0))[inside]
        if method == "none":
            assert size.max() < 1e-6
        else:  # identical content: mind stays near the world alignment
            assert size.mean() < 0.2 and np.percentile(size, 95) < 0.5


def test_apply_reproduces_register_outputs(two_grids, tmp_path):
    out = tmp_path / "reg"
    args = ["register", two_grids["fixed"], two_grids["moving"], "-o", str(out)]
    assert main([*args, "--moving-seg", two_grids["moving_seg"], "--affine", "off"]) == 0
    meta = json.loads((out / "transform.json").read_text())
    assert meta["space"] == "world" and meta["moving_shape"] == [44, 52, 30]
    warped = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)
    again = apply_registration(out, two_grids["moving"])
    np.testing.assert_array_equal(again, warped)
    wseg = np.asarray(nib.load(str(out / "warped_seg.nii.gz")).dataobj)
    labels = apply_registration(out, two_grids["moving_seg"], labels=True)
    np.testing.assert_array_equal(labels, wseg)  # bit for bit
    # the CLI writes the same files
    assert main(["apply", str(out), two_grids["moving"], "-o", str(tmp_path / "a")]) == 0
    np.testing.assert_array_equal(
        np.asarray(nib.load(str(tmp_path / "a" / "warped.nii.gz")).dataobj), warped
    )
    assert (
        main(
            [
                "apply",
                str(out),
                two_grids["moving_seg"],
                "--labels",
                "-o",
                str(tmp_path / "s.nii.gz"),
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "s.nii.gz")).dataobj), wseg)


def _register_none(two_grids: dict[str, str], out: Path) -> None:
    """``pddreg register FIXED MOVING -o out --method none`` (the world alignment only)."""
    argv = ["register", two_grids["fixed"], two_grids["moving"], "-o", str(out)]
    assert main([*argv, "--method", "none"]) == 0


def test_points_map_to_the_same_world_point(two_grids, tmp_path):
    out = tmp_path / "reg"
    _register_none(two_grids, out)
    af = nib.load(two_grids["fixed"]).affine
    am = nib.load(two_grids["moving"]).affine
    vox = np.array([[10.0, 12.0, 5.0], [20.5, 30.0, 9.0]])
    moved = map_points(out, vox, "voxel")  # moving voxels of the same world points
    world = vox @ af[:3, :3].T + af[:3, 3]
    np.testing.assert_allclose(moved @ am[:3, :3].T + am[:3, 3], world, atol=1e-4)
    np.testing.assert_allclose(map_points(out, world, "mm"), world, atol=1e-4)
    csv = tmp_path / "p.csv"
    csv.write_text("x,y,z\n" + "\n".join(",".join(str(v) for v in row) for row in world) + "\n")
    assert main(["apply", str(out), "--points", str(csv), "-o", str(tmp_path / "pts")]) == 0
    text = (tmp_path / "pts" / "points.csv").read_text().splitlines()
    assert text[0] == "x,y,z"
    np.testing.assert_allclose(np.loadtxt(text[1:], delimiter=","), world, atol=1e-4)
    with pytest.raises(InputError, match="outside the fixed image"):
        map_points(out, [[100.0, 0.0, 0.0]], "voxel")


def test_itk_export_applied_by_simpleitk_reproduces_warped(two_grids, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    out = tmp_path / "reg"
    assert (
        main(
            ["register", two_grids["fixed"], two_grids["moving"], "-o", str(out), "--affine", "off"]
        )
        == 0
    )
    warped = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)
    fixed = sitk.ReadImage(two_grids["fixed"], sitk.sitkFloat32)
    moving = sitk.ReadImage(two_grids["moving"], sitk.sitkFloat32)
    field = sitk.ReadImage(str(out / "disp_itk.nii.gz"), sitk.sitkVectorFloat64)
    assert field.GetSize() == fixed.GetSize()
    np.testing.assert_allclose(field.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
    tx = sitk.DisplacementFieldTransform(field)
    low = float(sitk.GetArrayViewFromImage(moving).min())  # register's value outside the image
    itk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, low))
    itk = itk.transpose(2, 1, 0)
    assert np.abs(itk - warped).mean() < 0.01 * np.ptp(warped)


def test_itk_export_2d_png(tmp_path):
    """PNGs: ITK reads (x = column, y = row); the exported field must follow."""
    sitk = pytest.importorskip("SimpleITK")
    from PIL import Image as PILImage

    yy, xx = np.mgrid[0:40, 0:56].astype(np.float32)
    f = 100 + 80 * np.exp(-((yy - 20) ** 2 + (xx - 26) ** 2) / 60) + 20 * np.sin(xx / 5)
    m = 100 + 80 * np.exp(-((yy - 23) ** 2 + (xx - 30) ** 2) / 60) + 20 * np.sin((xx - 4) / 5)
    PILImage.fromarray(f.astype(np.uint8)).save(tmp_path / "f.png")
    PILImage.fromarray(m.astype(np.uint8)).save(tmp_path / "m.png")
    out = tmp_path / "reg"
    assert (
        main(
            [
                "register",
                str(tmp_path / "f.png"),
                str(tmp_path / "m.png"),
                "-o",
                str(out),
                "--affine",
                "off",
            ]
        )
        == 0
    )
    disp = np.load(out / "disp.npy")
    assert np.median(disp[0]) > 1.5 and np.median(disp[1]) > 2.0  # rows +3, columns +4
    warped = np.asarray(PILImage.open(out / "warped.png")).astype(np.float32)
    fixed = sitk.ReadImage(str(tmp_path / "f.png"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(tmp_path / "m.png"), sitk.sitkFloat32)
    field = sitk.ReadImage(str(out / "disp_itk.nii.gz"), sitk.sitkVectorFloat64)
    assert field.GetDimension() == 2 and field.GetSize() == fixed.GetSize()
    tx = sitk.DisplacementFieldTransform(field)
    low = float(sitk.GetArrayViewFromImage(moving).min())
    itk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, low))
    assert np.abs(itk - warped).mean() < 0.01 * 255 + 0.5  # warped.png is rounded to 8 bits


def test_masks_exclude_an_occluder():
    """A textured occluder in the moving image only (moving the other way), outside the moving
    mask: with the mask the field there follows the true shift of its surroundings."""
    from scipy.ndimage import gaussian_filter, shift

    rng = np.random.default_rng(3)
    tex = gaussian_filter(rng.standard_normal((72, 72)), 2.0).astype(np.float32)
    fixed = tex[4:68, 4:68]
    moving = shift(tex, (-3.0, -2.0), order=1)[4:68, 4:68]  # fixed(x) = moving(x - (3, 2))
    occluded = moving.copy()
    occluded[36:56, 36:56] = tex[10:30, 40:60] * 2  # other texture, another motion
    mask = np.ones_like(moving)
    mask[34:58, 34:58] = 0
    truth = np.array([-3.0, -2.0]).reshape(2, 1, 1)
    region = (slice(None), slice(40, 52), slice(40, 52))

    def err(disp: np.ndarray) -> float:
        return float(np.sqrt(((disp - truth)[region] ** 2).sum(0)).mean())

    plain = register(fixed, occluded, affine="off").disp
    masked = register(fixed, occluded, affine="off", moving_mask=mask).disp
    assert err(register(fixed, moving, affine="off").disp) < 0.1
    assert err(masked) < 0.5 * err(plain)


def _nii(path: Path, arr: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(arr, affine), path)
    return str(path)


def _degenerate_nii(path: Path, arr: np.ndarray) -> str:
    """A NIfTI whose sform has a zero voxel axis (nibabel refuses to build one from an
    affine, so the header rows are written directly)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(arr.shape)
    hdr.set_data_dtype(np.float32)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(arr.astype(np.float32), None, header=hdr), path)
    return str(path)


def test_bad_geometry_inputs_exit_2(two_grids, tmp_path, capsys):
    fixed = nib.load(two_grids["fixed"])
    arr = np.asarray(fixed.dataobj)
    far = fixed.affine.copy()
    far[:3, 3] += 5000.0
    cases = {
        "no overlap": (
            [
                "register",
                two_grids["fixed"],
                _nii(tmp_path / "far.nii.gz", arr, far),
                "--affine",
                "off",
            ],
            "far.nii.gz",
        ),
        "no overlap, none": (
            ["register", two_grids["fixed"], str(tmp_path / "far.nii.gz"), "--method", "none"],
            "far.nii.gz",
        ),
        "degenerate header": (
            [
                "register",
                _degenerate_nii(tmp_path / "deg.nii.gz", arr),
                two_grids["moving"],
            ],
            "deg.nii.gz",
        ),
        "mask on neither grid": (
            [
                "register",
                two_grids["fixed"],
                two_grids["moving"],
                "--fixed-mask",
                _nii(tmp_path / "mask.nii.gz", np.ones((5, 6, 7), np.uint8), fixed.affine),
            ],
            "mask.nii.gz",
        ),
        "mask with other affine": (
            [
                "register",
                two_grids["fixed"],
                two_grids["moving"],
                "--fixed-mask",
                _nii(tmp_path / "mask2.nii.gz", np.ones(arr.shape, np.uint8), far),
            ],
            "mask2.nii.gz",
        ),
        "empty mask": (
            [
                "register",
                two_grids["fixed"],
                two_grids["moving"],
                "--fixed-mask",
                _nii(tmp_path / "empty.nii.gz", np.zeros(arr.shape, np.uint8), fixed.affine),
            ],
            "empty.nii.gz",
        ),
    }
    for case, (argv, name) in cases.items():
        out = tmp_path / f"never_{len(name)}"
        rc = main([*argv, "-o", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, case
        assert err.count("\n") == 1 and err.startswith("pddreg: error: ") and name in err, err
        assert "Traceback" not in err and not out.exists(), case


def test_point_outside_the_image_exits_2(two_grids, tmp_path, capsys):
    out = tmp_path / "reg"
    _register_none(two_grids, out)
    csv = tmp_path / "pts.csv"
    csv.write_text("i,j,k\n1,2,3\n500,2,3\n")
    capsys.readouterr()
    rc = main(["apply", str(out), "--points", str(csv), "-o", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert rc == 2 and "outside the fixed image" in err and err.count("\n") == 1
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (REAL / "ct_chest_2subjects").is_dir(), reason="no real data here")
def test_two_chest_cts_register_from_the_files(tmp_path):
    """Two patients, different grids and fields of view, origins that do not even overlap in
    z: registered from the files as they are; the lungs overlap better than by the headers."""
    d = REAL / "ct_chest_2subjects"
    res = register(str(d / "lung1_image.nii.gz"), str(d / "lung2_image.nii.gz"))
    assert res.disp.shape == (3, 512, 512, 48) and np.isfinite(res.disp).all()
    fixed = np.asarray(nib.load(str(d / "lung1_image.nii.gz")).dataobj)

    def lungs(ct: np.ndarray) -> np.ndarray:
        return (ct < -400) & (ct > -1100)

    body = fixed > -400
    inside = np.zeros_like(body)
    inside[:, :, :] = body.any(axis=(0, 1), keepdims=True)  # slices with anatomy
    dice_after = _dice(lungs(fixed) & inside, lungs(res.warped) & (res.warped != 0) & inside)
    assert dice_after > 0.5
    assert res.affine_mode != "off"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_affine_files_map_points_like_the_global_stage(tmp_path):
    """affine.txt (RAS world map) and affine.tfm (ITK, LPS) say the same thing, and SimpleITK
    reads the .tfm as the map from fixed to moving physical points."""
    sitk = pytest.importorskip("SimpleITK")
    from scipy.ndimage import affine_transform

    af = np.diag([2.0, 2.0, 3.0, 1.0])
    af[:3, 3] = [-30.0, -35.0, -20.0]
    fixed = _sample_grid((32, 36, 16), af)
    rot = _rotation(8.0)  # the moving image: the object rotated by 8 degrees about z
    centre = np.array([16.0, 18.0, 8.0])
    moving = affine_transform(fixed, rot, offset=centre - rot @ centre, order=1, mode="nearest")
    nib.save(nib.Nifti1Image(fixed, af), tmp_path / "f.nii.gz")
    nib.save(nib.Nifti1Image(moving.astype(np.float32), af), tmp_path / "m.nii.gz")
    out = tmp_path / "reg"
    argv = ["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o", str(out)]
    assert main([*argv, "--affine", "rigid"]) == 0
    world = np.loadtxt(out / "affine.txt")
    tx = sitk.ReadTransform(str(out / "affine.tfm"))
    flip = np.diag([-1.0, -1.0, 1.0])
    for p in ([0.0, 0.0, 0.0], [10.0, -5.0, 4.0]):
        ras = world[:3, :3] @ p + world[:3, 3]
        lps = np.array(tx.TransformPoint(tuple(flip @ p)))
        np.testing.assert_allclose(flip @ lps, ras, atol=1e-6)
    meta = json.loads((out / "metrics.json").read_text())
    assert (
        meta["affine_mode"] in ("rigid", "identity")
        and meta["global"]["mode"] == meta["affine_mode"]
    )


def test_headers_apart_with_labels_register_and_report(two_grids, tmp_path, capsys):
    # moving image and labels 5 m away by their headers: the global stage starts from the
    # centres; there is no Dice "before", and the summary line says so instead of failing
    moving = nib.load(two_grids["moving"])
    far = moving.affine.copy()
    far[:3, 3] += 5000.0
    mov = _nii(tmp_path / "far.nii.gz", np.asarray(moving.dataobj), far)
    seg = _nii(
        tmp_path / "far_seg.nii.gz", np.asarray(nib.load(two_grids["moving_seg"]).dataobj), far
    )
    fseg = (np.asarray(nib.load(two_grids["fixed"]).dataobj) > 500).astype(np.int16)
    fseg_path = _nii(tmp_path / "fixed_seg.nii.gz", fseg, nib.load(two_grids["fixed"]).affine)
    out = tmp_path / "out"
    argv = ["register", two_grids["fixed"], mov, "-o", str(out), "--method", "mind"]
    argv += ["--fixed-seg", fseg_path, "--moving-seg", seg, "--no-uncertainty"]
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert "mean Dice - -> " in line
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mean_dice_before"] is None and metrics["mean_dice"] > 0.5


def test_projective_global_stage_files_and_apply(tmp_path):
    """A 2D view through a homography: ``--affine projective`` writes the homography to
    affine.txt (marked, no affine.tfm), composes it into the field, and ``apply`` reproduces
    the warped image."""
    from test_align import _homography_pair

    fixed, moving, true = _homography_pair()
    np.save(tmp_path / "f.npy", fixed[0, 0].numpy())
    np.save(tmp_path / "m.npy", moving[0, 0].numpy())
    out = tmp_path / "reg"
    argv = ["register", str(tmp_path / "f.npy"), str(tmp_path / "m.npy"), "-o", str(out)]
    assert main([*argv, "--method", "mind", "--affine", "projective", "--device", "cpu"]) == 0
    text = (out / "affine.txt").read_text()
    assert "projective" in text and not (out / "affine.tfm").exists()
    world = np.loadtxt(out / "affine.txt")
    assert abs(world[2, 0]) > 1e-3  # the perspective row survives the world frame
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["affine_mode"] == "projective"
    # the field holds the homography: fixed voxel x -> moving x + u(x), near the true map
    disp = np.load(out / "disp.npy")
    pts = np.argwhere(fixed[0, 0].numpy() > 0.05).astype(np.float64)
    q = np.c_[pts, np.ones(len(pts))] @ true.numpy().T
    truth = q[:, :2] / q[:, 2:]
    got = pts + disp[:, pts[:, 0].astype(int), pts[:, 1].astype(int)].T
    assert np.linalg.norm(got - truth, axis=1).mean() < 0.6
    warped = np.load(out / "warped.npy")
    np.testing.assert_array_equal(apply_registration(out, str(tmp_path / "m.npy")), warped)


def test_apply_matrix_divides_for_a_homography():
    from pddreg.spatial import apply_matrix, is_projective, overlap_fraction

    h = np.array([[1.1, 0.05, 3.0], [-0.02, 0.9, -2.0], [0.004, -0.002, 1.0]])
    assert is_projective(h) and not is_projective(np.eye(3))
    coords = torch.rand(1, 2, 5, 7, dtype=torch.float64) * 40
    got = apply_matrix(h, coords)[0].reshape(2, -1).numpy()
    p = coords[0].reshape(2, -1).numpy()
    q = h @ np.vstack([p, np.ones(p.shape[1])])
    np.testing.assert_allclose(got, q[:2] / q[2], rtol=1e-12)
    # a horizon inside the fixed grid: the points behind it are outside, not wrapped round
    behind = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-0.05, 0.0, 1.0]])
    assert 0.0 < overlap_fraction(behind, (40, 40), (40, 40)) < 0.6


def test_inside_domain_margin_shrinks_each_side():
    from pddreg.pipeline import inside_domain

    coords = map_coords(np.eye(3), (64, 40))
    plain = inside_domain(coords, (64, 40))[0, 0]
    shrunk = inside_domain(coords, (64, 40), [3.0, 1.0])[0, 0]
    assert bool(plain.all())
    rows, cols = np.nonzero(shrunk.numpy())
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (3, 60, 1, 38)
    # at most an eighth of an axis per side
    capped = inside_domain(coords, (64, 40), [30.0, 30.0])[0, 0].numpy()
    rows, cols = np.nonzero(capped)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 55, 5, 34)


def test_deformable_stage_leaves_out_the_domain_edges():
    """The masks the deformable stage gets: the working grid's edge band (fixed side) and the
    moving domain's edge band, both DOMAIN_MARGIN working voxels wide."""
    from pddreg import pipeline

    seen = {}

    def deformable(fw, mw, fmask, mmask):  # noqa: ANN001, ANN202
        seen.update(fmask=fmask, mmask=mmask)
        return torch.zeros((1, 2, *fw.shape[2:]))

    img = torch.rand(1, 1, 96, 112)
    shift = np.eye(3)
    shift[:2, 2] = [10.0, 0.0]  # fixed voxel (i, j) -> moving voxel (i + 10, j)
    pipeline.run(img, img, shift, (1.0, 1.0), (1.0, 1.0), deformable, affine="off")
    k = pipeline.DOMAIN_MARGIN[2]
    fmask, mmask = seen["fmask"][0, 0].numpy(), seen["mmask"][0, 0].numpy()
    rows, cols = np.nonzero(fmask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (k, 95 - k, k, 111 - k)
    rows, cols = np.nonzero(mmask)  # the moving grid ends at fixed row 85
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, 85 - k, k, 111 - k)


@pytest.mark.slow
def test_anatomy_cut_by_the_field_of_view_registers():
    """A real chest CT (4.5 mm) seen zoomed out by 1.15 (the moving volume ends inside the
    fixed one, the body cut in z): leaving the domains' edges out of the similarity brings the
    error down (here 1.15 -> 0.40 voxels; 0.99 -> 0.45 on bench_capture's 3 mm case)."""
    from scipy import ndimage

    from pddreg import pipeline
    from pddreg.data import Image, affine_field, compose_fields, make_case, random_field
    from pddreg.metrics import epe

    nii = nib.load(str(REAL / "ct_chest_2subjects" / "lung1_image.nii.gz"))
    zooms = np.asarray(nii.header.get_zooms()[:3], dtype=np.float64)
    vol = np.asarray(nii.dataobj, dtype=np.float32)
    vol = ndimage.zoom(ndimage.gaussian_filter(vol, 0.4 * 4.5 / zooms), zooms / 4.5, order=1)
    sp = (4.5, 4.5, 4.5)
    deform = random_field(vol.shape, 0.04 * np.mean(vol.shape), 0.3 * np.mean(vol.shape), seed=302)
    disp = compose_fields(deform, affine_field(vol.shape, spacing=sp, matrix=np.eye(3) * 1.15))
    case = make_case(vol, disp, noise=0.01, seed=402, spacing=sp)
    grid = np.diag([*sp, 1.0])
    f, m = Image(case.fixed, sp, affine=grid), Image(case.moving, sp, affine=grid)
    with_margin = epe(register(f, m).disp, case.disp, case.mask)
    margin = pipeline.DOMAIN_MARGIN
    try:
        pipeline.DOMAIN_MARGIN = {2: 0, 3: 0}
        without = epe(register(f, m).disp, case.disp, case.mask)
    finally:
        pipeline.DOMAIN_MARGIN = margin
    assert with_margin < 0.6 and with_margin < 0.7 * without
