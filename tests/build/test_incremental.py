"""Incremental state: digest index, staged cases, the store index and what to process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipelines.build import incremental


def test_digest_index_knows_the_digests_of_files_with_their_recorded_stamp(tmp_path):
    a, b = tmp_path / "a.nii", tmp_path / "b.nii"
    a.write_bytes(b"x" * 100)
    b.write_bytes(b"y" * 100)
    index = incremental.DigestIndex(tmp_path / "state")
    for f, entry in incremental.stamped_digests([str(a), str(b)]).items():
        index.record(f, entry)
    index.save()
    again = incremental.DigestIndex(tmp_path / "state")
    d = incremental.file_digest(a)
    assert again.known([str(a)]) == {str(a): d}
    st = b.stat()
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert again.known([str(a), str(b), str(tmp_path / "gone")]) == {str(a): d}


def test_index_written_with_another_algorithm_is_ignored(tmp_path):
    (tmp_path / "digests.json").write_text('{"algorithm": "md5", "files": {"x": [1, 2, "d"]}}')
    assert incremental.DigestIndex(tmp_path).known(["x"]) == {}


def test_single_file_index_of_earlier_versions_is_taken_over_and_removed(tmp_path):
    a = tmp_path / "a.nii"
    a.write_bytes(b"x" * 10)
    entry = incremental.stamped_digests([str(a)])[str(a)]
    legacy = tmp_path / "state" / "digests.json"
    legacy.parent.mkdir()
    legacy.write_text(json.dumps({"algorithm": incremental.ALGORITHM, "files": {str(a): entry}}))
    index = incremental.DigestIndex(tmp_path / "state")
    assert index.known([str(a)]) == {str(a): entry[-1]}
    index.save()
    assert not legacy.exists()
    assert incremental.DigestIndex(tmp_path / "state").known([str(a)]) == {str(a): entry[-1]}


def test_json_buckets_rewrite_only_the_files_whose_entries_changed(tmp_path):
    folder = tmp_path / "map"
    entries = {f"/raw/patient{i:04d}/image.nii.gz": [i, i * 7, "d" * 32] for i in range(2000)}
    assert incremental.JsonBuckets(folder).save(entries) == incremental.N_BUCKETS
    before = {p.name: p.stat().st_ino for p in folder.iterdir()}
    state = incremental.JsonBuckets(folder)
    assert state.load() == entries
    entries["/raw/patient9999/image.nii.gz"] = [1, 2, "e" * 32]  # one new entry
    del entries["/raw/patient0001/image.nii.gz"]  # one gone
    changed = {incremental.bucket_of("/raw/patient9999/image.nii.gz"),
               incremental.bucket_of("/raw/patient0001/image.nii.gz")}
    assert state.save(entries) == len(changed)
    after = {p.name: p.stat().st_ino for p in folder.iterdir()}
    assert {n[:-5] for n in after if after[n] != before.get(n)} == changed  # replaced files
    assert incremental.JsonBuckets(folder).load() == entries
    # a damaged file counts as empty: its entries are written again, the rest stand
    damaged = folder / f"{incremental.bucket_of('/raw/patient0002/image.nii.gz')}.json"
    damaged.write_text("{not json")
    again = incremental.JsonBuckets(folder)
    assert "/raw/patient0002/image.nii.gz" not in again.load()
    assert again.save(entries) == 1 and incremental.JsonBuckets(folder).load() == entries


def test_staged_entry_is_valid_only_when_complete(tmp_path):
    arrays = {k: np.zeros((2, 4, 4) if k in ("images", "labels") else (2,), np.int32)
              for k in incremental.STAGED_ARRAYS}
    incremental.write_staged(tmp_path, "k1", arrays, {"key": "k1", "n_slices": 2})
    assert incremental.read_staged_meta(tmp_path, "k1")["n_slices"] == 2
    assert incremental.read_staged_arrays(tmp_path, "k1", ("images",))["images"].shape == (2, 4, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["k1.npz"]  # one file a case
    data = (tmp_path / "k1.npz").read_bytes()
    (tmp_path / "k1.npz").write_bytes(data[: len(data) // 2])  # torn by a power loss
    assert incremental.read_staged_meta(tmp_path, "k1") is None
    assert incremental.read_staged_meta(tmp_path, "other") is None
    incremental.clear_staging(tmp_path)
    assert not list(tmp_path.iterdir())


def test_store_index_of_no_version_is_empty(tmp_path):
    index = incremental.StoreIndex(None)
    assert index.case_ids == [] and index.key_of("x") is None and "x" not in index
    broken = tmp_path / "v.zarr"
    broken.mkdir()
    assert incremental.StoreIndex(broken).case_ids == []


def test_case_key_depends_on_contents_plan_and_paths():
    case = {"case_id": "p1", "layout": "acdc", "frames": [{"image": "/r/a", "label": "/r/b"}]}
    k = incremental.case_key(case, {"/r/a": "1", "/r/b": "2"}, "plan")
    assert k != incremental.case_key(case, {"/r/a": "1", "/r/b": "3"}, "plan")
    assert k != incremental.case_key(case, {"/r/a": "1", "/r/b": "2"}, "plan2")
    assert k == incremental.case_key({**case, "metadata": {"x": 1}}, {"/r/a": "1", "/r/b": "2"}, "plan")


def test_remove_files_deletes_what_is_there_and_skips_what_is_gone(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    for name in ("a.npz", "b.npz"):
        (staging / name).write_bytes(b"x")
    files = incremental.staged_files(staging)
    assert sorted(Path(f).name for f in files) == ["a.npz", "b.npz"]
    (staging / "a.npz").unlink()  # deleted meanwhile (a retried task): not an error
    assert incremental.remove_files(files) == {"ok": True, "removed": 2}
    assert not list(staging.iterdir())
    assert incremental.staged_files(tmp_path / "absent") == []
