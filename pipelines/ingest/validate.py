"""Load frames of a case and check them; every rule yields a named :class:`Problem`.

Errors (``severity="error"``) quarantine the case; warnings are reported and
the case is kept.  Each message names the case, the file and the offending
value, and says how to fix it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmrprep.cases import CLASSES, CaseError, CaseSpec, FrameSpec, Problem
from cmrprep.geometry import Geometry
from pipelines.ingest.readers import Header, read_cine, read_header, read_volume

__all__ = ["AFFINE_TOL_MM", "LoadedFrame", "load_frame", "load_cine", "validate_case", "inspect_case",
           "check_case",
           "check_intensities", "check_labels", "check_alignment", "check_metadata"]

log = logging.getLogger(__name__)

#: Largest tolerated absolute difference between image and label 4x4 affines (mm).
AFFINE_TOL_MM: float = 1e-3
#: Layouts whose frames come from ED/ES metadata.
_NEEDS_PHASES = ("acdc", "mnms")


@dataclass(frozen=True)
class LoadedFrame:
    """One frame read from disk, checked and remapped to the project labels."""

    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry
    warnings: list[Problem] = field(default_factory=list)
    #: Voxels of each class (background, RV, MYO, LV) in ``label``; ``None`` without label.
    label_counts: np.ndarray | None = None


def _values(vals: np.ndarray, n: int = 8) -> str:
    shown = ", ".join(f"{v:g}" for v in vals[:n])
    return f"[{shown}{', ...' if len(vals) > n else ''}] ({len(vals)} distinct)"


def check_intensities(image: np.ndarray, case_id: str, path: str) -> list[Problem]:
    """Error when the image holds NaN or Inf voxels (reports their count) or is constant.

    A constant image (every voxel the same value: a blank export, a failed
    reconstruction) has nothing to segment or learn from.
    """
    if image.size == 0:
        return []
    lo, hi = image.min(), image.max()  # two vectorised reductions; NaN propagates through them
    if np.issubdtype(image.dtype, np.floating) and not (np.isfinite(lo) and np.isfinite(hi)):
        n_nan, n_inf = int(np.isnan(image).sum()), int(np.isinf(image).sum())
        return [Problem(case_id, path, "intensity",
                        f"{n_nan} NaN and {n_inf} Inf voxels out of {image.size}; "
                        "re-export the image or mask the corrupt region.")]
    if lo == hi:
        return [Problem(case_id, path, "intensity",
                        f"image is constant (every voxel {float(lo):g}); it holds no anatomy. "
                        "Re-export it from the scanner or drop the case.")]
    return []


#: Below this largest value, :func:`_histogram` counts each value by comparison.
_FEW_VALUES = 16


def _histogram(label: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted distinct values and, for 8-bit labels, the voxels of each (one pass, no sort)."""
    if label.dtype not in (np.uint8, np.int8):
        return np.unique(label), None
    # ravel(order="K"): no copy of a Fortran array; int8 is counted as its uint8 bit pattern
    flat = label.ravel(order="K").view(np.uint8)
    top = int(flat.max()) if flat.size else 0
    if top < _FEW_VALUES:  # a few label values: one vectorised comparison each, ~10x faster
        hist = np.array([np.count_nonzero(flat == v) for v in range(top + 1)], dtype=np.int64)
        present = np.flatnonzero(hist)
        return present.astype(np.int64), hist[present]
    hist = np.bincount(flat, minlength=256)  # casts to int64 first: ~7 ms a cine frame
    offset = 0
    if label.dtype == np.int8:  # bit patterns 128..255 are -128..-1: put them first
        hist, offset = np.roll(hist, 128), -128
    present = np.flatnonzero(hist)
    return present.astype(np.int64) + offset, hist[present]


def _remap(label: np.ndarray, label_map, case_id: str, path: str,
           classes=None) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``label_map`` (file value -> class index pairs); unmapped values are errors.

    ``label_map=None`` is ACDC's identity (0 background, 1 RV, 2 MYO, 3 LV);
    ``classes`` (the class names, for messages) default to ACDC's.
    Returns the uint8 label and its voxel count per class (from the value
    histogram when there is one, so the volume is scanned once).
    """
    values, per_value = _histogram(label)
    pairs = label_map if label_map is not None else tuple((i, i) for i in range(len(CLASSES)))
    n_classes = max(b for _, b in pairs) + 1
    src = np.array([a for a, _ in pairs], dtype=np.int64)
    bad = values[~np.isin(values, src)]
    if bad.size:
        raise CaseError(Problem(case_id, path, "label_values",
                                f"label values {_values(bad)} are not in the label map "
                                f"{_spec(pairs, classes)}{_suggest(values, pairs, classes)}"))
    if all(a == b for a, b in pairs):
        out = label.astype(np.uint8, copy=False)
        mapped = values
    else:
        lut = np.zeros(int(src.max()) + 1, dtype=np.uint8)
        for a, b in pairs:
            lut[a] = b
        out = lut[label.astype(np.int64)]
        mapped = lut[values]
    if per_value is None:
        return out, np.bincount(out.ravel(order="K"), minlength=n_classes)[:n_classes]
    counts = np.bincount(mapped, weights=per_value, minlength=n_classes)[:n_classes]
    return out, counts.astype(np.int64)


def _class_names(pairs, classes) -> list[str]:
    n = max(b for _, b in pairs) + 1
    names = list(classes) if classes is not None and len(classes) == n else \
        list(CLASSES) if n == len(CLASSES) else ["background", *(f"class{i}" for i in range(1, n))]
    return names


def _spec(pairs, classes=None) -> str:
    names = _class_names(pairs, classes)
    return "'" + ",".join(f"{a}={names[b]}" for a, b in pairs) + "'"


def _suggest(values: np.ndarray, pairs=(), classes=None) -> str:
    """How to fix unmapped values: a ``--label-map`` with the values the file holds."""
    shown = [int(v) for v in values[:12]]
    if len(values) > 12 or not shown or shown[0] != 0:
        return "; fix the label file or pass --label-map 'VALUE=NAME,...' naming every value."
    known = dict(pairs)
    names = _class_names(pairs, classes) if pairs else []
    used, parts = set(), []  # mapped values keep their names; the others get placeholders
    guess = len(shown) == len(CLASSES) and not any(v in known for v in shown[1:])  # 4 values: ACDC order
    for i, v in enumerate(shown):
        if guess:
            name = CLASSES[i]
        elif v in known and names:
            name = names[known[v]]
        else:
            name = "background" if i == 0 else f"<class{i}>"
        if name in used:
            name = f"<class{i}>"
        used.add(name)
        parts.append(f"{v}={name}")
    example = ",".join(parts)
    return (f"; if these are your classes, pass --label-map '{example}' (the order of the names is "
            "the order of the classes; check which value is which structure).")


def check_labels(label: np.ndarray, label_map, case_id: str,
                 path: str) -> tuple[np.ndarray, list[Problem]]:
    """Check a label volume is integral and in range; return it remapped as uint8.

    Raises
    ------
    CaseError
        Non-finite or non-integral values, or values outside the label set.
    """
    out, warnings, _ = _check_labels(label, label_map, case_id, path)
    return out, warnings


def _check_labels(label: np.ndarray, label_map, case_id: str, path: str,
                  classes=None) -> tuple[np.ndarray, list[Problem], np.ndarray]:
    """:func:`check_labels` plus the voxel count of each class of the result."""
    warnings: list[Problem] = []
    if np.issubdtype(label.dtype, np.floating):
        finite = np.isfinite(label)
        if not finite.all():
            raise CaseError(Problem(case_id, path, "label_values",
                                    f"{int((~finite).sum())} NaN/Inf label voxels; fix the label file."))
        frac = np.unique(label[label != np.round(label)])
        if frac.size:
            raise CaseError(Problem(case_id, path, "label_values",
                                    f"non-integral label values {_values(frac)}; labels must be "
                                    "integers (was the mask resampled with linear interpolation?)."))
        warnings.append(Problem(case_id, path, "label_dtype",
                                f"labels stored as {label.dtype} but integral; store them as uint8.",
                                "warning"))
    elif not np.issubdtype(label.dtype, np.integer):
        raise CaseError(Problem(case_id, path, "label_values",
                                f"label dtype {label.dtype} is not numeric; store labels as uint8."))
    out, counts = _remap(label, label_map, case_id, path, classes)
    if not counts[1:].any():
        warnings.append(Problem(case_id, path, "empty_label",
                                "label volume is all background; kept (check it is intended).",
                                "warning"))
    return out, warnings, counts


def check_alignment(image_geom: Geometry, label_geom: Geometry, case_id: str, path: str,
                    tol: float = AFFINE_TOL_MM) -> list[Problem]:
    """Errors when image and label shapes differ or their affines differ by more than ``tol``."""
    if tuple(image_geom.shape) != tuple(label_geom.shape):
        return [Problem(case_id, path, "shape",
                        f"label shape {tuple(label_geom.shape)} != image shape "
                        f"{tuple(image_geom.shape)}; the label belongs to another image or was cropped.")]
    diff = image_geom.max_affine_difference(label_geom)
    if not diff <= tol:
        return [Problem(case_id, path, "affine",
                        f"label affine differs from the image affine by up to {diff:.4g} mm "
                        f"(tolerance {tol:g}); re-save the label with the image header.")]
    return []


def _pick_frame(case: CaseSpec, frame: FrameSpec | int | str) -> FrameSpec:
    if isinstance(frame, FrameSpec):
        return frame
    if isinstance(frame, str):
        for f in case.frames:
            if f.phase == frame:
                return f
        raise KeyError(f"{case.case_id} has no frame with phase {frame!r}")
    return case.frames[frame]


def _frame_headers(case: CaseSpec, fr: FrameSpec) -> tuple[list[Problem], Header | None, Header | None]:
    """Shape/affine errors visible from the image and label headers alone, and those headers.

    Comparing headers before any voxel is read means a label claiming a
    gigantic grid costs nothing; the headers then go to the voxel reads, so
    each file's header is parsed once.  Only files are compared here (a DICOM
    directory's geometry needs its series read); unreadable headers are left
    to the full read, which reports them.
    """
    if fr.label is None or Path(fr.image).is_dir() or Path(fr.label).is_dir():
        return [], None, None
    try:
        image = read_header(fr.image, case_id=case.case_id)
        label = read_header(fr.label, case_id=case.case_id)
    except CaseError:
        return [], None, None
    return check_alignment(image.geometry, label.geometry, case.case_id, fr.label), image, label


def _inspect(case: CaseSpec, fr: FrameSpec) -> tuple[LoadedFrame | None, list[Problem]]:
    """Read one frame and run every frame-level check; collect all problems found."""
    cid, problems = case.case_id, []
    image = geom = label = counts = None
    mismatch, image_header, label_header = _frame_headers(case, fr)
    if mismatch:  # the headers already disagree: read neither file's data
        return None, mismatch
    try:
        image, geom = read_volume(fr.image, case_id=cid, frame=fr.image_frame, header=image_header,
                                  dtype=np.float32)
        problems += check_intensities(image, cid, fr.image)
    except CaseError as exc:
        problems.append(exc.problem)
    if fr.label is not None:
        try:
            raw, label_geom = read_volume(fr.label, case_id=cid, frame=fr.label_frame,
                                          header=label_header)
            if geom is not None:
                problems += check_alignment(geom, label_geom, cid, fr.label)
            label, warnings, counts = _check_labels(raw, case.label_map, cid, fr.label,
                                                    case.metadata.get("classes"))
            problems += warnings
        except CaseError as exc:
            problems.append(exc.problem)
    if any(p.severity == "error" for p in problems):
        return None, problems
    warnings = [p for p in problems if p.severity != "error"]
    return LoadedFrame(image.astype(np.float32, copy=False), label, geom, warnings, counts), problems


def load_frame(case: CaseSpec, frame: FrameSpec | int | str) -> LoadedFrame:
    """Read, validate and remap one frame of a case.

    Parameters
    ----------
    case : CaseSpec
    frame : FrameSpec, int or str
        The frame itself, its index in ``case.frames`` or its phase (``"ED"``).

    Returns
    -------
    LoadedFrame
        ``image`` float32, ``label`` uint8 (project convention) or ``None``,
        the geometry and non-quarantining warnings.

    Raises
    ------
    CaseError
        The first error found (unreadable file, NaN intensities, misaligned or
        invalid labels, ...); :func:`validate_case` reports all of them.
    """
    loaded, problems = _inspect(case, _pick_frame(case, frame))
    if loaded is None:
        raise CaseError(next(p for p in problems if p.severity == "error"))
    return loaded


def load_cine(case: CaseSpec) -> tuple[np.ndarray, Geometry] | None:
    """The whole 4D cine of a case as float32 ``array[i, j, k, t]``, or ``None`` if it has none.

    Raises
    ------
    CaseError
        Unreadable cine, or one that is not 4D.
    """
    if case.cine is None:
        return None
    data, geom = read_cine(case.cine, case_id=case.case_id)
    return data.astype(np.float32), geom


def check_metadata(case: CaseSpec) -> list[Problem]:
    """Error when a layout that needs ED/ES lacks them in ``case.metadata``."""
    if case.layout not in _NEEDS_PHASES:
        return []
    missing = [k for k in ("ED", "ES") if case.metadata.get(k) is None]
    if missing:
        return [Problem(case.case_id, case.metadata.get("source"), "metadata",
                        f"missing {'/'.join(missing)} frame numbers; add them to the metadata file.")]
    return []


def _check_cine(case: CaseSpec) -> list[Problem]:
    if case.cine is None or any(f.image == case.cine for f in case.frames):
        return []  # a cine that is also a frame source is checked by reading the frames
    try:
        hdr = read_header(case.cine, case_id=case.case_id)
    except CaseError as exc:
        return [exc.problem]
    if len(hdr.shape) != 4:
        return [Problem(case.case_id, case.cine, "dimensions",
                        f"cine has shape {hdr.shape}; expected 4D (x, y, slice, time).")]
    return []


def check_case(case: CaseSpec) -> list[Problem]:
    """Case-level checks (ED/ES metadata, the cine's header); no frame is read.

    The build runs these before any frame, so a case ``ingest`` quarantines
    for its cine (e.g. a 3D file named ``*_4d``) is quarantined by ``build`` too.
    """
    return check_metadata(case) + _check_cine(case)


def validate_case(case: CaseSpec) -> list[Problem]:
    """Run every check on every frame of a case; never raises for data problems.

    Returns
    -------
    list of Problem
        Errors (quarantine the case) and warnings, in frame order.
    """
    return inspect_case(case)[0]


def inspect_case(case: CaseSpec) -> tuple[list[Problem], np.ndarray | None, list[dict]]:
    """:func:`validate_case` plus the case's in-plane class contacts and shift features.

    The contacts (:func:`cmrprep.anatomy.contact_counts` summed over the
    labelled frames, in class indices; for the label-convention check) are
    ``None`` without labels or when a frame has an error.  The features are
    :func:`cmrprep.shift.frame_features` of each readable frame.
    """
    from cmrprep.anatomy import contact_counts
    from cmrprep.shift import frame_features

    problems = check_case(case)
    contacts, features = None, []
    n_classes = max(b for _, b in case.label_map) + 1 if case.label_map else len(CLASSES)
    classes = tuple(case.metadata.get("classes") or CLASSES)
    for fr in case.frames:
        loaded, found = _inspect(case, fr)
        problems += found
        if loaded is not None:
            features.append(frame_features(loaded.image, loaded.geometry, loaded.label, classes=classes))
        if loaded is not None and loaded.label is not None:
            in_plane = tuple(int(a) for a in np.argsort(loaded.geometry.spacing, kind="stable")[:2])
            pairs = contact_counts(loaded.label, in_plane, n_classes)
            contacts = pairs if contacts is None else contacts + pairs
    for p in problems:
        log.info("%s", p)
    if any(p.severity == "error" for p in problems):
        contacts = None
    return problems, contacts, features
