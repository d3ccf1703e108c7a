"""Store layout: content-defined case groups, hard-linked reuse, repair of a damaged version."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import zarr

from cmrprep.plan import Plan
from pipelines.build import BuildConfig, build
from pipelines.build.store import group_layout, group_members, read_records
from pipelines.synthesize import synthesize


def test_group_layout_is_a_function_of_the_case_set_and_changes_locally():
    ids = [f"case{i:04d}" for i in range(400)]
    sizes = {cid: 10 + i % 13 for i, cid in enumerate(ids)}
    sizes["case0200x"] = 17

    def groups(members):
        layout = group_layout(members, [sizes[c] for c in members], shard=64, mean_cases=8)
        return [tuple(members[i] for i in g["cases"]) for g in layout], layout

    before, layout = groups(ids)
    assert 25 < len(before) < 100  # about 400 / 8 groups
    assert all(g["first_slice"] % 64 == 0 for g in layout)
    assert all(g["n_slices"] <= g["n_shards"] * 64 for g in layout)
    starts = [g["first_shard"] for g in layout]
    assert starts == sorted(set(starts))
    inserted = sorted(ids + ["case0200x"])
    after, _ = groups(inserted)
    changed = set(after) - set(before)
    home = next(g for g in before if g[0] <= "case0200x" <= g[-1] or g[-1] < "case0200x" < g[-1] + "~")
    assert 1 <= len(changed) <= 2  # its group (split in two when the new id is a boundary)
    assert sorted(c for g in changed for c in g) == sorted([*home, "case0200x"])
    removed, _ = groups([c for c in ids if c != "case0100"])
    assert len(set(removed) - set(before)) <= 1
    assert len(set(before) - set(removed)) <= 2


def test_an_insertion_rewrites_about_one_group():
    """A new case rewrites its own group and, at most, the few groups up to the next
    content boundary.  The old count-based cap (a group ended at 2 x mean_cases) pushed the
    last case of every full group into the next one: on these ids 14.5 cases rewritten per
    insertion on average, 47 at worst; content-defined long groups: 12.2 and 37."""
    ids = [f"patient{i:04d}" for i in range(1500)]
    before = {tuple(ids[i] for i in g) for g in group_members(ids, 8)}
    assert 12 <= max(len(g) for g in before) < 32  # long groups exist and end by content
    rewritten = []
    for k in np.random.default_rng(5).choice(len(ids), 300, replace=False):
        new = f"{ids[k]}b"  # sorts right after ids[k]
        members = sorted([*ids, new])
        changed = {tuple(members[i] for i in g) for g in group_members(members, 8)} - before
        assert any(ids[k] in g or new in g for g in changed)  # its group is rewritten
        rewritten.append(sum(len(g) for g in changed))
    assert np.mean(rewritten) < 13 and max(rewritten) <= 40


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    synthesize(root, 7, 31, layout="acdc")
    return root


def _small_groups_plan(tmp_path, raw):
    """A plan with groups of ~2 cases and 16-slice shards, so 7 cases make several groups."""
    probe = tmp_path / "probe"
    build(BuildConfig(raw, probe, workers=0, progress=False, report=False))
    plan = Plan.from_json((probe / "plan.json").read_text()).updated(group_cases=2, shard_slices=16)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return path


def _links(version):
    files = [p for name in ("images", "labels") for p in (version / name).rglob("c*")
             if p.is_file()]
    return sum(1 for p in files if p.stat().st_nlink > 1), len(files)


def test_adding_a_case_rewrites_only_its_group(raw, tmp_path):
    plan = _small_groups_plan(tmp_path, raw)
    part = tmp_path / "raw_part"
    shutil.copytree(raw, part)
    shutil.rmtree(part / "patient004")
    out = tmp_path / "out"
    build(BuildConfig(part, out, plan_file=plan, workers=0, progress=False, report=False))
    shutil.copytree(raw / "patient004", part / "patient004")
    res = build(BuildConfig(part, out, plan_file=plan, workers=0, progress=False, report=False))
    assert res.processed == ["patient004"]
    events = [json.loads(x) for x in (out / "logs" / "build.jsonl").read_text().splitlines()]
    published = [e for e in events if e["event"] == "published"][-1]
    assert published["groups"] >= 3 and published["groups_written"] <= 2
    assert published["groups_linked"] == published["groups"] - published["groups_written"] >= 1
    linked, total = _links((out / "store.zarr").resolve())
    assert 0 < linked < total  # unchanged groups share their shard files with the last version
    fresh = tmp_path / "fresh"
    build(BuildConfig(raw, fresh, plan_file=plan, workers=0, progress=False, report=False))
    a = zarr.open_group(str(out / "store.zarr"), mode="r")
    b = zarr.open_group(str(fresh / "store.zarr"), mode="r")
    for name in ("images", "labels", "weights", "case_index", "frame_index", "class_counts"):
        np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)
    def records(where, root):
        cases, frames = read_records(where / "store.zarr")
        for c in cases:
            c.pop("key")
        return json.dumps([cases, frames], sort_keys=True).replace(str(root), "RAW")

    assert records(out, part) == records(fresh, raw)


def test_a_format_2_version_is_reused_by_a_format_3_build(raw, tmp_path, monkeypatch):
    """Versions written before format 3 keep shards under ``c/K/0/0``; the next build links
    their unchanged groups into the new layout (``c.K.0.0``) instead of rewriting them."""
    from pipelines.build import store

    plan = _small_groups_plan(tmp_path, raw)
    part = tmp_path / "raw_part"
    shutil.copytree(raw, part)
    shutil.rmtree(part / "patient004")
    out = tmp_path / "out"
    monkeypatch.setattr(store, "KEY_ENCODING", {"name": "default", "separator": "/"})
    build(BuildConfig(part, out, plan_file=plan, workers=0, progress=False, report=False))
    old = (out / "store.zarr").resolve()
    assert (old / "images" / "c").is_dir() and store.key_separator(old) == "/"
    monkeypatch.undo()
    shutil.copytree(raw / "patient004", part / "patient004")
    res = build(BuildConfig(part, out, plan_file=plan, workers=0, progress=False, report=False))
    assert res.processed == ["patient004"]
    new = (out / "store.zarr").resolve()
    assert store.key_separator(new) == "." and not (new / "images" / "c").exists()
    linked, total = _links(new)
    assert 0 < linked < total
    fresh = tmp_path / "fresh"
    build(BuildConfig(raw, fresh, plan_file=plan, workers=0, progress=False, report=False))
    _same_arrays(out, fresh)


def _same_arrays(a, b):
    ga, gb = zarr.open_group(str(a / "store.zarr"), mode="r"), zarr.open_group(str(b / "store.zarr"), mode="r")
    for name in ("images", "labels", "weights", "case_index", "frame_index", "class_counts"):
        np.testing.assert_array_equal(ga[name][...], gb[name][...], err_msg=name)


@pytest.fixture(scope="module")
def damaged_setup(raw, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("damage")
    plan = _small_groups_plan(tmp, raw)
    fresh = tmp / "fresh"
    build(BuildConfig(raw, fresh, plan_file=plan, workers=0, progress=False, report=False))
    return plan, fresh


def _damage_shard(version, how):
    files = sorted(version.joinpath("images").glob("c.*"))
    victim = files[len(files) // 2]
    if how == "delete":
        victim.unlink()
    elif how == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    elif how == "records":
        shutil.rmtree(next(p for p in sorted((version / "records").iterdir()) if p.is_dir()))
    return victim


@pytest.mark.parametrize("how", ["delete", "truncate", "records"])
def test_damaged_shards_are_found_and_repaired_by_the_next_build(raw, tmp_path, damaged_setup, how, capsys):
    """#14 item 5: a shard deleted or cut from the current version, or a group's records lost,
    is noticed by the next plain build (one stat per shard), its cases are rebuilt from RAW and
    named; the result equals a fresh build (never zeros)."""
    from pipelines.build.__main__ import main

    plan, fresh = damaged_setup
    out = tmp_path / "out"
    build(BuildConfig(raw, out, plan_file=plan, workers=0, progress=False, report=False))
    version = (out / "store.zarr").resolve()
    _damage_shard(version, how)
    code = main([str(raw), str(out), "--plan", str(plan), "--workers", "0", "--quiet", "--no-report"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "repaired:" in printed and "damaged" in printed
    report = json.loads((out / "build_report.json").read_text())
    assert 1 <= len(report["repaired"]) < 7 and report["published"]
    assert sorted(report["processed"]) == sorted(report["repaired"])
    assert (out / "store.zarr").resolve() != version
    _same_arrays(out, fresh)
    again = build(BuildConfig(raw, out, plan_file=plan, workers=0, progress=False, report=False))
    assert again.repaired == [] and again.processed == [] and not again.published


def test_unreadable_case_table_rebuilds_everything(raw, tmp_path, damaged_setup):
    plan, fresh = damaged_setup
    out = tmp_path / "out"
    build(BuildConfig(raw, out, plan_file=plan, workers=0, progress=False, report=False))
    (out / "store.zarr").resolve().joinpath("case_table", "zarr.json").write_text("{not json")
    res = build(BuildConfig(raw, out, plan_file=plan, workers=0, progress=False, report=False))
    assert res.exit_code == 0 and res.published and len(res.processed) == 7 and res.repaired
    _same_arrays(out, fresh)


def _staged_case(staging, cid, n, label_value):
    from pipelines.build import incremental

    key = f"key-{cid}"
    arrays = {"images": np.full((n, 16, 16), 0.5, np.float32), "labels": np.full((n, 16, 16), label_value, np.uint8),
              "class_counts": np.zeros((n, 4), np.int64), "class_counts_raw": np.zeros((n, 4), np.int64),
              "slice_index": np.arange(n, dtype=np.int32), "phase": np.zeros(n, np.int8),
              "frame_local": np.zeros(n, np.int32)}
    arrays["class_counts"][:, label_value] = 256
    meta = {"case_id": cid, "key": key, "case": {"case_id": cid, "layout": "x", "frames": [{"image": f"/{cid}.nii"}]},
            "frames": [{"case_id": cid}], "fingerprint": [{}], "warnings": [], "n_slices": n}
    incremental.write_staged(staging, key, arrays, meta)
    from pipelines.build.tasks import case_summary

    return {"case_id": cid, "key": key, "source": "staged", "hashes": {}, "warnings": [],
            **case_summary(arrays, 1)}


def _drop_fill_value_shards(version):
    """Make ``version`` look written by an earlier cmrprep: zarr's default ``write_empty_chunks=False``
    stored no file for a shard of fill values only, and the build recorded its size as 0."""
    from pipelines.build.store import shard_files

    table = zarr.open_array(str(version / "case_table"), mode="r+")
    groups = table.attrs["groups"]
    labels = zarr.open_array(str(version / "labels"), mode="r")
    shard = labels.shards[0]
    for g in groups:
        files = shard_files(version, g[1], g[2])
        for j, f in enumerate(files[g[2]:]):  # the labels shards
            k = g[1] + j
            if not labels[k * shard:(k + 1) * shard].any():
                f.unlink()
                g[5][g[2] + j] = 0
    table.attrs.update({"groups": groups})


def test_an_all_background_label_shard_is_absent_and_still_reused(tmp_path):
    """Stores written before ``write_empty_chunks`` was on have no file for a shard of fill
    values only (size 0 recorded); reuse must not take that for damage."""
    from pipelines.build import incremental
    from pipelines.build.store import dataset_statistics, write_version

    plan = Plan(target_spacing=1.0, crop_shape=(16, 16), shard_slices=16, group_cases=1)
    staging = tmp_path / "staging"
    cases = [_staged_case(staging, "a", 20, 0), _staged_case(staging, "b", 12, 3)]
    costs = []

    def serial(func, items, cost):
        costs.append(cost)
        return [func(*it) for it in items]

    stats = dataset_statistics(cases, plan)
    v1 = tmp_path / "v1.zarr"
    write_version(v1, None, staging, cases, plan, stats, "k1", serial)
    assert all(s > 0 for g in incremental.StoreIndex(v1).groups for s in g[5])  # every shard written
    _drop_fill_value_shards(v1)
    index = incremental.StoreIndex(v1)
    sizes = [g[5] for g in index.groups]
    assert any(s == 0 for g in sizes for s in g)  # some labels shard holds only background
    for c in cases:
        c.update(source="store", old_first_slice=int(index.table[index.row(c["case_id"])][0]),
                 old_group=index.groups[int(index.table[index.row(c["case_id"])][2])][0])
    cases.append(_staged_case(staging, "c", 5, 2))
    v2 = tmp_path / "v2.zarr"
    counts = write_version(v2, v1, staging, cases, plan, dataset_statistics(cases, plan), "k2", serial,
                           old_groups={g[0]: g for g in index.groups})
    assert counts["groups_linked"] >= 1
    assert costs[0] == [21.0, 13.0]  # written: 1 + slices
    assert costs[1].count(1.0) == counts["groups_linked"]  # linked: 1
    a, b = zarr.open_group(str(v1), mode="r"), zarr.open_group(str(v2), mode="r")
    n1 = a["images"].shape[0]
    np.testing.assert_array_equal(b["labels"][:n1], a["labels"][...])
    np.testing.assert_array_equal(b["images"][:n1], a["images"][...])


def _as_fragment_part(staging, entry):
    """The :func:`~pipelines.build.store.write_fragment` input of a case staged by :func:`_staged_case`."""
    from pipelines.build import incremental
    from pipelines.build.store import case_record

    arrays = incremental.read_staged_arrays(staging, entry["key"])
    meta = incremental.read_staged_meta(staging, entry["key"])
    return {"arrays": arrays, "record": case_record(meta, {}),
            "summary": {k: entry[k] for k in ("case_id", "key", "n_slices", "n_frames",
                                              "class_counts_raw", "slices", "warnings")}}


@pytest.mark.parametrize("merged", [False, True])
def test_a_group_fragment_is_linked_or_read_back(tmp_path, merged):
    """A group written whole by its case task (a fragment) is hard-linked into the version when
    the layout has the same group; when the layout groups its cases otherwise (a quarantined
    neighbour moved a boundary) they are read back from it.  Either way: the same version."""
    from pipelines.build.store import dataset_statistics, write_fragment, write_version

    plan = Plan(target_spacing=1.0, crop_shape=(16, 16), shard_slices=16, group_cases=1)
    staging = tmp_path / "staging"
    cases = [_staged_case(staging, "a", 20, 1), _staged_case(staging, "b", 12, 3)]

    def serial(func, items, cost):
        return [func(*it) for it in items]

    stats = dataset_statistics(cases, plan)
    ref = tmp_path / "ref.zarr"
    write_version(ref, None, staging, cases, plan, stats, "k", serial)
    parts = [[_as_fragment_part(staging, c)] for c in cases]  # one group per case, as the layout has
    if merged:
        parts = [parts[0] + parts[1]]  # one fragment holding both: no group of the layout
    frags = [write_fragment(staging, plan, p) for p in parts]
    for c in cases:
        frag = next(f for f, p in zip(frags, parts) if any(q["record"]["case_id"] == c["case_id"] for q in p))
        j = [q["record"]["case_id"] for q in parts[frags.index(frag)]].index(c["case_id"])
        c.update(source="fragment", fragment={**{k: frag[k] for k in ("key", "path", "sizes", "sep")},
                                              "first": frag["first"][j]})
    for f in staging.glob("*.npz"):
        f.unlink()  # only the fragments hold the cases now
    new = tmp_path / "new.zarr"
    counts = write_version(new, None, staging, cases, plan, stats, "k", serial)
    assert counts["groups_written"] == 2 and counts["groups_linked"] == 0
    linked, _ = _links(new)
    assert (linked > 0) != merged  # linked from the fragments unless regrouped
    a, b = zarr.open_group(str(ref), mode="r"), zarr.open_group(str(new), mode="r")
    for name in ("images", "labels", "case_index", "weights"):
        np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)
    assert read_records(ref) == read_records(new)


def test_a_changed_group_keeps_its_shards_before_the_change(raw, tmp_path):
    """Adding (then removing) the case that sorts last changes only the end of its group: the
    shards before it are hard links to the previous version's files, and the store equals a
    fresh build of the same cases."""
    probe = tmp_path / "probe"
    build(BuildConfig(raw, probe, workers=0, progress=False, report=False))
    plan = Plan.from_json((probe / "plan.json").read_text()).updated(group_cases=64, shard_slices=16)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(plan.to_json())
    part = tmp_path / "raw_part"
    shutil.copytree(raw, part)
    last = sorted(p.name for p in raw.iterdir() if p.is_dir())[-1]
    shutil.rmtree(part / last)
    out, cfg = tmp_path / "out", dict(plan_file=plan_file, workers=0, progress=False, report=False)
    build(BuildConfig(part, out, **cfg))
    six = (out / "store.zarr").resolve()
    names = ("images", "labels", "weights", "case_index", "frame_index", "class_counts")
    six_arrays = {n: zarr.open_group(str(six), mode="r")[n][...] for n in names}

    def published():
        events = [json.loads(x) for x in (out / "logs" / "build.jsonl").read_text().splitlines()]
        return [e for e in events if e["event"] == "published"][-1]

    def same_arrays(a, b):
        a = zarr.open_group(str(a), mode="r")
        b = zarr.open_group(str(b), mode="r") if not isinstance(b, dict) else b
        for name in names:
            np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)

    shutil.copytree(raw / last, part / last)
    build(BuildConfig(part, out, **cfg))
    seven = (out / "store.zarr").resolve()
    event = published()
    assert (event["groups"], event["groups_written"]) == (1, 1)  # one group, rewritten
    assert event["shards_kept"] >= 2, event
    kept = [seven / "images" / f"c.{k}.0.0" for k in range(event["shards_kept"])]
    assert all(f.stat().st_ino == (six / "images" / f.name).stat().st_ino for f in kept)
    tail = seven / "images" / f"c.{event['shards_kept']}.0.0"
    assert tail.stat().st_nlink == 1  # the shard the new case falls in is written anew
    build(BuildConfig(raw, tmp_path / "fresh", **cfg))
    same_arrays(seven, tmp_path / "fresh" / "store.zarr")

    shutil.rmtree(part / last)  # and back: the removal keeps the same prefix
    build(BuildConfig(part, out, **cfg))
    assert published()["shards_kept"] >= 2
    same_arrays((out / "store.zarr").resolve(), six_arrays)
