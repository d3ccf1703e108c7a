"""DICOM cines (#15): single files, enhanced multi-frame, one series per slice; refusals; builds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cmrprep.cases import CaseError
from cmrprep.geometry import from_sitk
from cmrprep.synthetic import generate_case
from pipelines.ingest import discover, read_header, read_volume
from pipelines.ingest.readers import read_cine
from pipelines.dicom_export import reread, write_cine_dicom

pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def case():
    return generate_case(41, 1)


def _reference(case, geom):
    """The synthetic cine and labels as the reader should return them (slice order may flip)."""
    flip = not np.allclose(np.asarray(geom.affine)[:3, 2], case.affine[:3, 2], atol=1e-3)
    cine = case.cine[:, :, ::-1] if flip else case.cine
    labels = {t: (lab[:, :, ::-1] if flip else lab) for t, lab in case.labels.items()}
    return cine, labels, flip


@pytest.mark.parametrize("style", ["per_slice", "one_series", "enhanced"])
def test_export_styles_read_into_one_cine_in_world_space(tmp_path, case, style):
    src = write_cine_dicom(tmp_path / "dcm", case.cine.astype(np.int16), case.affine, style,
                           slope=0.5 if style == "enhanced" else 1.0, intercept=-4.0 if style == "enhanced" else 0)
    data, geom = read_cine(src, case_id="c")
    cine, _, flip = _reference(case, geom)
    np.testing.assert_array_equal(data, cine)
    assert read_header(src, case_id="c").shape == cine.shape
    n_k = cine.shape[2]
    for i, j, k in ((0, 0, 0), (5, 7, n_k - 1), (100, 3, n_k // 2)):
        kk = n_k - 1 - k if flip else k
        np.testing.assert_allclose(np.asarray(geom.affine) @ [i, j, k, 1], case.affine @ [i, j, kk, 1],
                                   atol=1e-2)  # the same voxel at the same RAS point
    frame, _ = read_volume(src, case_id="c", frame=1)
    np.testing.assert_array_equal(frame, cine[..., 1])


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                                  "MR_small_RLE.dcm"])
def test_pydicom_test_files_match_simpleitk(name):
    import SimpleITK as sitk
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    data, geom = read_volume(path, case_id="mr")
    ref, ref_geom = from_sitk(sitk.ReadImage(get_testdata_file("MR_small.dcm")))
    assert data.dtype.isnative
    np.testing.assert_array_equal(data, ref)
    np.testing.assert_allclose(geom.matrix, ref_geom.matrix, atol=1e-4)


def _per_slice(tmp_path, case, **kw) -> Path:
    return write_cine_dicom(tmp_path / "dcm", case.cine.astype(np.int16), case.affine, "per_slice", **kw)


def test_missing_slice_and_unequal_frames_are_refused(tmp_path, case):
    src = _per_slice(tmp_path, case)
    shutil.rmtree(src / "sax_5")
    with pytest.raises(CaseError, match=r"a missing slice: slices are .* mm apart except"):
        read_header(src, case_id="c")
    src2 = write_cine_dicom(tmp_path / "dcm2", case.cine.astype(np.int16), case.affine, "per_slice")
    next((src2 / "sax_3").glob("*.dcm")).unlink()
    with pytest.raises(CaseError, match=r"unequal frame counts per slice: 2 at most positions but .*: 1"):
        read_header(src2, case_id="c")


def test_other_views_are_left_out_and_a_second_stack_refused(tmp_path, case):
    src = _per_slice(tmp_path, case)
    loc = reread(next((src / "sax_1").glob("*.dcm")))  # a 4-chamber view: another orientation
    loc.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    loc.SeriesInstanceUID, loc.SeriesNumber = pydicom.uid.generate_uid(), 99
    (src / "ch4").mkdir()
    loc.save_as(src / "ch4" / "IM-0001.dcm")
    data, geom = read_cine(src, case_id="c")
    assert data.shape == case.cine.shape
    other = tmp_path / "tilted"  # a whole second stack at another angle
    write_cine_dicom(other, case.cine[:, :, :4].astype(np.int16), case.affine @ np.diag([1, 1, 1, 1.0]) @
                     _rotation(0.4), "per_slice")
    shutil.copytree(other, src / "tilted")
    for f in (src / "tilted").rglob("*.dcm"):  # same study
        ds = reread(f)
        ds.StudyInstanceUID = reread(next((src / "sax_1").glob("*.dcm"))).StudyInstanceUID
        ds.save_as(f)
    with pytest.raises(CaseError, match="mixed orientations or in-plane geometries"):
        read_header(src, case_id="c")


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])


def test_repeated_slice_keeps_the_later_series_and_instance_order_without_trigger(tmp_path, case):
    src = _per_slice(tmp_path, case, trigger=False)
    data, geom = read_cine(src, case_id="c")
    cine, _, _ = _reference(case, geom)
    np.testing.assert_array_equal(data, cine)  # frames ordered by InstanceNumber
    again = tmp_path / "again"  # slice 2 acquired twice; the second (series 50) is brighter
    shutil.copytree(src / "sax_2", again)
    uid = pydicom.uid.generate_uid()
    for f in again.glob("*.dcm"):
        ds = reread(f)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SOPInstanceUID = uid, 50, pydicom.uid.generate_uid()
        ds.PixelData = (ds.pixel_array + 7).astype(np.int16).tobytes()
        ds.save_as(src / "sax_2" / f"re-{f.name}")
    data2, _ = read_cine(src, case_id="c")
    diff = (data2.astype(np.int32) - data).reshape(-1, data.shape[2], data.shape[3])
    assert set(np.unique(diff)) == {0, 7} and (diff != 0).any(axis=(0, 2)).sum() == 1


def _with_labels(root: Path, case, style: str, label: str = "4d") -> Path:
    """A DICOM case folder with a NIfTI label beside it on the reader's grid."""
    src = write_cine_dicom(root / "dcm", case.cine.astype(np.int16), case.affine, style)
    folder = src if src.is_dir() else src.parent
    geom = read_header(src, case_id="c").geometry
    _, labels, _ = _reference(case, geom)
    affine = np.asarray(geom.affine)
    if label == "4d":
        lab = np.zeros(case.cine.shape, np.uint8)
        for t, l in labels.items():
            lab[..., case.frames.index(t)] = l
        nib.save(nib.Nifti1Image(lab, affine), str(folder / "cine_gt.nii.gz"))
    else:
        for t, l in labels.items():
            nib.save(nib.Nifti1Image(l, affine),
                     str(folder / f"cine_frame{case.frames.index(t) + 1:02d}_gt.nii.gz"))
    return folder


@pytest.mark.parametrize("style,label", [("per_slice", "4d"), ("enhanced", "3d")])
def test_dicom_cases_with_nifti_labels_build(tmp_path, style, label):
    from pipelines.build import BuildConfig, build

    raw = tmp_path / "raw"
    for n in range(2):
        c = generate_case(42, n + 1)
        folder = _with_labels(tmp_path / f"tmp{n}", c, style, label)
        shutil.move(str(folder), str(raw / f"subject{n + 1}"))
    found = discover(raw)
    assert found.layout == "dicom" and [c.case_id for c in found.cases] == ["subject1", "subject2"]
    assert all(len(c.frames) == 2 and all(f.label for f in c.frames) and c.cine for c in found.cases)
    res = build(BuildConfig(raw, tmp_path / "out", workers=0, progress=False, report=False))
    assert res.exit_code == 0 and res.n_cases == 2 and not res.quarantined
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["label_convention"]["severity"] == "ok"
    # a changed DICOM file is a changed case: only that case is rebuilt
    f = sorted((raw / "subject2").rglob("*.dcm"))[0]
    ds = reread(f)
    ds.PixelData = (ds.pixel_array // 2).astype(np.int16).tobytes()
    ds.save_as(f)
    again = build(BuildConfig(raw, tmp_path / "out", workers=0, progress=False, report=False))
    assert again.processed == ["subject2"]


def test_dicom_label_on_another_grid_is_quarantined(tmp_path, case):
    from pipelines.ingest import validate_case

    folder = _with_labels(tmp_path, case, "one_series")
    lab = nib.load(str(folder / "cine_gt.nii.gz"))
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj)[::-1].copy(), lab.affine @ np.diag([1, 1, 2.0, 1])),
             str(folder / "cine_gt.nii.gz"))
    problems = validate_case(discover(folder.parent).cases[0])
    errors = [p for p in problems if p.severity == "error"]
    assert errors and "cine_gt.nii.gz" in errors[0].file and "affine" in errors[0].message


@pytest.mark.parametrize("style", ["per_slice", "enhanced"])
def test_dicom_and_the_nifti_it_was_written_from_are_the_same_image(tmp_path, case, style):
    """Read from DICOM and from the NIfTI of the same cine: after reorientation to the closest
    canonical (RAS) axes, the same 4D array and the same affine."""
    from pipelines.synthesize import write_nifti

    nifti = tmp_path / "cine.nii.gz"
    write_nifti(nifti, case.cine, case)
    src = write_cine_dicom(tmp_path / "dcm", case.cine.astype(np.int16), case.affine, style)
    a_data, a_geom = read_cine(nifti, case_id="c")
    b_data, b_geom = read_cine(src, case_id="c")
    a = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(a_data), np.asarray(a_geom.affine)))
    b = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(b_data), np.asarray(b_geom.affine)))
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)


def test_discovery_cache_reads_an_unchanged_dicom_series_once(tmp_path, monkeypatch):
    """With the build's read cache, a second discovery opens no DICOM file (headers, probes);
    a new label beside the series is a change: that case is read again."""
    from pipelines.ingest import layouts
    from pipelines.ingest.readcache import ReadCache

    raw = tmp_path / "raw"
    for n in range(2):
        folder = _with_labels(tmp_path / f"tmp{n}", generate_case(42, n + 1), "per_slice", "4d")
        shutil.move(str(folder), str(raw / f"subject{n + 1}"))
    first = ReadCache()
    plain = discover(raw, read_cache=first)
    headers, probes = [], []
    real_header, real_probe = layouts.read_header, layouts._probe_dicom_sources
    monkeypatch.setattr(layouts, "read_header", lambda p, **k: headers.append(str(p)) or real_header(p, **k))
    monkeypatch.setattr(layouts, "_probe_dicom_sources", lambda r: probes.append(r) or real_probe(r))
    cache = ReadCache.from_json(first.to_json())
    again = discover(raw, read_cache=cache)
    assert headers == [] and probes == [] and cache.misses == 0
    assert [c.to_dict() for c in again.cases] == [c.to_dict() for c in plain.cases]
    label = raw / "subject2" / "cine_gt.nii.gz"
    shutil.copy(label, raw / "subject2" / "extra_gt.nii.gz")  # a second label: a changed case
    cache = ReadCache.from_json(cache.to_json())
    discover(raw, read_cache=cache)
    assert headers and all("subject2" in Path(p).parts for p in headers)
