"""The build through ``--scheduler`` on a real Dask cluster with 1, 2 and 4 worker processes.

    python benchmarks/distributed_speedup.py [--cases 40] [--workers 1,2,4]

For each worker count: start ``dask scheduler`` and N ``dask worker`` processes
(``--nthreads 1``) on loopback, run ``python -m pipelines.build RAW OUT --scheduler ADDR``
from an empty ``OUT``, tear the cluster down.  Prints wall time, frames/s and the speed-up
against the first worker count, and checks that every store is identical to the first one.
Cluster start-up is not timed (a real cluster is already running when a build is submitted).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(n_workers: int, scratch: Path) -> tuple[str, list[subprocess.Popen]]:
    """Scheduler + ``n_workers`` single-threaded worker processes; returns (address, processes)."""
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--dashboard-address", ":0", "--no-show"], **quiet)]
    for i in range(n_workers):
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                       "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                                       "--local-directory", str(scratch / f"w{i}")], **quiet))
    deadline = time.time() + 60
    while True:
        try:
            with Client(address, timeout="5s") as client:
                client.wait_for_workers(n_workers, timeout=60)
            return address, procs
        except OSError:
            if time.time() > deadline:
                stop_cluster(procs)
                raise
            time.sleep(0.5)


def stop_cluster(procs: list[subprocess.Popen]) -> None:
    """Terminate the worker and scheduler processes (kill after 20 s)."""
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--workdir", default="/tmp/cmrprep-distributed")
    a = p.parse_args(argv)
    import numpy as np
    import zarr

    from pipelines.synthesize import synthesize

    work = Path(a.workdir)
    raw = work / f"raw{a.cases}_s{a.seed}"
    if not raw.exists():
        synthesize(raw, a.cases, a.seed, layout="acdc")
    frames = 2 * a.cases
    rows = []
    first = None
    for n in (int(x) for x in a.workers.split(",")):
        out = work / f"out_{n}w"
        shutil.rmtree(out, ignore_errors=True)
        address, procs = start_cluster(n, work / "scratch")
        try:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pipelines.build", str(raw), str(out), "--scheduler", address,
                            "--quiet"], check=True, cwd=ROOT)
            wall = time.perf_counter() - t0
        finally:
            stop_cluster(procs)
        g = zarr.open_group(str(out / "store.zarr"), mode="r")
        same = True
        if first is None:
            first = g
        else:
            same = all(np.array_equal(first[k][...], g[k][...]) for k in ("images", "labels", "weights"))
        rows.append((n, wall, same))
    base = rows[0][1]
    print(f"\n{a.cases} cases ({frames} frames), build through --scheduler on loopback\n")
    print(f"{'workers':>7s} {'seconds':>8s} {'frames/s':>9s} {'speed-up':>9s} {'identical':>9s}")
    for n, wall, same in rows:
        print(f"{n:7d} {wall:8.1f} {frames / wall:9.1f} {base / wall:9.2f} {str(same):>9s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
