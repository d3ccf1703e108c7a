"""Scheduled builds: incremental updates, plan changes, SIGKILL safety and concurrent builds."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipelines.build import BuildConfig, build
from pipelines.build.__main__ import main
from pipelines.build.outdir import BuildLocked, build_lock
from pipelines.synthesize import synthesize

ARRAYS = ("images", "labels", "weights", "case_index", "frame_index", "slice_index", "phase",
          "class_counts")


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Six synthetic cases to pick from."""
    root = tmp_path_factory.mktemp("pool")
    synthesize(root, 6, 21, layout="acdc")
    return root


def _raw(pool: Path, dest: Path, ids) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for i in ids:
        shutil.copytree(pool / f"patient{i:03d}", dest / f"patient{i:03d}")
    return dest


def _snapshot(out: Path) -> dict:
    g = zarr.open_group(str(out / "store.zarr"), mode="r")
    arrays = {k: g[k][...] for k in ARRAYS}
    attrs = {k: v for k, v in g.attrs.items() if k != "provenance"}
    return {"arrays": arrays, "attrs": json.dumps(attrs, sort_keys=True)}


def _assert_same(a: dict, b: dict) -> None:
    for k in ARRAYS:
        np.testing.assert_array_equal(a["arrays"][k], b["arrays"][k], err_msg=k)
    assert a["attrs"] == b["attrs"]


@pytest.fixture(scope="module")
def reference(pool, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ref")
    raw = _raw(pool, tmp / "raw", [1, 2, 3, 4])
    build(BuildConfig(raw, tmp / "out", workers=0, progress=False))
    return {"raw": raw, "out": tmp / "out", "snap": _snapshot(tmp / "out")}


def test_add_change_remove_matches_a_fresh_build(pool, reference, tmp_path):
    raw = _raw(pool, tmp_path / "raw", [1, 2, 3, 5])
    out = tmp_path / "out"
    build(BuildConfig(raw, out, workers=0, progress=False))
    # remove 5, add 4: now the same inputs as the reference
    shutil.rmtree(raw / "patient005")
    _raw(pool, raw, [4])
    res = build(BuildConfig(raw, out, workers=0, progress=False))
    assert res.processed == ["patient004"] and res.removed == ["patient005"]
    build(BuildConfig(raw, tmp_path / "fresh", workers=0, progress=False))
    _assert_same(_snapshot(out), _snapshot(tmp_path / "fresh"))
    # change one case's content: only that case is reprocessed
    img = raw / "patient002" / "patient002_frame01.nii.gz"
    shutil.copy(pool / "patient006" / "patient006_frame01.nii.gz", img)
    shutil.copy(pool / "patient006" / "patient006_frame01_gt.nii.gz",
                raw / "patient002" / "patient002_frame01_gt.nii.gz")
    res = build(BuildConfig(raw, out, workers=0, progress=False))
    assert res.processed == ["patient002"] and res.published


def test_unchanged_rerun_reads_no_input_and_a_touched_file_is_checked_again(reference, tmp_path,
                                                                           monkeypatch):
    """Stored cases whose files keep their stat stamp are not opened at all (a nightly no-op
    costs a few stats); a file with a new mtime is re-hashed (its content decides)."""
    import pipelines.ingest as ingest
    from pipelines.build import incremental

    out = tmp_path / "out"
    shutil.copytree(reference["out"], out, symlinks=True)
    opened, hashed = [], []
    real_digest = incremental.file_digest
    monkeypatch.setattr(incremental, "file_digest", lambda p, **kw: hashed.append(str(p)) or real_digest(p, **kw))
    real = ingest.read_header
    monkeypatch.setattr(ingest, "read_header", lambda path, **kw: opened.append(str(path)) or real(path, **kw))
    res = build(BuildConfig(reference["raw"], out, workers=0, progress=False))
    assert res.processed == [] and len(res.reused) == 4 and opened == [] and hashed == []
    img = reference["raw"] / "patient003" / "patient003_frame01.nii.gz"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    try:
        res = build(BuildConfig(reference["raw"], out, workers=0, progress=False))
    finally:
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert res.processed == [] and len(res.reused) == 4  # same content: nothing to redo
    assert [Path(p).name for p in hashed] == ["patient003_frame01.nii.gz"] and opened == []


_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # every Python-level open() in this process (audit hooks stay installed)


def test_unchanged_rerun_opens_no_file_under_raw_and_an_edited_info_cfg_is_read(reference, tmp_path):
    """Nothing under RAW is opened by a no-op re-run: not an image, not an ``Info.cfg``
    (discovery's read cache, ``OUT/state/discovery-v1/``); an edited ``Info.cfg`` is read
    again, and nothing else is."""
    global _OPENED
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out, symlinks=True)
    raw = str(reference["raw"])
    build(BuildConfig(reference["raw"], out, workers=0, progress=False))  # stamps as RAW is now
    assert list((out / "state" / "discovery-v1").glob("*.json"))
    _OPENED = []
    try:
        res = build(BuildConfig(reference["raw"], out, workers=0, progress=False))
        noop, _OPENED = [p for p in _OPENED if p.startswith(raw)], []
        assert res.processed == [] and noop == []
        info = reference["raw"] / "patient002" / "Info.cfg"
        text, st = info.read_text(), info.stat()
        info.write_text(text + "Note: rescanned\n")
        try:
            _OPENED = []
            res = build(BuildConfig(reference["raw"], out, workers=0, progress=False))
            edited = sorted({p for p in _OPENED if p.startswith(raw)})
        finally:
            info.write_text(text)
            os.utime(info, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        _OPENED = None
    # read again, and only it; the case stands (its key holds its frames and file digests,
    # not the free-text metadata)
    assert edited == [str(info)] and res.processed == []


def test_a_moved_raw_folder_reads_each_input_once(reference, tmp_path, monkeypatch):
    """RAW under another path: keys hold paths, so every case is processed again, and each
    file is hashed once, by the task that reads it (the client used to hash the whole dataset
    first, serially, only to find keys that could not match)."""
    from pipelines.build import incremental

    out = tmp_path / "out"
    shutil.copytree(reference["out"], out, symlinks=True)
    moved = shutil.copytree(reference["raw"], tmp_path / "moved")
    import inspect

    hashed, where = [], set()
    real_digest = incremental.file_digest

    def digest(p, **kw):
        hashed.append(str(p))
        where.add(any(f.function == "process_case" for f in inspect.stack()))
        return real_digest(p, **kw)

    monkeypatch.setattr(incremental, "file_digest", digest)
    res = build(BuildConfig(moved, out, workers=0, progress=False, report=False))
    assert len(res.processed) == 4 and res.reused == []
    files = [str(p) for p in moved.rglob("*.nii.gz")]
    assert sorted(hashed) == sorted(files) and where == {True}  # each once, in the case's task
    got = _snapshot(out)["arrays"]
    for k in ARRAYS:  # the same data (the build key differs: keys hold the paths)
        np.testing.assert_array_equal(got[k], reference["snap"]["arrays"][k], err_msg=k)


def test_a_stored_case_whose_file_turns_unreadable_is_quarantined_by_name(pool, tmp_path, monkeypatch):
    """A changed file of a stored case is hashed by the case's task; when it cannot be read the
    case is quarantined naming the case, the file and the OS error, and the others stay."""
    from pipelines.build import incremental

    raw = _raw(pool, tmp_path / "raw", [1, 2])
    out = tmp_path / "out"
    build(BuildConfig(raw, out, workers=0, progress=False, report=False))
    img = raw / "patient002" / "patient002_frame01.nii.gz"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    real_digest = incremental.file_digest

    def digest(p, **kw):
        if Path(p) == img:
            raise PermissionError(13, "Permission denied", str(p))
        return real_digest(p, **kw)

    monkeypatch.setattr(incremental, "file_digest", digest)
    res = build(BuildConfig(raw, out, workers=0, progress=False, report=False))
    [q] = res.quarantined
    assert q["case_id"] == "patient002" and q["check"] == "readable" and q["file"] == str(img)
    assert "Permission denied" in q["message"]
    assert res.reused == ["patient001"] and res.exit_code == 3
    ids = zarr.open_group(str(out / "store.zarr"), mode="r")["case_table"].attrs["case_ids"]
    assert ids == ["patient001"]


def test_plan_change_triggers_full_rebuild(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out, symlinks=True)
    res = build(BuildConfig(reference["raw"], out, workers=0, progress=False, spacing=1.5))
    assert res.full_rebuild and len(res.processed) == 4
    assert zarr.open_group(str(out / "store.zarr"), mode="r").attrs["spacing"] == [1.5, 1.5]


def test_dry_run_lists_changes_and_touches_nothing(pool, tmp_path, capsys):
    out = tmp_path / "out"
    raw = _raw(pool, tmp_path / "raw", [1, 2])
    build(BuildConfig(raw, out, workers=0, progress=False))
    _raw(pool, raw, [6])
    before = os.readlink(out / "store.zarr")
    state = {f.relative_to(out): f.read_bytes() for f in (out / "state").rglob("*") if f.is_file()}
    assert main([str(raw), str(out), "--dry-run", "--workers", "0", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "would process 1" in text and "process patient006" in text
    assert os.readlink(out / "store.zarr") == before
    assert not list((out / "staging").iterdir()) and len(os.listdir(out / "versions")) == 1
    assert state and {f.relative_to(out): f.read_bytes() for f in (out / "state").rglob("*")
                      if f.is_file()} == state  # no cache written


def test_second_build_refuses_while_one_runs(reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with build_lock(out):
        with pytest.raises(BuildLocked, match="--wait"):
            build(BuildConfig(reference["raw"], out, workers=0, progress=False))
        assert main([str(reference["raw"]), str(out), "--workers", "0", "--quiet"]) == 2


def test_lock_of_a_killed_build_does_not_block(reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code = ("import sys, time; from pathlib import Path; from pipelines.build.outdir import build_lock\n"
            "with build_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with build_lock(out):  # acquired immediately: the kernel released the dead holder's flock
        pass


@pytest.mark.parametrize("delay", [0.8, 2.5, 4.5])
def test_sigkill_then_rerun_equals_uninterrupted_build(reference, tmp_path, delay):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.build", str(reference["raw"]), str(out),
           "--workers", "0", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "store.zarr").exists():  # whatever is visible is a complete, readable version
        zarr.open_group(str(out / "store.zarr"), mode="r")["images"][...]
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    _assert_same(_snapshot(out), reference["snap"])
    assert not list((out / "versions").glob(".tmp-*"))
    # the cases staged before the kill and those processed now make the same shift reference
    shift = [json.loads((o / "fingerprint.json").read_text())["shift_reference"]
             for o in (out, reference["out"])]
    assert shift[0] == shift[1] and shift[0]["n_frames"] == 8


def test_empty_raw_is_refused_and_changes_nothing(reference, tmp_path):
    """An unmounted share must not wipe the store (exit 2, nothing removed)."""
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out, symlinks=True)
    before = os.readlink(out / "store.zarr")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), str(out), "--workers", "0", "--quiet"]) == 2
    assert os.readlink(out / "store.zarr") == before
    _assert_same(_snapshot(out), reference["snap"])


def test_all_quarantined_lists_the_reasons(pool, tmp_path, caplog):
    raw = _raw(pool, tmp_path / "raw", [1, 2])
    for gt in raw.rglob("*_gt.nii.gz"):
        gt.write_bytes(b"")
    assert main([str(raw), str(tmp_path / "out"), "--workers", "0", "--quiet"]) == 2
    assert "patient001" in caplog.text and "patient002" in caplog.text and "quarantined" in caplog.text
    caplog.clear()  # with --spacing the plan needs no header, the reasons come all the same (#14.11)
    assert main([str(raw), str(tmp_path / "out"), "--workers", "0", "--quiet", "--spacing", "1.5"]) == 2
    assert "patient001" in caplog.text and "patient002" in caplog.text and "Traceback" not in caplog.text


def test_plan_becomes_current_only_with_the_version_it_built(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out, symlinks=True)
    plan_before = (out / "plan.json").read_text()
    build(BuildConfig(reference["raw"], out, workers=0, progress=False, seed=7, dry_run=True))
    assert (out / "plan.json").read_text() == plan_before
    res = build(BuildConfig(reference["raw"], out, workers=0, progress=False, seed=7))
    assert res.full_rebuild and json.loads((out / "plan.json").read_text())["seed"] == 7


def test_a_change_that_keeps_size_and_mtime_is_noticed(pool, tmp_path):
    """``touch -r``-style rewrites keep size and mtime; the ctime in the stamp catches them (#14.7)."""
    raw = _raw(pool, tmp_path / "raw", [1, 2])
    out = tmp_path / "out"
    build(BuildConfig(raw, out, workers=0, progress=False, report=False))
    img = raw / "patient002" / "patient002_frame01.nii.gz"
    other = pool / "patient003" / "patient003_frame01.nii.gz"
    st = img.stat()
    data = bytearray(img.read_bytes())
    donor = other.read_bytes()
    if len(donor) != len(data):  # same size: pad or cut the donor's gzip tail (still a change)
        donor = (donor + bytes(len(data)))[:len(data)]
    img.write_bytes(donor)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert img.stat().st_size == st.st_size and img.stat().st_mtime_ns == st.st_mtime_ns
    res = build(BuildConfig(raw, out, workers=0, progress=False, report=False))
    assert "patient002" in res.processed or "patient002" in [q["case_id"] for q in res.quarantined]


def _killed_before_publishing(raw, out, monkeypatch):
    from pipelines.build import store

    def crash(*args, **kwargs):
        raise RuntimeError("killed before publishing")

    monkeypatch.setattr(store, "write_version", crash)
    with pytest.raises(RuntimeError, match="killed"):
        build(BuildConfig(raw, out, workers=0, progress=False, report=False))
    monkeypatch.undo()


def test_a_killed_build_leaves_its_groups_for_the_next(pool, reference, tmp_path, monkeypatch):
    """A first build's case tasks write whole store groups (fragments); after a kill the next
    run takes them instead of processing again, and the store is the same."""
    out = tmp_path / "out"
    _killed_before_publishing(reference["raw"], out, monkeypatch)
    fragments = sorted((out / "staging").glob("*.group"))
    assert fragments and not list((out / "staging").glob("*.npz"))
    res = build(BuildConfig(reference["raw"], out, workers=0, progress=False))
    assert res.published and res.processed == [] and not res.quarantined
    _assert_same(_snapshot(out), reference["snap"])
    assert not list((out / "staging").iterdir())  # published: staging emptied


def test_a_torn_staged_group_is_processed_again(pool, tmp_path, monkeypatch):
    """A staged group whose shard was cut short (power loss after a kill) is redone, not read."""
    raw = _raw(pool, tmp_path / "raw", [1, 2])
    out = tmp_path / "out"
    _killed_before_publishing(raw, out, monkeypatch)
    fragments = sorted((out / "staging").glob("*.group"))
    assert fragments
    shard = next(f for f in sorted((fragments[0] / "images").iterdir()) if f.name.startswith("c."))
    shard.write_bytes(shard.read_bytes()[:100])
    res = build(BuildConfig(raw, out, workers=0, progress=False, report=False))
    assert res.published and not res.quarantined
    assert res.processed == ["patient001", "patient002"]  # one group (ids hash into one) redone
    fresh = tmp_path / "fresh"
    build(BuildConfig(raw, fresh, workers=0, progress=False, report=False))
    _assert_same(_snapshot(out), _snapshot(fresh))


def test_a_torn_staged_case_is_processed_again(pool, tmp_path, monkeypatch):
    """A staged case whose arrays were cut short (power loss after a kill) is redone, not read.

    Cases are staged one by one when their store group also holds stored cases (a nightly run;
    patient001-006 hash into one group)."""
    from pipelines.build import incremental

    raw = _raw(pool, tmp_path / "raw", [1])
    out = tmp_path / "out"
    build(BuildConfig(raw, out, workers=0, progress=False, report=False))
    _raw(pool, raw, [2, 3])
    _killed_before_publishing(raw, out, monkeypatch)
    staged = sorted((out / "staging").glob("*.npz"))
    assert len(staged) == 2 and not list((out / "staging").glob("*.group"))
    staged[0].write_bytes(staged[0].read_bytes()[:100])
    res = build(BuildConfig(raw, out, workers=0, progress=False, report=False))
    assert res.published and len(res.processed) == 1 and not res.quarantined
    assert incremental.read_staged_meta(out / "staging", staged[0].stem) is None


def _shift_reference(out: Path) -> dict:
    return json.loads((out / "fingerprint.json").read_text())["shift_reference"]


def _recomputed(out: Path) -> dict:
    from cmrprep.shift import summarize
    from pipelines.build.store import read_records

    return summarize(f["shift"] for r in read_records(out / "store.zarr")[0] for f in r["fingerprint"])


def test_fingerprint_reference_follows_additions_and_removals(pool, reference, tmp_path, monkeypatch):
    """fingerprint.json stays one dataset summary: an added case is merged in without reading
    the stored cases' records; a removal summarizes the records again."""
    from pipelines.build import store

    def no_records(*args):
        raise AssertionError("a first build or an addition should not read every stored record")

    raw = _raw(pool, tmp_path / "raw", [1, 2, 3])
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(store, "iter_records", no_records)
        build(BuildConfig(raw, out, workers=0, progress=False))
        first = json.loads((out / "fingerprint.json").read_text())
        assert "cases" not in first and first["n_cases"] == 3
        assert first["shift_reference"]["n_frames"] == 6
        _raw(pool, raw, [4])
        build(BuildConfig(raw, out, workers=0, progress=False))
    merged = _shift_reference(out)
    assert merged == _recomputed(out) == _shift_reference(reference["out"])
    shutil.rmtree(raw / "patient001")
    build(BuildConfig(raw, out, workers=0, progress=False))
    assert _shift_reference(out) == _recomputed(out)
    assert _shift_reference(out)["n_frames"] == 6
    # an older file (per-case fingerprints, no build key) is replaced by the summary on the next run
    (out / "fingerprint.json").write_text(json.dumps({"cases": {}, "shift_reference": {"n_frames": 0}}))
    build(BuildConfig(raw, out, workers=0, progress=False))
    assert _shift_reference(out) == _recomputed(out)
