"""Dataset shift: how a new dataset's acquisition differs from the training data's.

A model trained on one scanner meets another: coarser pixels, thicker slices, a
different intensity distribution, weaker blood-myocardium contrast, images
stored in another orientation.  :func:`frame_features` describes one input
frame with numbers that do not depend on a site's absolute intensity scale;
:func:`summarize` turns the training frames' features into a *reference* (the
range of each feature); :func:`compare` names every feature of a new dataset
that falls outside the reference, e.g. ``"in-plane spacing 2.4 mm, training
range 1.0-1.9 mm"``.

Features (``None`` where unknown):

* ``inplane_mm``, ``slice_mm`` -- in-plane and slice spacing;
* ``fov_mm`` -- the larger in-plane field of view; ``n_slices``;
* ``tail_ratio`` -- ``(p99.5 - p50) / (p50 - p0.5)`` of the intensities: the
  shape of the distribution, independent of scale and offset;
* ``contrast`` -- ``(mean LV blood - mean myocardium) / (p99.5 - p0.5)`` where a
  label (or a prediction) is known;
* ``axcodes`` -- the voxel axes' anatomical directions (``"LPS"``): the storage
  orientation (cmrprep reorients, but a model fed raw arrays does not).

A numeric feature is out of range when it lies outside the reference's
``[min, max]`` widened by :data:`MARGIN` of the range (at least the feature's
absolute tolerance in :data:`ABS_TOL`); a warning needs at least
:data:`MIN_SHARE` of the cases (and one) outside, so one unusual case among many
in-distribution ones is not a dataset shift.  Orientation is compared only when
the training data had a consistent storage orientation (at most
:data:`MAX_TRAINING_AXCODES` distinct ones).

Examples
--------
>>> ref = summarize([{"inplane_mm": 1.2, "slice_mm": 8.0}, {"inplane_mm": 1.6, "slice_mm": 10.0}])
>>> [w["message"] for w in compare(ref, {"c1": {"inplane_mm": 2.4, "slice_mm": 9.0}})]
['in-plane spacing 2.4 mm, training range 1.2-1.6 mm (1 of 1 cases outside)']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["FEATURES", "MARGIN", "frame_features", "summarize", "merge", "compare"]

#: Numeric features: (description, unit, format).
FEATURES: dict[str, tuple[str, str, str]] = {
    "inplane_mm": ("in-plane spacing", "mm", ".2g"),
    "slice_mm": ("slice spacing", "mm", ".3g"),
    "fov_mm": ("field of view", "mm", ".0f"),
    "n_slices": ("number of slices", "", ".0f"),
    "tail_ratio": ("intensity distribution shape (p99.5-p50)/(p50-p0.5)", "", ".2f"),
    "contrast": ("blood-myocardium contrast (LV - MYO)/(p99.5 - p0.5)", "", ".2f"),
}
#: Widening of the training range, as a share of its width.
MARGIN = 0.25
#: Share of a dataset's cases that must lie outside a range for a warning.
MIN_SHARE = 0.2
#: Training data with more storage orientations than this has no convention to compare with.
MAX_TRAINING_AXCODES = 2
#: Smallest widening per feature (absolute units), so a narrow training range is not over-strict.
ABS_TOL: dict[str, float] = {"inplane_mm": 0.1, "slice_mm": 0.5, "fov_mm": 20.0, "n_slices": 2.0,
                             "tail_ratio": 0.5, "contrast": 0.05}


def _axcodes(affine: np.ndarray) -> str:
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def frame_features(image: np.ndarray, geometry, label: np.ndarray | None = None,
                   percentiles: Mapping[str, float] | None = None,
                   classes: Sequence[str] = ("background", "RV", "MYO", "LV")) -> dict[str, Any]:
    """The shift features of one 3D frame (see the module docstring).

    ``percentiles`` (``p0.5``, ``p50``, ``p99.5``), when already computed, spare a pass.
    """
    sp = geometry.spacing
    shape = geometry.shape
    if percentiles is None:
        flat = np.asarray(image, dtype=np.float32).ravel()[:: max(1, image.size // 200_000)]
        lo, med, hi = (float(v) for v in np.percentile(flat, [0.5, 50, 99.5]))
    else:
        lo, med, hi = float(percentiles["p0.5"]), float(percentiles["p50"]), float(percentiles["p99.5"])
    out: dict[str, Any] = {
        "inplane_mm": float(min(sp[0], sp[1])), "slice_mm": float(sp[2]),
        "fov_mm": float(max(shape[0] * sp[0], shape[1] * sp[1])), "n_slices": int(shape[2]),
        "tail_ratio": float((hi - med) / (med - lo)) if med - lo > 1e-12 else None,
        "contrast": None, "axcodes": _axcodes(geometry.matrix),
    }
    if label is not None and "LV" in classes and "MYO" in classes and hi - lo > 1e-12:
        out["contrast"] = _contrast(np.asarray(image), np.asarray(label), classes.index("LV"),
                                    classes.index("MYO"), hi - lo)
    return out


def _contrast(image: np.ndarray, label: np.ndarray, lv: int, myo: int, span: float) -> float | None:
    """``(mean LV - mean MYO) / span`` inside the foreground's bounding box (the heart is a small
    part of the field of view: the class masks are built on that box only), ``None`` without both."""
    from cmrprep.crop import _fg_bbox

    bbox = _fg_bbox(label)
    if bbox is None:
        return None
    (i0, j0), (i1, j1) = bbox
    lab, img = label[i0:i1 + 1, j0:j1 + 1], image[i0:i1 + 1, j0:j1 + 1]
    in_lv, in_myo = lab == lv, lab == myo
    if not (in_lv.any() and in_myo.any()):
        return None
    return float((img[in_lv].astype(np.float64).mean() - img[in_myo].astype(np.float64).mean()) / span)


def summarize(features: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Reference ranges of the training frames' features: ``{feature: [min, max]}``, ``axcodes``."""
    features = list(features)
    ref: dict[str, Any] = {"n_frames": len(features)}
    for key in FEATURES:
        values = [float(f[key]) for f in features if f.get(key) is not None]
        if values:
            ref[key] = [min(values), max(values)]
    codes = sorted({f["axcodes"] for f in features if f.get("axcodes")})
    if codes:
        ref["axcodes"] = codes
    return ref


def merge(*references: Mapping[str, Any]) -> dict[str, Any]:
    """One reference for the frames of several references (disjoint frame sets).

    A reference is a reduction (count, per-feature ``[min, max]``, set of
    orientations), so the frames added to a dataset extend its reference without
    the earlier frames being read again: ``merge(summarize(a), summarize(b))``
    equals ``summarize(a + b)``.  Removing frames has no such shortcut (a
    minimum may leave with them): summarize what is left.

    Examples
    --------
    >>> a = [{"inplane_mm": 1.2, "axcodes": "RAS"}, {"inplane_mm": 1.6, "axcodes": "RAS"}]
    >>> b = [{"inplane_mm": 2.0, "slice_mm": 9.0, "axcodes": "LPS"}]
    >>> merge(summarize(a), summarize(b)) == summarize(a + b)
    True
    >>> merge(summarize(a), summarize(b))
    {'n_frames': 3, 'inplane_mm': [1.2, 2.0], 'slice_mm': [9.0, 9.0], 'axcodes': ['LPS', 'RAS']}
    """
    out: dict[str, Any] = {"n_frames": sum(int(r.get("n_frames", 0)) for r in references)}
    for key in FEATURES:
        ranges = [r[key] for r in references if r.get(key) is not None]
        if ranges:
            out[key] = [min(float(lo) for lo, _ in ranges), max(float(hi) for _, hi in ranges)]
    codes = sorted({c for r in references for c in r.get("axcodes") or []})
    if codes:
        out["axcodes"] = codes
    return out


def _fmt(v: float, spec: str) -> str:
    return format(v, spec)


def compare(reference: Mapping[str, Any], features: Mapping[str, Mapping[str, Any] | Sequence[Mapping]],
            ) -> list[dict[str, Any]]:
    """Named warnings for features of ``features`` (per case: one dict or a list of frames) outside ``reference``.

    Each warning: ``{"code": "shift_<feature>", "message", "value", "range", "cases"}``; the
    value is the median over the cases outside the range.
    """
    per_case: dict[str, list[Mapping[str, Any]]] = {
        cid: list(f) if isinstance(f, (list, tuple)) else [f] for cid, f in features.items()}
    n = len(per_case)
    out = []
    for key, (what, unit, spec) in FEATURES.items():
        if key not in reference:
            continue
        lo, hi = (float(v) for v in reference[key])
        pad = max(MARGIN * (hi - lo), ABS_TOL.get(key, 0.0))
        outside, values = [], []
        for cid, frames in per_case.items():
            vals = [float(f[key]) for f in frames if f.get(key) is not None]
            if vals and not (lo - pad <= float(np.median(vals)) <= hi + pad):
                outside.append(cid)
                values.append(float(np.median(vals)))
        if outside and len(outside) >= max(1.0, MIN_SHARE * n):
            v = float(np.median(values))
            u = f" {unit}" if unit else ""
            out.append({"code": f"shift_{key}", "value": v, "range": [lo, hi], "cases": sorted(outside),
                        "message": f"{what} {_fmt(v, spec)}{u}, training range {_fmt(lo, spec)}-"
                                   f"{_fmt(hi, spec)}{u} ({len(outside)} of {n} cases outside)"})
    known = set(reference.get("axcodes") or [])
    if known and len(known) <= MAX_TRAINING_AXCODES:
        odd = sorted(cid for cid, frames in per_case.items()
                     if any(f.get("axcodes") and f["axcodes"] not in known for f in frames))
        if odd:
            seen = sorted({f["axcodes"] for cid in odd for f in per_case[cid] if f.get("axcodes")})
            out.append({"code": "shift_orientation", "value": seen, "range": sorted(known), "cases": odd,
                        "message": f"voxel axes stored as {', '.join(seen)}; training data had "
                                   f"{', '.join(sorted(known))} ({len(odd)} of {n} cases): cmrprep "
                                   "reorients, a model fed raw arrays would see them rotated or mirrored"})
    return out
