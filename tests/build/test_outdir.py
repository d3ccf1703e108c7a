"""Output folder: atomic publish, version pruning, lock."""

from __future__ import annotations

import os

import pytest

from pipelines.build import outdir


def _version(out, name):
    tmp = outdir.new_version_dir(out, name)
    tmp.mkdir()
    (tmp / "zarr.json").write_text(name)
    return outdir.publish(out, tmp, name)


def test_publish_swaps_the_link_and_keeps_the_previous_version(tmp_path):
    assert outdir.current_version(tmp_path) is None
    first = _version(tmp_path, "a")
    assert outdir.current_version(tmp_path) == first.resolve()
    second = _version(tmp_path, "b")
    assert os.readlink(tmp_path / "store.zarr") == os.path.join("versions", "b.zarr")
    assert first.exists() and second.exists()
    _version(tmp_path, "c")
    _version(tmp_path, "d")
    kept = sorted(p.name for p in (tmp_path / "versions").iterdir())
    assert "d.zarr" in kept and len(kept) <= 3 and "a.zarr" not in kept


def test_a_real_directory_named_store_zarr_is_never_replaced(tmp_path):
    (tmp_path / "store.zarr").mkdir()
    tmp = outdir.new_version_dir(tmp_path, "x")
    tmp.mkdir()
    with pytest.raises(FileExistsError, match="not a cmrprep-managed link"):
        outdir.publish(tmp_path, tmp, "x")


def test_lock_is_exclusive(tmp_path):
    with outdir.build_lock(tmp_path):
        with pytest.raises(outdir.BuildLocked, match="--wait"):
            with outdir.build_lock(tmp_path):
                pass
    with outdir.build_lock(tmp_path, wait=True, timeout=1):
        pass
