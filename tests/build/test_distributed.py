"""The build on a real multi-process Dask cluster (scheduler + 2 workers on loopback)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipelines.build import BuildConfig, build
from pipelines.synthesize import synthesize

ARRAYS = ("images", "labels", "weights", "case_index", "frame_index", "slice_index", "phase",
          "class_counts")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_workers(address: str, n: int, timeout: float = 60.0) -> None:
    from distributed import Client

    with Client(address, timeout="30s") as client:
        client.wait_for_workers(n, timeout=timeout)


@pytest.fixture()
def cluster(tmp_path):
    """A scheduler and two single-threaded workers, each a separate OS process."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                               "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0",
                               "--no-show"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(1.0)
    for i in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
             "--nworkers", "1", "--no-dashboard", "--local-directory", str(tmp_path / f"w{i}")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        _wait_for_workers(address, 2)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_scheduler_build_equals_local_build(cluster, tmp_path):
    raw = tmp_path / "raw"
    synthesize(raw, 4, 5, layout="acdc")
    local = build(BuildConfig(raw, tmp_path / "local", workers=0, progress=False))
    dist = build(BuildConfig(raw, tmp_path / "dist", scheduler=cluster, progress=False))
    assert local.exit_code == dist.exit_code == 0
    a = zarr.open_group(str(tmp_path / "local" / "store.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "dist" / "store.zarr"), mode="r")
    for name in ARRAYS:
        np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)
    strip = lambda g: json.dumps({k: v for k, v in g.attrs.items() if k != "provenance"}, sort_keys=True)
    assert strip(a) == strip(b)
    logs = [json.loads(l) for l in (tmp_path / "dist" / "logs" / "build.jsonl").read_text().splitlines()]
    assert sum(1 for e in logs if e["event"] == "case" and e["ok"]) == 4


def _worker_env() -> dict:
    import os

    return {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                           "MALLOC_TRIM_THRESHOLD_")}


def test_local_workers_are_single_threaded_and_the_client_environment_is_restored():
    """Workers get the one-thread environment; the client process keeps its own."""
    import os

    from pipelines.build.cluster import dask_client

    before = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    with dask_client(2) as client:
        envs = list(client.run(_worker_env).values())
    assert len(envs) == 2
    assert all(e == {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                     "MALLOC_TRIM_THRESHOLD_": "65536"} for e in envs), envs
    assert {k: os.environ.get(k) for k in before} == before


def _listening_ports(pids):
    import psutil

    ports = []
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                ports.append((conn.laddr.ip, conn.laddr.port))
    return ports


def test_local_cluster_is_private_tls_and_serves_no_http():
    """#14 item 8: only mutual-TLS comm ports on 127.0.0.1; no dashboard/metrics server; a client
    without the run's certificate (plain TCP, TLS without a cert, another CA) cannot connect."""
    import psutil
    import urllib.request

    from distributed import Client
    from distributed.security import Security

    from pipelines.build.cluster import dask_client, temporary_security

    with dask_client(2) as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        pids = [os.getpid()] + [p.pid for p in psutil.Process().children(recursive=True)]
        ports = _listening_ports(pids)
        assert ports and all(ip == "127.0.0.1" for ip, _ in ports)
        assert 8787 not in {p for _, p in ports}
        for _, port in ports:  # none of them answers HTTP
            with pytest.raises(Exception):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3)
        port = address.rsplit(":", 1)[1]
        for addr, security in ((f"tcp://127.0.0.1:{port}", None), (address, None),
                               (address, Security.temporary()), (address, temporary_security())):
            with pytest.raises(Exception):
                Client(addr, security=security, timeout="3s")
        assert client.submit(sum, [1, 2], pure=False).result() == 3  # the build's own client works


def test_scheduler_without_workers_fails_after_the_timeout(tmp_path):
    """#14 item 8: --scheduler pointing at a scheduler with no worker -> exit 2, lock released."""
    from pipelines.build.__main__ import main

    raw = tmp_path / "raw"
    synthesize(raw, 2, 5, layout="acdc")
    port = _free_port()
    sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                              "--port", str(port), "--dashboard-address", ":0", "--no-show"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        t0 = time.monotonic()
        code = main([str(raw), str(tmp_path / "out"), "--scheduler", f"tcp://127.0.0.1:{port}",
                     "--scheduler-timeout", "3", "--quiet"])
        assert code == 2 and time.monotonic() - t0 < 60
        assert not (tmp_path / "out" / "store.zarr").exists()
        code = main([str(raw), str(tmp_path / "out"), "--scheduler", f"tcp://127.0.0.1:{_free_port()}",
                     "--scheduler-timeout", "2", "--quiet"])  # nobody listening
        assert code == 2
    finally:
        sched.terminate()
        sched.wait(timeout=20)
    assert build(BuildConfig(raw, tmp_path / "out", workers=0, progress=False)).exit_code == 0  # not locked
