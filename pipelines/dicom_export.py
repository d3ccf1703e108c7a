"""Write a cine as DICOM the way scanners export it (pydicom).

Used by ``python -m pipelines.synthesize --layout dicom`` (synthetic DICOM data to try
the DICOM path end to end) and by the tests.

Three export styles of one ``cine[i, j, k, t]`` with a RAS affine:

* ``"per_slice"``: one series per slice position, each in its own folder
  (``sax_<k>/IM-0001-<t>.dcm``, Kaggle DSB style), ``SeriesNumber`` = k + 1;
* ``"one_series"``: one series, one file per slice and frame, in one folder;
* ``"enhanced"``: one enhanced MR multi-frame file, positions and trigger
  delays in the per-frame functional groups, shared pixel measures.

Files are written in a shuffled order of names so a reader cannot rely on them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
RR_MS = 850.0


def _lps(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray, np.ndarray]:
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    col_spacing, row_spacing = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    return (lps[:3, 0] / col_spacing, lps[:3, 1] / row_spacing, row_spacing, col_spacing,
            lps[:3, 2], lps[:3, 3])


def _base(study: str, series: str, series_number: int, sop_class: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Manufacturer, ds.MagneticFieldStrength = "MR", "cmrprep-tests", 1.5
    ds.PatientID, ds.PatientName, ds.StudyInstanceUID = "TEST001", "Test^Patient", study
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series, series_number, "CINE_SAX"
    ds.ScanningSequence, ds.SequenceVariant, ds.RepetitionTime, ds.EchoTime = "GR", "SS", 3.2, 1.4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def write_cine_dicom(folder: Path, cine: np.ndarray, affine: np.ndarray, style: str = "per_slice",
                     *, slope: float = 1.0, intercept: float = 0.0, seed: int = 0,
                     trigger: bool = True) -> Path:
    """Write ``cine`` (``[i, j, k, t]``; stored int16 = (value - intercept) / slope) as DICOM.

    UIDs are new on every call (``generate_uid``); ``seed`` shuffles the file names.
    Returns the folder (``"per_slice"``, ``"one_series"``) or the file (``"enhanced"``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    cine = np.asarray(cine)
    if cine.ndim == 3:
        cine = cine[..., None]
    row_cos, col_cos, row_sp, col_sp, step, origin = _lps(affine)
    n_i, n_j, n_k, n_t = cine.shape
    stored = np.round((cine - intercept) / slope).astype(np.int16)
    study = generate_uid()
    rng = np.random.default_rng(seed)  # only the file names (never the data) are random
    if style == "enhanced":
        return _write_enhanced(folder / "cine.dcm", stored, row_cos, col_cos, row_sp, col_sp, step,
                               origin, study, slope, intercept)
    series = {k: generate_uid() for k in range(n_k)} if style == "per_slice" else dict.fromkeys(
        range(n_k), generate_uid())
    order = rng.permutation(n_k * n_t)  # file names shuffled against the acquisition order
    for n, (k, t) in enumerate((k, t) for k in range(n_k) for t in range(n_t)):
        ds = _base(study, series[k], k + 1 if style == "per_slice" else 1, MR_IMAGE)
        ds.Rows, ds.Columns = n_j, n_i
        ds.PixelSpacing = [f"{row_sp:.6f}", f"{col_sp:.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(step):.4f}"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_cos, *col_cos)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * step]
        ds.SliceLocation = f"{float(np.dot(origin + k * step, np.cross(row_cos, col_cos))):.4f}"
        if trigger:
            ds.TriggerTime = f"{t * RR_MS / n_t:.2f}"
        ds.InstanceNumber = t + 1 if style == "per_slice" else k * n_t + t + 1
        ds.CardiacNumberOfImages = n_t
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k, t].T).tobytes()
        sub = folder / f"sax_{k + 1}" if style == "per_slice" else folder
        sub.mkdir(exist_ok=True)
        ds.save_as(sub / f"IM-{k + 1:04d}-{order[n]:04d}.dcm", enforce_file_format=True)
    return folder


def _write_enhanced(path, stored, row_cos, col_cos, row_sp, col_sp, step, origin, study, slope, intercept):
    n_i, n_j, n_k, n_t = stored.shape
    ds = _base(study, generate_uid(), 1, ENHANCED_MR_IMAGE)
    ds.Rows, ds.Columns = n_j, n_i
    ds.NumberOfFrames = n_k * n_t
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [f"{row_sp:.6f}", f"{col_sp:.6f}"]
    pm.SliceThickness = f"{np.linalg.norm(step):.4f}"
    po = Dataset()
    po.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_cos, *col_cos)]
    pv = Dataset()
    pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = f"{slope:g}", f"{intercept:g}", "US"
    shared.PixelMeasuresSequence = Sequence([pm])
    shared.PlaneOrientationSequence = Sequence([po])
    shared.PixelValueTransformationSequence = Sequence([pv])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame, pixels = [], []
    for t in range(n_t):  # time-major order, as many scanners store cines
        for k in range(n_k):
            fg = Dataset()
            pp = Dataset()
            pp.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * step]
            cs = Dataset()
            cs.NominalCardiacTriggerDelayTime = round(t * RR_MS / n_t, 2)
            fc = Dataset()
            fc.TemporalPositionIndex, fc.InStackPositionNumber, fc.StackID = t + 1, k + 1, "1"
            fg.PlanePositionSequence = Sequence([pp])
            fg.CardiacSynchronizationSequence = Sequence([cs])
            fg.FrameContentSequence = Sequence([fc])
            per_frame.append(fg)
            pixels.append(stored[:, :, k, t].T)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.ascontiguousarray(np.stack(pixels)).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def reread(path: Path) -> pydicom.Dataset:
    """The dataset of one written file (to edit tags)."""
    return pydicom.dcmread(str(path))
