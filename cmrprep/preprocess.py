"""Compose the stages for one frame, and invert them for predictions.

Order (:func:`preprocess_frame`): intensity statistics of the input volume
-> reorient -> resample the label in-plane to ``plan.target_spacing`` ->
choose the centre -> crop to ``plan.crop_shape`` -> resample and normalise
the image *inside the crop box only* -> slices ``vol[:, :, k]`` stacked as
``(S, H, W)`` with ``S = K``.

Only what is stored is computed (this is what makes the build fast; the
result equals resampling the whole field of view and cropping, up to float
rounding):

* the label is resampled on the window of the target grid that holds all of
  its foreground (:func:`cmrprep.resample.resample_label_inplane_support`);
  outside it the full-FOV result is 0, so the centre, jitter clamp, counts
  before the crop (``class_counts_raw``) and foreground-outside check are
  exactly those of the full-FOV label;
* the image is resampled on the part of the crop box inside the target grid
  (:func:`cmrprep.resample.resample_inplane_window`).

Normalisation: percentile clip (``plan.clip_percentiles``) and z-score with
statistics of the **input volume** (original resolution, a deterministic
strided subsample of at most :data:`STAT_SAMPLES` voxels; see
:func:`cmrprep.normalize.intensity_statistics`), applied to the resampled
values.  Linear resampling barely changes the intensity distribution, so the
output is zero-mean, unit-variance to within a few percent; the statistics
are recorded (``record["intensity"]``) and reused by the build fingerprint.

Centre, by priority:

1. the label's foreground bounding-box centre, shifted uniformly within a
   disc of ``plan.crop_jitter_mm`` when ``rng`` is given (clamped so all
   foreground stays inside; no jitter without ``rng``);
2. ``center`` given by the caller: ``(ci, cj)`` voxel coordinates on axes 0
   and 1 of the *input* array (as :func:`cmrprep.localize.center_from_cine`
   returns for the input cine), taken at the middle slice, or a world point
   ``(x, y, z)`` in RAS mm;
3. :func:`cmrprep.localize.center_fallback` on the whole resampled,
   normalised volume (the only case where the full field of view is
   resampled).

Padding outside the image uses the lowest normalised value (the clipped dark
tail), which looks like air.  A heart larger than the crop is not an error
here: the record says ``crop_fits: False`` with the needed size and the
count of foreground voxels left outside; :func:`cmrprep.crop.check_crop_fits`
raises for callers that want a hard stop.

:func:`restore_prediction` undoes the geometry: uncrop (fill 0) -> resample
onto the canonical pre-resampling grid (label-safe) -> undo the
reorientation.  It is exact when the target spacing equals the original
spacing.

Examples
--------
>>> import numpy as np
>>> from cmrprep.geometry import Geometry
>>> from cmrprep.plan import Plan
>>> g = Geometry.from_affine(np.diag([1.25, 1.25, 8.0, 1.0]), (40, 36, 3))
>>> lab = np.zeros((40, 36, 3), np.uint8); lab[15:25, 10:20] = 3
>>> img = np.random.default_rng(0).normal(size=(40, 36, 3))
>>> plan = Plan(target_spacing=1.25, crop_shape=(32, 32))
>>> p = preprocess_frame(img, lab, g, plan)
>>> p.images.shape, p.labels.shape, bool((restore_prediction(p.labels, p.record) == lab).all())
((3, 32, 32), (3, 32, 32), True)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from cmrprep import crop as crop_mod
from cmrprep.geometry import Geometry
from cmrprep.normalize import apply_normalization, intensity_statistics
from cmrprep.plan import ConfigError, Plan
from cmrprep.reorient import (Reorientation, canonical_reorientation, reorient_geometry,
                              undo_reorientation)
from cmrprep.resample import (resample_inplane, resample_inplane_window, resample_label_inplane_support,
                              resample_to_reference, target_geometry)
from cmrprep.stats import slice_class_counts

__all__ = ["PreparedFrame", "preprocess_frame", "restore_prediction", "RECORD_VERSION"]

log = logging.getLogger(__name__)

RECORD_VERSION = 1

#: Voxels (deterministic strided subsample) the intensity statistics are computed on.
STAT_SAMPLES = 100_000


@dataclass(frozen=True, eq=False)
class PreparedFrame:
    """Output of :func:`preprocess_frame`.

    Attributes
    ----------
    images : ndarray
        ``(S, H, W)`` normalised slices, ``plan.store_dtype``.
    labels : ndarray or None
        ``(S, H, W)`` uint8 labels, ``None`` without a label.
    record : dict
        JSON-able inversion record (see :func:`restore_prediction`).
    class_counts_raw : ndarray or None
        ``(S, C)`` int64 per-slice counts after resampling, before the crop.
    class_counts : ndarray or None
        ``(S, C)`` int64 per-slice counts after the crop.
    """

    images: np.ndarray
    labels: np.ndarray | None
    record: dict[str, Any]
    class_counts_raw: np.ndarray | None
    class_counts: np.ndarray | None


def _slice_counts(label: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, C)`` int64 counts of each class per slice of ``label[i, j, k]``."""
    return slice_class_counts(label.transpose(2, 0, 1), num_classes)


def _validate(image: np.ndarray, label: np.ndarray | None, geometry: Geometry, plan: Plan) -> None:
    if plan.target_spacing is None:
        raise ConfigError("plan.target_spacing is not resolved; set it (e.g. the dataset's median "
                          "in-plane spacing) before preprocessing")
    if image.ndim != 3 or tuple(image.shape) != tuple(geometry.shape[:3]):
        raise ValueError(f"image must be 3D with geometry shape {geometry.shape}, got {image.shape}")
    if label is not None and label.shape != image.shape:
        raise ValueError(f"label shape {label.shape} differs from image shape {image.shape}")


def _given_center(center: Sequence[float], original: Geometry, resampled: Geometry) -> tuple[float, float]:
    """Map a caller's centre (input voxel (i, j) or world (x, y, z)) to resampled voxels."""
    c = np.asarray(center, dtype=np.float64)
    if c.shape == (2,):
        c = original.voxel_to_world([c[0], c[1], (original.shape[2] - 1) / 2])
    elif c.shape != (3,):
        raise ValueError(f"center must be (ci, cj) input voxels or (x, y, z) RAS mm, got {center!r}")
    v = resampled.world_to_voxel(c)
    return float(v[0]), float(v[1])


def _choose_center(fg_window, image_r, geometry_r, geometry, plan, center, rng):
    """Return ``(centre, source, jitter)``; see the module doc for the priority.

    ``fg_window`` is ``(label window, (i0, j0))`` when the resampled label has
    foreground (all of it inside the window), else ``None``.  ``image_r`` is a
    zero-argument callable giving the full normalised resampled image (only
    needed for the fallback).
    """
    if fg_window is not None:
        win, (i0, j0) = fg_window
        ci, cj = crop_mod.center_from_label(win)
        base = (ci + i0, cj + j0)
        if rng is None or plan.crop_jitter_mm == 0:
            return base, "label", (0.0, 0.0)
        jit = crop_mod.jittered_center((ci, cj), win, plan.crop_shape,
                                       plan.crop_jitter_mm / plan.target_spacing, rng)
        jit = (jit[0] + i0, jit[1] + j0)
        return jit, "label", (jit[0] - base[0], jit[1] - base[1])
    if center is not None:
        return _given_center(center, geometry, geometry_r), "given", (0.0, 0.0)
    from cmrprep.localize import center_fallback  # scipy.ndimage: imported only when needed

    return center_fallback(image_r(), geometry_r), "fallback", (0.0, 0.0)


def _canonical_view(array: np.ndarray, reo: Reorientation) -> np.ndarray:
    """Canonical orientation as a *view* (no copy): only the blocks resampled get copied."""
    out = np.transpose(array, reo.perm)
    flips = tuple(n for n, f in enumerate(reo.flips) if f)
    return np.flip(out, axis=flips) if flips else out


def _shift_box(box: crop_mod.CropBox, start: tuple[int, int], shape: tuple[int, ...]) -> crop_mod.CropBox:
    """``box`` expressed in the coordinates of a window starting at ``start`` of ``shape``."""
    return crop_mod.CropBox((box.start[0] - start[0], box.start[1] - start[1]), box.size,
                            (int(shape[0]), int(shape[1])))


def _crop_image(img_c, geo_c, geo_r, box, stats, plan, full_image) -> np.ndarray:
    """Normalised ``(h, w, K)`` crop of the resampled image; only the box is resampled."""
    fill = stats.normalized_low
    if full_image is not None:
        return crop_mod.crop(full_image, box, fill=fill)
    lo = [max(box.start[a], 0) for a in (0, 1)]
    hi = [min(box.stop[a], box.shape[a]) for a in (0, 1)]
    out = np.full((*box.size, geo_r.shape[2]), fill, dtype=np.float32)
    if hi[0] > lo[0] and hi[1] > lo[1]:
        vals, _ = resample_inplane_window(img_c, geo_c, plan.target_spacing,
                                          ((lo[0], hi[0]), (lo[1], hi[1])),
                                          interpolation=plan.image_interpolation)
        out[lo[0] - box.start[0]:hi[0] - box.start[0],
            lo[1] - box.start[1]:hi[1] - box.start[1]] = apply_normalization(vals, stats)
    return out


def preprocess_frame(image: np.ndarray, label: np.ndarray | None, geometry: Geometry, plan: Plan,
                     *, center: Sequence[float] | None = None,
                     rng: np.random.Generator | None = None) -> PreparedFrame:
    """Prepare one 3D frame (and its label) as 2D slices; see the module doc.

    Parameters
    ----------
    image : ndarray
        ``[i, j, k]`` image, any real dtype (not modified).
    label : ndarray or None
        ``[i, j, k]`` integer labels 0..3, or ``None``.
    geometry : Geometry
        Geometry of ``image``.
    plan : Plan
        Uses ``target_spacing``, ``crop_shape``, ``crop_jitter_mm``,
        ``clip_percentiles``, ``image_interpolation``, ``label_interpolation``,
        ``store_dtype``, ``num_classes``.
    center : sequence of float, optional
        Crop centre when there is no label (input voxel ``(ci, cj)`` or RAS mm).
    rng : numpy.random.Generator, optional
        Source of the crop jitter (training); ``None`` means no jitter.
    """
    _validate(image, label, geometry, plan)
    stats = intensity_statistics(image, percentiles=tuple(plan.clip_percentiles),
                                 max_samples=STAT_SAMPLES)
    reo = canonical_reorientation(geometry)
    img_c, geo_c = _canonical_view(image, reo), reorient_geometry(geometry, reo)
    geo_r = target_geometry(geo_c, plan.target_spacing)
    fg_window = None
    lab_win, lab_start = None, (0, 0)
    if label is not None:
        lab_c = _canonical_view(label, reo)
        lab_win, lab_start, _ = resample_label_inplane_support(
            lab_c, geo_c, plan.target_spacing, method=plan.label_interpolation,
            num_classes=plan.num_classes)
        if lab_win.size and lab_win.any():
            fg_window = (lab_win, lab_start)
        elif center is None:
            log.warning("label has no foreground; using the fallback centre")
    full = []

    def full_image() -> np.ndarray:
        img_r, _ = resample_inplane(img_c, geo_c, plan.target_spacing,
                                    interpolation=plan.image_interpolation)
        full.append(apply_normalization(img_r, stats))
        return full[0]

    ctr, source, jitter = _choose_center(fg_window, full_image, geo_r, geometry, plan, center, rng)
    box = crop_mod.crop_box_around(ctr, plan.crop_shape, geo_r.shape[:2])
    cropped = _crop_image(img_c, geo_c, geo_r, box, stats, plan, full[0] if full else None)
    images = np.ascontiguousarray(np.moveaxis(cropped, 2, 0).astype(plan.store_dtype))
    record = _record(geometry, reo, geo_c, geo_r, box, ctr, source, jitter, plan)
    record["intensity"] = stats.to_dict()
    if label is None:
        return PreparedFrame(images, None, record, None, None)
    wbox = _shift_box(box, lab_start, lab_win.shape)
    labels = np.ascontiguousarray(np.moveaxis(crop_mod.crop(lab_win, wbox, fill=0), 2, 0))
    raw = _slice_counts(lab_win, plan.num_classes)
    raw[:, 0] += geo_r.shape[0] * geo_r.shape[1] - lab_win.shape[0] * lab_win.shape[1]
    counts = _slice_counts(np.moveaxis(labels, 0, 2), plan.num_classes)
    _label_record(record, lab_win, wbox, raw, counts, plan)
    return PreparedFrame(images, labels, record, raw, counts)


def _record(geometry, reo, geo_c, geo_r, box, ctr, source, jitter, plan) -> dict[str, Any]:
    return {"record_version": RECORD_VERSION,
            "original_geometry": geometry.to_dict(), "reorientation": reo.to_dict(),
            "canonical_geometry": geo_c.to_dict(), "resampled_geometry": geo_r.to_dict(),
            "target_spacing": float(plan.target_spacing),
            "label_interpolation": plan.label_interpolation, "num_classes": int(plan.num_classes),
            "crop_box": box.to_dict(), "center": [float(ctr[0]), float(ctr[1])],
            "center_source": source,
            "jitter_px": [float(jitter[0]), float(jitter[1])],
            "jitter_mm": [float(jitter[0] * plan.target_spacing),
                          float(jitter[1] * plan.target_spacing)]}


def _label_record(record, lab_r, box, raw, counts, plan) -> None:
    outside = crop_mod.foreground_outside(lab_r, box)
    ext = crop_mod.foreground_extent(lab_r)
    fits = ext[0] <= plan.crop_shape[0] and ext[1] <= plan.crop_shape[1]
    if outside:
        log.warning("%d foreground voxels fall outside the %s crop (heart extent %s px)",
                    outside, tuple(plan.crop_shape), ext)
    record.update({"foreground_outside_crop": outside, "crop_fits": bool(fits),
                   "heart_extent_px": list(ext),
                   "heart_extent_mm": [e * float(plan.target_spacing) for e in ext],
                   "class_counts_raw": raw.sum(axis=0).tolist(),
                   "class_counts": counts.sum(axis=0).tolist()})


def restore_prediction(pred: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """Put a ``(S, H, W)`` label prediction back into the original geometry (uint8).

    Steps: uncrop (fill 0) -> resample onto the canonical pre-resampling grid
    (``record["label_interpolation"]``: one-hot linear + argmax or nearest) ->
    undo the reorientation.  Returns an array of ``original_geometry.shape``.
    """
    box = crop_mod.CropBox.from_dict(record["crop_box"])
    geo_r = Geometry.from_dict(record["resampled_geometry"])
    geo_c = Geometry.from_dict(record["canonical_geometry"])
    pred = np.asarray(pred)
    expected = (geo_r.shape[2], *box.size)
    if pred.shape != expected:
        raise ValueError(f"pred must have shape (S, H, W) = {expected}, got {pred.shape}")
    vol = crop_mod.uncrop(np.moveaxis(pred.astype(np.uint8), 0, 2), box, fill=0)
    vol = resample_to_reference(vol, geo_r, geo_c, is_label=True,
                                method=record.get("label_interpolation", "onehot_linear"),
                                num_classes=int(record.get("num_classes", 4)))
    return undo_reorientation(vol, Reorientation.from_dict(record["reorientation"]))
