"""In-plane resampling (cmrprep.resample)."""

import numpy as np
import pytest

from cmrprep.geometry import Geometry
from cmrprep.resample import (resample_cine_inplane, resample_inplane, resample_label_inplane,
                              resample_to_reference, target_geometry)


def _oblique(spacing, shape, seed=0):
    q = np.random.default_rng(seed).normal(size=3)
    rot, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(spacing)
    aff[:3, 3] = q * 30
    return Geometry.from_affine(aff, shape)


def _heart(shape, spacing, centre_mm=(0.0, 0.0), seed=0):
    """RV crescent (1), MYO ring (2), LV disc (3) in voxel space, radii in mm."""
    rng = np.random.default_rng(seed)
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    lab = np.zeros(shape, np.uint8)
    c = np.array(shape[:2]) / 2 + np.asarray(centre_mm) / np.asarray(spacing[:2])
    for k in range(shape[2]):
        x = (ii - c[0]) * spacing[0]
        y = (jj - c[1]) * spacing[1]
        r_lv = 22 - 1.5 * k + rng.uniform(-1, 1)
        r = np.hypot(x, y)
        rv = (np.hypot(x + 25, y - 10) < 26) & (r > r_lv + 9)
        lab[..., k][rv] = 1
        lab[..., k][r < r_lv + 8] = 2
        lab[..., k][r < r_lv] = 3
    return lab


def _corners(geo):
    n = np.asarray(geo.shape[:2], dtype=float)
    return geo.voxel_to_world(np.array([[-0.5, -0.5, 0], [n[0] - 0.5, n[1] - 0.5, 0],
                                        [(n[0] - 1) / 2, (n[1] - 1) / 2, 0]]))


def test_extent_preserved_exactly_when_divisible():
    geo = _oblique((1.5625, 1.5625, 8.0), (256, 208, 3))
    out, g2 = resample_inplane(np.zeros(geo.shape, np.int16), geo, 1.25)
    assert out.shape == (320, 260, 3) and out.dtype == np.float32
    np.testing.assert_allclose(_corners(g2), _corners(geo), atol=1e-9)
    np.testing.assert_allclose(g2.direction, geo.direction, atol=1e-12)


def test_centre_preserved_and_corners_within_quarter_voxel():
    geo = _oblique((1.37, 1.41, 9.0), (173, 149, 4), seed=3)
    g2 = target_geometry(geo, 1.25)
    a, b = _corners(geo), _corners(g2)
    np.testing.assert_allclose(b[2], a[2], atol=1e-9)
    assert np.abs(a[:2] - b[:2]).max() <= 1.25 / 2 + 1e-9  # two axes, each <= new/4
    # slice axis untouched: same count, spacing and slice centre positions
    assert g2.shape[2] == 4 and g2.spacing[2] == pytest.approx(9.0)
    ks = np.array([[(173 - 1) / 2, (149 - 1) / 2, k] for k in range(4)], float)
    ks2 = np.array([[(g2.shape[0] - 1) / 2, (g2.shape[1] - 1) / 2, k] for k in range(4)], float)
    np.testing.assert_allclose(g2.voxel_to_world(ks2), geo.voxel_to_world(ks), atol=1e-9)


def test_linear_ramp_reproduced_in_world_coordinates():
    geo = _oblique((1.5, 1.7, 8.0), (41, 37, 3), seed=1)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in geo.shape], indexing="ij"), -1)
    ramp = lambda xyz: xyz @ np.array([0.3, -0.2, 0.1]) + 5  # noqa: E731
    img = ramp(geo.voxel_to_world(ijk))
    out, g2 = resample_inplane(img, geo, 1.1)
    ijk2 = np.stack(np.meshgrid(*[np.arange(s) for s in g2.shape], indexing="ij"), -1)
    expect = ramp(g2.voxel_to_world(ijk2))
    np.testing.assert_allclose(out[2:-2, 2:-2], expect[2:-2, 2:-2], atol=1e-3)
    bs, _ = resample_inplane(img, geo, 1.1, interpolation="bspline")
    np.testing.assert_allclose(bs[3:-3, 3:-3], expect[3:-3, 3:-3], atol=1e-2)


@pytest.mark.parametrize("new", [1.0, 2.0])
def test_label_area_no_new_classes_per_slice(new):
    sp = (1.5, 1.4, 8.0)
    geo = _oblique(sp, (97, 103, 5), seed=2)
    lab = _heart(geo.shape, sp)
    lab[..., 4][lab[..., 4] == 1] = 0  # apex slice without RV
    out, g2 = resample_label_inplane(lab, geo, new)
    assert out.dtype == np.uint8
    for k in range(5):
        assert set(np.unique(out[..., k])) == set(np.unique(lab[..., k]))
        for c in (1, 2, 3):
            a0 = (lab[..., k] == c).sum() * sp[0] * sp[1]
            a1 = (out[..., k] == c).sum() * new * new
            assert a1 == pytest.approx(a0, rel=0.05)


def test_tiny_structure_not_lost_when_downsampling():
    geo = Geometry.from_affine(np.diag([1.0, 1.0, 8.0, 1.0]), (30, 30, 2))
    lab = np.zeros(geo.shape, np.uint8)
    lab[10:20, 10:20, :] = 3
    lab[14, 14, 0] = 2  # one pixel of MYO inside LV
    lab[25, 3, 1] = 1  # isolated RV pixel
    out, _ = resample_label_inplane(lab, geo, 3.0)
    assert (out[..., 0] == 2).any() and (out[..., 1] == 1).any()
    assert not (out[..., 0] == 1).any() and not (out[..., 1] == 2).any()


def test_identity_spacing_is_exact_and_round_trip_dice():
    sp = (1.3, 1.3, 8.0)
    geo = _oblique(sp, (81, 77, 3), seed=4)
    lab = _heart(geo.shape, sp)
    same, g_same = resample_label_inplane(lab, geo, 1.3)
    np.testing.assert_array_equal(same, lab)
    assert g_same.max_affine_difference(geo) < 1e-9
    down, g2 = resample_label_inplane(lab, geo, 1.1)
    back = resample_to_reference(down, g2, geo, is_label=True)
    for c in (1, 2, 3):
        a, b = lab == c, back == c
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.97
    img = np.random.default_rng(0).normal(size=geo.shape)
    np.testing.assert_array_equal(resample_to_reference(img, geo, geo, is_label=False),
                                  img.astype(np.float32))


def test_cine_equals_per_frame():
    geo = _oblique((1.5, 1.5, 8.0), (20, 24, 3), seed=5)
    cine = np.random.default_rng(0).normal(size=(*geo.shape, 4)).astype(np.float32)
    out, g2 = resample_cine_inplane(cine, geo, 1.2)
    assert out.shape == (*g2.shape, 4)
    for t in range(4):
        np.testing.assert_allclose(out[..., t], resample_inplane(cine[..., t], geo, 1.2)[0],
                                   atol=1e-6)


def test_errors():
    geo = Geometry.from_affine(np.eye(4), (4, 4, 2))
    with pytest.raises(ValueError, match="spacing must be a positive"):
        resample_inplane(np.zeros((4, 4, 2)), geo, -1.0)
    with pytest.raises(ValueError, match="interpolation"):
        resample_inplane(np.zeros((4, 4, 2)), geo, 1.0, interpolation="cubic")
    with pytest.raises(ValueError, match="label values must be in 0..3"):
        resample_label_inplane(np.full((4, 4, 2), 7, np.uint8), geo, 1.0)
    with pytest.raises(ValueError, match="image must be 3D"):
        resample_inplane(np.zeros((4, 4, 3)), geo, 1.0)


def test_index_space_fast_path_equals_world_path(monkeypatch):
    import cmrprep.resample as rs
    sp = (1.5, 1.4, 8.0)
    geo = _oblique(sp, (57, 49, 3), seed=6)
    lab = _heart(geo.shape, sp)
    img = np.random.default_rng(0).normal(size=geo.shape)
    fast_img, _ = resample_inplane(img, geo, 1.1)
    fast_lab, _ = resample_label_inplane(lab, geo, 1.1)
    monkeypatch.setattr(rs, "_index_frame", lambda g, r: None)
    slow_img, _ = resample_inplane(img, geo, 1.1)
    slow_lab, _ = resample_label_inplane(lab, geo, 1.1)
    np.testing.assert_allclose(fast_img, slow_img, atol=1e-4)
    assert (fast_lab != slow_lab).mean() < 1e-3  # argmax ties may flip on rounding
