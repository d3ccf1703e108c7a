"""The main job end to end on real synthetic NIfTI files and real Zarr stores."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from cmrprep.plan import ConfigError
from pipelines.build import BuildConfig, build
from pipelines.build.__main__ import main
from pipelines.build.store import read_records
from pipelines.synthesize import synthesize

ARRAYS = ("images", "labels", "weights", "case_index", "frame_index", "slice_index", "phase",
          "class_counts")
VOLATILE = ("provenance",)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    synthesize(root, 5, 11, layout="acdc")
    return root


@pytest.fixture(scope="module")
def serial_build(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial")
    res = build(BuildConfig(raw, out, workers=0, progress=False))
    assert res.exit_code == 0
    return out


def _store(out: Path) -> zarr.Group:
    return zarr.open_group(str(out / "store.zarr"), mode="r")


def _same_store(a: Path, b: Path) -> None:
    ga, gb = _store(a), _store(b)
    for name in ARRAYS:
        np.testing.assert_array_equal(ga[name][...], gb[name][...], err_msg=name)
    attrs_a = {k: v for k, v in ga.attrs.items() if k not in VOLATILE}
    attrs_b = {k: v for k, v in gb.attrs.items() if k not in VOLATILE}
    assert json.dumps(attrs_a, sort_keys=True) == json.dumps(attrs_b, sort_keys=True)


def test_store_schema(serial_build):
    g = _store(serial_build)
    n = g["images"].shape[0]
    assert n > 0 and g["images"].shape[1:] == (128, 128)
    assert g["images"].dtype == np.float16 and g["labels"].dtype == np.uint8
    assert g["images"].chunks == (16, 128, 128) and g["images"].shards == (64, 128, 128)
    assert g["labels"].chunks == g["images"].chunks and g["labels"].shards == g["images"].shards
    for name in ARRAYS:
        assert g[name].shape[0] == n, name
    assert np.isclose(g["weights"][...].sum(), 1.0)
    attrs = dict(g.attrs)
    assert attrs["format_version"] == 3 and attrs["n_cases"] == 5 and attrs["n_frames"] == 10
    assert attrs["classes"] == ["background", "RV", "MYO", "LV"]
    assert len(attrs["class_weights"]) == 4
    assert set(attrs["class_weights_all"]) == {"inverse_frequency", "median_frequency", "enet",
                                               "effective_number"}
    assert "cases" not in attrs and "frames" not in attrs  # per-case metadata is in records/
    counts = g["class_counts"][...]
    assert attrs["class_counts"] == counts.sum(axis=0).tolist()
    labels = g["labels"][...]
    assert np.array_equal(np.stack([np.bincount(s.ravel(), minlength=4) for s in labels]), counts)
    # padding: the tail of each case group's last shard, never sampled
    pad = g["case_index"][...] < 0
    assert not g["weights"][...][pad].any() and not counts[pad].any()
    assert (g["images"][...][pad] == 0).all()
    table = g["case_table"]
    assert table.shape == (5, 8) and table.attrs["case_ids"] == [f"patient{i:03d}" for i in range(1, 6)]
    assert int(table[...][:, 1].sum()) == int((~pad).sum())
    cases, frames = read_records(serial_build / "store.zarr")
    assert [c["case_id"] for c in cases] == table.attrs["case_ids"] and len(frames) == 10
    frame = frames[0]
    for key in ("original_geometry", "reorientation", "resampled_geometry", "crop_box", "image", "label"):
        assert key in frame, key
    assert set(np.unique(g["frame_index"][...][~pad])) == set(range(10))
    assert attrs["provenance"]["versions"]["zarr"]
    # new cases are hashed by the worker that reads them; every input file is recorded
    hashes = {f: d for c in cases for f, d in c["input_hashes"].items()}
    assert set(hashes) == {f for c in cases for f in c["source_files"]}
    from pipelines.build.incremental import JsonBuckets

    index = JsonBuckets(serial_build / "state" / "digests-sha256-128").load()
    assert {f: e[-1] for f, e in index.items()} == hashes
    assert set(np.unique(g["phase"][...][~pad])) == {0, 1}
    assert not list((serial_build / "staging").iterdir())  # one copy of the data at rest


def _case_ids(out: Path) -> list[str]:
    return list(_store(out)["case_table"].attrs["case_ids"])


def test_every_foreground_voxel_is_inside_the_crop(serial_build):
    _, frames = read_records(serial_build / "store.zarr")
    assert all(f["foreground_outside_crop"] == 0 for f in frames)


def test_report_is_written(serial_build):
    rep = serial_build / "report"
    for name in ("montage.png", "class_frequencies.png", "summary.json", "summary.md", "index.html"):
        assert (rep / name).stat().st_size > 0, name


def test_parallel_equals_serial(raw, serial_build, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    res = build(BuildConfig(raw, tmp_path / "par", workers=2, progress=False))
    assert res.exit_code == 0
    _same_store(serial_build, tmp_path / "par")
    # the nanny's worker environment must not leak into this process (torch would get 1 thread)
    assert "OMP_NUM_THREADS" not in os.environ and os.environ["MKL_NUM_THREADS"] == "3"


def test_small_shards_written_in_parallel_equal_one_shard(raw, serial_build, tmp_path):
    """Cases straddle shard boundaries; workers write the shards concurrently."""
    from cmrprep.plan import Plan

    plan = Plan.from_json((serial_build / "plan.json").read_text()).updated(shard_slices=16)
    (tmp_path / "plan.json").write_text(plan.to_json())
    res = build(BuildConfig(raw, tmp_path / "small", plan_file=str(tmp_path / "plan.json"), workers=2,
                progress=False))
    assert res.exit_code == 0
    g = _store(tmp_path / "small")
    assert g["images"].shards[0] == 16 and g["images"].shape[0] > 3 * 16
    ref = _store(serial_build)
    for name in ARRAYS:
        np.testing.assert_array_equal(g[name][...], ref[name][...], err_msg=name)
    shard_files = list((tmp_path / "small" / "store.zarr" / "images").glob("c.*.0.0"))
    assert len(shard_files) == -(-g["images"].shape[0] // 16)  # one file each, all in one folder


@pytest.mark.parametrize("where", ["write_report", "_save_montage"])
def test_failed_report_keeps_the_published_store(raw, tmp_path, monkeypatch, caplog, where):
    from pipelines.build import report

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(report, where, broken)
    res = build(BuildConfig(raw, tmp_path / "out", workers=0, progress=False))
    assert res.exit_code == 0 and res.published
    assert _store(tmp_path / "out")["images"].shape[0] > 0
    assert "QC report failed" in caplog.text and "no fonts today" in caplog.text
    assert not list((tmp_path / "out").glob(".report-*"))
    assert not (tmp_path / "out" / "report").exists()


def test_rerun_does_no_work_and_keeps_the_store(raw, serial_build, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(serial_build, out, symlinks=True)
    before = os.readlink(out / "store.zarr")
    res = build(BuildConfig(raw, out, workers=0, progress=False))
    assert res.processed == [] and len(res.reused) == 5 and not res.published
    assert os.readlink(out / "store.zarr") == before


def test_bad_case_is_quarantined_and_others_survive(raw, tmp_path):
    bad_raw = tmp_path / "raw"
    shutil.copytree(raw, bad_raw)
    gt = bad_raw / "patient002" / "patient002_frame01_gt.nii.gz"
    gt.write_bytes(gt.read_bytes()[:200])  # truncated gzip
    res = build(BuildConfig(bad_raw, tmp_path / "out", workers=0, progress=False))
    assert res.exit_code == 3
    assert [q["case_id"] for q in res.quarantined] == ["patient002"]
    assert "patient002_frame01_gt" in json.dumps(res.quarantined)
    cases = _case_ids(tmp_path / "out")
    assert cases == ["patient001", "patient003", "patient004", "patient005"]
    summary = (tmp_path / "out" / "report" / "summary.md").read_text()
    assert "patient002" in summary
    # its group's other cases were staged one by one (no whole-group fragment) and stored as
    # a build without the bad case (same plan: the bad case's header counted) stores them
    shutil.rmtree(bad_raw / "patient002")
    build(BuildConfig(bad_raw, tmp_path / "without", workers=0, progress=False, report=False,
                      plan_file=tmp_path / "out" / "plan.json"))
    a = zarr.open_group(str(tmp_path / "out" / "store.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "without" / "store.zarr"), mode="r")
    for name in ("images", "labels", "weights", "case_index", "class_counts"):
        np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)


def test_unreadable_input_while_hashing_quarantines_only_its_case(raw, tmp_path, monkeypatch):
    """An I/O error on one file while hashing (e.g. a flaky network share) names case and file."""
    from pipelines.build import incremental as cache

    real = cache.file_digest

    def flaky(path, **kw):
        if "patient004_frame01_gt" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, **kw)

    monkeypatch.setattr(cache, "file_digest", flaky)
    res = build(BuildConfig(raw, tmp_path / "out", workers=0, progress=False))
    assert res.exit_code == 3
    [q] = res.quarantined
    assert q["case_id"] == "patient004" and q["file"].endswith("patient004_frame01_gt.nii.gz")
    assert "Permission denied" in q["message"]
    cases = _case_ids(tmp_path / "out")
    assert cases == ["patient001", "patient002", "patient003", "patient005"]


@pytest.mark.parametrize("kwargs, match", [
    ({"weight_scheme": "focal"}, "unknown weight_scheme"),
    ({"spacing": -1.0}, "target_spacing must be > 0"),
    ({"crop_mm": 40.0}, "smaller than a heart"),
])
def test_configuration_errors_before_any_work(raw, tmp_path, kwargs, match):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=match):
        build(BuildConfig(raw, out, workers=0, progress=False, **kwargs))
    assert not (out / "store.zarr").exists()
    assert not list((out / "cache").glob("*.npz")) if (out / "cache").exists() else True


def test_cli_exit_code_for_configuration_error(raw, tmp_path, capsys):
    assert main([str(raw), str(tmp_path / "o"), "--weight-scheme", "nope", "--workers", "0"]) == 2


def test_unwritable_output_is_a_configuration_error(raw, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")   # works as root too: nothing can be created below a file
    assert main([str(raw), str(blocker / "out"), "--workers", "0"]) == 2


def test_cli_in_a_fresh_process_reports_flushes_and_cleans_up(raw, tmp_path):
    """The real entry point: exit code 3 with a quarantined case, the summary on stdout
    (written before the fast exit), no Dask scratch folder left behind."""
    import subprocess
    import sys

    bad_raw = tmp_path / "raw"
    shutil.copytree(raw, bad_raw)
    (bad_raw / "patient003" / "patient003_frame01.nii.gz").write_bytes(b"")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.run([sys.executable, "-m", "pipelines.build", str(bad_raw), str(tmp_path / "out"),
                           "--workers", "2", "--quiet"], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "5 cases" not in proc.stdout and "4 cases: processed 4" in proc.stdout
    assert "QUARANTINED patient003" in proc.stdout and "empty" in proc.stdout
    assert len(_case_ids(tmp_path / "out")) == 4
    assert json.loads((tmp_path / "out" / "build_report.json").read_text())["exit_code"] == 3
    assert not list(scratch.glob("cmrprep-dask-*"))


def test_a_non_utf8_case_name_builds_and_keeps_the_report(raw, tmp_path):
    """A folder and files named with bytes that are not UTF-8 (#14.12)."""
    src = tmp_path / "raw"
    shutil.copytree(raw, src)
    odd = os.fsencode(src) + b"/patient\xff002"
    os.rename(os.fsencode(src / "patient002"), odd)
    for name in os.listdir(odd):
        os.rename(odd + b"/" + name, odd + b"/" + name.replace(b"patient002", b"patient\xff002"))
    res = build(BuildConfig(src, tmp_path / "out", workers=0, progress=False))
    assert res.published and not res.quarantined
    assert (tmp_path / "out" / "report" / "summary.md").exists()
    assert "patient\udcff002" in _case_ids(tmp_path / "out")


def test_a_3d_file_named_4d_is_quarantined_as_ingest_does(raw, tmp_path):
    """#14 item 14: build runs ingest's case-level checks (the cine header) before any frame."""
    import nibabel as nib

    from pipelines.ingest import ingest

    bad_raw = tmp_path / "raw"
    shutil.copytree(raw, bad_raw)
    frame = bad_raw / "patient004" / "patient004_frame01.nii.gz"
    shutil.copy(frame, bad_raw / "patient004" / "patient004_4d.nii.gz")
    assert len(nib.load(bad_raw / "patient004" / "patient004_4d.nii.gz").shape) == 3
    res = build(BuildConfig(bad_raw, tmp_path / "out", workers=0, progress=False, report=False))
    assert res.exit_code == 3
    assert [(q["case_id"], q["check"]) for q in res.quarantined] == [("patient004", "dimensions")]
    assert "expected 4D" in res.quarantined[0]["message"]
    pre = ingest(bad_raw)
    assert pre.quarantined_ids == ["patient004"]


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    """#14 item 14: SIGINT to the whole process group -> exit 130, one line, no traceback."""
    import signal
    import subprocess
    import sys
    import time

    def default_sigint():  # as in a terminal: a shell's background job (`cmd &`) inherits SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    out = tmp_path / "syn"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.synthesize", str(out), "--cases", "400",
                             "--seed", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2], start_new_session=True,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while not (out / "patient002").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted")


def test_cases_named_like_the_build_bookkeeping_are_kept(raw, tmp_path):
    """#14 item 4: case ids 'digests', 'staging', 'state' do not collide with OUT's own files."""
    named = tmp_path / "raw"
    shutil.copytree(raw, named)
    for old, new in (("patient001", "digests"), ("patient002", "staging"), ("patient003", "state")):
        folder = named / old
        for f in folder.iterdir():
            f.rename(folder / f.name.replace(old, new))
        folder.rename(named / new)
    out = tmp_path / "out"
    res = build(BuildConfig(named, out, workers=0, progress=False, report=False))
    assert res.exit_code == 0, res.quarantined
    assert _case_ids(out) == ["digests", "patient004", "patient005", "staging", "state"]
    again = build(BuildConfig(named, out, workers=0, progress=False, report=False))
    assert again.processed == [] and sorted(again.reused) == _case_ids(out)


def test_a_case_that_killed_its_worker_is_quarantined_with_the_likely_causes():
    from cmrprep.cases import CaseSpec, FrameSpec
    from pipelines.build import _quarantine_records

    cases = [CaseSpec(f"p{i}", "acdc", (FrameSpec("ED", f"/raw/p{i}.nii.gz"),)) for i in range(3)]
    outcomes = [{"ok": True}, {"ok": False, "exception": "KilledWorker: Attempted to run task "
                               "'_run_batch-1' on 1 different workers"},
                {"ok": False, "exception": "ValueError: odd"}]
    recs = _quarantine_records(outcomes, cases)
    assert [(r["case_id"], r["file"]) for r in recs] == [("p1", "/raw/p1.nii.gz"),
                                                         ("p2", "/raw/p2.nii.gz")]
    assert "worker process preparing this case died" in recs[0]["message"]
    assert "--memory-limit" in recs[0]["message"]
    assert recs[1]["message"] == "task failed after retries: ValueError: odd"


def _enlarge(frame: Path, voxels: float) -> None:
    """Pad a frame (image or label) in-plane with zeros to about ``voxels`` voxels: same anatomy."""
    import nibabel as nib

    img = nib.load(frame)
    factor = np.sqrt(voxels / np.prod(img.shape))
    data = np.asanyarray(img.dataobj)
    pad = [(0, int(n * (factor - 1))) for n in data.shape[:2]] + [(0, 0)] * (data.ndim - 2)
    nib.save(nib.Nifti1Image(np.pad(data, pad), img.affine, img.header), frame)


@pytest.mark.timeout(300)
def test_a_case_that_kills_its_worker_is_quarantined_and_its_group_is_built(raw, tmp_path):
    """A case over the worker's memory limit (the nanny kills the worker, as a native crash would)
    fails alone: the cases processed in the same task are built exactly as without it."""
    import dask
    import distributed  # noqa: F401 - its config defaults, which dask.config.set restores

    big, good = tmp_path / "raw", tmp_path / "good"
    shutil.copytree(raw, big)
    shutil.copytree(raw, good)
    victim = sorted(p.name for p in big.iterdir() if p.is_dir())[1]
    shutil.rmtree(good / victim)
    for frame in sorted((big / victim).glob("*_frame*.nii.gz"))[:2]:  # the first frame and its labels
        _enlarge(frame, 2e8)  # 0.8 GB as float32: far above the 600 MiB limit
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):  # one death fails a task
        res = build(BuildConfig(big, tmp_path / "out", workers=2, memory_limit="600MiB",
                                progress=False))
    assert [q["case_id"] for q in res.quarantined] == [victim]
    assert "worker process preparing this case died" in res.quarantined[0]["message"]
    assert res.exit_code == 3 and res.n_cases == 4
    logged = [json.loads(line) for line in (tmp_path / "out" / "logs" / "build.jsonl").open()]
    cases = [(e["case_id"], e["ok"]) for e in logged if e["event"] == "case"]
    want = [(c.name, True) for c in good.iterdir() if c.is_dir()] + [(victim, False)]
    assert sorted(cases) == sorted(want)  # one event per case, with its final outcome
    ref = build(BuildConfig(good, tmp_path / "ref", workers=0, progress=False,  # the same plan
                            plan_file=tmp_path / "out" / "plan.json"))
    assert ref.exit_code == 0
    got, want = _store(tmp_path / "out"), _store(tmp_path / "ref")
    for name in ARRAYS:  # the attributes differ in paths (build_key): the data must not
        np.testing.assert_array_equal(got[name][...], want[name][...], err_msg=name)
    assert [r["case_id"] for r in read_records(tmp_path / "out" / "store.zarr")[0]] == \
        [r["case_id"] for r in read_records(tmp_path / "ref" / "store.zarr")[0]]
