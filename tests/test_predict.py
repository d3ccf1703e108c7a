"""pipelines.predict and pipelines.evaluate end to end with a real (tiny, briefly trained) run."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.build import BuildConfig, build
from pipelines.evaluate import evaluate
from pipelines.evaluate import main as evaluate_main
from pipelines.predict import main as predict_main
from pipelines.predict import predict
from pipelines.synthesize import synthesize


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from model.train import train

    tmp = tmp_path_factory.mktemp("run")
    synthesize(tmp / "raw", 3, 31, layout="acdc")
    build(BuildConfig(tmp / "raw", tmp / "shards", workers=0, progress=False, report=False))
    train(tmp / "shards", tmp / "run", epochs=1, steps_per_epoch=2, batch_size=4,
          filters=(4, 8, 16), augment=False, verbose=0, collapse_patience=0)
    return tmp / "run"


@pytest.fixture(scope="module")
def images_only(tmp_path_factory) -> Path:
    """An ACDC folder with 4D cines, labels removed (as scans arrive from the scanner)."""
    root = tmp_path_factory.mktemp("new")
    synthesize(root / "gt", 2, 77, layout="acdc", with_4d=True)
    shutil.copytree(root / "gt", root / "img")
    for f in (root / "img").rglob("*_gt.nii.gz"):
        f.unlink()
    return root


def test_predicts_every_frame_in_the_input_geometry(run_dir, images_only, tmp_path):
    res = predict(run_dir, images_only / "img", tmp_path / "pred", progress=False)
    assert not res.failed and len(res.written) == 4  # a 2-step model: flags (exit 3) expected
    for f in res.written:
        name = Path(f).name
        src = next((images_only / "img").rglob(name.replace("_pred", "")))
        a, b = nib.load(f), nib.load(src)
        assert a.shape == b.shape
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
        assert set(np.unique(np.asarray(a.dataobj))) <= {0, 1, 2, 3}
    assert all(c["source"] == "cine_first_harmonic" for c in res.centres.values())
    report = json.loads((tmp_path / "pred" / "predict_report.json").read_text())
    assert report["failed"] == []


def test_without_cine_uses_ed_es_motion_then_the_coarse_network_pass(run_dir, images_only, tmp_path):
    src = tmp_path / "img"
    shutil.copytree(images_only / "img", src)
    for f in src.rglob("*_4d.nii.gz"):
        f.unlink()
    res = predict(run_dir, src, tmp_path / "pred", progress=False)
    assert not res.failed and len(res.written) == 4
    assert {c["source"] for c in res.centres.values()} == {"ed_es_difference"}
    one = sorted(src.glob("patient001/patient001_frame[0-9][0-9].nii.gz"))[0]  # one 3D image
    res = predict(run_dir, one, tmp_path / "one", progress=False)
    assert not res.failed and len(res.written) == 1
    assert {c["source"] for c in res.centres.values()} <= {"coarse_network", "fov_centre"}


def test_single_file_input_and_a_bad_case_does_not_stop_others(run_dir, images_only, tmp_path):
    src = tmp_path / "img"
    shutil.copytree(images_only / "img", src)
    bad = next(src.rglob("patient001_frame01.nii.gz"))
    bad.write_bytes(b"not a nifti")
    res = predict(run_dir, src, tmp_path / "pred", progress=False)
    assert res.exit_code == 3
    assert [f["case_id"] for f in res.failed] == ["patient001"]
    assert any("patient002" in w for w in res.written)
    one = sorted(src.glob("patient002/patient002_frame[0-9][0-9].nii.gz"))[0]
    code = predict_main([str(run_dir), str(one), str(tmp_path / "one"), "--quiet"])
    report = json.loads((tmp_path / "one" / "predict_report.json").read_text())
    assert code == (3 if report["flags"] else 0) and not report["failed"]
    expected = one.name.replace(".nii.gz", "_pred.nii.gz")
    assert [p.name for p in (tmp_path / "one").rglob("*_pred.nii.gz")] == [expected]


def test_evaluate_reports_metrics_and_clinical_indices(run_dir, images_only, tmp_path):
    predict(run_dir, images_only / "img", tmp_path / "pred", progress=False)
    res = evaluate(tmp_path / "pred", images_only / "gt", tmp_path / "eval")
    assert len(res["rows"]) == 4 * 3 and res["problems"] == []
    assert {c["structure"] for c in res["clinical"]} == {"LV", "RV"}
    for name in ("metrics.csv", "clinical.csv", "summary.md"):
        assert (tmp_path / "eval" / name).stat().st_size > 0


def test_evaluate_refuses_a_prediction_in_another_geometry(images_only, tmp_path):
    pred = tmp_path / "pred" / "patient001"
    pred.mkdir(parents=True)
    gt = next((images_only / "gt").rglob("patient001_frame01_gt.nii.gz"))
    g = nib.load(gt)
    shifted = g.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(g.dataobj), shifted), pred / "patient001_frame01_pred.nii.gz")
    res = evaluate(tmp_path / "pred", images_only / "gt", tmp_path / "eval")
    msgs = [p["message"] for p in res["problems"] if p["check"] == "geometry"]
    assert msgs and "affine differs" in msgs[0] and "patient001_frame01_gt" in msgs[0]
    assert evaluate_main([str(tmp_path / "pred"), str(images_only / "gt")]) == 3


def _rewrite(path: Path, data=None, affine=None):
    img = nib.load(path)
    out = np.asarray(img.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(out, img.affine if affine is None else affine, img.header), path)


def test_bad_images_in_predict_are_named_failures_and_others_still_predicted(run_dir, images_only, tmp_path):
    """#14 item 14: singular affine, constant and NaN images fail their case with a reason."""
    src = tmp_path / "img"
    shutil.copytree(images_only / "img", src)
    for f in src.rglob("*_4d.nii.gz"):
        f.unlink()
    shutil.copytree(src / "patient001", src / "patient003")
    shutil.copytree(src / "patient001", src / "patient004")
    for n in ("003", "004"):
        for f in (src / f"patient{n}").iterdir():
            f.rename(f.with_name(f.name.replace("patient001", f"patient{n}")))
    f1 = next((src / "patient001").glob("*_frame*.nii.gz"))
    aff = nib.load(f1).affine.copy()
    aff[:3, 1] = aff[:3, 0]
    _rewrite(f1, affine=aff)
    f3 = next((src / "patient003").glob("*_frame*.nii.gz"))
    _rewrite(f3, data=np.full(nib.load(f3).shape, 7, np.int16))
    f4 = next((src / "patient004").glob("*_frame*.nii.gz"))
    nan = np.asarray(nib.load(f4).dataobj, dtype=np.float32)
    nan[0, 0, 0] = np.nan
    _rewrite(f4, data=nan)
    res = predict(run_dir, src, tmp_path / "pred", progress=False)
    failed = {f["case_id"]: f for f in res.failed}
    assert sorted(failed) == ["patient001", "patient003", "patient004"]
    assert failed["patient001"]["check"] == "affine" and "singular" in failed["patient001"]["message"]
    assert "constant (every voxel 7)" in failed["patient003"]["message"]
    assert "1 NaN" in failed["patient004"]["message"]
    assert res.exit_code == 3 and any("patient002" in w for w in res.written)


def test_corrupt_checkpoint_is_a_clear_error(run_dir, tmp_path, caplog):
    """#14 item 14: a damaged best.keras gives exit 2 and one message naming the file, no traceback."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    data = (run / "best.keras").read_bytes()
    (run / "best.keras").write_bytes(data[: len(data) // 2])
    assert predict_main([str(run), str(tmp_path), str(tmp_path / "out"), "--quiet"]) == 2
    err = caplog.text
    assert "best.keras" in err and "corrupt" in err and "Traceback" not in err
    caplog.clear()
    (run / "best.keras").write_bytes(b"PK\x03\x04" + bytes(100))  # zip magic, garbage inside
    assert predict_main([str(run), str(tmp_path), str(tmp_path / "out"), "--quiet"]) == 2
    assert "best.keras" in caplog.text and "Traceback" not in caplog.text


def test_predicts_a_dicom_cine_into_nifti(run_dir, tmp_path):
    """A cine exported as one DICOM series per slice: every frame segmented, NIfTI on the DICOM grid."""
    from cmrprep.synthetic import generate_case
    from pipelines.ingest import read_header
    from pipelines.dicom_export import write_cine_dicom

    case = generate_case(78, 1)
    src = write_cine_dicom(tmp_path / "scan" / "subject1", case.cine.astype(np.int16), case.affine,
                           "per_slice")
    res = predict(run_dir, tmp_path / "scan", tmp_path / "pred", progress=False)
    assert not res.failed and len(res.written) == case.cine.shape[3]
    geom = read_header(src, case_id="subject1").geometry
    for f in res.written:
        assert f.endswith(".nii.gz") and "subject1_frame" in Path(f).name
        img = nib.load(f)
        assert img.shape == case.cine.shape[:3]
        np.testing.assert_allclose(img.affine, geom.affine, atol=1e-4)
    assert res.centres["subject1"]["source"] == "cine_first_harmonic"
    report = json.loads((tmp_path / "pred" / "predict_report.json").read_text())
    assert report["format"].startswith("NIfTI") and report["classes"] == ["background", "RV", "MYO", "LV"]


def test_predict_names_the_dataset_shift_of_another_site(run_dir, tmp_path):
    """#12: inputs from another site are compared with the run's training_fingerprint.json."""
    assert (run_dir / "training_fingerprint.json").is_file()
    synthesize(tmp_path / "siteB", 1, 91, layout="acdc", site="B")
    res = predict(run_dir, tmp_path / "siteB", tmp_path / "pred", progress=False)
    assert not res.failed and len(res.written) == 2
    report = json.loads((tmp_path / "pred" / "predict_report.json").read_text())
    assert "shift_inplane_mm" in {w["code"] for w in report["shift"]}


def test_refinement_keeps_the_more_heart_like_segmentation():
    """#12: a re-centred crop that lost classes (the heart left it) never replaces a better one."""
    from pipelines.predict import _heart_score

    heart = np.zeros((2, 16, 16), np.uint8)
    heart[0, 4:8, 4:8], heart[0, 5:7, 5:7], heart[1, 2:4, 10:14] = 2, 3, 1
    blob = np.zeros_like(heart)
    blob[:, :, :12] = 3  # more foreground voxels, one class only: a false positive
    assert _heart_score(heart, 4) > _heart_score(blob, 4) > _heart_score(np.zeros_like(heart), 4)
    bigger = heart.copy()
    bigger[1, 12:15, 2:6] = 2
    assert _heart_score(bigger, 4) > _heart_score(heart, 4)  # same classes: more voxels wins
