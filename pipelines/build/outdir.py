"""The build output folder: layout, exclusive lock, versioned store and atomic publish.

Layout of ``OUT/``::

    store.zarr -> versions/<build-id>.zarr   symlink, swapped atomically
    versions/                                complete store versions (current + previous)
    cache/                                   per-case preprocessed arrays (incremental builds)
    plan.json  fingerprint.json  build_report.json  report/  logs/
    .lock                                    flock held while a build runs

A reader opening ``store.zarr`` always resolves to one complete version: a
new version is written under ``versions/.tmp-*``, renamed into place, and
only then is the symlink replaced (``rename(2)`` is atomic).  The previous
version is kept so readers that opened it keep working; older ones go.
The lock is an ``fcntl.flock``: the kernel releases it when its holder dies,
so a build killed with ``kill -9`` never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

STORE_LINK = "store.zarr"


class BuildLocked(RuntimeError):
    """Another build holds the output folder's lock."""


def check_writable(out: Path) -> None:
    """Create ``out`` if needed and prove it is writable, or raise ``PermissionError``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"output folder {out} is not writable ({exc.strerror or exc}); "
                              "choose another OUT or fix its permissions") from exc


@contextmanager
def build_lock(out: Path, *, wait: bool = False, timeout: float | None = None) -> Iterator[None]:
    """Hold the output folder's exclusive lock for the duration of a build."""
    fh = open(out / ".lock", "a+")
    start = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait or (timeout is not None and time.monotonic() - start > timeout):
                    raise BuildLocked(
                        f"another build is running on {out} (lock {out / '.lock'} held); "
                        "wait for it or pass --wait") from None
                time.sleep(0.5)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def new_version_dir(out: Path, build_id: str) -> Path:
    """A fresh temporary directory for a store version being written."""
    versions = out / "versions"
    versions.mkdir(exist_ok=True)
    tmp = versions / f".tmp-{build_id}-{os.getpid()}.zarr"
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def publish(out: Path, tmp_dir: Path, build_id: str, *, keep: int = 2) -> Path:
    """Move a complete version into place and atomically point ``store.zarr`` at it."""
    final = out / "versions" / f"{build_id}.zarr"
    if final.exists():
        shutil.rmtree(final)
    _fsync_tree(tmp_dir)
    os.replace(tmp_dir, final)
    link_tmp = out / f".{STORE_LINK}.{os.getpid()}.link"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(os.path.join("versions", final.name), link_tmp)
    current = out / STORE_LINK
    if current.exists() and not current.is_symlink():
        raise FileExistsError(f"{current} is a real directory, not a cmrprep-managed link; "
                              "move it away or choose another OUT")
    os.replace(link_tmp, current)
    fsync_path(out)
    prune_versions(out, keep=keep)
    return final


def current_version(out: Path) -> Path | None:
    """The version ``store.zarr`` points at, if any."""
    link = out / STORE_LINK
    if not link.is_symlink():
        return None
    target = (out / os.readlink(link)).resolve()
    return target if target.exists() else None


def prune_versions(out: Path, *, keep: int = 2) -> None:
    """Delete leftover temporaries and all but the newest ``keep`` versions (never the current)."""
    versions = out / "versions"
    if not versions.exists():
        return
    current = current_version(out)
    for tmp in versions.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    done = sorted((p for p in versions.glob("*.zarr") if not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    kept = 0
    for p in done:
        if current is not None and p.resolve() == current:
            kept += 1
            continue
        if kept < keep:
            kept += 1
            continue
        shutil.rmtree(p, ignore_errors=True)


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush a new version: its small files and directories.  Shard files are flushed by
    the task that wrote them, and hard links to an earlier version's files are durable
    already (an ``fsync`` of each would cost one syscall per shard of the whole store).
    Directories are few: the store's chunk keys hold no ``/`` (``images/c.7.0.0``)."""
    for dirpath, _, files in os.walk(root):
        rel = os.path.relpath(dirpath, root).split(os.sep)
        shards = rel[0] in ("images", "labels")
        for name in files:
            path = os.path.join(dirpath, name)
            if (shards and name != "zarr.json") or os.stat(path).st_nlink > 1:
                continue
            fsync_path(path)
        fsync_path(dirpath)
