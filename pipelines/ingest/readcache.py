"""What discovery read from small input files, kept by the files' stat stamps.

Discovery reads a few small files to describe the cases: every ACDC
``Info.cfg``, the M&Ms CSV, nnU-Net's ``dataset.json``, the headers of a DICOM
series.  At thousands of cases those reads are most of what an unchanged
re-run of the build would read.  :class:`ReadCache` remembers each result with
the :func:`file_stamp` of the file(s) it came from; while the stamp is the same
the result is taken from the cache and the file is not opened (one ``stat``
instead).  The build keeps its :attr:`~ReadCache.entries` in
``OUT/state/discovery-v1/``, so a no-op re-run reads no input file; every other caller of
:func:`pipelines.ingest.discover` passes none and reads as before.

Results must be JSON values (they are stored as JSON; no pickle).  A reader
that raises stores nothing: a case with a problem is read again next time.

Examples
--------
>>> import json, tempfile, pathlib
>>> f = pathlib.Path(tempfile.mkdtemp()) / "Info.cfg"
>>> _ = f.write_text("ED: 1")
>>> reads = []
>>> def parse(path):
...     reads.append(path)
...     return {"text": open(path).read()}
>>> cache = ReadCache()
>>> cache.read(f, "info", parse) == {"text": "ED: 1"}
True
>>> again = ReadCache.from_json(cache.to_json())
>>> again.read(f, "info", parse) == {"text": "ED: 1"}, len(reads)
(True, 1)
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["ReadCache", "file_stamp"]

#: Layout of a stored entry; another layout (an older cmrprep) is ignored, so everything is read again.
FORMAT = 1


def file_stamp(path: str | Path) -> list[int]:
    """``[size, mtime_ns, ctime_ns, inode]`` of a file, as git's index stamps files.

    The ctime and inode catch what size and mtime miss: a rewrite that keeps
    both (``touch -r``, a restore that sets mtimes) changes the ctime, a file
    replaced by another one changes the inode.  For a directory (a DICOM series):
    summed sizes plus the file count, the newest mtime and ctime, and the sum of
    the inodes.
    """
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    stats = [q.stat() for q in Path(path).rglob("*") if q.is_file()]
    return [sum(st.st_size for st in stats) + len(stats),
            max((st.st_mtime_ns for st in stats), default=0),
            max((st.st_ctime_ns for st in stats), default=0), sum(st.st_ino for st in stats)]


def _stamp_or_none(path: str | Path) -> list[int] | None:
    try:
        return file_stamp(path)
    except OSError:
        return None


class ReadCache:
    """Results of reading input files, reused while the files keep their stamps.

    Parameters
    ----------
    entries : dict, optional
        ``{kind + "\\0" + path: [stamps, value]}`` from an earlier run
        (:meth:`from_json`).
    """

    def __init__(self, entries: dict[str, list[Any]] | None = None) -> None:
        self._old = entries or {}
        self._used: dict[str, list[Any]] = {}
        self.hits = 0
        self.misses = 0

    def read(self, path: str | Path, kind: str, reader: Callable[[str], Any],
             depends: Sequence[str | Path] = ()) -> Any:
        """``reader(path)``, or its stored result if ``path`` (and ``depends``) kept their stamps.

        ``kind`` names what is read (one file may be read in two ways); the
        stamp of ``path`` is taken first, so a missing file raises
        ``FileNotFoundError`` as the reader would.  ``depends`` are other files
        the result depends on (a missing one counts too: its appearance is a
        change).
        """
        path = os.fspath(path)
        stamps = [file_stamp(path), *(_stamp_or_none(d) for d in depends)]
        key = f"{kind}\0{path}"
        entry = self._old.get(key)
        if entry is not None and entry[0] == stamps:
            self.hits += 1
            value = entry[1]
        else:
            self.misses += 1
            # through JSON: the caller may change what it gets; the stored copy stays as read
            value = json.loads(json.dumps(reader(path)))
        self._used[key] = [stamps, value]
        return json.loads(json.dumps(value)) if isinstance(value, (dict, list)) else value

    @property
    def changed(self) -> bool:
        """True when this run read a file or stopped using an entry (the stored cache is stale)."""
        return self.misses > 0 or len(self._used) != len(self._old)

    @property
    def entries(self) -> dict[str, list[Any]]:
        """The entries used in this run, ``{kind + "\\0" + path: [stamps, value]}`` (files no
        longer read drop out): what a later run's cache starts from."""
        return self._used

    def to_json(self) -> str:
        """The entries used in this run (files no longer read drop out)."""
        return json.dumps({"format": FORMAT, "entries": self._used}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "ReadCache":
        """From :meth:`to_json`'s text; ``None``, damaged text or another format give an empty cache."""
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            data = {}
        ok = isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("entries"), dict)
        return cls(data["entries"] if ok else None)
