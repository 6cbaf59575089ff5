import time

import numpy as np
import pytest

from pddreg.data.phantom import (
    DEFAULT_SHAPE_2D,
    LABEL_NAMES,
    WINDOW,
    make_phantom,
    phantom_spacing,
)
from pddreg.errors import InputError

ORGANS = range(1, len(LABEL_NAMES))


def _dice(a: np.ndarray, b: np.ndarray, labels) -> float:
    try:
        from pddreg.metrics import mean_dice

        return float(mean_dice(a, b, labels=list(labels)))
    except ImportError:  # metrics not installed: a local Dice
        vals = []
        for k in labels:
            x, y = a == k, b == k
            if x.any() and y.any():
                vals.append(2.0 * (x & y).sum() / (x.sum() + y.sum()))
        return float(np.mean(vals))


def test_label_names_order():
    assert LABEL_NAMES[0] == "background"
    assert LABEL_NAMES[1:9] == (
        "liver",
        "spleen",
        "left kidney",
        "right kidney",
        "pancreas",
        "gallbladder",
        "stomach",
        "aorta",
    )
    assert len(set(LABEL_NAMES)) == len(LABEL_NAMES)


@pytest.mark.parametrize("seed", [0, 5])
def test_2d_shape_dtype_range_labels(seed):
    image, labels = make_phantom(seed)
    assert image.shape == labels.shape == DEFAULT_SHAPE_2D
    assert image.dtype == np.float32 and labels.dtype == np.int64
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(np.unique(labels)) <= set(range(len(LABEL_NAMES)))
    # CT-like: air outside the body is black, bone is saturated, labelled organs are soft tissue
    assert image[0, 0] == 0.0 and image[-1, -1] == 0.0
    assert (image == 1.0).sum() > 50
    liver = image[labels == LABEL_NAMES.index("liver")]
    lo, hi = WINDOW
    assert (0 - lo) / (hi - lo) < liver.mean() < 1.0  # denser than water, below bone


def test_small_organs_present_and_small():
    pancreas, gallbladder, liver = (
        LABEL_NAMES.index(k) for k in ("pancreas", "gallbladder", "liver")
    )
    areas = {k: [] for k in ORGANS}
    for seed in range(6):
        _, labels = make_phantom(seed)
        for k in ORGANS:
            areas[k].append(int((labels == k).sum()))
    for k in (pancreas, gallbladder):
        assert min(areas[k]) > 0, f"{LABEL_NAMES[k]} missing in some subject"
        assert np.median(areas[k]) < 0.25 * np.median(areas[liver])
        assert max(areas[k]) < 0.05 * np.prod(DEFAULT_SHAPE_2D)
    # every organ appears in most subjects at the reference level
    for k in ORGANS:
        assert sum(a > 0 for a in areas[k]) >= 5, LABEL_NAMES[k]


def test_3d_small_shape_all_organs():
    shape = (48, 40, 64)
    image, labels = make_phantom(1, ndim=3, shape=shape)
    assert image.shape == labels.shape == shape
    assert image.dtype == np.float32 and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(len(LABEL_NAMES)))
    sp = phantom_spacing(3, shape)
    assert len(sp) == 3 and sp[0] == sp[1] > 0


def test_deterministic_per_seed_and_seed_forms():
    a = make_phantom(3, shape=(64, 80))
    b = make_phantom(3, shape=(64, 80))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = make_phantom(4, shape=(64, 80))
    assert not np.array_equal(a[1], c[1])
    d = make_phantom((0, 3), shape=(64, 80))  # PhantomDataset's (seed, index) form
    assert not np.array_equal(a[0], d[0])
    np.testing.assert_array_equal(d[1], make_phantom([0, 3], shape=(64, 80))[1])


def test_variability_between_subjects():
    subjects = [make_phantom(s)[1] for s in range(5)]
    scores = [_dice(subjects[i], subjects[j], ORGANS) for i in range(5) for j in range(5) if i != j]
    mean = float(np.mean(scores))
    assert mean < 0.6, f"subjects too similar (mean Dice {mean:.2f})"
    assert mean > 0.05, f"subjects do not overlap at all (mean Dice {mean:.2f})"
    # body size differs between subjects
    bodies = [int((make_phantom(s)[0] > 0.05).sum()) for s in range(4)]
    assert max(bodies) > 1.1 * min(bodies)


def test_2d_is_axial_plane_of_3d():
    # a 3D grid with the 2D in-plane spacing and a sample at z = 0 (odd number of slices)
    image2, labels2 = make_phantom(2)
    rows, cols = DEFAULT_SHAPE_2D
    image3, labels3 = make_phantom(2, ndim=3, shape=(cols, rows, 9))
    plane = labels3[:, :, 4].T  # (x, y) -> (rows = y, cols = x)
    assert phantom_spacing(3, (cols, rows, 9))[:2] == phantom_spacing(2)
    # equal up to the through-plane deformation (left out in 2D) and texture
    assert (plane == labels2).mean() > 0.9
    assert _dice(plane, labels2, ORGANS) > 0.7


def test_any_shape_works():
    image, labels = make_phantom(0, shape=(40, 50))
    assert image.shape == (40, 50) and labels.max() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ndim": 4}, "ndim"),
        ({"shape": (4, 4)}, "shape"),
        ({"shape": (64, 64, 64)}, "shape"),
        ({"shape": "abc"}, "shape"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        make_phantom(0, **kwargs)


def test_bad_seed():
    with pytest.raises(InputError, match="seed"):
        make_phantom(-1)


def test_fast_enough():
    make_phantom(0)
    t0 = time.process_time()
    for s in range(5):
        make_phantom(s)
    per = (time.process_time() - t0) / 5
    assert per < 0.3, f"2D phantom took {per:.3f} s of CPU"


def test_contrast_phase_differs_between_subjects():
    aorta, liver = LABEL_NAMES.index("aorta"), LABEL_NAMES.index("liver")
    means = []
    for seed in range(10):
        image, labels = make_phantom(seed, shape=(96, 120))
        means.append((image[labels == aorta].mean(), image[labels == liver].mean()))
    aorta_means, liver_means = np.array(means).T
    # native blood (~40 HU) against arterial enhancement (~300 HU, saturated)
    assert aorta_means.max() - aorta_means.min() > 0.3
    assert liver_means.max() - liver_means.min() > 0.08
