"""Frame preprocessing and its inverse (cmrprep.preprocess)."""

import json

import numpy as np
import pytest

from cmrprep.geometry import Geometry
from cmrprep.plan import ConfigError, Plan
from cmrprep.preprocess import preprocess_frame, restore_prediction


def _affine(spacing, seed, slice_axis=2, left_handed=False):
    rot, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    if left_handed:
        rot[:, 0] *= -1
    sp = list(spacing)
    sp[2], sp[slice_axis] = sp[slice_axis], sp[2]
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(sp)
    aff[:3, 3] = [-20.0, 35.0, 11.0]
    return aff


def _case(shape, spacing, seed=0, slice_axis=2, left_handed=False):
    """Oblique heart phantom: image + label in the input layout (slice axis anywhere)."""
    rng = np.random.default_rng(seed)
    canon = (shape[0], shape[1], shape[2])
    ii, jj = np.meshgrid(np.arange(canon[0]), np.arange(canon[1]), indexing="ij")
    lab = np.zeros(canon, np.uint8)
    c = np.array(canon[:2]) / 2 + rng.uniform(-5, 5, 2)
    for k in range(canon[2]):
        x, y = (ii - c[0]) * spacing[0], (jj - c[1]) * spacing[1]
        r, r_lv = np.hypot(x, y), 20 - 1.5 * k
        lab[..., k][(np.hypot(x + 22, y - 12) < 24) & (r > r_lv + 8)] = 1
        lab[..., k][r < r_lv + 8] = 2
        lab[..., k][r < r_lv] = 3
    img = (rng.normal(100, 10, canon) + 300 * (lab == 3) + 200 * (lab == 1)).astype(np.int16)
    order = [0, 1, 2]
    order[2], order[slice_axis] = order[slice_axis], order[2]
    img, lab = np.transpose(img, order), np.transpose(lab, order)
    geo = Geometry.from_affine(_affine(spacing, seed, slice_axis, left_handed), img.shape)
    return img, lab, geo


@pytest.mark.parametrize("shape,slice_axis,left", [((61, 47, 5), 2, False), ((53, 59, 3), 0, True),
                                                   ((45, 51, 4), 1, False)])
def test_round_trip_exact_at_same_spacing(shape, slice_axis, left):
    img, lab, geo = _case(shape, (1.3, 1.3, 8.0), seed=slice_axis, slice_axis=slice_axis,
                          left_handed=left)
    keep = (img.copy(), lab.copy())
    plan = Plan(target_spacing=1.3, crop_shape=(64, 64), crop_jitter_mm=6.0)
    p = preprocess_frame(img, lab, geo, plan, rng=np.random.default_rng(0))
    assert p.images.shape == p.labels.shape == (shape[2], 64, 64)
    assert p.images.dtype == np.dtype(plan.store_dtype) and p.labels.dtype == np.uint8
    np.testing.assert_array_equal(restore_prediction(p.labels, p.record), lab)
    np.testing.assert_array_equal(img, keep[0])
    np.testing.assert_array_equal(lab, keep[1])
    rec = json.loads(json.dumps(p.record))
    np.testing.assert_array_equal(restore_prediction(p.labels, rec), lab)
    assert rec["foreground_outside_crop"] == 0 and rec["crop_fits"]


def test_round_trip_dice_with_spacing_change_and_counts():
    img, lab, geo = _case((71, 65, 5), (1.5625, 1.5625, 8.0), seed=3, left_handed=True)
    plan = Plan(target_spacing=1.25, crop_shape=(80, 80))
    p = preprocess_frame(img, lab, geo, plan)
    back = restore_prediction(p.labels, p.record)
    assert back.shape == lab.shape and back.dtype == np.uint8
    for c in (1, 2, 3):
        a, b = lab == c, back == c
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.97
    assert p.class_counts.shape == p.class_counts_raw.shape == (5, 4)
    assert (p.class_counts.sum(axis=1) == 80 * 80).all()
    np.testing.assert_array_equal(p.class_counts[:, 1:], p.class_counts_raw[:, 1:])
    assert p.record["class_counts"] == p.class_counts.sum(axis=0).tolist()
    for k in range(5):
        assert np.bincount(p.labels[k].ravel(), minlength=4).tolist() == p.class_counts[k].tolist()
    assert abs(float(p.images.mean())) < 1.0


def test_jitter_keeps_foreground_and_is_seeded():
    img, lab, geo = _case((61, 61, 4), (1.5, 1.5, 8.0), seed=5)
    plan = Plan(target_spacing=1.5, crop_shape=(64, 64), crop_jitter_mm=30.0)
    centres = set()
    for seed in range(20):
        p = preprocess_frame(img, lab, geo, plan, rng=np.random.default_rng(seed))
        assert p.record["foreground_outside_crop"] == 0
        assert (p.class_counts[:, 1:] == p.class_counts_raw[:, 1:]).all()
        centres.add(tuple(p.record["center"]))
    assert len(centres) > 10
    a = preprocess_frame(img, lab, geo, plan, rng=np.random.default_rng(3))
    b = preprocess_frame(img, lab, geo, plan, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a.images, b.images)


def test_without_label_given_centre_fallback_pad_and_float16():
    img, lab, geo = _case((41, 37, 3), (1.5, 1.5, 8.0), seed=6)
    plan = Plan(target_spacing=1.5, crop_shape=(64, 64), store_dtype="float16")
    ref = preprocess_frame(img, lab, geo, plan)
    world = geo.voxel_to_world(np.array([20.0, 18.0, 1.0]))
    p = preprocess_frame(img, None, geo, plan, center=world)
    assert p.labels is None and p.class_counts is None and p.images.dtype == np.float16
    assert p.record["center_source"] == "given"
    f = preprocess_frame(img, None, geo, plan)
    assert f.record["center_source"] == "fallback"
    assert ref.images.shape == (3, 64, 64)  # 41 x 37 image padded to 64 x 64
    assert np.isclose(float(ref.images[0, 0, 0]), float(ref.images.min()))


def test_errors():
    img, lab, geo = _case((20, 20, 2), (1.5, 1.5, 8.0))
    with pytest.raises(ConfigError, match="target_spacing is not resolved"):
        preprocess_frame(img, lab, geo, Plan())
    plan = Plan(target_spacing=1.5, crop_shape=(32, 32))
    with pytest.raises(ValueError, match="label shape"):
        preprocess_frame(img, lab[:, :, :1], geo, plan)
    p = preprocess_frame(img, lab, geo, plan)
    with pytest.raises(ValueError, match="pred must have shape"):
        restore_prediction(p.labels[:1], p.record)


def test_heart_larger_than_crop_is_recorded_and_voxel_centre_accepted():
    img, lab, geo = _case((61, 47, 3), (1.3, 1.3, 8.0), seed=2)
    p = preprocess_frame(img, lab, geo, Plan(target_spacing=1.3, crop_shape=(32, 32)))
    rec = p.record
    assert not rec["crop_fits"] and rec["foreground_outside_crop"] > 0
    assert rec["heart_extent_mm"][0] > 32 * 1.3
    q = preprocess_frame(img, None, geo, Plan(target_spacing=1.3, crop_shape=(32, 32)),
                         center=(30.0, 23.0))
    assert q.record["center_source"] == "given"
    world = geo.voxel_to_world(np.array([30.0, 23.0, 1.0]))
    r = preprocess_frame(img, None, geo, Plan(target_spacing=1.3, crop_shape=(32, 32)),
                         center=world)
    np.testing.assert_allclose(q.record["center"], r.record["center"], atol=1e-6)
