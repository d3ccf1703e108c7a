"""Prediction geometry: preprocess -> identity 'prediction' -> inverse -> file equals the input label.

Covers oblique affines, odd matrix sizes, flipped axes and NIfTI-2 through the real readers and the
real writer used by ``pipelines.predict``; plus label-free heart localisation on synthetic cines.
"""

import nibabel as nib
import numpy as np
import pytest

from cmrprep.crop import center_from_label
from cmrprep.localize import center_from_cine
from cmrprep.plan import Plan
from cmrprep.preprocess import preprocess_frame, restore_prediction
from cmrprep.synthetic import generate_case
from pipelines.ingest import read_volume
from pipelines.predict import _write_label


def _affine(flip: bool, theta_deg: float, spacing=(1.3, 1.7, 8.0)) -> np.ndarray:
    t = np.deg2rad(theta_deg)
    rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    if flip:
        a[:3, 0] *= -1
        a[:3, 1] *= -1
    a[:3, 3] = [31.0, -12.5, 80.0]
    return a


def _label(shape) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    ci, cj = shape[0] // 2 + 3, shape[1] // 2 - 4
    ii, jj = np.indices(shape[:2])
    r = np.hypot(ii - ci, jj - cj)
    for k in range(1, shape[2] - 1):
        lab[..., k][r < 14] = 2
        lab[..., k][r < 9] = 3
        lab[..., k][(np.hypot(ii - ci, jj - cj - 16) < 8) & (r >= 14)] = 1
    return lab


@pytest.mark.parametrize("nifti, shape, flip, theta", [
    (nib.Nifti1Image, (97, 83, 7), False, 25.0),
    (nib.Nifti2Image, (101, 90, 9), True, -40.0),
    (nib.Nifti2Image, (64, 77, 5), True, 0.0),
])
def test_identity_prediction_round_trips_exactly(tmp_path, nifti, shape, flip, theta):
    aff = _affine(flip, theta)
    lab = _label(shape)
    img = (lab * 100 + np.random.default_rng(0).normal(0, 5, shape)).astype(np.float32)
    src = tmp_path / "case_frame01.nii.gz"
    nib.save(nifti(img, aff), src)
    image, geom = read_volume(src, case_id="case")
    # in-plane spacing equal on both axes so that resampling is the identity on this grid
    plan = Plan(target_spacing=1.5, crop_shape=(80, 80))
    geom_iso = geom.from_affine(_affine(flip, theta, (1.5, 1.5, 8.0)), shape)
    prepared = preprocess_frame(image, lab, geom_iso, plan)
    restored = restore_prediction(prepared.labels, prepared.record)
    out = tmp_path / "case_frame01_pred.nii.gz"
    nib.save(nifti(img, geom_iso.matrix), src)
    _write_label(out, restored, str(src), geom_iso)
    back = nib.load(out)
    np.testing.assert_array_equal(np.asarray(back.dataobj), lab)
    np.testing.assert_allclose(back.affine, geom_iso.matrix, atol=1e-5)
    assert back.get_data_dtype() == np.uint8


def test_round_trip_with_spacing_change_keeps_dice(tmp_path):
    shape = (97, 83, 7)
    aff = _affine(True, 30.0)
    lab = _label(shape)
    img = (lab * 100.0).astype(np.float32)
    from cmrprep.geometry import Geometry

    geom = Geometry.from_affine(aff, shape)
    prepared = preprocess_frame(img, lab, geom, Plan(target_spacing=1.25, crop_shape=(96, 96)))
    restored = restore_prediction(prepared.labels, prepared.record)
    assert restored.shape == shape
    for c in (1, 2, 3):
        inter = np.logical_and(restored == c, lab == c).sum()
        assert 2 * inter / ((restored == c).sum() + (lab == c).sum()) > 0.93, c


@pytest.mark.parametrize("index", [0, 1, 2])
def test_label_free_localisation_error_in_mm(index):
    case = generate_case(7, index, full_cine=True)
    geom = case.geometry
    cine = np.stack([case.intensity(t) for t in case.frames], axis=-1)
    ci, cj = center_from_cine(cine, geom)
    ed_label = case.labels[case.ed]
    ti, tj = center_from_label(ed_label)
    k = (geom.shape[2] - 1) / 2
    err = np.linalg.norm(geom.voxel_to_world([ci, cj, k]) - geom.voxel_to_world([ti, tj, k]))
    assert err < 15.0, f"cine localisation error {err:.1f} mm"
