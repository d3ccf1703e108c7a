"""Augmentation: finite output, preserved shapes/dtypes/labels, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from cmrprep.plan import ConfigError
from model.augment import AugmentConfig, Augmenter
from storefixture import synthetic_case


@pytest.fixture(scope="module")
def case():
    return synthetic_case(np.random.default_rng(0), n_slices=10, size=32)


def test_output_finite_shapes_labels(case):
    images, labels = case
    aug = Augmenter(AugmentConfig(p_affine=1, p_elastic=1, p_brightness_contrast=1, p_gamma=1,
                                  p_noise=1))
    for k in range(images.shape[0]):
        for seed in range(5):
            img, lab = aug(images[k], labels[k], seed)
            assert img.shape == images[k].shape and img.dtype == np.float32
            assert lab.shape == labels[k].shape and lab.dtype == np.uint8
            assert np.isfinite(img).all()
            assert set(np.unique(lab)) <= {0, 1, 2, 3}
            assert set(np.unique(lab)) <= set(np.unique(labels[k])) | {0}


def test_extreme_inputs_never_nan():
    aug = Augmenter(AugmentConfig(p_gamma=1, p_noise=1))
    lab = np.zeros((16, 16), np.uint8)
    for img in (np.zeros((16, 16)), np.full((16, 16), -50.0), np.array([[np.nan, 1e9] * 8] * 16)):
        out, _ = aug(img.astype(np.float32), lab, 3)
        assert np.isfinite(out).all()


def test_seeded_and_scale_preserving(case):
    images, labels = case
    aug = Augmenter()
    a = aug(images[5], labels[5], 11)
    b = Augmenter()(images[5], labels[5], 11)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], aug(images[5], labels[5], 12)[0])
    identity = Augmenter(AugmentConfig(p_affine=0, p_elastic=0, p_brightness_contrast=0,
                                       p_gamma=0, p_noise=0))
    out, _ = identity(images[5], labels[5], 0)
    np.testing.assert_allclose(out, np.clip(images[5], -3, 5), atol=1e-5)
    zs, _ = Augmenter(AugmentConfig(restore="zscore"))(images[5], labels[5], 0)
    assert abs(zs.mean()) < 1e-4 and zs.std() == pytest.approx(1, abs=1e-3)


def test_bad_config():
    with pytest.raises(ConfigError, match="restore"):
        Augmenter(AugmentConfig(restore="minmax"))


def test_threads_and_copies_reproduce(case):
    import copy
    from concurrent.futures import ThreadPoolExecutor
    images, labels = case
    aug = Augmenter()
    expected = [aug(images[5], labels[5], s)[0] for s in range(16)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: aug(images[5], labels[5], s)[0], range(16)))
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)
    np.testing.assert_array_equal(copy.deepcopy(aug)(images[5], labels[5], 3)[0], expected[3])
