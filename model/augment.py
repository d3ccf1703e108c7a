"""Training-time augmentation of z-scored slices with albumentations 2.0.8.

albumentations assumes float images in [0, 1]: brightness/contrast and noise
outputs are clipped to [0, 1] and ``RandomGamma`` returns NaN for negative
values.  Stored slices are z-scored, so each slice is

1. clipped to ``z_range`` (default [-3, 5] standard deviations) and mapped
   affinely to [0, 1] using the clipped slice's own min and max,
2. augmented (geometry on image and label together, intensity on the image),
3. mapped back with the inverse of the same affine map, so augmented slices
   keep the stored (per-volume z-score) intensity scale that validation and
   inference slices have.  Set ``restore="zscore"`` to z-score each
   augmented slice instead.

Geometry (``Affine``: rotation +-15 deg, scale 0.85-1.15, translation +-8 %,
which also simulates a label-free crop-centre error; mild
``ElasticTransform``) uses linear interpolation for the image and nearest
for the label, padding with the darkest value and background.

Intensity augmentation covers what changes between scanners and sites (issue
#12), on the image only (labels untouched):

* contrast, brightness and gamma (``RandomBrightnessContrast``, ``RandomGamma``
  with gamma 0.7-1.5);
* **tissue contrast** (:func:`class_contrast`): each foreground class's intensity
  scaled by its own random gain (0.6-1.4, edges smoothed), so blood and
  myocardium come closer or further apart as between sites and sequences --
  the label only decides where, it is never changed;
* a smooth multiplicative **bias field** (:func:`bias_field`: the exponential of
  a random cubic polynomial in x and y, up to ``bias_strength`` in log
  amplitude) and a **surface-coil fall-off** (:func:`coil_falloff`:
  ``1 / (1 + (d / L)^2)`` from a random point beside the image) -- non-linear,
  not only ramps; NumPy, since albumentations has neither;
* **flattened tissue contrast** (:func:`flatten_contrast`, ``p_flatten``: the
  share of poor acquisitions that get it; 0 in :class:`AugmentConfig`, 1 in the
  trainer's default for its instance-normalized U-Net,
  :func:`model.train.default_augment`): every foreground
  class's mean pulled toward one randomly chosen foreground class's mean, keeping
  only 15-60 % of the differences -- blood and myocardium nearly alike, as at a
  site with a weaker sequence.  On synthetic site B the blood-myocardium
  difference is 0.4-0.6 background standard deviations after normalisation
  (2.2-2.9 at site A), which the per-class gains above reach in under 5 % of
  augmented slices (16 % with ``p_flatten=1``).  Measured with ``p_flatten=1``
  (``benchmarks/site_shift.py``, 20 minutes, instance normalization, batch 16): site B 0.847
  (worst frame 0.697) against 0.844 (0.610), but site A 0.942 against 0.949 -- the
  budget goes to the harder slices; with batch 8 (the default since) site B 0.860
  (0.725) against 0.850 (0.655), site A 0.950 against 0.955 (all at Adam 3e-3); at
  2e-3, today's default, site B 0.862 (0.699) and 0.854 (0.603) in two runs against
  0.857 / 0.850 without it, site A 0.957 / 0.952 against 0.958 / 0.957: inside the
  run-to-run spread.  With unweighted cross-entropy (the trainer's default since)
  site B 0.872 / 0.864 (worst 0.728 / 0.725) against 0.846 / 0.855 (0.653 / 0.673),
  site A 0.961 / 0.964 against 0.964 / 0.967, so the trainer turns it on for that
  U-Net;
* **partial volume** of a thicker slice (:func:`partial_volume`): the slice
  blended with a slightly scaled copy of itself, as a neighbouring slice's
  structures bleed into a thick one (an in-plane approximation);
* lower resolution (``Downscale``, 0.45-0.9), blur (``GaussianBlur``, sigma
  0.3-1.2 px) and noise (``GaussNoise``, std 1-25 % of the range, p 0.5: a
  site whose heart lies far from the surface coil has a blood-myocardium
  contrast-to-noise ratio near 1).

Independent draws rarely combine: with the probabilities above, fewer than 1 %
of slices would be coarse, blurred, coil-shaded and noisy at once, which is
what another site's whole dataset can look like.  A **poor acquisition**
(``p_poor_acquisition``, default 0.25) therefore gets all of them together:
tissue contrast, coil fall-off, lower resolution, blur and noise of 6-25 % (and,
with ``p_flatten``, flattened tissue contrast).

Per-volume percentile clipping and z-scoring (:mod:`cmrprep.normalize`) already
make the input independent of a site's absolute intensity scale.

Randomness is seeded per sample (:meth:`Augmenter.__call__` takes ``seed``),
so a sample's augmentation depends only on its seed, never on which loader
worker produces it.

Examples
--------
>>> aug = Augmenter()
>>> img, lab = aug(np.zeros((32, 32), np.float32), np.zeros((32, 32), np.uint8), seed=0)
>>> img.dtype, lab.dtype, img.shape
(dtype('float32'), dtype('uint8'), (32, 32))
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np

from cmrprep.plan import ConfigError

__all__ = ["Augmenter", "AugmentConfig", "bias_field", "coil_falloff", "partial_volume", "class_contrast",
           "flatten_contrast"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation parameters and probabilities (see the module docstring)."""

    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.08
    p_affine: float = 0.8
    elastic_alpha: float = 30.0
    elastic_sigma: float = 5.0
    p_elastic: float = 0.2
    brightness: float = 0.1
    contrast: float = 0.3
    p_brightness_contrast: float = 0.5
    gamma: tuple[float, float] = (70.0, 150.0)
    p_gamma: float = 0.5
    class_gain: tuple[float, float] = (0.6, 1.4)
    p_class_contrast: float = 0.5
    flatten: tuple[float, float] = (0.15, 0.6)  # fraction of the class differences kept
    p_flatten: float = 0.0  # share of poor acquisitions with flattened tissue contrast (off)
    bias_strength: float = 0.6
    p_bias: float = 0.5
    coil_length: tuple[float, float] = (0.5, 1.5)  # fall-off length, in image widths
    p_coil: float = 0.3
    partial_volume: tuple[float, float] = (0.15, 0.4)  # weight of the neighbour-like copy
    p_partial_volume: float = 0.2
    downscale: tuple[float, float] = (0.45, 0.9)
    p_downscale: float = 0.25
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    p_blur: float = 0.25
    noise_std: tuple[float, float] = (0.01, 0.25)
    p_noise: float = 0.5
    p_poor_acquisition: float = 0.25
    poor_noise_std: tuple[float, float] = (0.06, 0.25)
    z_range: tuple[float, float] = (-3.0, 5.0)
    restore: str = "inverse"


def bias_field(shape: tuple[int, int], rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative field: ``exp`` of a random cubic polynomial, log amplitude <= ``strength``.

    >>> f = bias_field((32, 32), np.random.default_rng(0), 0.5)
    >>> f.shape, bool(f.min() > 0), bool(np.log(f).max() - np.log(f).min() <= 1.0 + 1e-6)
    ((32, 32), True, True)
    """
    y, x = np.meshgrid(np.linspace(-1, 1, shape[0], dtype=np.float32),
                       np.linspace(-1, 1, shape[1], dtype=np.float32), indexing="ij")
    terms = [x, y, x * x, y * y, x * y, x ** 3, y ** 3, x * x * y, x * y * y]
    poly = sum(np.float32(c) * t for c, t in zip(rng.normal(0.0, 1.0, len(terms)), terms))
    span = float(poly.max() - poly.min())
    if span < 1e-6:
        return np.ones(shape, np.float32)
    log_field = (poly - poly.mean()) * np.float32(2.0 * strength / span)  # range 2 * strength
    return np.exp(log_field).astype(np.float32)


def coil_falloff(shape: tuple[int, int], rng: np.random.Generator, length: tuple[float, float]) -> np.ndarray:
    """Surface-coil sensitivity ``1 / (1 + (d / L)^2)`` from a point beside the image, scaled to max 1."""
    h, w = shape
    angle = rng.uniform(0, 2 * np.pi)
    cy, cx = (h - 1) / 2 + 0.6 * h * np.sin(angle), (w - 1) / 2 + 0.6 * w * np.cos(angle)
    yy, xx = np.indices(shape, dtype=np.float32)
    ell = rng.uniform(*length) * max(h, w)
    field = 1.0 / (1.0 + ((yy - cy) ** 2 + (xx - cx) ** 2) / np.float32(ell * ell))
    return (field / field.max()).astype(np.float32)


def partial_volume(unit: np.ndarray, rng: np.random.Generator, weight: tuple[float, float]) -> np.ndarray:
    """Blend a slice with a slightly scaled copy of itself (a thicker slice's neighbour bleeding in)."""
    h, w = unit.shape
    s = rng.uniform(0.88, 1.12)
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 0.0, s)
    other = cv2.warpAffine(unit, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    a = np.float32(rng.uniform(*weight))
    return ((1 - a) * unit + a * other).astype(np.float32)


def _scale_classes(unit: np.ndarray, label: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """``unit`` times each pixel's class gain, the gain map smoothed (sigma 1 px) across class edges."""
    field = cv2.GaussianBlur(gains[label], (0, 0), sigmaX=1.0)
    return (unit * field).astype(np.float32)


def class_contrast(unit: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                   gain: tuple[float, float]) -> np.ndarray:
    """Scale each foreground class by its own gain drawn from ``gain`` (background 1), edges smoothed.

    >>> lab = np.zeros((16, 16), np.uint8); lab[4:12, 4:12] = 3
    >>> out = class_contrast(np.full((16, 16), 0.5, np.float32), lab, np.random.default_rng(0), (1.2, 1.2))
    >>> round(float(out[8, 8]), 3), round(float(out[0, 0]), 3)
    (0.6, 0.5)
    """
    lab = np.asarray(label)
    n = int(lab.max()) + 1 if lab.size else 1
    gains = np.ones(n, np.float32)
    gains[1:] = rng.uniform(*gain, n - 1)
    return _scale_classes(unit, lab, gains)


def flatten_contrast(unit: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                     keep: tuple[float, float]) -> np.ndarray:
    """Pull every foreground class's mean toward a random foreground class's, keeping ``keep`` of the gap.

    The reference is one of the foreground classes present (at least 2 are needed,
    otherwise the slice is returned unchanged); each other class is scaled by the
    gain that moves its mean to ``ref + f * (mean - ref)`` with ``f`` drawn from
    ``keep``, edges smoothed (:func:`_scale_classes`, as in :func:`class_contrast`).  The label is never changed.

    >>> lab = np.zeros((16, 16), np.uint8); lab[2:8, 2:14] = 2; lab[8:14, 2:14] = 3
    >>> img = np.where(lab == 3, 0.9, np.where(lab == 2, 0.3, 0.1)).astype(np.float32)
    >>> out = flatten_contrast(img, lab, np.random.default_rng(0), (0.5, 0.5))
    >>> round(float(out[11, 8] - out[4, 8]), 2)  # the 0.6 gap, halved
    0.3
    """
    lab = np.asarray(label)
    n = int(lab.max()) + 1 if lab.size else 1
    counts = np.bincount(lab.ravel(), minlength=n)
    sums = np.bincount(lab.ravel(), weights=unit.ravel(), minlength=n)
    present = [c for c in range(1, n) if counts[c] > 0 and sums[c] > 0]
    if len(present) < 2:
        return unit
    means = sums / np.maximum(counts, 1)
    ref = means[present[int(rng.integers(len(present)))]]
    f = rng.uniform(*keep)
    gains = np.ones(n, np.float32)
    for c in present:
        gains[c] = (ref + f * (means[c] - ref)) / means[c]
    return _scale_classes(unit, lab, gains)


def _site_transforms(cfg: AugmentConfig) -> list:
    """Acquisition changes applied after the NumPy fields: resolution, blur, noise."""
    return [
        A.Downscale(scale_range=cfg.downscale, interpolation_pair={"downscale": cv2.INTER_AREA,
                                                                   "upscale": cv2.INTER_LINEAR},
                    p=cfg.p_downscale),
        A.GaussianBlur(blur_limit=0, sigma_limit=cfg.blur_sigma, p=cfg.p_blur),
        A.GaussNoise(std_range=cfg.noise_std, p=cfg.p_noise),
    ]


def _poor_transforms(cfg: AugmentConfig) -> list:
    """A poor acquisition: lower resolution, blur and strong noise together (see the module doc)."""
    return [
        A.Downscale(scale_range=cfg.downscale, interpolation_pair={"downscale": cv2.INTER_AREA,
                                                                   "upscale": cv2.INTER_LINEAR}, p=1.0),
        A.GaussianBlur(blur_limit=0, sigma_limit=cfg.blur_sigma, p=1.0),
        A.GaussNoise(std_range=cfg.poor_noise_std, p=1.0),
    ]


def _transforms(cfg: AugmentConfig) -> list:
    constant = cv2.BORDER_CONSTANT
    return [
        A.Affine(rotate=(-cfg.rotate_deg, cfg.rotate_deg), scale=cfg.scale,
                 translate_percent=(-cfg.translate, cfg.translate),
                 interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                 border_mode=constant, fill=0, fill_mask=0, p=cfg.p_affine),
        A.ElasticTransform(alpha=cfg.elastic_alpha, sigma=cfg.elastic_sigma,
                           interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                           border_mode=constant, fill=0, fill_mask=0, p=cfg.p_elastic),
        A.RandomBrightnessContrast(brightness_limit=cfg.brightness, contrast_limit=cfg.contrast,
                                   p=cfg.p_brightness_contrast),
        A.RandomGamma(gamma_limit=cfg.gamma, p=cfg.p_gamma),
    ]


def _draw_poor(seed: int, p: float) -> bool:
    """Whether sample ``seed`` is a poor acquisition (its own stream, independent of the others)."""
    return bool(np.random.default_rng(np.random.SeedSequence([seed, 13])).random() < p)


class Augmenter:
    """Seeded augmentation of one (image, label) slice pair.

    Parameters
    ----------
    config : AugmentConfig, optional
        Parameters; defaults as documented in the module docstring.
    """

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config or AugmentConfig()
        if self.config.restore not in ("inverse", "zscore"):
            raise ConfigError(f"restore must be 'inverse' or 'zscore', got {self.config.restore!r}")
        if not 0.0 <= self.config.p_flatten <= 1.0:
            raise ConfigError(f"p_flatten must be a share between 0 and 1, got {self.config.p_flatten}")
        lo, hi = self.config.z_range
        if not lo < hi:
            raise ConfigError(f"z_range must be (low, high) with low < high, got {(lo, hi)}")
        self._local = threading.local()
        self._compose()  # build once now so configuration errors surface here

    def _compose(self) -> tuple[A.Compose, A.Compose, A.Compose]:
        """This thread's pipelines: seeding then applying must not interleave across threads."""
        composes = getattr(self._local, "composes", None)
        if composes is None:
            # strict=True: an obsolete 1.x keyword raises instead of silently using defaults.
            composes = (A.Compose(_transforms(self.config), strict=True, seed=0),
                        A.Compose(_site_transforms(self.config), strict=True, seed=0),
                        A.Compose(_poor_transforms(self.config), strict=True, seed=0))
            self._local.composes = composes
        return composes

    def __getstate__(self) -> dict:
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"])

    def __call__(self, image: np.ndarray, label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Augment one slice.

        Parameters
        ----------
        image : ndarray (H, W)
            z-scored float slice.
        label : ndarray (H, W)
            Integer labels 0..3.
        seed : int
            Seed of this sample's random choices (0 <= seed < 2**32).

        Returns
        -------
        image : ndarray (H, W) float32
            Augmented slice on the input intensity scale; always finite.
        label : ndarray (H, W) uint8
            Augmented labels (nearest interpolation: no new values).
        """
        unit, lo, span = self._to_unit(image)
        geometry, site, poor_site = self._compose()
        geometry.set_random_seed(int(seed))
        out = geometry(image=unit, mask=np.ascontiguousarray(label, dtype=np.uint8))
        poor = _draw_poor(int(seed), self.config.p_poor_acquisition)
        img = self._fields(np.asarray(out["image"], dtype=np.float32), out["mask"], int(seed), poor)
        site = poor_site if poor else site
        site.set_random_seed((int(seed) + 0x9E3779B9) % 2 ** 32)
        img = np.asarray(site(image=img)["image"], dtype=np.float32)
        return self._from_unit(img, lo, span), np.asarray(out["mask"], dtype=np.uint8)

    def _fields(self, unit: np.ndarray, label: np.ndarray, seed: int, poor: bool = False) -> np.ndarray:
        """Tissue contrast, bias field, coil fall-off and partial volume (NumPy), from the sample's own stream.

        A poor acquisition (``poor``) always gets the coil fall-off and the tissue contrast, and
        the flattened tissue contrast with probability ``p_flatten`` (its own stream, so
        ``p_flatten=0`` leaves every other draw as it was)."""
        cfg = self.config
        rng = np.random.default_rng(np.random.SeedSequence([seed, 12]))
        draws = rng.random(4)
        if poor or draws[3] < cfg.p_class_contrast:
            unit = class_contrast(unit, label, rng, cfg.class_gain)
        if poor and cfg.p_flatten > 0:  # a sequence property: before the fields on the whole image
            flat = np.random.default_rng(np.random.SeedSequence([seed, 14]))
            if flat.random() < cfg.p_flatten:
                unit = flatten_contrast(unit, label, flat, cfg.flatten)
        if draws[0] < cfg.p_bias:
            unit = unit * bias_field(unit.shape, rng, cfg.bias_strength)
        if poor or draws[1] < cfg.p_coil:
            unit = unit * coil_falloff(unit.shape, rng, cfg.coil_length)
        if draws[2] < cfg.p_partial_volume:
            unit = partial_volume(unit, rng, cfg.partial_volume)
        return np.clip(unit, 0.0, 1.0).astype(np.float32)

    def _to_unit(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Clip to ``z_range`` and map the slice's min..max to [0, 1]."""
        z = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        z = np.clip(z, *self.config.z_range)
        lo, hi = float(z.min()), float(z.max())
        span = hi - lo
        if span < 1e-6:  # constant slice: nothing to scale
            return np.zeros_like(z), lo, 0.0
        return ((z - lo) / span).astype(np.float32), lo, span

    def _from_unit(self, unit: np.ndarray, lo: float, span: float) -> np.ndarray:
        unit = np.nan_to_num(np.clip(unit, 0.0, 1.0), nan=0.0)
        if self.config.restore == "zscore":
            std = float(unit.std())
            out = (unit - unit.mean()) / std if std > 1e-6 else unit - unit.mean()
        else:
            out = unit * span + lo
        return np.ascontiguousarray(out, dtype=np.float32)
