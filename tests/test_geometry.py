"""Geometry: derived quantities and the SimpleITK boundary (LPS, axis order)."""

import numpy as np

from cmrprep.geometry import Geometry, from_sitk, to_sitk


def _oblique_affine():
    theta = np.deg2rad(30)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([1.4, 1.6, 8.0])
    a[:3, 3] = [-100.0, 20.0, 35.5]
    return a


def test_spacing_origin_direction_are_derived_from_affine():
    g = Geometry.from_affine(_oblique_affine(), (11, 13, 5))
    np.testing.assert_allclose(g.spacing, (1.4, 1.6, 8.0))
    np.testing.assert_allclose(g.origin, (-100.0, 20.0, 35.5))
    np.testing.assert_allclose(g.direction.T @ g.direction, np.eye(3), atol=1e-12)


def test_world_voxel_round_trip():
    g = Geometry.from_affine(_oblique_affine(), (11, 13, 5))
    ijk = np.array([[0, 0, 0], [10, 12, 4], [3.5, 2.0, 1.0]])
    np.testing.assert_allclose(g.world_to_voxel(g.voxel_to_world(ijk)), ijk, atol=1e-9)


def test_sitk_round_trip_preserves_values_and_world_positions():
    g = Geometry.from_affine(_oblique_affine(), (11, 13, 5))
    arr = np.arange(11 * 13 * 5, dtype=np.float32).reshape(11, 13, 5)
    img = to_sitk(arr, g)
    back, g2 = from_sitk(img)
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_allclose(g2.matrix, g.matrix, atol=1e-9)
    # the same voxel maps to the same physical point in ITK (LPS) and here (RAS)
    lps = np.array(img.TransformIndexToPhysicalPoint((3, 4, 2)))
    ras = g.voxel_to_world(np.array([3, 4, 2]))
    np.testing.assert_allclose(lps * [-1, -1, 1], ras, atol=1e-9)


def test_dict_round_trip():
    g = Geometry.from_affine(_oblique_affine(), (11, 13, 5))
    assert Geometry.from_dict(g.to_dict()) == g
