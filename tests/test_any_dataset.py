"""#15: datasets that are not ACDC-shaped, read correctly from the command line to the evaluation.

Flat folders of ``.nii`` frames with ``X_seg.nii`` masks, other label values
(``0/85/170/255``, M&Ms' swapped 1/3), other class sets (LV only; a fifth class),
nnU-Net raw frames grouped into patients, and datasets with no usable case.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipelines.build.__main__ import main as build_main
from pipelines.evaluate import evaluate, prediction_name
from pipelines.ingest import DiscoveryOptions, discover
from pipelines.ingest.__main__ import main as ingest_main
from tests.datasets import lv_only, with_scar, write_flat

FLAT = ["--layout", "generic", "--image-glob", "*.nii", "--label-pattern", "{stem}_seg{ext}"]
PATIENTS = ["--patient-pattern", r"^(patient\d+)_frame(\d+)$"]


def _build(raw: Path, out: Path, *args: str) -> int:
    return build_main([str(raw), str(out), "--workers", "0", "--quiet", "--no-report", *args])


def _said(capsys, caplog) -> str:
    """Everything a CLI printed or logged since the last call."""
    printed = capsys.readouterr()
    text = printed.out + printed.err + caplog.text
    caplog.clear()
    return text


def _case_table(out: Path) -> dict:
    return json.loads((out / "store.zarr" / "case_table" / "zarr.json").read_text())["attributes"]


def test_0_85_170_255_masks_named_seg_build_from_the_command_line(tmp_path, capsys, caplog):
    raw = write_flat(tmp_path / "raw", 3, seed=21, values=(0, 85, 170, 255))
    assert _build(raw, tmp_path / "plain", *FLAT) == 2  # every case quarantined, values named
    said = _said(capsys, caplog)
    assert "label values [85, 170, 255]" in said
    assert "--label-map '0=background,85=RV,170=MYO,255=LV'" in said
    out = tmp_path / "out"
    assert _build(raw, out, *FLAT, *PATIENTS, "--label-map", "0=background,85=RV,170=MYO,255=LV") == 0
    root = zarr.open_group(str(out / "store.zarr"), mode="r")
    assert root.attrs["classes"] == ["background", "RV", "MYO", "LV"]
    assert set(np.unique(root["labels"][...])) == {0, 1, 2, 3}
    table = _case_table(out)
    assert table["patients"] == ["patient001", "patient002", "patient003"]  # two frames each
    assert np.asarray(root["case_table"][...])[:, 3].tolist() == [2, 2, 2]


def test_swapped_rv_lv_is_refused_then_built_with_the_map(tmp_path, capsys, caplog):
    raw = write_flat(tmp_path / "raw", 4, seed=22, values=(0, 3, 2, 1))  # M&Ms: 1 LV, 3 RV
    out = tmp_path / "out"
    assert _build(raw, out, *FLAT) == 2
    err = _said(capsys, caplog)
    assert "contradict" in err and "8 of 8" in err
    assert "--label-map '0=background,3=RV,2=MYO,1=LV'" in err
    assert not (out / "store.zarr").exists() and not (out / "versions").exists()
    assert ingest_main([str(raw), *FLAT]) == 2  # the pre-flight says the same
    assert _build(raw, out, *FLAT, "--label-map", "0=background,3=RV,2=MYO,1=LV") == 0
    report = json.loads((out / "build_report.json").read_text())
    assert report["label_convention"]["severity"] == "ok"


def test_nnunet_raw_frames_are_grouped_into_patients(tmp_path):
    from pipelines.synthesize import synthesize

    raw = tmp_path / "Dataset027_Synth"
    synthesize(raw, 3, seed=23, layout="nnunet")
    found = discover(raw)
    assert [c.case_id for c in found.cases] == ["patient001", "patient002", "patient003"]
    assert all(len(c.frames) == 2 and c.patient_id == c.case_id for c in found.cases)
    # ground truth as the prediction: every EF is exact, ED/ES found from the volumes
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in found.cases:
        for frame in case.frames:
            shutil.copy(frame.label, pred / prediction_name(frame.image))
    res = evaluate(pred, raw)
    assert not res["problems"]
    lv = [r for r in res["clinical"] if r["structure"] == "LV"]
    assert len(lv) == 3 and all(abs(r["ef_error_pct"]) < 1e-9 and r["ef_gt_pct"] > 20 for r in lv)
    assert all(r["edv_gt_ml"] > r["esv_gt_ml"] for r in lv)


@pytest.mark.parametrize("name,classes,values,label_map", [
    ("lv_only", lv_only, (0, 1), "0=background,1=LV"),
    ("with_scar", with_scar, (0, 1, 2, 3, 4), "0=background,1=RV,2=MYO,3=LV,4=scar"),
])
def test_other_class_sets_build_train_predict_evaluate(tmp_path, name, classes, values, label_map):
    from model.train import train
    from pipelines.predict import predict

    raw = write_flat(tmp_path / "raw", 4, seed=24, values=values, classes=classes)
    out = tmp_path / "out"
    assert _build(raw, out, *FLAT, *PATIENTS, "--label-map", label_map) == 0
    n_classes = len(values)
    root = zarr.open_group(str(out / "store.zarr"), mode="r")
    assert len(root.attrs["classes"]) == n_classes and root["class_counts"].shape[1] == n_classes
    assert len(root.attrs["class_weights"]) == n_classes
    run = tmp_path / "run"
    result = train(out, run, epochs=1, steps_per_epoch=2, batch_size=4, filters=(8, 16),
                   collapse_patience=0, val_fraction=0.25, verbose=0)
    assert set(result.best_dice) >= {"mean"} | ({"lv"} if n_classes == 2 else {"rv", "myo", "lv", "scar"})
    config = json.loads((run / "train_config.json").read_text())
    assert config["classes"] == root.attrs["classes"]
    assert not set(config["split"]["train_patients"]) & set(config["split"]["val_patients"])
    opts = DiscoveryOptions(layout="generic", image_glob="*.nii", label_pattern="{stem}_seg{ext}",
                            patient_pattern=PATIENTS[1], label_map=label_map)
    pred = tmp_path / "pred"
    res = predict(run, raw, pred, options=opts, progress=False)
    assert not res.failed and len(res.written) == 8
    assert json.loads((pred / "predict_report.json").read_text())["classes"] == root.attrs["classes"]
    ev = evaluate(pred, raw, options=opts)
    assert not ev["problems"] and set(ev["summary"]) == {*root.attrs["classes"][1:], "mean_foreground"}
    assert {r["structure"] for r in ev["clinical"]} == ({"LV"} if n_classes == 2 else {"LV", "RV"})


def test_no_usable_case_exits_2_with_the_reasons(tmp_path, capsys, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _build(empty, tmp_path / "o1") == 2
    assert "no case found" in _said(capsys, caplog)
    raw = write_flat(tmp_path / "raw", 2, seed=25, values=(0, 1, 2, 7))
    assert _build(raw, tmp_path / "o2", *FLAT) == 2
    err = _said(capsys, caplog)
    assert "no usable case" in err and "label values [7]" in err and "Traceback" not in err
    assert not (tmp_path / "o2" / "store.zarr").exists()


@pytest.mark.parametrize("text,message", [
    ("0=RV,1=LV", "first class must be the background"),
    ("0=background,1=LV,1=RV", "appear twice"),
    ("background", "is not VALUE=NAME"),
    ("0=background,x=LV", "'x' is not an integer file value"),
])
def test_label_map_errors_name_the_option(tmp_path, capsys, caplog, text, message):
    raw = write_flat(tmp_path / "raw", 1, seed=26)
    assert _build(raw, tmp_path / "out", *FLAT, "--label-map", text) == 2
    err = _said(capsys, caplog)
    assert f"--label-map {text!r}" in err and message in err


def test_convention_check_skips_other_class_sets(tmp_path, caplog):
    raw = write_flat(tmp_path / "raw", 2, seed=27, values=(0, 1), classes=lv_only)
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        assert _build(raw, out, *FLAT, "--label-map", "0=background,1=LV") == 0
    report = json.loads((out / "build_report.json").read_text())
    assert report["label_convention"]["severity"] == "skipped"
