"""Plan: JSON round trip and configuration errors that name the fix."""

import pytest

from cmrprep.plan import ConfigError, Plan


def test_json_round_trip_keeps_every_field():
    plan = Plan(target_spacing=1.25, crop_shape=(96, 112), weight_scheme="enet", seed=7)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.crop_mm == (120.0, 140.0)


@pytest.mark.parametrize("changes, match", [
    ({"weight_scheme": "focal"}, "unknown weight_scheme 'focal'; choose one of"),
    ({"target_spacing": -1.0}, "target_spacing must be > 0"),
    ({"target_spacing": 0.0}, "--spacing"),
    ({"clip_percentiles": (99.0, 1.0)}, "low < high"),
    ({"foreground_share": 1.5}, "foreground_share must be in"),
    ({"crop_shape": (8, 8)}, "crop_shape"),
    ({"store_dtype": "int8"}, "store_dtype"),
])
def test_bad_values_are_rejected_with_the_fix(changes, match):
    with pytest.raises(ConfigError, match=match):
        Plan().updated(**changes)


def test_unknown_key_in_edited_plan_is_named():
    with pytest.raises(ConfigError, match=r"unknown plan key\(s\) \['spacing_mm'\]"):
        Plan.from_dict({"spacing_mm": 1.0})


def test_invalid_json_is_a_config_error():
    with pytest.raises(ConfigError, match="not valid JSON"):
        Plan.from_json("{nope")


def test_crop_mm_converts_to_pixels_at_target_spacing():
    plan = Plan(target_spacing=1.5).with_crop_mm(192)
    assert plan.crop_shape == (128, 128)
