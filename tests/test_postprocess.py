"""Post-processing keeps the heart and drops isolated false positives."""

import numpy as np

from cmrprep.postprocess import largest_foreground_component


def test_keeps_largest_component_with_all_its_classes():
    lab = np.zeros((20, 20, 4), np.uint8)
    lab[5:12, 5:12, 1:3] = 2
    lab[7:10, 7:10, 1:3] = 3
    lab[12:14, 6:9, 1:3] = 1           # touches the myocardium: same component
    lab[18:20, 18:20, 0] = 3           # isolated blob
    out = largest_foreground_component(lab)
    assert out[18:20, 18:20, 0].sum() == 0
    np.testing.assert_array_equal(out[:15], lab[:15])
    assert lab[18, 18, 0] == 3         # input untouched


def test_empty_and_single_component_are_unchanged():
    z = np.zeros((4, 4, 2), np.uint8)
    np.testing.assert_array_equal(largest_foreground_component(z), z)
    one = z.copy(); one[1:3, 1:3] = 2
    np.testing.assert_array_equal(largest_foreground_component(one), one)
