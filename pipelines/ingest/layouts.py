"""Find cases on disk: ACDC, M&Ms, nnU-Net raw, generic globs, DICOM and bare images.

:func:`discover` only looks at names, small metadata files and (for bare 4D
images) headers; pixel data is read later by :mod:`pipelines.ingest.validate`.
A case that cannot even be described (e.g. ``Info.cfg`` without ``ED``)
becomes a :class:`Problem` and the other cases go on.
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmrprep.cases import CaseError, CaseSpec, FrameSpec, Problem
from cmrprep.labels import ACDC, MNMS, LabelMap
from cmrprep.plan import ConfigError
from pipelines.ingest.nnunet import discover_nnunet
from pipelines.ingest.options import LAYOUTS, DiscoveryOptions
from pipelines.ingest.patients import NNUNET_PATIENT, group_patients
from pipelines.ingest.readcache import ReadCache
from pipelines.ingest.readers import NIFTI_SUFFIXES, is_volume_path, read_header, volume_stem

__all__ = ["LAYOUTS", "MNMS_LABEL_MAP", "Discovery", "discover", "detect_layout"]

log = logging.getLogger(__name__)

#: M&Ms labels (1 LV, 2 MYO, 3 RV) -> project (1 RV, 2 MYO, 3 LV).
MNMS_LABEL_MAP = MNMS.values
_ACDC_FRAME = re.compile(r"^(?P<case>.+)_frame(?P<n>\d+)(_gt)?$")
_ACDC_FRAME_FILE = re.compile(fnmatch.translate("*_frame[0-9][0-9]*.nii*")).match
#: What ``pipelines.predict`` writes into the root of its output folder.
PREDICT_REPORT = "predict_report.json"
#: Stem suffix of ``pipelines.predict``'s label files; such files are never images.
PRED_SUFFIX = "_pred"


@dataclass
class Discovery:
    """Result of :func:`discover`: cases sorted by id, problems found on the way, the label map."""

    layout: str
    cases: list[CaseSpec] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    #: File values -> classes of every labelled case (the layout's or the user's).
    label_map: LabelMap = ACDC


def walk(root: str | Path):
    """``(folder, file names, folder names)`` of every folder under ``root``, sorted, following
    symlinked folders (loop-safe), skipping ``pipelines.predict`` output folders.

    Datasets are often assembled from symlinks (one folder per patient pointing
    into an archive); :meth:`pathlib.Path.rglob` skips symlinked directories
    before Python 3.13, which would silently drop those cases.  Names are plain
    strings: at thousands of cases, a :class:`~pathlib.Path` per file costs more
    than the walk itself.
    """
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:  # vanished while walking
            dirnames[:] = []
            continue
        real = (st.st_dev, st.st_ino)  # one stat (realpath takes one per path component)
        if real in seen:  # a symlink loop or a folder linked twice
            dirnames[:] = []
            continue
        if PREDICT_REPORT in filenames:  # a pipelines.predict output folder: never an input
            log.info("skipping %s: it holds %s (prediction outputs are not inputs)",
                     dirpath, PREDICT_REPORT)
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        filenames.sort()
        yield dirpath, filenames, dirnames


def rglob(root: Path, *patterns: str):
    """``root.rglob(pattern)`` that also descends into symlinked folders (sorted, loop-safe);
    with several patterns, the names matching any of them (one walk).  See :func:`walk`.
    """
    if not patterns:
        return
    match = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match
    for dirpath, filenames, dirnames in walk(root):
        folder = None
        for name in sorted(filenames + dirnames):
            if match(name):
                folder = folder or Path(dirpath)
                yield folder / name


def _find_nifti(folder: Path, stem: str) -> Path | None:
    base = os.fspath(folder)
    for suffix in NIFTI_SUFFIXES:  # plain strings: a miss costs a stat, not two Path objects
        path = os.path.join(base, stem + suffix)
        if os.path.isfile(path):
            return Path(path)
    return None


def detect_layout(root: Path, image_glob: str | None = None, cache: ReadCache | None = None) -> str:
    """Guess the layout of ``root`` from file names (see module docstring; DICOM files are
    recognised by their content, probed through ``cache`` when given)."""
    if root.is_file():
        return "dicom" if _is_dicom_path(root) else "images"
    if (root / "dataset.json").is_file() and any((root / d).is_dir() for d in ("imagesTr", "imagesTs")):
        return "nnunet"
    if image_glob is not None:
        return "generic"
    images = (p for p in rglob(root, "*.nii*") if not volume_stem(p).endswith("_gt"))
    if next(images, None) is None and _dicom_sources(root, cache):  # DICOM, NIfTI labels at most
        return "dicom"
    if next(rglob(root, "Info.cfg"), None) or next(rglob(root, "*_frame[0-9][0-9]*.nii*"), None):
        return "acdc"
    if next(rglob(root, "*_sa.nii*"), None):
        return "mnms"
    if is_volume_path(root):
        return "images"
    return "generic"


def _is_dicom_path(path: Path) -> bool:
    from pipelines.ingest.dicom import is_dicom_source

    return is_dicom_source(path)


# -- ACDC ---------------------------------------------------------------------
def _parse_info(path: str | Path) -> dict:
    meta: dict = {"source": os.fspath(path)}
    # utf-8-sig: an Info.cfg saved by a Windows editor starts with a byte-order mark
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        text = fh.read()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        value = value.strip()
        try:
            num = float(value)
            meta[key.strip()] = int(num) if num.is_integer() else num
        except ValueError:
            meta[key.strip()] = value
    return meta


def _pick_nifti(folder: str, names: frozenset[str], stem: str) -> str | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever the listing ``names`` holds."""
    for suffix in NIFTI_SUFFIXES:
        if stem + suffix in names:
            return os.path.join(folder, stem + suffix)
    return None


def _acdc_case(item: tuple[str, frozenset[str]], cache: ReadCache | None = None) -> CaseSpec:
    """One ACDC case from its folder and the folder's file names (from the walk: no ``stat``;
    with ``cache``, one ``stat`` of ``Info.cfg`` and no read while it is unchanged)."""
    folder, names = item
    cid, info = os.path.basename(folder), os.path.join(folder, "Info.cfg")
    missing = Problem(cid, info, "metadata",
                      "Info.cfg is missing; add it with ED/ES (ACDC layout, detected from the "
                      "*_frameNN names). Not ACDC? Pass --layout generic --image-glob '...' "
                      "(and --label-pattern / --patient-pattern).")
    if "Info.cfg" not in names:
        raise CaseError(missing)
    try:
        meta = cache.read(info, "acdc_info", _parse_info) if cache is not None else _parse_info(info)
    except FileNotFoundError:  # a dangling link
        raise CaseError(missing) from None
    except OSError as exc:
        raise CaseError(Problem(cid, info, "metadata", f"Info.cfg cannot be read ({exc.strerror})"
                                "; check its permissions.")) from None
    for key in ("ED", "ES"):
        if not isinstance(meta.get(key), int) or meta[key] < 1:
            found = "missing" if meta.get(key) is None else f"{meta[key]!r}"
            raise CaseError(Problem(cid, info, "metadata",
                                    f"{key} is {found}; Info.cfg needs '{key}: <1-based frame>'."))
    phases = [("ED", meta["ED"])] + ([("ES", meta["ES"])] if meta["ES"] != meta["ED"] else [])
    images = {ph: _pick_nifti(folder, names, f"{cid}_frame{n:02d}") for ph, n in phases}
    labels = {ph: _pick_nifti(folder, names, f"{cid}_frame{n:02d}_gt") for ph, n in phases}
    for ph, n in phases:
        if images[ph] is None:
            raise CaseError(Problem(cid, os.path.join(folder, f"{cid}_frame{n:02d}.nii.gz"),
                                    "missing_file",
                                    f"{ph} frame {n} (Info.cfg) has no image file; restore it."))
    if any(labels.values()) and not all(labels.values()):
        ph = next(p for p, lab in labels.items() if lab is None)
        raise CaseError(Problem(cid, images[ph], "missing_file",
                                f"{ph} label *_gt file missing while the other phase has one; restore it."))
    frames = tuple(FrameSpec(ph, images[ph], labels[ph]) for ph, _ in phases)
    return CaseSpec(cid, "acdc", frames, _pick_nifti(folder, names, f"{cid}_4d"), None, meta)


def _is_acdc_name(name: str) -> bool:
    """``Info.cfg`` or an ACDC frame volume (``*_frameNN[_gt].nii[.gz]``, not ``*_frameNN_pred``)."""
    return name == "Info.cfg" or (_ACDC_FRAME_FILE(name) is not None
                                  and _ACDC_FRAME.match(volume_stem(name)) is not None)


def _discover_acdc(root: Path, cache: ReadCache | None = None, **_) -> Discovery:
    folders = [(dirpath, frozenset(filenames)) for dirpath, filenames, _ in walk(root)
               if any(_is_acdc_name(n) for n in filenames)]
    return _collect("acdc", folders, lambda item: _acdc_case(item, cache), source=lambda item: item[0])


# -- M&Ms ---------------------------------------------------------------------
def _csv_header(path: str) -> list[str]:
    with open(path, newline="", errors="replace") as fh:
        return next(csv.reader(fh), [])


def _find_mnms_csv(root: Path, cache: ReadCache | None = None) -> Path:
    for folder in (root, root.parent):
        for path in sorted(folder.glob("*.csv")):
            header = cache.read(path, "csv_header", _csv_header) if cache is not None else _csv_header(path)
            if {"External code", "ED", "ES"} <= {h.strip() for h in header}:
                return path
    raise ConfigError(f"no M&Ms CSV with columns 'External code', 'ED', 'ES' in {root} or its "
                      "parent; pass mnms_csv=PATH.")


def _read_mnms_csv(path: Path) -> dict[str, dict]:
    with open(path, newline="", errors="replace") as fh:
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(fh)]
    return {r["External code"]: r for r in rows if r.get("External code")}


def _mnms_case(sa: Path, rows: dict[str, dict], csv_path: Path) -> CaseSpec:
    cid = volume_stem(sa)[: -len("_sa")]
    row = rows.get(cid)
    if row is None:
        raise CaseError(Problem(cid, str(csv_path), "metadata",
                                f"no row for {cid!r} in the M&Ms CSV; add ED/ES (0-based) for it."))
    try:
        ed, es = (int(float(row[k])) for k in ("ED", "ES"))
    except (KeyError, ValueError):
        raise CaseError(Problem(cid, str(csv_path), "metadata",
                                f"ED/ES {row.get('ED')!r}/{row.get('ES')!r} are not frame indices; "
                                "fix the CSV (0-based integers).")) from None
    gt = _find_nifti(sa.parent, f"{cid}_sa_gt")
    lab = str(gt) if gt else None
    frames = (FrameSpec("ED", str(sa), lab, ed, ed if lab else None),
              FrameSpec("ES", str(sa), lab, es, es if lab else None))
    meta = {**row, "ED": ed, "ES": es, "source": str(csv_path)}
    return CaseSpec(cid, "mnms", frames, str(sa), MNMS_LABEL_MAP, meta)


def _discover_mnms(root: Path, mnms_csv=None, cache: ReadCache | None = None, **_) -> Discovery:
    csv_path = Path(mnms_csv) if mnms_csv else _find_mnms_csv(root, cache)
    if not csv_path.is_file():
        raise ConfigError(f"M&Ms CSV {csv_path} does not exist; fix mnms_csv.")
    rows = (cache.read(csv_path, "mnms_csv", _read_mnms_csv) if cache is not None
            else _read_mnms_csv(csv_path))
    files = sorted(p for p in rglob(root, "*_sa.nii*") if volume_stem(p).endswith("_sa"))
    return _collect("mnms", files, lambda p: _mnms_case(p, rows, csv_path))


# -- generic / images ---------------------------------------------------------
def _label_for(image: Path, label_suffix: str, label_pattern: str | None) -> Path:
    stem = volume_stem(image)
    ext = image.name[len(stem):]
    name = label_pattern.format(stem=stem, ext=ext) if label_pattern else f"{stem}{label_suffix}{ext}"
    return image.parent / name


def _candidates(root: Path, image_glob: str | None) -> list[Path]:
    if root.is_file() or is_volume_path(root):
        return [root]
    paths = root.glob(image_glob) if image_glob else rglob(root, "*")
    return sorted(p for p in paths if not p.name.startswith(".") and is_volume_path(p)
                  and not volume_stem(p).endswith(PRED_SUFFIX))  # predict's outputs are not inputs


def _frames_of(image: Path, label: str | None, cid: str) -> tuple[tuple[FrameSpec, ...], str | None]:
    """One frame per volume; a label-free 4D file becomes one frame per time point."""
    if label is None and image.is_file():
        try:
            shape = read_header(image, case_id=cid).shape
        except CaseError:
            shape = ()  # reported when the frame is validated
        if len(shape) == 4:
            return tuple(FrameSpec(f"F{t:02d}", str(image), None, t) for t in range(shape[3])), str(image)
    return (FrameSpec("F00", str(image), label),), None


def _discover_files(root: Path, layout: str, image_glob=None, label_suffix="_gt",
                    label_pattern=None, auto=False, **_) -> Discovery:
    cands = _candidates(root, image_glob)
    labels = {_label_for(p, label_suffix, label_pattern) for p in cands if p.is_file()}
    images = [p for p in cands if p not in labels
              and not (label_suffix and volume_stem(p).endswith(label_suffix))]
    if auto and layout == "generic" and not any(lab.is_file() for lab in labels):
        layout = "images"

    def make(image: Path) -> CaseSpec:
        lab = _label_for(image, label_suffix, label_pattern)
        label = str(lab) if image.is_file() and lab.is_file() else None
        frames, cine = _frames_of(image, label, volume_stem(image))
        return CaseSpec(volume_stem(image), layout, frames, cine)

    return _collect(layout, images, make)


# -- DICOM --------------------------------------------------------------------
_DICOM_FRAME_LABEL = re.compile(r"_frame(\d+)$")


def _dicom_sources(root: Path, cache: ReadCache | None = None) -> list[Path]:
    """Case sources under ``root``: ``root`` itself when it holds DICOM files directly
    (unless each is a whole multi-frame cine), else each child folder or file with DICOM in it.

    The probes read files (preambles, headers); with ``cache`` they are not repeated
    while nothing under ``root`` changed."""
    if root.is_file():
        return [root]
    if cache is not None:
        return [Path(p) for p in cache.read(root, "dicom_sources",
                                            lambda p: [str(q) for q in _probe_dicom_sources(Path(p))])]
    return _probe_dicom_sources(root)


def _probe_dicom_sources(root: Path) -> list[Path]:
    from pipelines.ingest.dicom import is_dicom_file, is_dicom_source

    direct = [f for f in sorted(root.iterdir()) if is_dicom_file(f)]
    if direct and not all(_is_multiframe(f) for f in direct):
        return [root]
    children = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
                and is_dicom_source(d)]
    return direct + children


def _is_multiframe(path: Path) -> bool:
    import pydicom

    try:
        return int(pydicom.dcmread(str(path), stop_before_pixels=True,
                                   specific_tags=["NumberOfFrames"]).get("NumberOfFrames", 1) or 1) > 1
    except Exception:  # unreadable: reported when the case is read
        return False


def _dicom_stem(source: Path) -> str:
    """Case id of a DICOM source: the folder's name, or the file's without ``.dcm``."""
    return source.name[:-4] if source.name.lower().endswith(".dcm") else source.name


def _labels_beside_file(source: Path, label_suffix: str) -> list[Path]:
    """Where the NIfTI labels of a DICOM *file* source would lie: ``<stem><suffix>.nii[.gz]`` beside it."""
    return [source.parent / f"{_dicom_stem(source)}{label_suffix or '_gt'}{e}" for e in NIFTI_SUFFIXES]


def _dicom_labels(source: Path, label_suffix: str) -> list[Path]:
    """NIfTI label files beside a DICOM source: ``*<suffix>.nii[.gz]`` in its folder
    (for a file source, ``<file stem><suffix>.nii[.gz]`` next to it)."""
    suffix = label_suffix or "_gt"
    if source.is_file():
        return [p for p in _labels_beside_file(source, suffix) if p.is_file()]
    return sorted(p for p in source.iterdir() if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)
                  and volume_stem(p).endswith(suffix))


def _dicom_case(source: Path, label_suffix: str) -> CaseSpec:
    """One case of a DICOM source: its frames, with NIfTI labels where given.

    A 4D label (same grid, same frame count) labels the frames where it has any
    foreground; a 3D label named ``..._frameNN<suffix>`` labels frame NN
    (1-based, as ACDC); a 3D label of a 3D image labels it.
    """
    import nibabel as nib

    from pipelines.ingest.dicom import dicom_files

    cid = _dicom_stem(source)
    shape = read_header(source, case_id=cid).shape
    n_t = shape[3] if len(shape) == 4 else 1
    labelled: dict[int, tuple[str, int | None]] = {}
    for lab in _dicom_labels(source, label_suffix):
        lshape = read_header(lab, case_id=cid).shape
        m = _DICOM_FRAME_LABEL.search(volume_stem(lab)[: -len(label_suffix or "_gt")])
        if len(lshape) == 4:
            if lshape[3] != n_t:
                raise CaseError(Problem(cid, str(lab), "frames",
                                        f"4D label has {lshape[3]} frames, the DICOM cine {n_t}; "
                                        "labels must be on the image's grid and frames."))
            data = np.asanyarray(nib.load(str(lab)).dataobj)
            for t in np.flatnonzero(data.reshape(-1, n_t).any(axis=0)):
                labelled[int(t)] = (str(lab), int(t))
        elif m is not None:
            t = int(m.group(1)) - 1
            if not 0 <= t < n_t:
                raise CaseError(Problem(cid, str(lab), "frames",
                                        f"label names frame {t + 1} but the cine has {n_t} frames (1-based)"))
            labelled[t] = (str(lab), None)
        elif n_t == 1:
            labelled[0] = (str(lab), None)
        else:
            raise CaseError(Problem(cid, str(lab), "frames",
                                    f"3D label beside a {n_t}-frame DICOM cine: name it "
                                    f"..._frameNN{label_suffix or '_gt'}.nii.gz (NN = 1-based frame) or "
                                    "give a 4D label"))
    image_frame = (lambda t: t) if n_t > 1 else (lambda t: None)  # noqa: E731
    if labelled:
        frames = tuple(FrameSpec(f"F{t + 1:02d}", str(source), lab, image_frame(t), lt)
                       for t, (lab, lt) in sorted(labelled.items()))
    else:
        frames = tuple(FrameSpec(f"F{t + 1:02d}", str(source), None, image_frame(t)) for t in range(n_t))
    files = [str(f) for f in dicom_files(source)] if source.is_dir() else []
    return CaseSpec(cid, "dicom", frames, str(source) if n_t > 1 else None,
                    metadata={"_metadata_files": files} if files else {})


def _cached_dicom_case(source: Path, label_suffix: str, cache: ReadCache | None) -> CaseSpec:
    """:func:`_dicom_case`, from ``cache`` while the series (and the labels beside a file) are unchanged."""
    if cache is None:
        return _dicom_case(source, label_suffix)
    # a folder's stamp covers the labels in it; a file's labels lie beside it
    depends = [] if source.is_dir() else _labels_beside_file(source, label_suffix)
    d = cache.read(source, f"dicom_case{label_suffix}",
                   lambda p: _dicom_case(Path(p), label_suffix).to_dict(), depends=depends)
    return CaseSpec.from_dict(d)


def _discover_dicom(root: Path, label_suffix="_gt", cache: ReadCache | None = None, **_) -> Discovery:
    found = _collect("dicom", _dicom_sources(root, cache),
                     lambda src: _cached_dicom_case(src, label_suffix, cache))
    if found.cases and not any(c.has_labels for c in found.cases):
        log.info("DICOM input without NIfTI labels: image-only cases (for predict)")
    return found


# -- dispatch -----------------------------------------------------------------
def _outside(path: str | None, root: str) -> bool:
    """True when ``path`` leaves ``root`` lexically (``..``, absolute elsewhere).

    Symbolic links are not resolved: a case folder the user linked into RAW
    stays allowed; what is refused is a name that climbs out of RAW.
    """
    if path is None:
        return False
    norm = os.path.normpath(os.path.abspath(path))
    return norm != root and not norm.startswith(root.rstrip(os.sep) + os.sep)


def _confine(found: Discovery, root: Path) -> None:
    """Turn every case that would read a file outside ``root`` into a problem."""
    if root.is_file():
        return
    base = os.path.normpath(os.path.abspath(root))
    kept = []
    for case in found.cases:
        paths = [p for f in case.frames for p in (f.image, f.label)] + [case.cine]
        bad = next((p for p in paths if _outside(p, base)), None)
        if bad is None:
            kept.append(case)
            continue
        found.problems.append(Problem(case.case_id, bad, "outside_input",
                                      f"file {bad!r} lies outside the input folder {base}; every input "
                                      "must be inside it (link the case folder into it instead)."))
    found.cases = kept


def _collect(layout: str, items, make, source=str) -> Discovery:
    """Build one CaseSpec per item; a CaseError becomes a Problem.

    A case id found in more than one place (``siteA/patient001`` and
    ``siteB/patient001``) is ambiguous: every copy becomes a ``duplicate_id``
    problem naming all of them and none is built, so no copy silently wins and
    no other case is affected.
    """
    found = Discovery(layout)
    by_id: dict[str, list[tuple[str, CaseSpec | Problem]]] = {}
    for item in items:
        try:
            case = make(item)
            cid = case.case_id
        except CaseError as exc:
            case, cid = exc.problem, exc.problem.case_id
        by_id.setdefault(cid, []).append((source(item), case))
    for cid, copies in by_id.items():
        if len(copies) > 1:
            where = ", ".join(src for src, _ in copies)
            found.problems.extend(
                Problem(cid, src, "duplicate_id",
                        f"case id {cid!r} is found {len(copies)} times ({where}); none of them is "
                        "built. Rename or move all but one, or point the input at one site's folder.")
                for src, _ in copies)
            continue
        (_, case), = copies
        if isinstance(case, Problem):
            found.problems.append(case)
        else:
            found.cases.append(case)
    found.cases.sort(key=lambda c: c.case_id)
    return found


def discover(root: str | Path, layout: str | None = None, *, image_glob: str | None = None,
             label_suffix: str = "_gt", label_pattern: str | None = None,
             mnms_csv: str | Path | None = None, label_map: str | LabelMap | None = None,
             patient_pattern: str | None = None, read_cache: ReadCache | None = None) -> Discovery:
    """Find every case under ``root``.

    Parameters
    ----------
    root : str or Path
        Dataset folder, or a single volume file / DICOM directory.
    layout, image_glob, label_suffix, label_pattern, mnms_csv, label_map, patient_pattern
        See :class:`pipelines.ingest.options.DiscoveryOptions`.  The label map
        defaults to the layout's convention (ACDC identity, M&Ms, nnU-Net's
        ``dataset.json``); a given one applies to every layout.
    read_cache : ReadCache, optional
        Results of earlier reads of the metadata files (``Info.cfg``, the M&Ms
        CSV, ``dataset.json``, DICOM headers), reused while a file keeps its
        stat stamp (:mod:`pipelines.ingest.readcache`); the build passes its
        own so an unchanged re-run reads no input file.  ``None``: read them.

    Returns
    -------
    Discovery

    Raises
    ------
    ConfigError
        Missing root, unknown layout, missing M&Ms CSV, bad label map or
        pattern, unmappable nnU-Net labels.

    Examples
    --------
    >>> found = discover("database/training")  # doctest: +SKIP
    >>> found.layout, len(found.cases)  # doctest: +SKIP
    ('acdc', 100)
    """
    root = Path(root)
    opts = DiscoveryOptions(layout, image_glob, label_suffix, label_pattern,
                            str(mnms_csv) if mnms_csv is not None else None, label_map,
                            patient_pattern).validate()
    if not root.exists():
        raise ConfigError(f"input {root} does not exist; check the path.")
    auto = layout is None
    layout = layout or detect_layout(root, image_glob, read_cache)
    user_map = opts.parsed_label_map()
    kw = dict(image_glob=image_glob, label_suffix=label_suffix, label_pattern=label_pattern,
              mnms_csv=mnms_csv, auto=auto, cache=read_cache)
    if layout == "acdc":
        found = _discover_acdc(root, cache=read_cache)
    elif layout == "mnms":
        found = _discover_mnms(root, **kw)
    elif layout == "nnunet":
        cases, problems, lm = discover_nnunet(root, user_map, read_cache)
        found = Discovery("nnunet", cases, problems, lm)
    elif layout == "dicom":
        found = _discover_dicom(root, **kw)
    else:
        found = _discover_files(root, layout, **kw)
    if layout == "mnms":
        found.label_map = MNMS
    if user_map is not None:
        found.label_map = user_map
    pattern = opts.compiled_patient_pattern() or (NNUNET_PATIENT if layout == "nnunet" else None)
    if pattern is not None and layout in ("nnunet", "generic", "images"):
        found.cases, grouping = group_patients(found.cases, pattern)
        found.problems.extend(grouping)
    found.cases = [_with_label_map(c, found.label_map) for c in found.cases]
    _confine(found, root)
    log.info("discovered %d %s cases (%d problems, classes %s) in %s", len(found.cases), found.layout,
             len(found.problems), ",".join(found.label_map.classes), root)
    return found


def _with_label_map(case: CaseSpec, label_map: LabelMap) -> CaseSpec:
    """The case with the dataset's label map (labelled cases only)."""
    from dataclasses import replace

    if not any(f.label is not None for f in case.frames):
        return case if case.label_map is None else replace(case, label_map=None)
    return replace(case, label_map=label_map.values,
                   metadata={**case.metadata, "classes": list(label_map.classes)})
