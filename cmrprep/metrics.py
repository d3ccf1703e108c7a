"""Segmentation metrics in physical units: Dice, HD95 (mm), volumes (mL), ejection fraction.

Conventions (documented because papers differ):

* Dice of a class absent from both prediction and ground truth is NaN and is
  left out of means (it is neither right nor wrong).
* HD95 is the larger of the two directed 95th-percentile surface distances
  (as MONAI's ``compute_hausdorff_distance(percentile=95)``), in mm using the
  voxel spacing (anisotropic, slice spacing included).  NaN when either mask
  is empty.
* Volumes are voxel counts times the voxel volume, in millilitres.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["dice", "hd95", "volume_ml", "ejection_fraction", "per_class_metrics"]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks (NaN when both are empty).

    Examples
    --------
    >>> dice(np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool))
    0.6666666666666666
    """
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, g).sum()) / denom


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                    border_value=0)
    return mask & ~eroded


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two masks."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    if not p.any() or not g.any():
        return float("nan")
    sp, sg = _surface(p), _surface(g)
    dist_to_g = ndimage.distance_transform_edt(~sg, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(max(np.percentile(dist_to_g[sp], 95), np.percentile(dist_to_p[sg], 95)))


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of a mask in millilitres (mm^3 / 1000)."""
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


def ejection_fraction(edv: float, esv: float) -> float:
    """Ejection fraction in percent, NaN when EDV is not positive."""
    return float("nan") if not edv > 0 else 100.0 * (edv - esv) / edv


def per_class_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                      classes: Sequence[int] = (1, 2, 3)) -> dict[int, dict[str, float]]:
    """Dice, HD95 and both volumes for each foreground class of two label maps."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    out = {}
    for c in classes:
        p, g = pred == c, gt == c
        out[int(c)] = {"dice": dice(p, g), "hd95_mm": hd95(p, g, spacing),
                       "volume_pred_ml": volume_ml(p, spacing), "volume_gt_ml": volume_ml(g, spacing)}
    return out
