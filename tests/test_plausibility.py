"""#12: each plausibility flag fires on a crafted case and stays quiet on good (ground-truth) answers."""

from __future__ import annotations

import numpy as np
import pytest

from cmrprep.plausibility import case_flags, crop_flags, frame_flags, input_flags
from cmrprep.preprocess import preprocess_frame
from cmrprep.plan import Plan
from cmrprep.synthetic import generate_case

CLASSES = ("background", "RV", "MYO", "LV")


@pytest.fixture(scope="module", params=[3, 7, 11])
def case(request):
    return generate_case(request.param, 1)


def _codes(flags):
    return sorted(f["code"] for f in flags)


def test_ground_truth_is_plausible(case):
    labels = {"ED": case.labels[case.ed], "ES": case.labels[case.es]}
    spacing = {k: case.geometry.spacing for k in labels}
    assert input_flags(case.cine.shape, case.geometry.spacing) == []
    for phase, lab in labels.items():
        assert frame_flags(lab, spacing[phase], CLASSES, phase) == []
    flags, values = case_flags(labels, spacing, CLASSES)
    assert flags == [], flags
    assert 40 < values["lv_edv_ml"] < 400 and 10 < values["lv_ef_pct"] < 85 and values["myo_mass_g"] > 30
    prepared = preprocess_frame(case.frame(case.ed), case.labels[case.ed], case.geometry, Plan(target_spacing=1.5))
    assert crop_flags(prepared.labels, "ED", 3.0, "cine_first_harmonic") == []


def test_empty_and_missing_classes(case):
    lab = case.labels[case.ed]
    assert _codes(frame_flags(np.zeros_like(lab), case.geometry.spacing, CLASSES, "ED")) == ["empty_prediction"]
    no_rv = np.where(lab == 1, 0, lab)
    flags = frame_flags(no_rv, case.geometry.spacing, CLASSES, "ED")
    assert _codes(flags) == ["missing_class"] and "RV" in flags[0]["message"]


def test_implausible_volumes_and_ef(case):
    ed, es = case.labels[case.ed], case.labels[case.es]
    sp = case.geometry.spacing
    tiny = np.where(ed == 3, 0, ed)  # an under-segmented heart: LV cavity almost gone
    tiny[tuple(np.argwhere(ed == 3)[:5].T)] = 3
    flags, _ = case_flags({"ED": tiny, "ES": es}, {"ED": sp, "ES": sp}, CLASSES)
    msgs = " ".join(f["message"] for f in flags)
    assert "implausible_volume" in _codes(flags) and "LV end-diastolic volume" in msgs
    # the EF of a vanished ED cavity is a huge negative number: the volumes behind it are named
    ef = next(f["message"] for f in flags if "LV ejection fraction" in f["message"])
    assert "(EDV " in ef and " ml, ESV " in ef, ef
    same = {"ED": ed, "ES": ed}  # no contraction: EF 0 %
    flags, values = case_flags(same, {"ED": sp, "ES": sp}, CLASSES)
    assert values["lv_ef_pct"] == 0.0 and "LV ejection fraction 0 %" in " ".join(f["message"] for f in flags)
    huge = {"ED": np.where(ed > 0, 2, 0).astype(np.uint8)}  # everything called myocardium
    flags, _ = case_flags(huge, {"ED": tuple(s * 2 for s in sp)}, CLASSES)
    assert any("myocardial mass" in f["message"] for f in flags)


def test_crop_border_and_localisation(case):
    prepared = preprocess_frame(case.frame(case.ed), case.labels[case.ed], case.geometry, Plan(target_spacing=1.5))
    shifted = np.roll(prepared.labels, prepared.labels.shape[2] // 2, axis=2)  # heart cut by the crop
    flags = crop_flags(shifted, "ED", 3.0, "coarse_network")
    assert _codes(flags) == ["touches_crop_border"]
    assert _codes(crop_flags(prepared.labels, "ED", 45.0, "coarse_network")) == ["low_localisation_confidence"]
    assert _codes(crop_flags(prepared.labels, "ED", None, "fov_centre")) == ["low_localisation_confidence"]


def test_non_cmr_inputs():
    assert _codes(input_flags((256, 256, 192), (1.0, 1.0, 1.0))) == ["non_cmr_input", "non_cmr_input"]
    assert _codes(input_flags((32, 32, 10), (1.5, 1.5, 8.0))) == ["non_cmr_input"]
    assert input_flags((192, 256, 12), (1.4, 1.4, 10.0)) == []


def test_class_sets_without_cardiac_structures_are_not_checked():
    lab = np.zeros((30, 30, 3), np.uint8)
    lab[10:20, 10:20] = 1
    flags, values = case_flags({"F01": lab}, {"F01": (1.0, 1.0, 8.0)}, ("background", "aorta"))
    assert flags == [] and values == {}
