"""DICOM cines: single files, enhanced multi-frame files and classic exports of many files.

A *DICOM source* is a directory (searched recursively, so Kaggle-style
``study/sax_5/IM-0001-0001.dcm`` folders work) or one file.  All its image
frames are gathered (one per classic file; one per frame of an enhanced
multi-frame file, whose position, orientation, pixel spacing, trigger delay and
rescale live in the per-frame or shared functional groups), then assembled into
one 4D cine ``array[i, j, k, t]``:

* frames are grouped into *stacks* sharing a study, an orientation
  (``ImageOrientationPatient`` within :data:`ORIENTATION_TOL`) and an in-plane
  geometry (rows, columns, pixel spacing).  A short-axis stack is often
  exported as one series per slice position; those series form one stack.
  Single-position stacks of other orientations (localisers, 2/3/4-chamber
  views) are left out with a logged note; two multi-slice stacks of different
  orientations are refused as ambiguous;
* slices are ordered by ``ImagePositionPatient`` projected on the slice normal
  (row x column direction cosines), frames by ``TriggerTime`` (enhanced:
  ``NominalCardiacTriggerDelayTime``), else ``InstanceNumber``.  When one
  position holds two series (a repeated breath-hold), the later series
  (highest ``SeriesNumber``) is kept, logged;
* missing slices (a gap in the positions), unequal frame counts per slice or
  unequal slice spacing are refused with the positions named;
* the affine maps ``i`` along the row direction (columns), ``j`` along the
  column direction (rows), ``k`` along the normal, in NIfTI's RAS (DICOM's
  LPS with x and y negated).  This is the grid ITK, SimpleITK and the tools
  built on them (3D Slicer, ITK-SNAP) give the series, so a segmentation
  saved from them as NIfTI is on the same grid.

Pixel values get ``RescaleSlope``/``RescaleIntercept`` (float32 when they are not
1/0).  A frame without ``TriggerTime`` in a multi-frame stack takes its place
from ``InstanceNumber``.  Every refusal is a :class:`~cmrprep.cases.CaseError`
naming the source and the reason.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmrprep.cases import CaseError, Problem
from cmrprep.geometry import Geometry

__all__ = ["is_dicom_file", "is_dicom_source", "dicom_files", "read_dicom_header", "read_dicom",
           "ORIENTATION_TOL", "POSITION_TOL_MM"]

log = logging.getLogger(__name__)

#: Largest difference of direction cosines for two frames to share an orientation.
ORIENTATION_TOL = 1e-3
#: Positions (mm along the normal) closer than this are one slice.
POSITION_TOL_MM = 0.05
#: Relative tolerance on slice spacing before a stack is refused as irregular.
SPACING_RTOL = 0.1
_SKIP_SUFFIXES = (".nii", ".nii.gz", ".json", ".txt", ".csv", ".cfg", ".md", ".png", ".jpg", ".xml")


def is_dicom_file(path: str | Path) -> bool:
    """True for a ``.dcm`` file or a file with the ``DICM`` preamble magic."""
    p = Path(path)
    if not p.is_file() or p.name.startswith("."):
        return False
    if p.suffix.lower() == ".dcm":
        return True
    if p.name.lower().endswith(_SKIP_SUFFIXES) or p.name.upper() == "DICOMDIR":
        return False
    try:
        with open(p, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def dicom_files(path: str | Path) -> list[Path]:
    """The DICOM files of a source: the file itself, or every DICOM file below a directory."""
    p = Path(path)
    if p.is_file():
        return [p] if is_dicom_file(p) else []
    out = []
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if is_dicom_file(Path(dirpath) / f))
    return out


def is_dicom_source(path: str | Path, probe: int = 8) -> bool:
    """True when ``path`` is a DICOM file or a directory with DICOM files in it (any depth)."""
    p = Path(path)
    if p.is_file():
        return is_dicom_file(p)
    if not p.is_dir():
        return False
    seen = 0
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in sorted(filenames):
            f = Path(dirpath) / f
            if f.name.lower().endswith(_SKIP_SUFFIXES):
                continue
            if is_dicom_file(f):
                return True
            seen += 1
            if seen >= probe:
                return False
    return False


@dataclass(frozen=True)
class _Frame:
    """One 2D image: where it is stored and where it lies."""

    file: str
    index: int | None  # frame of a multi-frame file (None: single-frame file)
    study: str
    series: str
    series_number: int
    rows: int
    cols: int
    row_cos: tuple[float, float, float]  # direction of increasing column index
    col_cos: tuple[float, float, float]  # direction of increasing row index
    spacing: tuple[float, float]  # (between rows, between columns) mm
    position: tuple[float, float, float]
    trigger: float | None
    instance: int
    slope: float
    intercept: float


def _fail(source: Path, case_id: str, message: str, check: str = "dicom") -> CaseError:
    return CaseError(Problem(case_id, str(source), check, message))


def _floats(value, n: int, what: str, file: Path) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != n:
        raise ValueError(f"{file.name}: {what} is {value!r}, expected {n} numbers")
    return out


def _item(seq_owner, name: str):
    seq = getattr(seq_owner, name, None)
    return seq[0] if seq else None


def _enhanced_frames(ds, file: Path) -> list[_Frame]:
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.PerFrameFunctionalGroupsSequence
    n = int(ds.NumberOfFrames)
    if len(per_frame) != n:
        raise ValueError(f"{file.name}: NumberOfFrames {n} but {len(per_frame)} per-frame functional groups")

    def group(fg, name):
        return _item(fg, name) or (_item(shared, name) if shared is not None else None)

    frames = []
    for f, fg in enumerate(per_frame):
        plane, orient = group(fg, "PlanePositionSequence"), group(fg, "PlaneOrientationSequence")
        pixel = group(fg, "PixelMeasuresSequence")
        if plane is None or orient is None or pixel is None:
            raise ValueError(f"{file.name} frame {f + 1}: no plane position, orientation or pixel "
                             "measures in the functional groups")
        iop = _floats(orient.ImageOrientationPatient, 6, "ImageOrientationPatient", file)
        sync, content = group(fg, "CardiacSynchronizationSequence"), group(fg, "FrameContentSequence")
        trigger = getattr(sync, "NominalCardiacTriggerDelayTime", None) if sync is not None else None
        temporal = getattr(content, "TemporalPositionIndex", None) if content is not None else None
        rescale = group(fg, "PixelValueTransformationSequence")
        frames.append(_Frame(str(file), f, str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
                             int(ds.get("SeriesNumber", 0) or 0), int(ds.Rows), int(ds.Columns),
                             iop[:3], iop[3:], _floats(pixel.PixelSpacing, 2, "PixelSpacing", file),
                             _floats(plane.ImagePositionPatient, 3, "ImagePositionPatient", file),
                             float(trigger) if trigger is not None else None,
                             int(temporal) if temporal is not None else f,
                             float(getattr(rescale, "RescaleSlope", 1.0) if rescale is not None else 1.0),
                             float(getattr(rescale, "RescaleIntercept", 0.0) if rescale is not None else 0.0)))
    return frames


def _classic_frame(ds, file: Path) -> _Frame:
    for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        if tag not in ds:
            raise ValueError(f"{file.name}: no {tag} (a secondary capture or a report, not an MR image?)")
    iop = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", file)
    trigger = ds.get("TriggerTime")
    return _Frame(str(file), None, str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
                  int(ds.get("SeriesNumber", 0) or 0), int(ds.Rows), int(ds.Columns), iop[:3], iop[3:],
                  _floats(ds.PixelSpacing, 2, "PixelSpacing", file),
                  _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", file),
                  float(trigger) if trigger not in (None, "") else None,
                  int(ds.get("InstanceNumber", 0) or 0),
                  float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0))


def _scan(files: list[Path], source: Path, case_id: str) -> tuple[list[_Frame], int]:
    """Every image frame of ``files`` (headers only) and the number of non-image files skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    frames, skipped = [], 0
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise _fail(source, case_id, f"{f.name} is not a readable DICOM file ({type(exc).__name__}: "
                                         f"{exc}); remove it or re-export the series.", "readable") from exc
        if "Rows" not in ds or "Columns" not in ds:
            skipped += 1  # a report, presentation state or structured report: no pixels
            continue
        try:
            if int(ds.get("NumberOfFrames", 1) or 1) > 1 and "PerFrameFunctionalGroupsSequence" in ds:
                frames.extend(_enhanced_frames(ds, f))
            elif int(ds.get("NumberOfFrames", 1) or 1) > 1:
                raise ValueError(f"{f.name}: {ds.NumberOfFrames} frames without per-frame functional "
                                 "groups (not an enhanced MR image); positions unknown")
            else:
                frames.append(_classic_frame(ds, f))
        except ValueError as exc:
            raise _fail(source, case_id, f"{exc}; cannot place the image in space.") from exc
    return frames, skipped


def _normal(fr: _Frame) -> np.ndarray:
    n = np.cross(fr.row_cos, fr.col_cos)
    return n / np.linalg.norm(n)


def _position_key(fr: _Frame, normal: np.ndarray) -> int:
    """The slice a frame belongs to: its position along ``normal`` in units of :data:`POSITION_TOL_MM`."""
    return round(float(np.dot(fr.position, normal)) / POSITION_TOL_MM)


def _n_positions(frames: list[_Frame]) -> int:
    normal = _normal(frames[0])
    return len({_position_key(fr, normal) for fr in frames})


def _stack_key(fr: _Frame) -> tuple:
    q = lambda v: tuple(round(x / ORIENTATION_TOL) for x in v)  # noqa: E731
    return (fr.study, q(fr.row_cos + fr.col_cos), fr.rows, fr.cols, tuple(round(s, 3) for s in fr.spacing))


def _describe(frames: list[_Frame]) -> str:
    f = frames[0]
    return (f"{_n_positions(frames)} slice position(s), orientation {np.round(f.row_cos + f.col_cos, 3).tolist()}, "
            f"{f.rows}x{f.cols}, series {sorted({fr.series_number for fr in frames})}")


def _choose_stack(frames: list[_Frame], source: Path, case_id: str) -> list[_Frame]:
    stacks: dict[tuple, list[_Frame]] = {}
    for fr in frames:
        stacks.setdefault(_stack_key(fr), []).append(fr)
    studies = {k[0] for k in stacks}
    if len(studies) > 1:
        raise _fail(source, case_id, f"holds {len(studies)} studies ({sorted(studies)[:3]}); "
                                     "give one study per case folder.")
    if len(stacks) == 1:
        return next(iter(stacks.values()))
    multi = [st for st in stacks.values() if _n_positions(st) > 1]
    if len(multi) == 1:
        left = [st for st in stacks.values() if st is not multi[0]]
        log.info("%s: using the stack of %s; left out %d other view(s): %s", source, _describe(multi[0]),
                 len(left), "; ".join(_describe(st) for st in left))
        return multi[0]
    shown = "; ".join(_describe(st) for st in (multi or list(stacks.values())))
    raise _fail(source, case_id, f"mixed orientations or in-plane geometries: {shown}. A cine is one "
                                 "stack of parallel slices with one matrix and pixel spacing; put each "
                                 "stack in its own folder (or remove the extra series).")


def _assemble(stack: list[_Frame], source: Path, case_id: str) -> tuple[list[list[_Frame]], np.ndarray]:
    """Frames ``[slice][time]`` and the sorted slice positions (mm along the normal)."""
    normal = _normal(stack[0])
    by_pos: dict[int, list[_Frame]] = {}
    for fr in stack:
        by_pos.setdefault(_position_key(fr, normal), []).append(fr)
    slices, positions = [], []
    for key in sorted(by_pos):
        frs = by_pos[key]
        series = {fr.series_number for fr in frs}
        if len(series) > 1:  # a repeated breath-hold: keep the later series
            keep = max(series)
            log.warning("%s: slice at %.2f mm is in series %s; kept the later series %d", source,
                        key * POSITION_TOL_MM, sorted(series), keep)
            frs = [fr for fr in frs if fr.series_number == keep]
        if all(fr.trigger is not None for fr in frs):
            frs.sort(key=lambda fr: (fr.trigger, fr.instance))
        else:  # TriggerTime missing somewhere: the acquisition order
            frs.sort(key=lambda fr: fr.instance)
        slices.append(frs)
        positions.append(float(np.dot(frs[0].position, normal)))
    counts = [len(s) for s in slices]
    if len(set(counts)) > 1:
        common = max(set(counts), key=counts.count)
        odd = [f"{p:.1f} mm: {c}" for p, c in zip(positions, counts) if c != common]
        raise _fail(source, case_id, f"unequal frame counts per slice: {common} at most positions but "
                                     f"{', '.join(odd[:6])}; every slice of a cine needs the same frames "
                                     "(an interrupted or repeated acquisition?).")
    pos = np.asarray(positions)
    if pos.size > 2:
        gaps = np.diff(pos)
        step = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - step) > SPACING_RTOL * step)
        if bad.size:
            where = ", ".join(f"{pos[b]:.1f}->{pos[b + 1]:.1f} mm" for b in bad[:4])
            missing = "a missing slice" if np.any(gaps[bad] > 1.5 * step) else "unequal slice spacing"
            raise _fail(source, case_id, f"{missing}: slices are {step:.2f} mm apart except {where}; "
                                         "export every slice of the stack (or remove the odd one).")
    return slices, pos


def _affine(first: _Frame, last: _Frame, n_slices: int) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(first.row_cos) * first.spacing[1]
    lps[:3, 1] = np.asarray(first.col_cos) * first.spacing[0]
    if n_slices > 1:
        lps[:3, 2] = (np.asarray(last.position) - np.asarray(first.position)) / (n_slices - 1)
    else:
        lps[:3, 2] = _normal(first) * 1.0  # one slice: unit thickness along the normal
    lps[:3, 3] = first.position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@dataclass(frozen=True)
class _Study:
    slices: tuple[tuple[_Frame, ...], ...]
    shape: tuple[int, ...]
    geometry: Geometry


def _signature(files: list[Path]) -> tuple:
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)


@functools.lru_cache(maxsize=8)
def _study(source: str, signature: tuple, case_id: str) -> _Study:
    p = Path(source)
    files = [Path(f) for f, _, _ in signature]
    frames, skipped = _scan(files, p, case_id)
    if not frames:
        raise _fail(p, case_id, f"no DICOM image in {len(files)} file(s)"
                                f"{f' ({skipped} without pixel data)' if skipped else ''}.", "readable")
    slices, _ = _assemble(_choose_stack(frames, p, case_id), p, case_id)
    first = slices[0][0]
    n_s, n_t = len(slices), len(slices[0])
    shape = (first.cols, first.rows, n_s) + ((n_t,) if n_t > 1 else ())
    geometry = Geometry.from_affine(_affine(first, slices[-1][0], n_s), shape[:3])
    return _Study(tuple(tuple(s) for s in slices), shape, geometry)


def _load(source: Path, case_id: str) -> _Study:
    files = dicom_files(source)
    if not files:
        raise _fail(source, case_id, "no DICOM file found (.dcm or a DICM preamble).", "readable")
    return _study(str(source), _signature(files), case_id)


def read_dicom_header(source: str | Path, *, case_id: str) -> tuple[tuple[int, ...], Geometry]:
    """Shape ``(i, j, k[, t])`` and geometry of a DICOM source, from headers only."""
    study = _load(Path(source), case_id)
    return study.shape, study.geometry


def _pixels(files: dict[str, list[_Frame]], source: Path, case_id: str) -> dict[tuple[str, int | None], np.ndarray]:
    import pydicom

    out = {}
    for file, frs in files.items():
        try:
            arr = pydicom.dcmread(file).pixel_array
        except Exception as exc:  # missing codec, truncated pixel data: many types
            hint = (" Install a decoder for its transfer syntax (pip install pylibjpeg pylibjpeg-libjpeg "
                    "pylibjpeg-openjpeg) or export it uncompressed." if "decod" in str(exc).lower()
                    or "handler" in str(exc).lower() else " The file is truncated or corrupt.")
            raise _fail(source, case_id, f"cannot read the pixel data of {Path(file).name} "
                                         f"({type(exc).__name__}: {exc}).{hint}", "readable") from exc
        for fr in frs:
            out[(file, fr.index)] = arr[fr.index] if fr.index is not None else arr
    return out


def read_dicom(source: str | Path, *, case_id: str, frame: int | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a DICOM cine ``array[i, j, k, t]`` (or, with ``frame``, one 3D time point).

    Values are the stored pixels with the rescale applied (float32 when the slope
    or intercept is not 1/0, else the stored integer type).

    Raises
    ------
    CaseError
        No DICOM image, unreadable files, mixed stacks, missing slices, unequal
        frame counts or spacing, a frame out of range.
    """
    src = Path(source)
    study = _load(src, case_id)
    n_t = len(study.slices[0])
    if frame is not None and not 0 <= int(frame) < n_t:
        raise _fail(src, case_id, f"frame {frame} out of range for {n_t} time point(s) "
                                  f"(valid 0..{n_t - 1}).", "frame")
    times = range(n_t) if frame is None else [int(frame)]
    wanted: dict[str, list[_Frame]] = {}
    for s in study.slices:
        for t in times:
            wanted.setdefault(s[t].file, []).append(s[t])
    pixels = _pixels(wanted, src, case_id)
    scaled = any(fr.slope != 1.0 or fr.intercept != 0.0 for frs in wanted.values() for fr in frs)
    first = pixels[(study.slices[0][times[0]].file, study.slices[0][times[0]].index)]
    out = np.empty(study.shape[:3] + (len(times),), dtype=np.float32 if scaled else first.dtype.newbyteorder("="))
    for k, s in enumerate(study.slices):
        for n, t in enumerate(times):
            fr = s[t]
            img = pixels[(fr.file, fr.index)]
            if img.shape != (fr.rows, fr.cols):
                raise _fail(src, case_id, f"{Path(fr.file).name}: pixel data {img.shape} but Rows x Columns "
                                          f"{fr.rows}x{fr.cols}; re-export it.", "readable")
            out[:, :, k, n] = (img.T * fr.slope + fr.intercept) if scaled else img.T
    if frame is not None or n_t == 1:
        out = out[..., 0]
    return out, study.geometry
