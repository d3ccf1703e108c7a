"""Crop around the heart (cmrprep.crop)."""

import json

import numpy as np
import pytest

from cmrprep.crop import (CropBox, CropError, center_from_label, check_crop_fits, crop,
                          crop_box_around, foreground_extent, foreground_outside,
                          jittered_center, uncrop)


def _label(shape=(100, 90, 4)):
    lab = np.zeros(shape, np.uint8)
    lab[10:40, 5:30, 1] = 1
    lab[20:50, 15:45, 2] = 3
    lab[45:52, 20:25, 3] = 2
    return lab


def test_center_and_box():
    lab = _label()
    assert center_from_label(lab) == ((10 + 51) / 2, (5 + 44) / 2)
    box = crop_box_around((63.5, 63.5), (128, 128), (200, 200))
    assert box.start == (0, 0) and box.stop == (128, 128)
    assert CropBox.from_dict(json.loads(json.dumps(box.to_dict()))) == box
    with pytest.raises(ValueError, match="no foreground"):
        center_from_label(np.zeros((4, 4, 2), np.uint8))


def test_crop_holds_foreground_and_uncrop_inverse():
    lab = _label()
    box = crop_box_around(center_from_label(lab), (64, 64), lab.shape[:2])
    c = crop(lab, box)
    assert c.shape == (64, 64, 4)
    assert foreground_outside(lab, box) == 0 and (c > 0).sum() == (lab > 0).sum()
    back = uncrop(c, box)
    np.testing.assert_array_equal(back[box.start[0]:box.stop[0], box.start[1]:box.stop[1]],
                                  lab[box.start[0]:box.stop[0], box.start[1]:box.stop[1]])
    np.testing.assert_array_equal(back, lab)  # all foreground inside -> exact


def test_pad_when_image_smaller_than_crop():
    img = np.arange(30 * 20 * 2, dtype=np.float32).reshape(30, 20, 2)
    box = crop_box_around((14.5, 9.5), (48, 40), (30, 20))
    assert box.start == (-9, -10)
    c = crop(img, box, fill=-3.0)
    assert c.shape == (48, 40, 2)
    np.testing.assert_array_equal(c[9:39, 10:30], img)
    assert (c[:9] == -3).all() and (c[:, :10] == -3).all()
    np.testing.assert_array_equal(uncrop(c, box), img)


def test_jitter_keeps_all_foreground_inside():
    lab = np.zeros((120, 120, 3), np.uint8)
    lab[5:60, 2:55, 0] = 2  # heart near the corner, 55 x 53 px
    lab[30:62, 20:50, 2] = 1
    center = center_from_label(lab)
    rng = np.random.default_rng(0)
    shifts = []
    for _ in range(300):
        c = jittered_center(center, lab, (64, 64), 15.0, rng)
        box = crop_box_around(c, (64, 64), lab.shape[:2])
        assert foreground_outside(lab, box) == 0
        shifts.append(np.hypot(c[0] - center[0], c[1] - center[1]))
    assert max(shifts) <= 15.0 + 1e-9 and np.mean(shifts) > 1.0
    big = jittered_center(center, lab, (40, 40), 15.0, np.random.default_rng(1))
    assert big == center  # heart larger than crop: no shift
    a = jittered_center(center, lab, (64, 64), 15.0, np.random.default_rng(7))
    assert a == jittered_center(center, lab, (64, 64), 15.0, np.random.default_rng(7))


def test_foreground_outside_and_crop_fit_check():
    lab = _label()
    box = CropBox((0, 0), (30, 30), lab.shape[:2])
    assert foreground_outside(lab, box) == int((lab > 0).sum() - (lab[:30, :30] > 0).sum())
    assert foreground_extent(lab) == (42, 40)
    check_crop_fits(lab, (64, 64), 1.25)
    with pytest.raises(CropError, match="crop smaller than the heart: need at least 52 x 50 mm"):
        check_crop_fits(lab, (32, 32), 1.25)


def test_errors():
    box = CropBox((0, 0), (4, 4), (8, 8))
    with pytest.raises(ValueError, match="differs from box.shape"):
        crop(np.zeros((9, 8)), box)
    with pytest.raises(ValueError, match="differs from box.size"):
        uncrop(np.zeros((5, 4)), box)
    with pytest.raises(ValueError, match="jitter_px must be >= 0"):
        jittered_center((1, 1), None, (4, 4), -1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="center must be two finite"):
        crop_box_around((np.nan, 1), (4, 4), (8, 8))
