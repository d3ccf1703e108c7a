"""Label-free heart centre for cropping at inference time.

:func:`center_from_cine` (first temporal harmonic; Lin, Cowan & Young,
MICCAI 2006; Kaggle DSB "Fourier-based tutorial"):

1. ``H1 = |FFT_t(cine)[1]|`` per voxel: the heart is the only structure that
   moves once per cardiac cycle, so static bright tissue (fat, liver) has
   ``H1 ~ 0``.  The cine is scaled by its 99th percentile first so the
   threshold below does not depend on the intensity scale.
2. Gaussian blur in-plane with ``sigma_mm`` (default 5 mm, converted with the
   in-plane spacing; no blur across slices).
3. Zero everything below ``threshold`` (5 %) of the volume maximum.
4. ``H1``-weighted centroid per slice over the middle half of the slices
   (base and apex move less and the base includes the atria).
5. Median of the slice centroids (robust to a few bad slices).
6. Refine (``refine_iter`` times): recompute the per-slice centroids using only
   voxels within ``refine_radius_mm`` (default 60 mm) of the current centre,
   which rejects far-away moving tissue (e.g. flow artefacts, bowel).

:func:`center_fallback` for a single frame (no cine, no label):

* ``method="bright_blob"`` (default): the weighted centroid of the brightest
  10 % of the blurred image within 50 mm of the FOV centre over the middle
  slices (the blood pools are the brightest large structures near the
  centre of a short-axis stack); falls back to the FOV centre if empty.
* ``method="fov_centre"``: the centre of the field of view (stacks are
  planned around the heart).

Measured on 8 cases of :mod:`cmrprep.synthetic` (off-centre hearts, bright
fat): first harmonic 2-9 mm error, bright blob 6-78 mm (median ~17), FOV
centre 32-67 mm.  Neither fallback is good enough for a 12 mm training
jitter; a coarse network pass is the intended replacement.

Both return ``(ci, cj)`` in the voxel coordinates of the array they are given
(axes 0 and 1; axis 2 is the slice axis).

Examples
--------
>>> import numpy as np
>>> from cmrprep.geometry import Geometry
>>> g = Geometry.from_affine(np.diag([2.0, 2.0, 8.0, 1.0]), (40, 40, 4))
>>> center_fallback(np.zeros((40, 40, 4)), g)
(19.5, 19.5)
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from cmrprep.geometry import Geometry

__all__ = ["first_harmonic", "center_from_cine", "center_fallback"]

log = logging.getLogger(__name__)


def _check(array: np.ndarray, geometry: Geometry, ndim: int, name: str) -> None:
    if array.ndim != ndim or tuple(array.shape[:3]) != tuple(geometry.shape[:3]):
        raise ValueError(f"{name} must be {ndim}D with spatial shape {geometry.shape}, "
                         f"got shape {array.shape}")


def first_harmonic(cine: np.ndarray) -> np.ndarray:
    """``|FFT_t[1]|`` of a cine ``[i, j, k, t]`` as float32 ``[i, j, k]`` (needs ``t >= 2``).

    With two frames (ED and ES of a case without a cine) this is ``|ED - ES|``:
    the contraction, which is as specific to the heart as the harmonic of a full cine.
    """
    if cine.ndim != 4 or cine.shape[3] < 2:
        raise ValueError(f"cine must be 4D [i, j, k, t] with t >= 2 frames, got shape {cine.shape}")
    return np.abs(np.fft.rfft(cine.astype(np.float32, copy=False), axis=3)[..., 1]).astype(np.float32)


def _blur(volume: np.ndarray, geometry: Geometry, sigma_mm: float) -> np.ndarray:
    sp = geometry.spacing
    return ndimage.gaussian_filter(volume, (sigma_mm / sp[0], sigma_mm / sp[1], 0.0))


def _mid_slices(n: int) -> range:
    lo = n // 4
    return range(lo, max(n - n // 4, lo + 1))


def _weighted_center(weights: np.ndarray, slices: range,
                     mask: np.ndarray | None = None) -> tuple[float, float] | None:
    """Median over ``slices`` of the per-slice weighted centroids."""
    ii, jj = np.meshgrid(np.arange(weights.shape[0]), np.arange(weights.shape[1]), indexing="ij")
    cents = []
    for k in slices:
        w = weights[:, :, k] if mask is None else weights[:, :, k] * mask
        total = float(w.sum())
        if total > 0:
            cents.append(((w * ii).sum() / total, (w * jj).sum() / total))
    if not cents:
        return None
    c = np.median(np.asarray(cents), axis=0)
    return float(c[0]), float(c[1])


def _disc(shape: tuple[int, ...], center: tuple[float, float], geometry: Geometry,
          radius_mm: float) -> np.ndarray:
    sp = geometry.spacing
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    d2 = ((ii - center[0]) * sp[0]) ** 2 + ((jj - center[1]) * sp[1]) ** 2
    return (d2 <= radius_mm ** 2).astype(np.float32)


def center_from_cine(cine: np.ndarray, geometry: Geometry, *, sigma_mm: float = 5.0,
                     threshold: float = 0.05, refine_iter: int = 2,
                     refine_radius_mm: float = 60.0) -> tuple[float, float]:
    """Heart centre ``(ci, cj)`` from the first temporal harmonic of a cine (see module doc).

    Parameters
    ----------
    cine : ndarray
        ``[i, j, k, t]``: a cine covering the cardiac cycle, or the ED and ES frames
        stacked (``t = 2``).
    geometry : Geometry
        Geometry of the spatial axes (for the spacing in mm).

    Returns
    -------
    tuple of float
        Voxel coordinates on axes 0 and 1 of ``cine``;
        :func:`center_fallback` of the first frame (with a warning) if
        nothing moves.
    """
    _check(cine, geometry, 4, "cine")
    if not (0 <= threshold < 1):
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    scale = float(np.percentile(np.abs(cine[::2, ::2]), 99)) or 1.0
    h1 = _blur(first_harmonic(cine) / np.float32(scale), geometry, sigma_mm)
    peak = float(h1.max())
    if not peak > 0:
        log.warning("cine has no temporal variation; using center_fallback")
        return center_fallback(cine[..., 0], geometry)
    h1 = np.where(h1 >= threshold * peak, h1, np.float32(0))
    slices = _mid_slices(cine.shape[2])
    center = _weighted_center(h1, slices)
    for _ in range(refine_iter):
        refined = _weighted_center(h1, slices, _disc(h1.shape, center, geometry, refine_radius_mm))
        if refined is None:
            break
        center = refined
    return center


def center_fallback(image: np.ndarray, geometry: Geometry, *, method: str = "bright_blob",
                    radius_mm: float = 50.0, sigma_mm: float = 5.0) -> tuple[float, float]:
    """Heart centre guess for a single 3D frame without labels or cine (see module doc).

    Parameters
    ----------
    image : ndarray
        ``[i, j, k]`` image.
    method : {"bright_blob", "fov_centre"}
        Centroid of the brightest (top 10 %) blurred voxels within
        ``radius_mm`` of the FOV centre over the middle slices, or the FOV
        centre.
    """
    _check(image, geometry, 3, "image")
    fov = ((image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2)
    if method == "fov_centre":
        return (float(fov[0]), float(fov[1]))
    if method != "bright_blob":
        raise ValueError(f"method must be 'fov_centre' or 'bright_blob', got {method!r}")
    blurred = _blur(image.astype(np.float32), geometry, sigma_mm)
    disc = _disc(image.shape, fov, geometry, radius_mm).astype(bool)
    slices = _mid_slices(image.shape[2])
    inside = blurred[:, :, slices.start:slices.stop][disc]
    cut = np.percentile(inside, 90) if inside.size else np.inf
    weights = np.where(blurred >= cut, blurred - cut, 0).astype(np.float32)
    center = _weighted_center(weights, slices, disc.astype(np.float32))
    return center if center is not None else (float(fov[0]), float(fov[1]))
