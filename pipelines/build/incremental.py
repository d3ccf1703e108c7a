"""Incremental state: input digests, case keys, staged cases and what changed.

A case's *key* hashes its description, its input file contents, the plan and
the cmrprep version: an unchanged case is never preprocessed twice and any
change is detected.  The published store version is the only copy of the
prepared data; its ``case_table`` records each case's key (see
:class:`StoreIndex`).  A case processed by this build is *staged* until the
store version holding it is published, then the staging folder is emptied:
as one file, ``OUT/staging/<key>.npz`` (its arrays and its JSON record,
renamed into place once complete), or, with the other cases of a store group
that is new as a whole, as that group's shards, ``OUT/staging/<group key>.group/``
(:func:`pipelines.build.store.write_fragment`, complete once its
``summary.json`` exists).  A killed build leaves what it staged for the next
run, which takes it instead of processing again.

``OUT/state/digests-sha256-128/`` remembers each input file's digest by its
stat stamp, so unchanged files are not re-read; like discovery's read cache
(``OUT/state/discovery-v1/``) it is a :class:`JsonBuckets` map, so a run
rewrites only the few small files whose entries changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import cmrprep
from pipelines.ingest.readcache import file_stamp

log = logging.getLogger(__name__)

#: Suffix of a group fragment's folder in the staging folder (``pipelines.build.store.write_fragment``).
FRAGMENT_SUFFIX = ".group"

STAGED_ARRAYS = ("images", "labels", "class_counts", "class_counts_raw", "slice_index",
                "phase", "frame_local")


#: Name of the content digest: SHA-256 (hardware-accelerated on x86 with SHA-NI: 1.7 GB/s
#: here, twice BLAKE2b) truncated to 128 bits, plenty to detect changed inputs.
ALGORITHM = "sha256/128"


def file_digest(path: str | Path, *, chunk: int = 1 << 22) -> str:
    """Content digest of a file (or of every file, sorted, in a DICOM directory)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(os.fsencode(f.name))  # file names need not be UTF-8
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()[:32]


#: Files a :class:`JsonBuckets` map is spread over (two hex digits of a hash of each key).
N_BUCKETS = 256


def bucket_of(key: str) -> str:
    """The :class:`JsonBuckets` file (stem) that holds ``key``: ``"00"`` to ``"ff"``.

    >>> bucket_of("/raw/patient001/patient001_frame01.nii.gz")
    '7f'
    """
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=1).hexdigest()


class JsonBuckets:
    """A large ``{str: JSON value}`` map kept as up to :data:`N_BUCKETS` JSON files in a folder.

    A build's state has an entry per input file (its digest; what discovery
    read from it).  Kept as one JSON file it is rewritten whole by every run
    that changes anything: ~65 MB for the digests of 100,000 cases, for a
    nightly run that adds five.  Spread over files by a hash of the key,
    :meth:`save` rewrites only the files whose entries changed (adding 5 cases
    to 1,600 rewrites ~20 files of ~4 KB instead of 1 MB).  Each file is
    replaced by a rename and every entry carries the stamps that validate it,
    so a run killed between two files leaves a state that is at worst stale
    (entries computed again), never wrong; an unreadable file counts as empty.
    The files are not flushed (``fsync``): the map is a cache, and a file
    a power cut leaves torn reads as empty.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()) / "digests"
    >>> state = JsonBuckets(folder)
    >>> state.load()
    {}
    >>> entries = {f"case{i:03d}": [i, "digest"] for i in range(100)}
    >>> state.save(entries) == len({bucket_of(k) for k in entries})
    True
    >>> again = JsonBuckets(folder)
    >>> again.load() == entries
    True
    >>> entries["case100"] = [100, "new"]
    >>> again.save(entries)  # one file written, the others untouched
    1
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._stored: dict[str, dict[str, Any]] = {}

    def load(self) -> dict[str, Any]:
        """Every entry of every readable file of the folder (none when it does not exist)."""
        entries: dict[str, Any] = {}
        if not self.folder.is_dir():
            return entries
        for path in sorted(self.folder.glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):  # damaged: its entries are computed again
                continue
            if isinstance(data, dict):
                self._stored[path.stem] = data
                entries.update(data)
        return entries

    def save(self, entries: Mapping[str, Any]) -> int:
        """Make the folder hold ``entries``, writing only files whose entries changed; how many."""
        buckets: dict[str, dict[str, Any]] = {}
        for key, value in entries.items():
            buckets.setdefault(bucket_of(key), {})[key] = value
        written = 0
        for name in sorted(set(buckets) | set(self._stored)):
            new = buckets.get(name, {})
            if new == self._stored.get(name, {}):
                continue
            path = self.folder / f"{name}.json"
            if new:
                self.folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(new, sort_keys=True), fsync=False)
            else:
                path.unlink(missing_ok=True)
            self._stored[name] = new
            written += 1
        return written


class DigestIndex:
    """Remembers file digests by their stat stamps so unchanged files are not re-read.

    Kept in ``state/digests-<algorithm>/`` as a :class:`JsonBuckets` map,
    ``{path: [*stamp, digest]}`` (see :func:`file_stamp`; an entry with another
    stamp layout never matches, so the file is hashed again).  Another
    :data:`ALGORITHM` keeps its digests in another folder (every file is
    hashed again).  The single ``state/digests.json`` of earlier versions is
    read once, when the folder does not exist yet, and removed by :meth:`save`.
    """

    def __init__(self, state: Path):
        self.state = Path(state)
        self._buckets = JsonBuckets(self.state / f"digests-{ALGORITHM.replace('/', '-')}")
        self._index: dict[str, list[Any]] = self._buckets.load()
        self._legacy = self.state / "digests.json"
        if not self._index and self._legacy.is_file():
            try:
                data = json.loads(self._legacy.read_text())
            except (OSError, ValueError):
                data = {}
            if isinstance(data, dict) and data.get("algorithm") == ALGORITHM:
                self._index = dict(data.get("files", {}))

    def known(self, files: list[str]) -> dict[str, str]:
        """Stored digests of those ``files`` that still have their recorded stamp.

        Costs one ``stat`` per file; a missing file counts as changed.
        """
        found = {}
        for f in files:
            entry = self._index.get(f)
            try:
                if entry and entry[:-1] == file_stamp(f):
                    found[f] = entry[-1]
            except OSError:
                pass
        return found

    def record(self, file: str, entry: list[Any]) -> None:
        """Store ``[*stamp, digest]`` computed elsewhere (by the worker that read the file)."""
        self._index[file] = list(entry)

    def save(self) -> int:
        """Write the entries that changed (see :class:`JsonBuckets`); how many files were written."""
        written = self._buckets.save(self._index)
        self._legacy.unlink(missing_ok=True)
        return written


def stamped_digests(files: list[str]) -> dict[str, list[Any]]:
    """``{file: [*stamp, digest]}``; the stamp is taken before hashing, so a file
    changed meanwhile gets a newer mtime and is hashed again by the next build."""
    return {f: [*file_stamp(f), file_digest(f)] for f in files}


def case_files(case: dict[str, Any]) -> list[str]:
    """All input files of a case dict (images, labels, cine, metadata), sorted and unique.

    A DICOM directory is not a file: discovery lists the files in it under
    ``metadata["_metadata_files"]``, which are digested instead.
    """
    files = {case["cine"]} if case.get("cine") else set()
    for f in case["frames"]:
        files.add(f["image"])
        if f.get("label"):
            files.add(f["label"])
    listed = case.get("metadata", {}).get("_metadata_files")
    if listed:  # only DICOM cases list files: a stat per path only for them (3 calls a case a build)
        files = {f for f in files if not os.path.isdir(f)}
        files.update(listed)
    return sorted(files)


def known_digests(case: dict[str, Any], digests: dict[str, str]) -> dict[str, str]:
    """The digests in ``digests`` of a case's input files, in :func:`case_files` order.

    >>> known_digests({"frames": [{"image": "/a.nii"}]}, {"/a.nii": "d1", "/b.nii": "d2"})
    {'/a.nii': 'd1'}
    """
    return {f: digests[f] for f in case_files(case) if f in digests}


def case_key(case: dict[str, Any], digests: dict[str, str], plan_hash: str) -> str:
    """Cache key of a case: its description, input contents, plan and code version."""
    payload = {k: v for k, v in case.items() if k != "metadata"}
    blob = json.dumps({"case": payload, "digests": digests, "plan": plan_hash,
                       "version": cmrprep.__version__}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def plan_hash(plan_dict: dict[str, Any]) -> str:
    """Stable hash of a plan dict."""
    blob = json.dumps(plan_dict, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def atomic_write_text(path: Path, text: str, *, fsync: bool = True) -> None:
    """Write text through a temporary file and rename it into place (atomic on POSIX).

    ``fsync=False`` skips the flush before the rename: for the files of a
    :class:`JsonBuckets` cache, where a file lost or torn by a power cut reads as
    empty (its entries are computed again), never as wrong entries; a first build
    writes 512 of them.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_staged(staging: Path, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Atomically stage one processed case: one ``<key>.npz`` holding its arrays and its JSON
    record (as UTF-8 bytes, member ``meta``; no pickle), written aside, flushed and renamed."""
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f".{key}.{os.getpid()}.npz.tmp"
    record = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    with open(tmp, "wb") as fh:
        np.savez(fh, **{k: arrays[k] for k in STAGED_ARRAYS}, meta=record)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, staging / f"{key}.npz")


def read_staged_meta(staging: Path, key: str) -> dict[str, Any] | None:
    """The staged record of a case key, or ``None`` when absent, unreadable or incomplete
    (then the case is simply processed again).  Reads the zip directory and the record only."""
    try:
        with np.load(staging / f"{key}.npz", allow_pickle=False) as z:
            if set(z.files) != {*STAGED_ARRAYS, "meta"}:
                return None
            meta = json.loads(z["meta"].tobytes().decode("utf-8"))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    return meta if isinstance(meta, dict) and meta.get("key") == key else None


def read_staged_arrays(staging: str | Path, key: str,
                       names: tuple[str, ...] = STAGED_ARRAYS) -> dict[str, np.ndarray]:
    """Load some or all of a staged case's arrays (no pickle; only ``names`` are read)."""
    with np.load(Path(staging) / f"{key}.npz", allow_pickle=False) as z:
        return {k: z[k] for k in names}


def clear_staging(staging: Path) -> None:
    """Remove every staged case (after the version holding them is published)."""
    remove_files(staged_files(staging))


def staged_files(staging: Path) -> list[str]:
    """Paths of everything in the staging folder (none when it does not exist)."""
    try:
        with os.scandir(staging) as it:
            return [entry.path for entry in it]
    except FileNotFoundError:
        return []


def remove_files(paths: list[str]) -> dict[str, Any]:
    """Delete ``paths`` (already gone is fine); a Dask task of the build's staging cleanup.

    >>> remove_files([])
    {'ok': True, 'removed': 0}
    """
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except IsADirectoryError:  # a group fragment
            shutil.rmtree(path, ignore_errors=True)
    return {"ok": True, "removed": len(paths)}


class StoreIndex:
    """What the published store version holds, per case: key, slices, frames, group.

    Read from the version's ``case_table`` array (one small JSON document and
    one array, whatever the store's size); empty when there is no version or
    it predates this layout.
    """

    def __init__(self, version: Path | None) -> None:
        self.version = version
        self.case_ids: list[str] = []
        self.keys: list[str] = []
        self.table = np.zeros((0, 8), dtype=np.int64)
        self.groups: list[list[Any]] = []
        self.warnings: dict[str, list[dict[str, Any]]] = {}
        self.plan: dict[str, Any] | None = None
        self._row: dict[str, int] = {}
        #: The version exists but its case table or attributes cannot be read.
        self.unreadable = False
        if version is None:
            return
        import zarr

        try:
            meta = json.loads((version / "case_table" / "zarr.json").read_text())["attributes"]
            self.plan = json.loads((version / "zarr.json").read_text())["attributes"].get("plan")
            table = np.asarray(zarr.open_array(str(version / "case_table"), mode="r")[...],
                               dtype=np.int64).reshape(-1, 8)
            case_ids, keys = list(meta["case_ids"]), list(meta["keys"])
            groups, warnings = list(meta["groups"]), dict(meta.get("warnings", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.unreadable = (version / "zarr.json").exists() or (version / "case_table").exists()
            if self.unreadable:
                log.warning("store version %s cannot be read (%s: %s); every case is built again",
                            version, type(exc).__name__, exc)
            return
        if len(table) != len(case_ids) or len(keys) != len(case_ids):
            self.unreadable = True
            log.warning("store version %s has a damaged case table; every case is built again", version)
            return
        self.table, self.case_ids, self.keys = table, case_ids, keys
        self.groups, self.warnings = groups, warnings
        self._row = {cid: i for i, cid in enumerate(self.case_ids)}

    def damaged(self) -> tuple[list[str], set[str]]:
        """Cases whose data in the version is missing or not as written, and their group keys.

        Cheap: one ``stat`` per shard file, compared with the sizes recorded
        when the version was written (``case_table`` groups), plus the group's
        records.  A version whose ``case_table`` cannot be read while its
        directory exists counts as wholly damaged (:attr:`unreadable`).
        """
        from pipelines.build.store import key_separator, shard_files  # store imports this module

        bad_groups: set[str] = set()
        sep = key_separator(self.version) if self.groups else "."
        for g in self.groups:
            gkey, first, n = g[0], int(g[1]), int(g[2])
            sizes = g[5] if len(g) > 5 else None
            files = shard_files(self.version, first, n, sep)
            if sizes is None or len(sizes) != len(files):
                continue  # written before sizes were recorded: nothing to compare with
            for f, size in zip(files, sizes):
                try:
                    actual = f.stat().st_size
                except FileNotFoundError:
                    actual = 0
                if actual != size:
                    bad_groups.add(gkey)
                    break
            if not (self.version / "records" / gkey / "zarr.json").is_file():
                bad_groups.add(gkey)
        cases = [cid for cid, i in self._row.items()
                 if self.groups[int(self.table[i, 2])][0] in bad_groups]
        return sorted(cases), bad_groups

    def forget(self, case_ids) -> None:
        """Treat ``case_ids`` as absent from the store (their data is damaged: process them again)."""
        for cid in case_ids:
            self._row.pop(cid, None)

    def key_of(self, case_id: str) -> str | None:
        """The key the store holds for ``case_id`` (``None``: not in the store)."""
        i = self._row.get(case_id)
        return self.keys[i] if i is not None else None

    def row(self, case_id: str) -> int:
        """Row of ``case_id`` in :attr:`table` (first_slice, n_slices, group, n_frames, raw counts)."""
        return self._row[case_id]

    def __contains__(self, case_id: str) -> bool:
        return case_id in self._row


# -- what changed since the last build ---------------------------------------------
def survey(cases: list, digests: DigestIndex) -> tuple[list, dict[str, str]]:
    """Header records of the cases and the digests of their files that are known unchanged.

    Returns ``(headers, file_digests)``: ``{"case", "spacing"}`` records
    (``spacing`` ``None``: read by a worker only when the plan needs it, see
    :func:`pipelines.build.planning.resolve_plan`) and the digest of every
    input file that still has the stat stamp it had when it was hashed (one
    ``stat`` per file).  Nothing is read: a case with a changed or new file is
    hashed by the worker that reads it (:func:`pipelines.build.tasks.process_case`,
    which also recognises a touched file whose content is unchanged), so the
    client reads no input at all and an unchanged re-run reads no file.
    """
    headers, file_digests = [], {}
    for case in cases:
        headers.append({"case": case, "spacing": None})
        file_digests.update(digests.known(case_files(case.to_dict())))
    return headers, file_digests


def plan_work(cases: list, digests: dict[str, str], phash: str, index: StoreIndex,
              staging: Path) -> tuple[list, dict[str, str | None], dict[str, dict[str, Any]]]:
    """Cases to process, every case's key and the staged cases to take as they are.

    A case whose key is known (all its digests are) and equals the key the
    store holds for it is reused from the store; one staged by an earlier,
    interrupted build under that key (a staged file or a group fragment) is
    taken from the staging folder.  Every
    other case is processed (key ``None``: the worker hashes its files).
    """
    keys: dict[str, str | None] = {}
    staged: dict[str, dict[str, Any]] = {}
    fragments: dict[str, dict[str, Any]] | None = None
    todo = []
    for case in cases:
        d = case.to_dict()
        files = case_files(d)
        keys[case.case_id] = None
        if all(f in digests for f in files):
            key = keys[case.case_id] = case_key(d, {f: digests[f] for f in files}, phash)
            if index.key_of(case.case_id) == key:
                continue
            meta = read_staged_meta(staging, key)
            if meta is None:
                if fragments is None:
                    fragments = read_fragments(staging)
                meta = fragments.get(key)
            if meta is not None:
                staged[case.case_id] = meta
                continue
        todo.append(case)
    return todo, keys, staged


def read_fragments(staging: Path) -> dict[str, dict[str, Any]]:
    """Cases of the complete group fragments in ``staging``, by case key.

    A fragment (:func:`pipelines.build.store.write_fragment`) is complete when
    its ``summary.json`` exists and every shard file has the size recorded
    there (a file cut short by a power loss is caught by one ``stat``: its
    cases are then processed again); each case maps to its summary and
    ``fragment`` (``{"key", "path", "sizes", "sep", "first"}``).
    """
    found: dict[str, dict[str, Any]] = {}
    for summary in staging.glob(f"*{FRAGMENT_SUFFIX}/summary.json"):
        try:
            data = json.loads(summary.read_text())
            root = summary.parent  # not the recorded path: OUT may have moved since
            info = {"key": data["key"], "path": str(root), "sizes": data["sizes"], "sep": data["sep"]}
            if any(size and os.stat(root / name).st_size != size
                   for name, size in zip(data["files"], data["sizes"], strict=True)):
                log.warning("staged group %s is damaged; its cases are processed again", root.name)
                continue
            for case in data["cases"]:
                found[case["key"]] = {**case, "fragment": {**info, "first": case["first"]}}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable: its cases are processed again
    return found


def removed_cases(index: StoreIndex, present: set[str]) -> list[str]:
    """Ids of cases the store holds that are no longer among the inputs."""
    return sorted(cid for cid in index.case_ids if cid not in present)


def remove_leftovers(staging: Path) -> None:
    """Delete temporary files and incomplete group fragments of a killed build."""
    for leftover in staging.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
    for fragment in staging.glob(f"*{FRAGMENT_SUFFIX}"):
        if not (fragment / "summary.json").is_file():
            shutil.rmtree(fragment, ignore_errors=True)
