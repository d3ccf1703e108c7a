"""Tests of the synthetic cine-CMR generator and its writer CLI."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cmrprep.plan import ConfigError
from cmrprep.synthetic import GROUPS, contraction, generate_case, generate_dataset
from pipelines.synthesize import main, synthesize

N_CASES = 6


@pytest.fixture(scope="module")
def cases():
    return list(generate_dataset(N_CASES, seed=7))


def _heart_slices(label: np.ndarray) -> np.ndarray:
    return np.nonzero((label > 0).any(axis=(0, 1)))[0]


# ------------------------------------------------------------------ generator
def test_same_seed_same_arrays_and_different_seed_differs():
    a, b, c = generate_case(3, 1), generate_case(3, 1), generate_case(4, 1)
    np.testing.assert_array_equal(a.cine, b.cine)
    np.testing.assert_array_equal(a.labels[a.es], b.labels[b.es])
    np.testing.assert_array_equal(a.affine, b.affine)
    assert (a.ed, a.es, a.n_frames, a.code) == (b.ed, b.es, b.n_frames, b.code)
    assert a.cine.shape != c.cine.shape or not np.array_equal(a.cine, c.cine)


def test_full_cine_matches_ed_es_rendering():
    short = generate_case(5, 2, n_frames=6)
    full = generate_case(5, 2, n_frames=6, full_cine=True)
    assert full.frames == tuple(range(6)) and full.cine.shape[-1] == 6
    for t in (short.ed, short.es):
        np.testing.assert_array_equal(short.frame(t), full.frame(t))
        np.testing.assert_array_equal(short.labels[t], full.labels[t])
    with pytest.raises(KeyError, match="not rendered"):
        short.frame(next(t for t in range(6) if t not in short.frames))


def test_contraction_is_periodic_and_peaks_at_es():
    n, ed, es = 25, 1, 9
    values = [contraction(t, ed, es, n) for t in range(n)]
    assert values[ed] == 0.0 and values[es] == pytest.approx(1.0)
    assert min(values) >= 0.0 and max(values) <= 1.0
    assert contraction(ed + n, ed, es, n) == pytest.approx(0.0)


def test_metadata_is_realistic(cases):
    for case in cases:
        assert 20 <= case.n_frames <= 35 and 0 <= case.ed < case.n_frames
        assert (case.es - case.ed) % case.n_frames == pytest.approx(case.n_frames / 3, abs=3)
        assert case.group in GROUPS and 150 <= case.height <= 195 and 50 <= case.weight <= 110
        assert len(case.code) == 6 and case.code.isalnum() and case.code.upper() == case.code
        assert sorted(case.labels) == sorted({case.ed, case.es})


def test_geometry_ranges(cases):
    for case in cases:
        ni, nj, nk, _ = case.cine.shape
        sp = case.geometry.spacing
        assert 150 <= ni <= 512 and 150 <= nj <= 512 and 6 <= nk <= 18
        assert sp[0] == pytest.approx(sp[1]) and 1.0 <= sp[0] <= 2.0 and 5.0 <= sp[2] <= 10.0
        direction = case.geometry.direction
        np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-9)
    assert len({c.cine.shape[:2] for c in cases}) > 1
    assert {c.cine.dtype for c in cases} <= {np.dtype(np.int16), np.dtype(np.float32)}


def test_labels_values_and_foreground_fraction(cases):
    for case in cases:
        labels = np.stack(list(case.labels.values()))
        assert labels.dtype == np.uint8 and labels.shape[1:] == case.cine.shape[:3]
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
        assert 0.01 <= (labels > 0).mean() <= 0.05


def test_empty_slices_above_base_and_below_apex(cases):
    for case in cases:
        for label in case.labels.values():
            heart = _heart_slices(label)
            assert len(heart) >= 3
            assert heart[0] > 0 and heart[-1] < label.shape[2] - 1


def test_rv_vanishes_before_the_apex(cases):
    for case in cases:
        label = case.labels[case.ed]
        lv = _heart_slices(np.where(label >= 2, label, 0))
        rv = _heart_slices(np.where(label == 1, 1, 0))
        apex_end = lv[-1] if rv.mean() < lv.mean() else lv[0]  # stacks may run either way
        assert len(rv) >= 2 and apex_end not in rv  # the most apical heart slice has no RV


def test_es_cavity_smaller_and_wall_thicker(cases):
    for case in cases:
        ed, es = case.labels[case.ed], case.labels[case.es]
        assert (es == 3).sum() < (ed == 3).sum()
        k = _heart_slices(ed)[len(_heart_slices(ed)) // 2]
        thickness = []
        for lab in (ed, es):
            endo, epi = (lab[..., k] == 3).sum(), (lab[..., k] >= 2).sum()
            thickness.append(np.sqrt(epi / np.pi) - np.sqrt(endo / np.pi))
        assert thickness[1] > thickness[0]


def test_lv_diameter_in_mm(cases):
    for case in cases:
        area = (case.labels[case.ed] == 3).sum(axis=(0, 1)).max() * case.geometry.spacing[0] ** 2
        diameter = 2 * np.sqrt(area / np.pi)
        low, high = (45, 75) if case.group in ("DCM", "MINF") else (38, 57)
        assert low <= diameter <= high, (case.group, diameter)


def test_myocardium_encloses_lv(cases):
    ring = ndimage.generate_binary_structure(3, 1)
    ring[:, :, 0] = ring[:, :, 2] = False  # in-plane dilation only
    for case in cases:
        for lab in case.labels.values():
            lv = lab == 3
            shell = ndimage.binary_dilation(lv, ring) & ~lv
            assert (lab[shell] == 2).mean() > 0.95


def test_intensity_contrast(cases):
    scales = []
    for case in cases:
        image, lab = case.intensity(case.ed), case.labels[case.ed]
        lv, myo = image[lab == 3].mean(), image[lab == 2].mean()
        assert lv > 1.8 * myo
        assert image[lab == 1].mean() > 1.8 * myo
        bright_unlabelled = (image > 0.8 * np.median(image[lab == 3])) & (lab == 0)
        assert bright_unlabelled.sum() > (lab == 3).sum()  # aorta, atria, fat look like blood
        scales.append(np.percentile(image, 99))
    assert max(scales) / min(scales) > 3  # random intensity scale per case


# ------------------------------------------------------------------------ CLI
def test_cli_acdc_layout_roundtrip(tmp_path):
    out = tmp_path / "acdc"
    assert main([str(out), "--cases", "2", "--seed", "3"]) == 0
    case = generate_case(3, 1)
    folder = out / "patient002"
    info = dict(line.split(": ") for line in (folder / "Info.cfg").read_text().splitlines())
    assert set(info) == {"ED", "ES", "Group", "Height", "NbFrame", "Weight"}
    assert (int(info["ED"]), int(info["ES"])) == (case.ed + 1, case.es + 1)
    assert int(info["NbFrame"]) == case.n_frames and info["Group"] == case.group
    for t in (case.ed, case.es):
        img = nib.load(folder / f"patient002_frame{t + 1:02d}.nii.gz")
        gt = nib.load(folder / f"patient002_frame{t + 1:02d}_gt.nii.gz")
        np.testing.assert_allclose(img.affine, case.affine, atol=1e-4)
        np.testing.assert_allclose(img.header.get_zooms(), case.geometry.spacing, rtol=1e-5)
        np.testing.assert_array_equal(np.asanyarray(gt.dataobj), case.labels[t])
        np.testing.assert_allclose(img.get_fdata(dtype=np.float32), case.intensity(t),
                                   rtol=1e-5, atol=1e-3 * max(1.0, case.scl_slope))
    assert not list(folder.glob("*_4d.nii.gz"))
    assert sorted(p.name for p in out.iterdir()) == ["patient001", "patient002", "synthesize.json"]


def test_cli_acdc_with_4d(tmp_path):
    synthesize(tmp_path / "a", 1, 12, with_4d=True)  # seed 12: a small case, fast to write
    case = generate_case(12, 0)
    cine = nib.load(tmp_path / "a" / "patient001" / "patient001_4d.nii.gz")
    assert cine.shape == case.cine.shape[:3] + (case.n_frames,)
    assert len(cine.header.get_zooms()) == 4
    frame = nib.load(tmp_path / "a" / "patient001" / f"patient001_frame{case.es + 1:02d}.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(cine.dataobj)[..., case.es],
                                  np.asanyarray(frame.dataobj))


def test_cli_mnms_layout_swaps_labels(tmp_path):
    out = tmp_path / "mnms"
    ids = synthesize(out, 2, 16, layout="mnms")  # seed 16: short 4D files, fast
    with open(out / "mnms_info.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["External code", "VendorName", "Vendor", "Centre", "ED", "ES"]
    assert [r["External code"] for r in rows] == ids
    case = generate_case(16, 1)
    row = rows[1]
    assert row["External code"] == case.code
    assert (int(row["ED"]), int(row["ES"])) == (case.ed, case.es)  # 0-based
    image = nib.load(out / case.code / f"{case.code}_sa.nii.gz")
    gt = np.asanyarray(nib.load(out / case.code / f"{case.code}_sa_gt.nii.gz").dataobj)
    assert image.ndim == 4 and gt.shape == image.shape
    assert image.shape[3] >= max(case.ed, case.es) + 1
    np.testing.assert_allclose(image.affine, case.affine, atol=1e-4)
    swap = np.array([0, 3, 2, 1])
    for t in (case.ed, case.es):
        np.testing.assert_array_equal(gt[..., t], swap[case.labels[t]])
    others = [t for t in range(gt.shape[3]) if t not in (case.ed, case.es)]
    assert not gt[..., others].any()


def test_cli_nnunet_layout(tmp_path):
    out = tmp_path / "nn"
    assert main([str(out), "--cases", "2", "--seed", "3", "--layout", "nnunet"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta == {"channel_names": {"0": "cineMRI"},
                    "labels": {"background": 0, "RV": 1, "MLV": 2, "LVC": 3},
                    "numTraining": 4, "file_ending": ".nii.gz", "name": "cmrprep_synthetic"}
    case = generate_case(3, 0)
    images = sorted(p.name for p in (out / "imagesTr").iterdir())
    labels = sorted(p.name for p in (out / "labelsTr").iterdir())
    assert len(images) == len(labels) == 4
    for t in (case.ed, case.es):
        assert f"patient001_frame{t + 1:02d}_0000.nii.gz" in images
        lab = nib.load(out / "labelsTr" / f"patient001_frame{t + 1:02d}.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(lab.dataobj), case.labels[t])


def test_cli_refuses_non_empty_out(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main([str(out), "--cases", "1"]) == 2
    assert main([str(out), "--cases", "1", "--overwrite"]) == 2  # not ours: never deleted
    assert (out / "keep.txt").exists()
    mine = tmp_path / "mine"
    assert main([str(mine), "--cases", "1", "--layout", "nnunet"]) == 0
    assert main([str(mine), "--cases", "1", "--layout", "nnunet"]) == 2
    assert main([str(mine), "--cases", "1", "--overwrite"]) == 0
    assert (mine / "patient001" / "Info.cfg").exists() and not (mine / "imagesTr").exists()


def test_configuration_errors(tmp_path):
    assert main([str(tmp_path / "x"), "--cases", "1", "--layout", "bogus"]) == 2
    assert main([str(tmp_path / "x")]) == 2
    with pytest.raises(ConfigError, match="cases"):
        synthesize(tmp_path / "y", 0, 1)
    with pytest.raises(ConfigError, match="seed"):
        synthesize(tmp_path / "y", 1, -1)
    with pytest.raises(ValueError, match="seed"):
        generate_case(-1, 0)
    with pytest.raises(ConfigError, match="layout"):
        synthesize(tmp_path / "y", 1, 1, layout="nifti")


def test_site_b_is_another_acquisition_of_the_same_kind_of_heart():
    """#12: coarser, thicker, noisier, transposed; site A unchanged; seeded."""
    from cmrprep.synthetic import generate_case

    for index in range(3):
        a, b = generate_case(7, index), generate_case(7, index, site="B")
        assert generate_case(7, index).cine.tobytes() == a.cine.tobytes()  # A does not depend on B
        np.testing.assert_array_equal(generate_case(7, index, site="B").cine, b.cine)
        sp = b.geometry.spacing
        assert 2.0 <= sp[0] <= 2.6 and 9.0 <= sp[2] <= 12.0 and sp[0] > a.geometry.spacing[0]
        # stored transposed: the first voxel axis runs along A's second axis
        cos = abs(float(np.dot(b.affine[:3, 0], a.affine[:3, 1]))) / (np.linalg.norm(b.affine[:3, 0])
                                                                      * np.linalg.norm(a.affine[:3, 1]))
        assert cos > 0.999
        for t, lab in b.labels.items():
            assert lab.shape == b.cine.shape[:3] and set(np.unique(lab)) == {0, 1, 2, 3}
            img = b.frame(t).astype(np.float64)
            blood, myo = img[lab == 3].mean(), img[lab == 2].mean()
            img_a, lab_a = a.frame(t).astype(np.float64), a.labels[t]
            # weaker blood-myocardium contrast than site A
            assert blood / myo < img_a[lab_a == 3].mean() / img_a[lab_a == 2].mean()


def _heart_cnr(case) -> float:
    """Blood-myocardium contrast over the Rician noise sigma (from the air in the corners), mid slice, ED."""
    from scipy import ndimage

    img, lab = case.frame(case.ed).astype(np.float64), case.labels[case.ed]
    k = int(np.argmax([(lab[..., s] == 3).sum() for s in range(lab.shape[2])]))
    sl, ls = img[..., k], lab[..., k]
    lv, myo = ndimage.binary_erosion(ls == 3, iterations=2), ndimage.binary_erosion(ls == 2, iterations=1)
    air = np.concatenate([sl[:6, :6].ravel(), sl[:6, -6:].ravel(), sl[-6:, :6].ravel(), sl[-6:, -6:].ravel()])
    return float((sl[lv].mean() - sl[myo].mean()) / (air.mean() / np.sqrt(np.pi / 2)))


@pytest.mark.parametrize("seed", [3, 17])
def test_site_b_is_noisier_but_still_a_diagnostic_cine(seed):
    """#12: site B's blood-myocardium CNR at the heart is poor (about 4-8) but not below what scanners keep."""
    from cmrprep.synthetic import generate_case

    a = [_heart_cnr(generate_case(seed, i)) for i in range(8)]
    b = [_heart_cnr(generate_case(seed, i, site="B")) for i in range(8)]
    # medians and counts: a corner that is not air (a coil-bright or quantised one) skews one estimate
    assert 3.0 < float(np.median(b)) < 9.0 and sum(2.0 < v < 13.0 for v in b) >= 6
    assert float(np.median(a)) > 1.5 * float(np.median(b))


def test_site_b_changes_apply_one_at_a_time():
    """#12: each of site B's changes alone, with its full-site-B value; none of them is site A."""
    from cmrprep.synthetic import SITE_B_CHANGES, generate_case

    a, b = generate_case(9, 1), generate_case(9, 1, site="B")
    np.testing.assert_array_equal(generate_case(9, 1, site="B", site_changes=SITE_B_CHANGES).cine, b.cine)
    np.testing.assert_array_equal(generate_case(9, 1, site="B", site_changes=()).cine, a.cine)
    res = generate_case(9, 1, site="B", site_changes=["resolution"])
    assert res.geometry.spacing[0] == pytest.approx(b.geometry.spacing[0])
    assert res.cine.shape[2] == a.cine.shape[2] and res.cine.shape[:2] != a.cine.shape[:2]
    thick = generate_case(9, 1, site="B", site_changes=["thickness"])
    assert thick.cine.shape[2] == b.cine.shape[2] != a.cine.shape[2]
    assert thick.geometry.spacing[0] == pytest.approx(a.geometry.spacing[0])
    flip = generate_case(9, 1, site="B", site_changes="transposed")  # one name is one change
    np.testing.assert_array_equal(flip.cine, np.swapaxes(a.cine, 0, 1))
    for change in ("contrast", "blur", "coil"):  # same grid as site A, other intensities
        c = generate_case(9, 1, site="B", site_changes=[change])
        assert c.cine.shape == a.cine.shape and np.array_equal(c.affine, a.affine)
        assert not np.array_equal(c.cine, a.cine), change
        for t in a.labels:
            np.testing.assert_array_equal(c.labels[t], a.labels[t])
    with pytest.raises(ValueError, match="unknown site-B change"):
        generate_case(9, 1, site="B", site_changes=["gradient"])


def test_cli_site_changes(tmp_path):
    """--site-changes: recorded in synthesize.json; only with --site B; unknown names are rc 2."""
    out = tmp_path / "coil"
    assert main([str(out), "--cases", "1", "--site", "B", "--site-changes", "coil,blur"]) == 0
    assert json.loads((out / "synthesize.json").read_text())["site_changes"] == ["coil", "blur"]
    assert main([str(tmp_path / "x"), "--cases", "1", "--site-changes", "coil"]) == 2
    assert main([str(tmp_path / "y"), "--cases", "1", "--site", "B", "--site-changes", "gradient"]) == 2
    assert not (tmp_path / "y").exists() or not any((tmp_path / "y").iterdir())
