"""#12: the dataset-shift report flags another site's data and stays quiet on the same site's."""

from __future__ import annotations

import json

import pytest

from cmrprep.shift import compare, summarize
from pipelines.build import BuildConfig, build
from pipelines.ingest import ingest
from pipelines.ingest.__main__ import main as ingest_main
from pipelines.synthesize import synthesize


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shift")
    synthesize(tmp / "siteA", 24, 51)
    build(BuildConfig(tmp / "siteA", tmp / "out", workers=0, progress=False, report=False))
    return tmp / "out"


def test_build_writes_the_reference(reference):
    ref = json.loads((reference / "fingerprint.json").read_text())["shift_reference"]
    assert ref["n_frames"] == 48 and {"inplane_mm", "slice_mm", "contrast", "tail_ratio"} <= set(ref)


@pytest.mark.parametrize("seed", [52, 53])
def test_same_site_is_quiet(reference, tmp_path, seed):
    synthesize(tmp_path / "new", 6, seed)
    assert ingest(tmp_path / "new", reference=reference).shift == []


@pytest.mark.parametrize("seed", [54, 55])
def test_other_site_is_named(reference, tmp_path, seed, capsys):
    synthesize(tmp_path / "siteB", 6, seed, site="B")
    report = tmp_path / "r.json"
    assert ingest_main([str(tmp_path / "siteB"), "--reference", str(reference), "--report", str(report)]) == 0
    shift = json.loads(report.read_text())["shift"]
    codes = {w["code"] for w in shift}
    assert {"shift_inplane_mm", "shift_contrast"} <= codes
    msg = next(w["message"] for w in shift if w["code"] == "shift_inplane_mm")
    assert msg.startswith("in-plane spacing 2.") and "training range 1." in msg
    assert "SHIFT in-plane spacing" in capsys.readouterr().out


def test_orientation_is_compared_when_training_had_one_convention():
    ref = summarize([{"axcodes": "LPS", "inplane_mm": 1.4}, {"axcodes": "LPS", "inplane_mm": 1.6}])
    out = compare(ref, {"a": {"axcodes": "PLS", "inplane_mm": 1.5}, "b": {"axcodes": "LPS", "inplane_mm": 1.5}})
    assert [w["code"] for w in out] == ["shift_orientation"] and out[0]["cases"] == ["a"]
    many = summarize([{"axcodes": c} for c in ("LPS", "RAS", "PLS")])
    assert compare(many, {"a": {"axcodes": "SLP"}}) == []


def test_one_odd_case_among_many_is_not_a_shift():
    ref = summarize([{"slice_mm": v} for v in (8.0, 10.0)])
    cases = {f"c{i}": {"slice_mm": 9.0} for i in range(9)}
    assert compare(ref, {**cases, "odd": {"slice_mm": 14.0}}) == []
    assert compare(ref, {"odd": {"slice_mm": 14.0}})[0]["code"] == "shift_slice_mm"


def test_bad_reference_is_a_config_error(tmp_path):
    from cmrprep.plan import ConfigError

    with pytest.raises(ConfigError, match="no training_fingerprint.json"):
        ingest(tmp_path, reference=tmp_path)


def test_contrast_is_the_class_means_difference_over_the_range():
    """The bounding-box computation equals the plain mean over the whole volume's class masks."""
    import numpy as np

    from cmrprep.geometry import Geometry
    from cmrprep.shift import frame_features

    rng = np.random.default_rng(4)
    image = rng.normal(100, 20, (40, 50, 6)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[12:30, 20:41, 1:5] = 1
    label[15:25, 22:30, 1:5] = 2
    label[17:22, 24:27, 1:5] = 3
    image[label == 3] += 80
    geometry = Geometry.from_affine(np.diag([1.5, 1.5, 8.0, 1.0]), image.shape)
    pct = {"p0.5": 40.0, "p50": 100.0, "p99.5": 200.0}
    got = frame_features(image, geometry, label, pct)["contrast"]
    want = (image[label == 3].mean() - image[label == 2].mean()) / 160.0
    assert got == pytest.approx(float(want), rel=1e-5)
    assert frame_features(image, geometry, np.where(label == 2, 0, label), pct)["contrast"] is None
    assert frame_features(image, geometry, np.zeros_like(label), pct)["contrast"] is None
