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
                                       p_gamma=0, p_noise=0, **NO_SITE))
    out, _ = identity(images[5], labels[5], 0)
    np.testing.assert_allclose(out, np.clip(images[5], -3, 5), atol=1e-5)
    zs, _ = Augmenter(AugmentConfig(restore="zscore"))(images[5], labels[5], 0)
    assert abs(zs.mean()) < 1e-4 and zs.std() == pytest.approx(1, abs=1e-3)


NO_SITE = dict(p_bias=0, p_coil=0, p_partial_volume=0, p_downscale=0, p_blur=0, p_class_contrast=0,
               p_poor_acquisition=0)
ONLY = dict(p_affine=0, p_elastic=0, p_brightness_contrast=0, p_gamma=0, p_noise=0, **NO_SITE)


@pytest.mark.parametrize("which", ["p_class_contrast", "p_bias", "p_coil", "p_partial_volume", "p_downscale", "p_blur",
                                   "p_noise", "p_gamma", "p_brightness_contrast", "p_poor_acquisition"])
def test_site_augmentations_are_seeded_label_safe_and_act(case, which):
    """#12: each intensity augmentation alone changes the image, never the label, same seed same output."""
    images, labels = case
    aug = Augmenter(AugmentConfig(**{**ONLY, which: 1.0}))
    k = int(np.argmax([(lab > 0).sum() for lab in labels]))
    img, lab = aug(images[k], labels[k], 5)
    again, _ = Augmenter(AugmentConfig(**{**ONLY, which: 1.0}))(images[k], labels[k], 5)
    np.testing.assert_array_equal(img, again)
    np.testing.assert_array_equal(lab, labels[k])
    assert np.isfinite(img).all() and img.dtype == np.float32
    assert np.abs(img - np.clip(images[k], -3, 5)).mean() > 1e-3
    assert not np.array_equal(img, aug(images[k], labels[k], 6)[0])


def test_bias_field_and_coil_are_smooth_and_bounded():
    from model.augment import bias_field, coil_falloff

    rng = np.random.default_rng(3)
    f = bias_field((64, 64), rng, 0.6)
    assert f.min() > 0 and np.log(f).max() - np.log(f).min() == pytest.approx(1.2, abs=1e-4)
    assert np.abs(np.diff(np.log(f), axis=0)).max() < 0.1  # smooth: no jumps between neighbours
    c = coil_falloff((64, 64), rng, (0.5, 1.5))
    assert c.max() == pytest.approx(1.0) and 0 < c.min() < 0.9  # a non-linear fall-off across the image


def test_bad_config():
    with pytest.raises(ConfigError, match="restore"):
        Augmenter(AugmentConfig(restore="minmax"))
    with pytest.raises(ConfigError, match="p_flatten"):
        Augmenter(AugmentConfig(p_flatten=1.5))


def test_flattened_contrast_is_off_by_default_and_only_in_poor_acquisitions(case):
    """#12: ``p_flatten`` changes poor acquisitions only; off, they are as before; labels untouched."""
    images, labels = case
    k = int(np.argmax([(lab > 0).sum() for lab in labels]))
    assert AugmentConfig().p_flatten == 0.0
    poor = {**ONLY, "p_poor_acquisition": 1.0}
    off, lab_off = Augmenter(AugmentConfig(**poor))(images[k], labels[k], 7)
    on, lab_on = Augmenter(AugmentConfig(**poor, p_flatten=1.0))(images[k], labels[k], 7)
    assert np.abs(on - off).mean() > 1e-3
    np.testing.assert_array_equal(lab_on, lab_off)
    good = Augmenter(AugmentConfig(**ONLY, p_flatten=1.0))(images[k], labels[k], 7)[0]
    np.testing.assert_array_equal(good, Augmenter(AugmentConfig(**ONLY))(images[k], labels[k], 7)[0])


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


def test_poor_acquisition_combines_its_degradations(case):
    """#12: a poor acquisition is noisier than a noise-free slice and blurs edges; drawn per seed."""
    from model.augment import _draw_poor

    images, labels = case
    k = int(np.argmax([(lab > 0).sum() for lab in labels]))
    poor = Augmenter(AugmentConfig(**{**ONLY, "p_poor_acquisition": 1.0}))
    clean = np.clip(images[k], -3, 5)
    img, _ = poor(images[k], labels[k], 7)
    rough = np.abs(np.diff(img - clean, axis=1)).mean()
    assert rough > 0.05  # noise and blur change the slice everywhere, not only its intensity scale
    share = np.mean([_draw_poor(s, 0.25) for s in range(4000)])
    assert 0.22 < share < 0.28


def test_flatten_contrast_shrinks_class_differences_label_safe():
    """#12: a weaker sequence's blood and myocardium: the class means move together, by the drawn share."""
    from model.augment import flatten_contrast

    lab = np.zeros((48, 48), np.uint8)
    lab[8:20, 8:40], lab[20:30, 8:40], lab[30:42, 8:40] = 1, 2, 3
    img = np.choose(lab, [0.1, 0.8, 0.3, 0.9]).astype(np.float32)
    inner = np.zeros_like(lab, bool)  # away from the smoothed class edges
    inner[10:18, 10:38] = inner[22:28, 10:38] = inner[32:40, 10:38] = True

    def gaps(x):
        m = [x[inner & (lab == c)].mean() for c in (1, 2, 3)]
        return np.abs(np.subtract.outer(m, m))

    before = gaps(img)
    for seed in range(6):
        out = flatten_contrast(img, lab, np.random.default_rng(seed), (0.15, 0.6))
        np.testing.assert_array_equal(out, flatten_contrast(img, lab, np.random.default_rng(seed), (0.15, 0.6)))
        ratio = gaps(out)[before > 0] / before[before > 0]
        assert np.all(ratio > 0.14) and np.all(ratio < 0.61)  # every difference kept by the same share
        assert np.ptp(ratio) < 0.02
        assert np.isfinite(out).all() and out.dtype == np.float32
        assert np.allclose(out[:4], img[:4])  # background far from the heart is untouched
    one_class = np.where(lab == 3, 3, 0).astype(np.uint8)
    np.testing.assert_array_equal(flatten_contrast(img, one_class, np.random.default_rng(0), (0.2, 0.2)), img)
