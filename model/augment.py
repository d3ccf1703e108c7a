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

__all__ = ["Augmenter", "AugmentConfig"]

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
    contrast: float = 0.15
    p_brightness_contrast: float = 0.5
    gamma: tuple[float, float] = (80.0, 120.0)
    p_gamma: float = 0.5
    noise_std: tuple[float, float] = (0.01, 0.05)
    p_noise: float = 0.3
    z_range: tuple[float, float] = (-3.0, 5.0)
    restore: str = "inverse"


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
        A.GaussNoise(std_range=cfg.noise_std, p=cfg.p_noise),
    ]


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
        lo, hi = self.config.z_range
        if not lo < hi:
            raise ConfigError(f"z_range must be (low, high) with low < high, got {(lo, hi)}")
        self._local = threading.local()
        self._compose()  # build once now so configuration errors surface here

    def _compose(self) -> A.Compose:
        """This thread's pipeline: seeding then applying must not interleave across threads."""
        compose = getattr(self._local, "compose", None)
        if compose is None:
            # strict=True: an obsolete 1.x keyword raises instead of silently using defaults.
            compose = A.Compose(_transforms(self.config), strict=True, seed=0)
            self._local.compose = compose
        return compose

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
        compose = self._compose()
        compose.set_random_seed(int(seed))
        out = compose(image=unit, mask=np.ascontiguousarray(label, dtype=np.uint8))
        result = self._from_unit(np.asarray(out["image"], dtype=np.float32), lo, span)
        return result, np.asarray(out["mask"], dtype=np.uint8)

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
