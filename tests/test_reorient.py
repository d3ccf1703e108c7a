"""Canonical reorientation (cmrprep.reorient)."""

import json

import numpy as np
import pytest

from cmrprep.geometry import Geometry
from cmrprep.reorient import (Reorientation, apply_reorientation, canonical_reorientation,
                              reorient, undo_reorientation, undo_reorientation_geometry)


def _rotation(seed):
    q = np.random.default_rng(seed).normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _oblique(seed, spacing, shape, left_handed=False):
    rot = _rotation(seed)
    if left_handed:
        rot[:, 0] *= -1
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(spacing)
    aff[:3, 3] = [12.0, -40.0, 7.5]
    return Geometry.from_affine(aff, shape)


@pytest.mark.parametrize("seed,spacing,shape,left", [
    (0, (1.4, 1.6, 8.0), (11, 9, 5), False),
    (1, (8.0, 1.3, 1.3), (4, 13, 7), True),
    (2, (1.2, 10.0, 1.2), (9, 3, 10), False),
    (3, (1.5, 1.5, 1.5), (6, 7, 8), True),
])
def test_world_positions_unchanged_and_round_trip(seed, spacing, shape, left):
    geo = _oblique(seed, spacing, shape, left)
    vals = np.arange(np.prod(shape)).reshape(shape)
    out, geo_c, r = reorient(vals, geo)
    assert geo_c.shape == out.shape
    assert geo_c.spacing[2] == pytest.approx(max(spacing))
    n = np.stack(np.meshgrid(*[np.arange(s) for s in out.shape], indexing="ij"), -1).reshape(-1, 3)
    o = np.stack(np.unravel_index(out.reshape(-1), shape), -1)
    np.testing.assert_allclose(geo_c.voxel_to_world(n), geo.voxel_to_world(o), atol=1e-9)
    np.testing.assert_array_equal(undo_reorientation(out, r), vals)
    back = undo_reorientation_geometry(geo_c, r)
    assert back.shape == geo.shape and back.max_affine_difference(geo) < 1e-9


def test_inplane_closest_to_ras_and_tie_keeps_axis2():
    geo = Geometry.from_affine(np.diag([-1.5, -1.5, 8.0, 1.0]), (5, 6, 3))  # LPS-like
    r = canonical_reorientation(geo)
    assert r == Reorientation((0, 1, 2), (True, True, False))
    _, g2, _ = reorient(np.zeros((5, 6, 3)), geo)
    np.testing.assert_allclose(g2.direction, np.eye(3))
    swapped = Geometry.from_affine(np.array([[0, 1.5, 0, 0], [1.5, 0, 0, 0], [0, 0, 1.5, 0],
                                             [0, 0, 0, 1.0]]), (4, 5, 6))
    assert canonical_reorientation(swapped) == Reorientation((1, 0, 2), (False, False, False))


def test_4d_time_axis_untouched():
    geo = Geometry.from_affine(np.diag([8.0, -1.5, 1.5, 1.0]), (3, 5, 7))
    cine = np.random.default_rng(0).normal(size=(3, 5, 7, 4))
    out, g2, r = reorient(cine, geo)
    assert out.shape == (5, 7, 3, 4)
    for t in range(4):
        np.testing.assert_array_equal(out[..., t], apply_reorientation(cine[..., t], r))
    np.testing.assert_array_equal(undo_reorientation(out, r), cine)


def test_json_round_trip_and_inputs_not_mutated():
    geo = _oblique(5, (1.3, 1.3, 9.0), (6, 5, 4), True)
    arr = np.random.default_rng(1).normal(size=geo.shape)
    keep = arr.copy()
    _, _, r = reorient(arr, geo)
    np.testing.assert_array_equal(arr, keep)
    assert Reorientation.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_errors_name_the_parameter():
    geo = Geometry.from_affine(np.eye(4), (4, 4, 4))
    with pytest.raises(ValueError, match="array must be 3D"):
        reorient(np.zeros((4, 4)), geo)
    with pytest.raises(ValueError, match="does not match geometry shape"):
        reorient(np.zeros((4, 4, 5)), geo)
    with pytest.raises(ValueError, match="perm must be a permutation"):
        Reorientation((0, 0, 2), (False, False, False))
