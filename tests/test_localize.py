"""Label-free heart localisation (cmrprep.localize)."""

import numpy as np
import pytest

from cmrprep.crop import center_from_label
from cmrprep.geometry import Geometry
from cmrprep.localize import center_fallback, center_from_cine, first_harmonic

SP = 1.5


def _phantom(centre=(62.0, 36.0), shape=(96, 96, 8), frames=12, scale=1000.0, seed=0):
    """Body ellipse, beating LV pool + RV, static bright fat blob, Rician-like noise."""
    rng = np.random.default_rng(seed)
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    mm = lambda c: np.hypot((ii - c[0]) * SP, (jj - c[1]) * SP)  # noqa: E731
    body = (((ii - 47.5) / 44) ** 2 + ((jj - 47.5) / 38) ** 2 < 1) * 0.3
    fat = (mm((22.0, 74.0)) < 12) * 1.6  # static, brighter than blood
    cine = np.zeros((*shape, frames), np.float32)
    heart = np.zeros(shape, bool)
    for t in range(frames):
        c = 0.5 + 0.5 * np.cos(2 * np.pi * t / frames)  # 1 at ED, 0 at ES
        for k in range(shape[2]):
            taper = 1 - 0.06 * k
            r_lv = (13 + 9 * c) * taper
            frame = body + fat
            ring = mm(centre) < r_lv + 9
            frame = np.where(ring, 0.25, frame)
            frame = np.where(mm(centre) < r_lv, 1.0, frame)
            rv = (mm((centre[0] - 4, centre[1] + 20)) < (18 + 7 * c) * taper) & ~ring
            frame = np.where(rv, 0.9, frame)
            cine[..., k, t] = frame
            heart[..., k] |= ring | rv
    cine += rng.normal(0, 0.04, cine.shape)
    geo = Geometry.from_affine(np.diag([SP, SP, 8.0, 1.0]), shape)
    return np.abs(cine) * scale, geo, center_from_label(heart)  # truth: heart bbox centre


@pytest.mark.parametrize("scale,seed,centre", [(1000.0, 0, (62.0, 36.0)), (1.0, 1, (30.0, 55.0))])
def test_first_harmonic_centre_error_below_10mm(scale, seed, centre):
    cine, geo, truth = _phantom(centre=centre, scale=scale, seed=seed)
    ci, cj = center_from_cine(cine, geo)
    err = np.hypot(ci - truth[0], cj - truth[1]) * SP
    assert err < 10.0, f"centre error {err:.1f} mm"
    fov_err = np.hypot(47.5 - truth[0], 47.5 - truth[1]) * SP
    assert err < fov_err  # beats the FOV centre


def test_fallbacks_and_static_cine():
    cine, geo, _ = _phantom(frames=4)
    assert center_fallback(cine[..., 0], geo, method="fov_centre") == (47.5, 47.5)
    ci, cj = center_fallback(cine[..., 0], geo)
    assert 0 <= ci < 96 and 0 <= cj < 96
    assert center_fallback(np.zeros((96, 96, 8)), geo) == (47.5, 47.5)  # nothing bright
    static = np.repeat(cine[..., :1], 4, axis=3)
    assert center_from_cine(static, geo) == center_fallback(static[..., 0], geo)


def test_first_harmonic_of_sinusoid():
    t = np.arange(8)
    cine = np.broadcast_to(3 + 2 * np.cos(2 * np.pi * t / 8), (2, 2, 1, 8))
    np.testing.assert_allclose(first_harmonic(cine), 8.0, rtol=1e-5)  # N * amplitude / 2


def test_two_frames_give_the_ed_es_difference():
    ed, es = np.zeros((3, 3, 1)), np.zeros((3, 3, 1))
    ed[1, 1], es[1, 1] = 5.0, 2.0
    np.testing.assert_allclose(first_harmonic(np.stack([ed, es], axis=-1))[..., 0],
                               np.abs(ed - es)[..., 0])


def test_errors():
    geo = Geometry.from_affine(np.eye(4), (4, 4, 2))
    with pytest.raises(ValueError, match="t >= 2"):
        first_harmonic(np.zeros((4, 4, 2, 1)))
    with pytest.raises(ValueError, match="cine must be 4D"):
        center_from_cine(np.zeros((4, 4, 2)), geo)
    with pytest.raises(ValueError, match="method must be"):
        center_fallback(np.zeros((4, 4, 2)), geo, method="hough")
