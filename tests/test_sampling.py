"""Tests of cmrprep.sampling: foreground share, class balance, draws, replication."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmrprep import sampling
from cmrprep.plan import ConfigError


def _dataset(n=1000, fg_rate=0.1, rv_rate=0.3, seed=0) -> np.ndarray:
    """Slices of 1000 voxels; foreground slices hold MYO+LV, some also RV (rare class)."""
    rng = np.random.default_rng(seed)
    c = np.zeros((n, 4), dtype=np.int64)
    fg = rng.random(n) < fg_rate
    rv = fg & (rng.random(n) < rv_rate)
    c[fg, 2], c[fg, 3], c[rv, 1] = 30, 50, 20
    c[:, 0] = 1000 - c[:, 1:].sum(axis=1)
    return c


def test_weights_sum_to_one_and_reach_share():
    c = _dataset(fg_rate=0.1)
    w = sampling.sampling_weights(c, foreground_share=1 / 3)
    assert w.dtype == np.float64 and w.shape == (len(c),)
    assert w.sum() == pytest.approx(1.0) and w.min() > 0
    assert sampling.expected_class_share(c, w)["foreground_slices"] >= 1 / 3 - 1e-12


def test_natural_share_kept_when_larger():
    c = _dataset(fg_rate=0.6)
    natural = (c[:, 1:].sum(1) > 0).mean()
    w = sampling.sampling_weights(c, foreground_share=1 / 3)
    assert sampling.expected_class_share(c, w)["foreground_slices"] == pytest.approx(natural)


def test_rare_class_presence_increases():
    c = _dataset()
    uniform = np.full(len(c), 1 / len(c))
    balanced = sampling.sampling_weights(c, balance_classes=True)
    flat = sampling.sampling_weights(c, balance_classes=False)
    rv = lambda w: sampling.expected_class_share(c, w)["slice_presence"][1]  # noqa: E731
    assert rv(balanced) > rv(flat) > rv(uniform)
    # flat: fg slices uniform among themselves
    fg = c[:, 1:].sum(1) > 0
    assert np.ptp(flat[fg]) == pytest.approx(0.0)


def test_balanced_rule_matches_formula():
    # 2 bg slices; fg slices {RV}, {MYO, LV}, {MYO, LV}, {MYO}: K = 3 classes,
    # in 1 (RV), 3 (MYO), 2 (LV) slices -> within-fg weights 1/3, 1/9 + 1/6 (x2), 1/9.
    c = np.array([[10, 0, 0, 0], [10, 0, 0, 0], [5, 5, 0, 0], [4, 0, 3, 3], [4, 0, 3, 3],
                  [7, 0, 3, 0]])
    w = sampling.sampling_weights(c, foreground_share=0.5)  # natural share 4/6 > 0.5 is kept
    within = np.array([1 / 3, 5 / 18, 5 / 18, 1 / 9])
    np.testing.assert_allclose(w, [1 / 6, 1 / 6] + list(2 / 3 * within))
    w_low = sampling.sampling_weights(c, foreground_share=0.9)
    np.testing.assert_allclose(w_low, [0.05, 0.05] + list(0.9 * within))


def test_edge_cases(caplog):
    none_fg = np.array([[10, 0, 0, 0]] * 4)
    np.testing.assert_allclose(sampling.sampling_weights(none_fg), 0.25)
    assert "no slice contains foreground" in caplog.text
    all_fg = np.array([[5, 5, 0, 0]] * 3)
    np.testing.assert_allclose(sampling.sampling_weights(all_fg), 1 / 3)
    with pytest.raises(ConfigError, match="foreground_share"):
        sampling.sampling_weights(none_fg, foreground_share=1.5)
    with pytest.raises(ValueError, match="no slices"):
        sampling.sampling_weights(np.zeros((0, 4)))


def test_expected_class_share_json():
    c = _dataset()
    out = sampling.expected_class_share(c, sampling.sampling_weights(c))
    json.dumps(out)
    assert sum(out["voxel_share"]) == pytest.approx(1.0)
    assert out["slice_presence"][0] == pytest.approx(1.0)


def test_empirical_draw_matches_expectation():
    c = _dataset()
    w = sampling.sampling_weights(c)
    idx = sampling.draw(w, 20000, np.random.default_rng(123))
    fg = c[:, 1:].sum(1) > 0
    expected = sampling.expected_class_share(c, w)
    assert fg[idx].mean() == pytest.approx(expected["foreground_slices"], abs=0.02)
    assert (c[idx, 1] > 0).mean() == pytest.approx(expected["slice_presence"][1], abs=0.02)
    np.testing.assert_array_equal(idx, sampling.draw(w, 20000, 123))


def test_replicate_indices_deterministic_and_proportional():
    c = _dataset()
    w = sampling.sampling_weights(c)
    a = sampling.replicate_indices(w, seed=7)
    np.testing.assert_array_equal(a, sampling.replicate_indices(w, seed=7))
    assert not np.array_equal(a, sampling.replicate_indices(w, seed=8))
    reps = np.bincount(a, minlength=len(w))
    assert reps.min() >= 1
    fg = c[:, 1:].sum(1) > 0
    assert fg[a].mean() == pytest.approx(1 / 3, abs=0.02)
    assert not np.array_equal(a, np.sort(a))  # shuffled
    b = sampling.replicate_indices(w, n_total=5000, seed=0)
    assert len(b) >= 5000
    np.testing.assert_allclose(np.bincount(b, minlength=len(w)) / len(b), w, atol=1.0 / 5000 * 2)


def test_replicate_zero_weight_excluded():
    idx = sampling.replicate_indices(np.array([0.0, 0.25, 0.75]), n_total=8, seed=0)
    assert np.bincount(idx, minlength=3).tolist() == [0, 2, 6]
