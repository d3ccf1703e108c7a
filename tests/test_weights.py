"""Tests of cmrprep.weights on hand-computed counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmrprep import weights
from cmrprep.plan import WEIGHT_SCHEMES, ConfigError

COUNTS = [900, 50, 30, 20]


def _mean_one(w):
    assert len(w) == 4
    assert np.all(np.isfinite(w))
    assert np.mean(w) == pytest.approx(1.0)


def test_inverse_frequency_hand_computed():
    raw = np.array([1000 / (4 * n) for n in COUNTS])
    w = weights.inverse_frequency(COUNTS)
    _mean_one(w)
    np.testing.assert_allclose(w, raw * 4 / raw.sum())
    assert w[3] / w[1] == pytest.approx(50 / 20)


def test_median_frequency_hand_computed():
    # three slices of 100 voxels: bg in all, RV and MYO in two, LV in one.
    table = np.array([[100, 0, 0, 0], [80, 10, 10, 0], [70, 10, 10, 10]])
    freq = np.array([250 / 300, 20 / 200, 20 / 200, 10 / 100])
    raw = np.median(freq) / freq
    w = weights.median_frequency(table)
    _mean_one(w)
    np.testing.assert_allclose(w, raw * 4 / raw.sum())
    np.testing.assert_allclose(weights.median_frequency(table.sum(0), [300, 200, 200, 100]), w)


def test_median_frequency_needs_presence_for_totals():
    with pytest.raises(ValueError, match="image_presence_voxels"):
        weights.median_frequency(COUNTS)


def test_enet_hand_computed():
    raw = np.array([1 / np.log(1.02 + n / 1000) for n in COUNTS])
    w = weights.enet(COUNTS)
    _mean_one(w)
    np.testing.assert_allclose(w, raw * 4 / raw.sum())


def test_effective_number_hand_computed():
    beta = 0.99
    raw = np.array([(1 - beta) / (1 - beta ** n) for n in COUNTS])
    np.testing.assert_allclose(weights.effective_number(COUNTS, beta), raw * 4 / raw.sum())
    assert weights.default_beta(COUNTS) == pytest.approx(1 - 1 / 900)


def test_effective_number_not_degenerate_at_voxel_scale():
    big = np.array(COUNTS) * 1_000_000  # counts in the tens of millions
    default = weights.effective_number(big)
    fixed = weights.effective_number(big, beta=0.9999)
    assert max(default) / min(default) > 1.5
    assert max(fixed) / min(fixed) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("fn", [weights.inverse_frequency, weights.enet, weights.effective_number])
def test_absent_class_gets_max_of_others(fn):
    w = fn([900, 0, 30, 20])
    _mean_one(w)
    assert w[1] == pytest.approx(max(w[0], w[2], w[3]))


def test_absent_class_median_frequency():
    table = np.array([[90, 0, 5, 5], [100, 0, 0, 0]])
    w = weights.median_frequency(table)
    _mean_one(w)
    assert w[1] == pytest.approx(max(w[0], w[2], w[3]))


def test_all_zero_counts_are_ones():
    assert weights.inverse_frequency([0, 0, 0, 0]) == [1.0] * 4


def test_compute_all_json_and_default():
    table = np.array([[100, 0, 0, 0], [80, 10, 10, 0], [70, 10, 10, 10]])
    out = weights.compute_all(table, "enet")
    json.dumps(out)
    assert out["default"] == "enet"
    assert list(out["weights"]) == list(WEIGHT_SCHEMES)
    for w in out["weights"].values():
        _mean_one(w)


def test_unknown_scheme_lists_valid_ones():
    with pytest.raises(ConfigError, match="median_frequency.*enet"):
        weights.compute_all(np.ones((2, 4), np.int64), "focal")


def test_bad_beta_and_counts():
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        weights.effective_number(COUNTS, beta=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        weights.inverse_frequency([10, -1, 2, 3])
