"""Machine-readable run log: one JSON object per line, appended and flushed per event."""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from pathlib import Path
from typing import Any


class RunLog:
    """Append JSON-lines events (``{"time", "pid", "event", "cpu_s", "peak_rss_mib", ...}``) to ``path``.

    ``cpu_s`` is this process's CPU time so far and ``peak_rss_mib`` its peak resident memory
    so far: the client's share of a build, event by event.
    """

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def event(self, name: str, **fields: Any) -> None:
        """Write one event line and flush it to disk."""
        self.events(name, [fields])

    def events(self, name: str, records: list[dict[str, Any]]) -> None:
        """Write one line per record, all events ``name`` of one moment (one write, one sample
        of the process's CPU and memory: per-case events cost the client 0.4 ms each otherwise)."""
        if not records:
            return
        head = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
                "pid": os.getpid(), "event": name, "cpu_s": round(time.process_time(), 3),
                "peak_rss_mib": round(peak_rss_mib(), 1)}
        lines = "".join(json.dumps({**head, **fields}, default=str) + "\n" for fields in records)
        with open(self.path, "a") as fh:
            fh.write(lines)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``; ``getrusage``'s ``ru_maxrss``
    survives ``exec`` there, so a build started by a larger parent process
    would report the parent's peak.  Elsewhere ``ru_maxrss``.
    """
    import resource
    import sys

    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)
