"""Layout detection and case discovery (pipelines.ingest.layouts / nnunet)."""

import json

import numpy as np
import pytest

from cmrprep.plan import ConfigError
from pipelines.ingest import MNMS_LABEL_MAP, discover, load_frame


def test_acdc_nested_discovery(acdc_root):
    found = discover(acdc_root.parent.parent)  # .../database
    assert found.layout == "acdc" and not found.problems
    assert [c.case_id for c in found.cases] == ["patient001", "patient002", "patient003"]
    case = found.cases[0]
    assert [f.phase for f in case.frames] == ["ED", "ES"]
    assert case.frames[0].image.endswith("patient001_frame01.nii.gz")
    assert case.frames[1].label.endswith("patient001_frame03_gt.nii.gz")
    assert case.cine.endswith("patient001_4d.nii.gz")
    assert case.metadata["ED"] == 1 and case.metadata["Group"] == "NOR"


def test_symlinked_patient_folders_are_discovered(acdc_root, tmp_path):
    """Datasets assembled from symlinks (and a symlink loop) are found, each case once."""
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("patient002", "patient003"):
        (linked / name).symlink_to(acdc_root / name, target_is_directory=True)
    (linked / "patient002" / "loop").symlink_to(linked, target_is_directory=True)
    found = discover(linked)
    assert found.layout == "acdc" and not found.problems
    assert [c.case_id for c in found.cases] == ["patient002", "patient003"]


def test_acdc_missing_ed_and_missing_frame_are_problems(acdc_root):
    (acdc_root / "patient002" / "Info.cfg").write_text("ES: 3\nGroup: NOR\n")
    (acdc_root / "patient003" / "patient003_frame03.nii.gz").unlink()
    found = discover(acdc_root)
    assert [c.case_id for c in found.cases] == ["patient001"]
    checks = {p.case_id: p.check for p in found.problems}
    assert checks == {"patient002": "metadata", "patient003": "missing_file"}
    assert "ED" in found.problems[0].message


@pytest.mark.parametrize("cached", [False, True])
def test_acdc_dangling_info_and_frame_links_are_problems_not_crashes(acdc_root, cached):
    """Discovery works from the folder listing: a listed Info.cfg that is a dangling link, or a
    frame file that is one, is that case's problem (named file), and the other cases go on;
    the same through the build's read cache, which then holds only the readable cases."""
    from pipelines.ingest.readcache import ReadCache

    cache = ReadCache() if cached else None
    info = acdc_root / "patient002" / "Info.cfg"
    info.unlink()
    info.symlink_to(acdc_root / "nowhere.cfg")
    frame = acdc_root / "patient003" / "patient003_frame01.nii.gz"
    frame.unlink()
    frame.symlink_to(acdc_root / "nowhere.nii.gz")
    found = discover(acdc_root, read_cache=cache)
    assert [c.case_id for c in found.cases] == ["patient001", "patient003"]
    if cached:
        assert cache.misses == 2 and "patient002" not in cache.to_json()
    (problem,) = found.problems
    assert problem.case_id == "patient002" and problem.check == "metadata"
    assert problem.file == str(info) and "Info.cfg is missing" in problem.message


def test_acdc_image_only(acdc_root):
    for gt in acdc_root.rglob("*_gt.nii.gz"):
        gt.unlink()
    found = discover(acdc_root)
    assert all(f.label is None for c in found.cases for f in c.frames)
    assert load_frame(found.cases[0], "ED").label is None


@pytest.fixture
def mnms_root(tmp_path, write_nifti, tiny):
    root = tmp_path / "OpenDataset" / "Training" / "Labeled"
    cine = np.stack([tiny.image(t) for t in range(5)], axis=-1)
    src = tiny.label()
    mnms = np.choose(src, [0, 3, 2, 1]).astype(np.uint8)  # project -> M&Ms (1 LV, 2 MYO, 3 RV)
    gt = np.zeros(cine.shape, np.uint8)
    gt[..., 0] = gt[..., 3] = mnms
    for code in ("A1B2C3", "Z9Y8X7"):
        write_nifti(root / code / f"{code}_sa.nii.gz", cine)
        write_nifti(root / code / f"{code}_sa_gt.nii.gz", gt)
    (root.parent / "info.csv").write_text("External code,VendorName,ED,ES\nA1B2C3,Siemens,0,3\n"
                                          "Z9Y8X7,Philips,0,3\n")
    return root


def test_mnms_discovery_and_remap(mnms_root, tiny):
    found = discover(mnms_root)
    assert found.layout == "mnms" and len(found.cases) == 2
    case = found.cases[0]
    assert case.label_map == MNMS_LABEL_MAP and case.cine == case.frames[0].image
    assert [(f.phase, f.image_frame, f.label_frame) for f in case.frames] == [("ED", 0, 0), ("ES", 3, 3)]
    loaded = load_frame(case, "ES")
    np.testing.assert_array_equal(loaded.label, tiny.label())  # back in ACDC convention
    np.testing.assert_array_equal(loaded.image, tiny.image(3).astype(np.float32))


def test_mnms_csv_missing_or_given(mnms_root, tmp_path):
    (mnms_root.parent / "info.csv").rename(tmp_path / "elsewhere.csv")
    with pytest.raises(ConfigError, match="mnms_csv"):
        discover(mnms_root, "mnms")
    assert len(discover(mnms_root, mnms_csv=tmp_path / "elsewhere.csv").cases) == 2


def _nnunet(root, write_nifti, tiny, labels, channels=1):
    for i in range(2):
        for c in range(channels):
            write_nifti(root / "imagesTr" / f"heart_{i:03d}_{c:04d}.nii.gz", tiny.image(i))
        write_nifti(root / "labelsTr" / f"heart_{i:03d}.nii.gz", tiny.label())
    write_nifti(root / "imagesTs" / "heart_100_0000.nii.gz", tiny.image(9))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "cineMRI"},
                                                   "labels": labels, "file_ending": ".nii.gz"}))
    return root


def test_nnunet_label_names_mapped(tmp_path, write_nifti, tiny):
    root = _nnunet(tmp_path / "Dataset001", write_nifti, tiny,
                   {"background": 0, "left ventricle": 1, "LVM": 2, "RVC": 3})
    found = discover(root)
    assert found.layout == "nnunet"
    assert [c.case_id for c in found.cases] == ["heart_000", "heart_001", "heart_100"]
    assert found.cases[0].label_map == ((0, 0), (1, 3), (2, 2), (3, 1))
    assert found.cases[2].frames[0].label is None  # imagesTs: image-only
    acdc = _nnunet(tmp_path / "D27", write_nifti, tiny, {"0": "background", "1": "RV", "2": "MLV", "3": "LVC"})
    found = discover(acdc)  # v1 style: names as keys
    assert found.cases[0].label_map == ((0, 0), (1, 1), (2, 2), (3, 3))
    assert found.label_map.classes == ("background", "RV", "MYO", "LV")


def test_nnunet_unmappable_and_multichannel(tmp_path, write_nifti, tiny):
    other = _nnunet(tmp_path / "other", write_nifti, tiny, {"background": 0, "aorta": 1})
    assert discover(other).label_map.classes == ("background", "aorta")  # another class set
    bad = _nnunet(tmp_path / "bad", write_nifti, tiny, {"aorta": 1, "LV": 2})
    with pytest.raises(ConfigError, match="no background"):
        discover(bad)
    multi = _nnunet(tmp_path / "multi", write_nifti, tiny, {"background": 0, "RV": 1, "MYO": 2, "LV": 3}, 2)
    found = discover(multi)
    assert {p.check for p in found.problems} == {"channels"}
    assert all(p.severity == "warning" for p in found.problems)


def test_generic_suffix_and_pattern(tmp_path, write_nifti, tiny):
    for name in ("a", "b"):
        write_nifti(tmp_path / "img" / f"{name}.nii.gz", tiny.image())
        write_nifti(tmp_path / "img" / f"{name}_mask.nii.gz", tiny.label())
    found = discover(tmp_path, image_glob="img/*.nii.gz", label_suffix="_mask")
    assert found.layout == "generic" and [c.case_id for c in found.cases] == ["a", "b"]
    assert found.cases[0].frames[0].label.endswith("a_mask.nii.gz")
    found = discover(tmp_path, image_glob="img/*.nii.gz", label_pattern="{stem}_mask{ext}")
    assert all(c.has_labels for c in found.cases)


def test_image_only_file_and_folder(tmp_path, write_nifti, tiny):
    single = write_nifti(tmp_path / "one.nii.gz", tiny.image())
    found = discover(single)
    assert found.layout == "images" and found.cases[0].frames[0].label is None
    cine = np.stack([tiny.image(t) for t in range(3)], axis=-1)
    write_nifti(tmp_path / "cine.nii", cine)
    found = discover(tmp_path)
    assert found.layout == "images"
    cine_case = next(c for c in found.cases if c.case_id == "cine")
    assert [f.image_frame for f in cine_case.frames] == [0, 1, 2] and cine_case.cine


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        discover(tmp_path / "nope")
    with pytest.raises(ConfigError, match="unknown layout"):
        discover(tmp_path, "kaggle")


def test_info_cfg_with_a_byte_order_mark_is_read(tmp_path):
    """An Info.cfg written by a Windows editor (UTF-8 BOM) still has its ED (#14 item 14)."""
    from pipelines.synthesize import synthesize

    synthesize(tmp_path / "raw", 1, 3, layout="acdc")
    cfg = next((tmp_path / "raw").rglob("Info.cfg"))
    cfg.write_bytes(b"\xef\xbb\xbf" + cfg.read_bytes())
    disc = discover(tmp_path / "raw")
    assert len(disc.cases) == 1 and not disc.problems


def test_duplicate_case_ids_are_reported_for_every_copy(acdc_root, make_case):
    """#14 item 3: siteB/patient002 beside patient002 -> both reported, neither built, others kept."""
    import shutil

    shutil.copytree(acdc_root / "patient002", acdc_root / "siteB" / "patient002")
    found = discover(acdc_root)
    assert [c.case_id for c in found.cases] == ["patient001", "patient003"]
    dup = [p for p in found.problems if p.check == "duplicate_id"]
    assert sorted(p.file for p in dup) == [str(acdc_root / "patient002"),
                                           str(acdc_root / "siteB" / "patient002")]
    assert all("found 2 times" in p.message and "siteB" in p.message for p in dup)


def test_prediction_outputs_are_never_inputs(acdc_root, tmp_path, write_nifti, tiny):
    """#14 item 3: predictions written inside RAW (predict's layout) are not cases, nor duplicates."""
    preds = acdc_root / "a_preds" / "patient001"  # sorts before the real case folders
    preds.mkdir(parents=True)
    write_nifti(preds / "patient001_frame01_pred.nii.gz", tiny.label())
    loose = acdc_root / "patient003" / "patient003_frame03_pred.nii.gz"
    write_nifti(loose, tiny.label())
    found = discover(acdc_root)
    assert [c.case_id for c in found.cases] == ["patient001", "patient002", "patient003"]
    assert found.problems == []
    # a folder holding predict_report.json is skipped whole, whatever its file names
    gen = tmp_path / "gen"
    write_nifti(gen / "a.nii.gz", tiny.image())
    write_nifti(gen / "a_gt.nii.gz", tiny.label())
    write_nifti(gen / "out" / "a" / "a.nii.gz", tiny.label())
    (gen / "out" / "predict_report.json").write_text("{}")
    write_nifti(gen / "b_pred.nii.gz", tiny.label())
    found = discover(gen, "generic")
    assert [c.case_id for c in found.cases] == ["a"] and found.problems == []


@pytest.mark.parametrize("ending", ["/../../outside/x.nii.gz", "_0000.nii.gz/../../x", "*", "", 7])
def test_nnunet_file_ending_cannot_leave_the_dataset(tmp_path, write_nifti, tiny, ending):
    """#14 item 13: a file_ending with ../ (or any non-suffix) is refused, nothing outside is read."""
    root = _nnunet(tmp_path / "D1", write_nifti, tiny, {"background": 0, "RV": 1, "MYO": 2, "LV": 3})
    write_nifti(tmp_path / "outside" / "x.nii.gz", tiny.image())
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": ending}))
    with pytest.raises(ConfigError, match="file_ending .* is not one of"):
        discover(root)


def test_inputs_outside_the_root_are_refused_but_symlinked_folders_stay(acdc_root, tmp_path):
    """#14 item 13: a case whose files climb out of RAW is a problem; a linked-in folder is fine."""
    import os

    from pipelines.ingest.layouts import Discovery, _confine
    from cmrprep.cases import CaseSpec, FrameSpec

    elsewhere = tmp_path / "archive"
    (acdc_root / "patient003").rename(elsewhere)
    os.symlink(elsewhere, acdc_root / "patient003")
    found = discover(acdc_root)
    assert [c.case_id for c in found.cases] == ["patient001", "patient002", "patient003"]
    sneaky = CaseSpec("x", "generic", (FrameSpec("F00", str(acdc_root / ".." / ".." / "x.nii.gz"), None),))
    found = Discovery("generic", [sneaky, found.cases[0]])
    _confine(found, acdc_root)
    assert [c.case_id for c in found.cases] == ["patient001"]
    assert [p.check for p in found.problems] == ["outside_input"]


def _count_calls(monkeypatch, module, name: str) -> list:
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


def test_read_cache_reads_unchanged_info_cfg_once_and_a_rewritten_one_again(acdc_root, monkeypatch):
    """The build's discovery cache: Info.cfg is parsed while its stat stamp is new, not after."""
    import os

    from pipelines.ingest import layouts
    from pipelines.ingest.readcache import ReadCache

    parsed = _count_calls(monkeypatch, layouts, "_parse_info")
    first = ReadCache()
    plain = discover(acdc_root, read_cache=first)
    assert len(parsed) == 3 and first.misses == 3 and first.changed
    cache = ReadCache.from_json(first.to_json())
    again = discover(acdc_root, read_cache=cache)
    assert len(parsed) == 3 and cache.hits == 3 and not cache.changed
    assert [c.to_dict() for c in again.cases] == [c.to_dict() for c in plain.cases]
    info = acdc_root / "patient002" / "Info.cfg"
    st = info.stat()
    info.write_text(info.read_text().replace("NOR", "DCM"))  # same size
    os.utime(info, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cache = ReadCache.from_json(cache.to_json())
    changed = discover(acdc_root, read_cache=cache)
    assert [os.path.basename(os.path.dirname(p)) for p in parsed[3:]] == ["patient002"]
    assert changed.cases[1].metadata["Group"] == "DCM" and changed.cases[0].metadata["Group"] == "NOR"


def test_read_cache_text_that_is_damaged_or_of_another_format_is_ignored(acdc_root):
    from pipelines.ingest.readcache import ReadCache

    for text in ("{not json", json.dumps({"format": 0, "entries": {}}), None, "[]"):
        cache = ReadCache.from_json(text)
        found = discover(acdc_root, read_cache=cache)
        assert len(found.cases) == 3 and cache.misses == 3 and cache.hits == 0


def test_read_cache_keeps_the_mnms_csv_and_forgets_dropped_entries(mnms_root, monkeypatch):
    from pipelines.ingest import layouts
    from pipelines.ingest.readcache import ReadCache

    first = ReadCache()
    discover(mnms_root, read_cache=first)
    rows = _count_calls(monkeypatch, layouts, "_read_mnms_csv")
    headers = _count_calls(monkeypatch, layouts, "_csv_header")
    cache = ReadCache.from_json(first.to_json())
    found = discover(mnms_root, read_cache=cache)
    assert rows == [] and headers == [] and len(found.cases) == 2
    assert found.cases[0].frames[1].image_frame == 3
    (mnms_root.parent / "info.csv").rename(mnms_root.parent / "other.csv")
    cache = ReadCache.from_json(cache.to_json())
    discover(mnms_root, read_cache=cache)
    assert cache.changed and "info.csv" not in cache.to_json()  # entries of vanished files drop out
