"""Evaluation metrics against hand-computed values on small arrays."""

import math

import numpy as np
import pytest

from cmrprep.metrics import dice, ejection_fraction, hd95, per_class_metrics, volume_ml


def test_dice_hand_computed():
    p = np.zeros((4, 4), bool); p[0, :3] = True          # 3 voxels
    g = np.zeros((4, 4), bool); g[0, 1:] = True          # 3 voxels, overlap 2
    assert dice(p, g) == pytest.approx(2 * 2 / 6)


def test_dice_both_empty_is_nan_one_empty_is_zero():
    z = np.zeros((3, 3), bool)
    o = z.copy(); o[1, 1] = True
    assert math.isnan(dice(z, z))
    assert dice(o, z) == 0.0


def test_hd95_of_shifted_square_uses_spacing():
    g = np.zeros((20, 20, 1), bool); g[5:10, 5:10] = True
    p = np.roll(g, 2, axis=0)                              # shift 2 voxels along i
    assert hd95(p, g, (1.5, 1.0, 8.0)) == pytest.approx(3.0)  # 2 voxels x 1.5 mm
    assert hd95(g, g, (1.5, 1.0, 8.0)) == 0.0


def test_hd95_empty_is_nan():
    g = np.zeros((5, 5, 2), bool); g[2, 2, 0] = True
    assert math.isnan(hd95(np.zeros_like(g), g, (1, 1, 1)))


def test_volume_and_ef():
    m = np.zeros((10, 10, 10), bool); m[:5, :4, :2] = True   # 40 voxels
    assert volume_ml(m, (1.25, 1.25, 8.0)) == pytest.approx(40 * 12.5 / 1000)
    assert ejection_fraction(150.0, 60.0) == pytest.approx(60.0)
    assert math.isnan(ejection_fraction(0.0, 0.0))


def test_per_class_metrics_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="prediction shape"):
        per_class_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), (1, 1, 1))


def test_per_class_metrics_values():
    gt = np.zeros((6, 6, 2), np.uint8); gt[1:3, 1:3] = 3; gt[4, 4] = 1
    pred = gt.copy(); pred[1, 1, 0] = 0
    m = per_class_metrics(pred, gt, (1, 1, 1))
    assert m[1]["dice"] == 1.0
    assert math.isnan(m[2]["dice"])
    assert m[3]["dice"] == pytest.approx(2 * 7 / 15)
    assert m[3]["volume_gt_ml"] == pytest.approx(8 / 1000)


def test_clinical_rows_volumes_ef_and_myocardial_mass():
    from pipelines.evaluate import clinical_rows

    def row(phase, cls, pred, gt):
        return {"case_id": "p1", "phase": phase, "class": cls, "volume_pred_ml": pred, "volume_gt_ml": gt}

    rows = [row("ED", "LV", 150.0, 160.0), row("ES", "LV", 60.0, 64.0),
            row("ED", "RV", 170.0, 170.0), row("ES", "RV", 85.0, 85.0),
            row("ED", "MYO", 100.0, 110.0), row("ES", "MYO", 105.0, 112.0)]
    lv, rv = sorted(clinical_rows(rows), key=lambda r: r["structure"])
    assert lv["ef_gt_pct"] == pytest.approx(60.0) and lv["ef_pred_pct"] == pytest.approx(60.0)
    assert lv["edv_error_ml"] == pytest.approx(-10.0)
    assert lv["myo_mass_gt_g"] == pytest.approx(115.5) and lv["myo_mass_error_g"] == pytest.approx(-10.5)
    assert rv["ef_gt_pct"] == pytest.approx(50.0) and "myo_mass_gt_g" not in rv
    assert clinical_rows(rows[:1]) == []  # ED without ES: no clinical row
