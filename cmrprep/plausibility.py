"""Plausibility flags of a predicted segmentation: is this answer believable?

A model trained on one scanner can fail quietly on the next (under-segmented
hearts in low-contrast images, a crop beside the heart).  These checks look only
at the prediction, its geometry and how the heart was found, so they work
without labels:

* ``non_cmr_input`` -- the input does not look like a short-axis cine stack:
  tiny matrices, isotropic 3D voxels (a brain or a whole-body volume), or far
  more slices than a short-axis stack has (:data:`CMR_LIMITS`);
* ``empty_prediction`` / ``missing_class`` -- no foreground, or a class of the
  run absent from a frame;
* ``implausible_volume`` -- LV or RV end-diastolic volume, myocardial mass or an
  ejection fraction outside the adult physiological ranges of :data:`RANGES`
  (generous bounds around published reference values, e.g. Kawel-Boehm et al.,
  JCMR 2020: LV EDV ~ 100-250 ml, mass ~ 60-200 g, EF ~ 50-75 %; diseased hearts
  widen each range);
* ``touches_crop_border`` -- foreground on the border of the network's crop:
  the heart was probably cut (crop beside the heart, or a heart larger than the
  crop);
* ``low_localisation_confidence`` -- the heart was found by the last fallback
  (field-of-view centre), or the segmented heart lies far from the crop centre.

Each flag is a dict ``{"code", "frame", "message"}`` naming the value and the
range.

Examples
--------
>>> lab = np.zeros((20, 20, 4), np.uint8); lab[5:15, 5:15, 1:3] = 3
>>> [f["code"] for f in frame_flags(lab, (1.5, 1.5, 8.0), ("background", "RV", "MYO", "LV"), "F00")]
['missing_class', 'missing_class']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["RANGES", "CMR_LIMITS", "MYOCARDIAL_DENSITY", "input_flags", "frame_flags", "case_flags",
           "crop_flags"]

#: Physiological ranges (adults, health and disease) beyond which a value is flagged.
RANGES: dict[str, tuple[float, float]] = {
    "lv_edv_ml": (30.0, 450.0),
    "rv_edv_ml": (30.0, 500.0),
    "myo_mass_g": (30.0, 350.0),
    "lv_ef_pct": (5.0, 90.0),
    "rv_ef_pct": (5.0, 90.0),
}
#: What a short-axis cine stack looks like (in-plane matrix, slice count, slice/in-plane spacing ratio).
CMR_LIMITS: dict[str, float] = {"min_matrix": 64, "max_slices": 40, "min_anisotropy": 1.8}
#: g/ml, for myocardial mass (as :mod:`pipelines.evaluate`).
MYOCARDIAL_DENSITY = 1.05
#: A segmented heart further than this from the crop centre means the crop was off.
MAX_CENTRE_OFFSET_MM = 30.0


def _flag(code: str, frame: str | None, message: str) -> dict[str, Any]:
    return {"code": code, "frame": frame, "message": message}


def input_flags(shape: Sequence[int], spacing: Sequence[float]) -> list[dict[str, Any]]:
    """Flags of an input volume that does not look like a short-axis CMR stack.

    >>> [f["code"] for f in input_flags((256, 256, 180), (1.0, 1.0, 1.0))]
    ['non_cmr_input', 'non_cmr_input']
    >>> input_flags((208, 256, 10), (1.5, 1.5, 8.0))
    []
    """
    out = []
    ni, nj, nk = (int(s) for s in shape[:3])
    si, sj, sk = (float(s) for s in spacing[:3])
    if min(ni, nj) < CMR_LIMITS["min_matrix"]:
        out.append(_flag("non_cmr_input", None, f"in-plane matrix {ni}x{nj} is smaller than "
                                                f"{CMR_LIMITS['min_matrix']}: not a cine short-axis image?"))
    if nk > CMR_LIMITS["max_slices"]:
        out.append(_flag("non_cmr_input", None, f"{nk} slices; a short-axis stack has at most "
                                                f"~{int(CMR_LIMITS['max_slices'])} (a 3D or whole-body volume?)"))
    if sk / max(min(si, sj), 1e-6) < CMR_LIMITS["min_anisotropy"] and nk > 1:
        out.append(_flag("non_cmr_input", None, f"near-isotropic voxels {si:.2g}x{sj:.2g}x{sk:.2g} mm; "
                                                "short-axis cines have thick slices (a 3D acquisition, e.g. "
                                                "a brain volume?)"))
    return out


def frame_flags(label: np.ndarray, spacing: Sequence[float], classes: Sequence[str],
                frame: str) -> list[dict[str, Any]]:
    """Empty prediction or a missing class in one predicted frame."""
    present = np.bincount(np.asarray(label, dtype=np.int64).ravel(), minlength=len(classes))
    if not present[1:].any():
        return [_flag("empty_prediction", frame, "no foreground predicted anywhere in the frame")]
    return [_flag("missing_class", frame, f"class {name} absent from the prediction")
            for c, name in enumerate(classes) if c and present[c] == 0]


def _volume_ml(label: np.ndarray, spacing: Sequence[float], cls: int) -> float:
    return float((np.asarray(label) == cls).sum()) * float(np.prod(spacing[:3])) / 1000.0


def case_flags(labels: dict[str, np.ndarray], spacing: dict[str, Sequence[float]],
               classes: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Volume, mass and EF flags of one case's predicted frames, and the values measured.

    ED is the frame named ``ED`` (else the frame with the largest predicted LV
    volume), ES the frame named ``ES`` (else the smallest), when the case has two
    or more frames.  Structures the class set lacks are not checked.
    """
    idx = {name: i for i, name in enumerate(classes)}
    values: dict[str, float] = {}
    out: list[dict[str, Any]] = []
    ref = "LV" if "LV" in idx else "RV" if "RV" in idx else None
    if ref is None or not labels:
        return out, values
    vols = {f: _volume_ml(lab, spacing[f], idx[ref]) for f, lab in labels.items()}
    ed = "ED" if "ED" in labels else max(vols, key=vols.get)
    es = "ES" if "ES" in labels else min(vols, key=vols.get)
    for struct in ("LV", "RV"):
        if struct not in idx:
            continue
        v_ed = _volume_ml(labels[ed], spacing[ed], idx[struct])
        values[f"{struct.lower()}_edv_ml"] = v_ed
        if len(labels) > 1 and ed != es:
            v_es = _volume_ml(labels[es], spacing[es], idx[struct])
            values[f"{struct.lower()}_esv_ml"] = v_es
            values[f"{struct.lower()}_ef_pct"] = 100.0 * (v_ed - v_es) / v_ed if v_ed > 0 else float("nan")
    if "MYO" in idx:
        values["myo_mass_g"] = _volume_ml(labels[ed], spacing[ed], idx["MYO"]) * MYOCARDIAL_DENSITY
    names = {"lv_edv_ml": "LV end-diastolic volume", "rv_edv_ml": "RV end-diastolic volume",
             "myo_mass_g": "myocardial mass", "lv_ef_pct": "LV ejection fraction",
             "rv_ef_pct": "RV ejection fraction"}
    for key, (lo, hi) in RANGES.items():
        v = values.get(key)
        if v is not None and not (lo <= v <= hi):
            unit = key.rsplit("_", 1)[1].replace("pct", "%")
            why = ""
            if key.endswith("_ef_pct"):  # an EF of -30000 % means little without the volumes behind it
                side = key.split("_")[0]
                why = f" (EDV {values[f'{side}_edv_ml']:.1f} ml, ESV {values[f'{side}_esv_ml']:.1f} ml)"
            out.append(_flag("implausible_volume", ed if "ef" not in key else f"{ed}/{es}",
                             f"{names[key]} {v:.0f} {unit}{why} outside the plausible {lo:.0f}-{hi:.0f} {unit}"))
    return out, values


def crop_flags(pred_crop: np.ndarray, frame: str, crop_centre_offset_mm: float | None,
               source: str | None) -> list[dict[str, Any]]:
    """Foreground on the crop border; heart far from the crop centre; fallback localisation.

    ``pred_crop`` is the network's ``(S, H, W)`` prediction on its crop.
    """
    out = []
    p = np.asarray(pred_crop)
    border = np.concatenate([p[:, 0, :].ravel(), p[:, -1, :].ravel(), p[:, :, 0].ravel(), p[:, :, -1].ravel()])
    n = int((border > 0).sum())
    if n:
        out.append(_flag("touches_crop_border", frame, f"{n} foreground voxels on the border of the "
                                                       f"{p.shape[1]}x{p.shape[2]} crop: the heart may be cut "
                                                       "(crop beside the heart, or a larger heart)"))
    if source == "fov_centre":
        out.append(_flag("low_localisation_confidence", frame, "heart not found (no cine motion, the "
                                                               "coarse pass saw no heart): crop at the field-of-view centre"))
    elif crop_centre_offset_mm is not None and crop_centre_offset_mm > MAX_CENTRE_OFFSET_MM:
        out.append(_flag("low_localisation_confidence", frame,
                         f"segmented heart {crop_centre_offset_mm:.0f} mm from the crop centre "
                         f"(> {MAX_CENTRE_OFFSET_MM:.0f} mm): localisation ({source}) was probably off"))
    return out
