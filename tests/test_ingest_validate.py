"""validate_case / load_frame rules, defect injection and the ingest CLI."""

import json
from pathlib import Path

import numpy as np
import pytest

from cmrprep.cases import CaseError, CaseSpec, FrameSpec
from defects import DEFECTS, EXPECTED_CHECK, inject_defects
from defects import main as defects_main
from pipelines.ingest import discover, ingest, load_cine, load_frame, validate_case
from pipelines.ingest.__main__ import main as ingest_main


def _case(tmp_path, write_nifti, image, label=None, affine=None, label_affine=None, **kw):
    """One-frame CaseSpec over files written in ``tmp_path`` (default affine: conftest.AFFINE)."""
    def save(name, data, aff):
        return write_nifti(tmp_path / name, data) if aff is None else write_nifti(tmp_path / name, data, aff)
    img = save("img.nii.gz", image, affine)
    lab = save("lab.nii.gz", label, label_affine) if label is not None else None
    frame = FrameSpec("ED", str(img), str(lab) if lab else None, kw.pop("frame", None), kw.pop("lframe", None))
    return CaseSpec("c1", kw.pop("layout", "generic"), (frame,), **kw)


def _checks(case):
    return {(p.check, p.severity) for p in validate_case(case)}


def test_valid_case_loads(tmp_path, write_nifti, tiny):
    case = _case(tmp_path, write_nifti, tiny.image(), tiny.label())
    assert validate_case(case) == []
    fr = load_frame(case, 0)
    assert fr.image.dtype == np.float32 and fr.label.dtype == np.uint8 and fr.warnings == []
    np.testing.assert_allclose(fr.geometry.matrix, tiny.affine)


def test_readable_rule(tmp_path, write_nifti, tiny):
    case = _case(tmp_path, write_nifti, tiny.image(), tiny.label())
    (tmp_path / "lab.nii.gz").write_bytes(b"")
    assert _checks(case) == {("readable", "error")}


def test_dimensions_rule(tmp_path, write_nifti, tiny):
    case = _case(tmp_path, write_nifti, tiny.image()[..., 0])  # 2D
    with pytest.raises(CaseError, match=r"2D; expected a 3D volume"):
        load_frame(case, 0)


def test_frame_rule(tmp_path, write_nifti, tiny):
    cine = np.stack([tiny.image(t) for t in range(3)], axis=-1)
    case = _case(tmp_path, write_nifti, cine, frame=5)
    assert _checks(case) == {("frame", "error")}


def test_shape_rule(tmp_path, write_nifti, tiny):
    case = _case(tmp_path, write_nifti, tiny.image(), tiny.label()[:-1])
    with pytest.raises(CaseError, match=r"label shape \(11, 10, 3\) != image shape \(12, 10, 3\)"):
        load_frame(case, "ED")


def test_affine_rule_reports_largest_difference(tmp_path, write_nifti, tiny):
    moved = tiny.affine.copy()
    moved[1, 3] += 2.5
    moved[0, 3] += 0.5
    case = _case(tmp_path, write_nifti, tiny.image(), tiny.label(), label_affine=moved)
    with pytest.raises(CaseError, match=r"by up to 2\.5 mm") as err:
        load_frame(case, 0)
    assert err.value.problem.check == "affine"
    tiny_shift = tiny.affine.copy()
    tiny_shift[0, 3] += 1e-5  # within tolerance
    assert validate_case(_case(tmp_path, write_nifti, tiny.image(), tiny.label(), label_affine=tiny_shift)) == []


def test_label_values_rules(tmp_path, write_nifti, tiny):
    lab = tiny.label().astype(np.float32)
    lab[0, 0, 0] = 0.5
    with pytest.raises(CaseError, match=r"non-integral label values \[0\.5\]"):
        load_frame(_case(tmp_path, write_nifti, tiny.image(), lab), 0)
    lab = tiny.label()
    lab[0, 0, 0] = 7
    with pytest.raises(CaseError, match=r"label values \[7\] .*not in the label map '0=background,1=RV,2=MYO,3=LV'.*--label-map '0=background,1=RV,2=MYO,3=LV,7=<class4>'") as err:
        load_frame(_case(tmp_path, write_nifti, tiny.image(), lab), 0)
    assert err.value.problem.check == "label_values"


def test_label_map_unknown_value(tmp_path, write_nifti, tiny):
    lab = tiny.label()
    lab[0, 0, 0] = 4
    case = _case(tmp_path, write_nifti, tiny.image(), lab, label_map=((0, 0), (1, 3), (2, 2), (3, 1)))
    with pytest.raises(CaseError, match=r"\[4\] .*not in the label map '0=background,1=LV,2=MYO,3=RV'"):
        load_frame(case, 0)


def test_float_integral_and_empty_labels_warn(tmp_path, write_nifti, tiny):
    case = _case(tmp_path, write_nifti, tiny.image(), tiny.label().astype(np.float32))
    assert _checks(case) == {("label_dtype", "warning")}
    np.testing.assert_array_equal(load_frame(case, 0).label, tiny.label())
    empty = _case(tmp_path, write_nifti, tiny.image(), np.zeros(tiny.shape, np.uint8))
    assert _checks(empty) == {("empty_label", "warning")}


def test_intensity_rule_counts_nan_inf(tmp_path, write_nifti, tiny):
    img = tiny.image().astype(np.float32)
    img[0, 0, :] = np.nan
    img[1, 1, 1] = np.inf
    with pytest.raises(CaseError, match=r"3 NaN and 1 Inf voxels"):
        load_frame(_case(tmp_path, write_nifti, img), 0)


def test_spacing_rule(tmp_path, write_nifti, tiny):
    case = _case(tmp_path, write_nifti, tiny.image(), affine=np.diag([1.5, 1.5, 45.0, 1.0]))
    assert _checks(case) == {("spacing", "error")}


def test_metadata_rule(tmp_path, write_nifti, tiny):
    case = _case(tmp_path, write_nifti, tiny.image(), tiny.label(), layout="acdc", metadata={"ES": 3})
    assert ("metadata", "error") in _checks(case)


def test_load_cine(acdc_root, tiny):
    case = discover(acdc_root).cases[0]
    cine, geom = load_cine(case)
    assert cine.shape == tiny.shape + (4,) and cine.dtype == np.float32
    np.testing.assert_allclose(geom.matrix, tiny.affine)


@pytest.fixture
def defect_root(tmp_path, make_case):
    root = tmp_path / "raw"
    for n in range(1, len(DEFECTS) + 4):
        make_case(root, n)
    return root


def test_defects_reported_exactly(defect_root, tmp_path):
    applied = inject_defects(defect_root, seed=3)
    assert sorted(applied.values()) == sorted(DEFECTS)
    assert json.loads((defect_root / "defects.json").read_text()) == applied
    result = ingest(defect_root, workers=2)
    assert result.quarantined_ids == sorted(applied)
    assert len(result.ok) == 3 and result.n_cases == len(DEFECTS) + 3
    for problem in result.quarantined:
        assert problem.check == EXPECTED_CHECK[applied[problem.case_id]], str(problem)
    serial = ingest(defect_root, workers=1)
    assert serial.to_dict() == result.to_dict()


def test_cli_exit_codes_and_report(defect_root, tmp_path):
    assert ingest_main([str(defect_root), "--report", str(tmp_path / "clean.json")]) == 0
    assert defects_main([str(defect_root), "--seed", "1", "--kinds", "empty_file,nan_intensity"]) == 0
    report = tmp_path / "out" / "report.json"
    assert ingest_main([str(defect_root), "--report", str(report), "--layout", "acdc"]) == 3
    data = json.loads(report.read_text())
    defects = json.loads((defect_root / "defects.json").read_text())
    assert data["layout"] == "acdc" and data["n_cases"] == len(DEFECTS) + 3
    assert sorted({q["case_id"] for q in data["quarantined"]}) == sorted(defects)
    assert set(data["quarantined"][0]) == {"case_id", "file", "check", "message"}
    assert ingest_main([str(tmp_path / "missing")]) == 2
    assert ingest_main([str(defect_root), "--layout", "bogus"]) == 2


def test_validate_case_reports_every_problem(tmp_path, write_nifti, tiny):
    img = tiny.image().astype(np.float32)
    img[0, 0, 0] = np.nan
    lab = tiny.label()
    lab[1, 1, 1] = 9
    case = _case(tmp_path, write_nifti, img, lab)
    assert _checks(case) == {("intensity", "error"), ("label_values", "error")}


def test_cli_as_module(acdc_root, tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "pipelines.ingest", str(acdc_root), "--report",
                          str(tmp_path / "r.json")], capture_output=True, text=True, check=False,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "3 cases, 3 ok" in out.stdout
    assert json.loads((tmp_path / "r.json").read_text())["ok"] == ["patient001", "patient002", "patient003"]


@pytest.mark.parametrize("dtype, label_map", [
    (np.uint8, None), (np.int8, None), (np.int16, None), (np.float32, None),
    (np.uint8, ((0, 0), (1, 3), (2, 2), (3, 1))), (np.int8, ((0, 0), (1, 3), (2, 2), (3, 1))),
    (np.uint16, ((0, 0), (500, 1), (600, 2), (700, 3))),
    (np.int8, ((-1, 0), (1, 1), (-128, 2), (127, 3))),
])
def test_label_counts_come_with_the_checked_labels(dtype, label_map):
    """The per-class voxel counts (used by the fingerprint) equal a count of the remapped labels."""
    from pipelines.ingest.validate import _check_labels

    rng = np.random.default_rng(3)
    src = [a for a, _ in label_map] if label_map else [0, 1, 2, 3]
    raw = np.asarray(rng.choice(src, size=(9, 7, 4), p=[0.7, 0.1, 0.15, 0.05]), dtype=dtype)
    raw = np.asfortranarray(raw)
    out, _, counts = _check_labels(raw, label_map, "c", "f.nii.gz")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(counts, np.bincount(out.ravel(), minlength=4))
    assert counts.sum() == raw.size


def test_label_header_mismatch_reported_before_any_voxel_is_read(tmp_path, write_nifti, tiny):
    """#14 item 2: a label header claiming a huge grid is compared with the image header first."""
    import gzip
    import tracemalloc

    import nibabel as nib

    case = _case(tmp_path, write_nifti, tiny.image(), tiny.label())
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1000, 1000, 1000))
    hdr.set_data_dtype(np.uint8)
    hdr.set_qform(np.eye(4), 1)
    hdr.set_sform(np.eye(4), 1)
    with gzip.open(tmp_path / "lab.nii.gz", "wb") as fh:  # header only: a reader would inflate 1 GB
        fh.write(hdr.binaryblock + bytes(4) + bytes(1 << 20))
    tracemalloc.start()
    problems = validate_case(case)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(p.check, p.severity) for p in problems] == [("shape", "error")]
    assert "(1000, 1000, 1000)" in problems[0].message
    assert peak < 16 << 20
