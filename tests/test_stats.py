"""Tests of cmrprep.stats: per-slice counts (map), merge and summary (reduce)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmrprep import stats


def _tiny() -> np.ndarray:
    lab = np.zeros((3, 4, 4), dtype=np.uint8)
    lab[1, :2, :2] = 1
    lab[2, 0, :] = 3
    lab[2, 1, 1] = 2
    return lab


def test_slice_class_counts_tiny():
    counts = stats.slice_class_counts(_tiny())
    assert counts.dtype == np.int64
    assert counts.tolist() == [[16, 0, 0, 0], [12, 4, 0, 0], [11, 0, 1, 4]]


def test_slice_class_counts_matches_loop():
    lab = np.random.default_rng(0).integers(0, 4, size=(7, 5, 6), dtype=np.uint8)
    loop = np.stack([np.bincount(s.ravel(), minlength=4) for s in lab])
    np.testing.assert_array_equal(stats.slice_class_counts(lab), loop)


def test_slice_class_counts_empty_and_errors():
    assert stats.slice_class_counts(np.zeros((0, 4, 4), np.uint8)).shape == (0, 4)
    with pytest.raises(ValueError, match="values must be in 0..3"):
        stats.slice_class_counts(np.full((1, 2, 2), 4, np.uint8))
    with pytest.raises(ValueError, match=r"\(S, H, W\)"):
        stats.slice_class_counts(np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="integer dtype"):
        stats.slice_class_counts(np.zeros((1, 2, 2), np.float32))


def test_does_not_mutate_input():
    lab = _tiny()
    before = lab.copy()
    stats.slice_class_counts(lab)
    np.testing.assert_array_equal(lab, before)


def test_merge_counts():
    a = stats.slice_class_counts(_tiny())
    merged = stats.merge_counts([a, a[:1]])
    assert merged.shape == (4, 4)
    assert stats.merge_counts([]).shape == (0, 4)
    with pytest.raises(ValueError, match="number of classes"):
        stats.merge_counts([a, np.zeros((1, 3), np.int64)])


def test_summarize_values_and_json():
    s = stats.summarize(stats.slice_class_counts(_tiny()), frame_ids=[0, 0, 1])
    json.dumps(s)
    assert s["n_slices"] == 3 and s["n_voxels"] == 48
    assert s["class_counts"] == [39, 4, 1, 4]
    assert s["class_fractions"] == pytest.approx([39 / 48, 4 / 48, 1 / 48, 4 / 48])
    assert s["slice_presence"] == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3])
    assert s["empty_slice_share"] == pytest.approx(1 / 3)
    assert s["foreground_slice_share"] == pytest.approx(2 / 3)
    assert s["n_frames"] == 2 and s["frame_presence"] == pytest.approx([1.0, 0.5, 0.5, 0.5])
    assert s["classes"] == ["background", "RV", "MYO", "LV"]


def test_summarize_empty_table():
    s = stats.summarize(np.zeros((0, 4), np.int64))
    assert s["n_slices"] == 0 and s["class_fractions"] == [0.0] * 4


def test_presence_voxels():
    counts = np.array([[100, 0, 0, 0], [80, 10, 10, 0], [70, 10, 10, 10]])
    assert stats.presence_voxels(counts).tolist() == [300, 200, 200, 100]


def test_summarize_equals_after_merge():
    """Map-then-reduce: summarising merged per-case tables equals the whole stack."""
    lab = np.random.default_rng(1).integers(0, 4, size=(9, 3, 3), dtype=np.uint8)
    parts = [stats.slice_class_counts(lab[i:i + 4]) for i in range(0, 9, 4)]
    assert stats.summarize(stats.merge_counts(parts)) == stats.summarize(stats.slice_class_counts(lab))
