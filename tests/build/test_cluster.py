"""Task mapping: results in input order, one failing task never takes down the others."""

from __future__ import annotations

import time

import pytest

from pipelines.build.cluster import map_tasks


def _task(x: int) -> dict:
    if x == 2:
        raise ValueError("bad case 2")
    return {"ok": True, "x": x}


def test_serial_map_keeps_order_and_captures_failures():
    seen = []
    out = map_tasks(_task, [(i,) for i in range(4)], client=None, progress=False,
                    on_result=seen.append)
    assert [r.get("x") for r in out] == [0, 1, None, 3]
    assert out[2] == {"ok": False, "exception": "ValueError: bad case 2"}
    assert len(seen) == 4


def _echo(case: dict, plan: dict) -> dict:
    return {"ok": True, "case": case, "plan": plan}


def _tasks_on_scheduler(dask_scheduler=None) -> int:
    return len(dask_scheduler.tasks)


@pytest.mark.timeout(120)
def test_local_cluster_map_equals_serial():
    from pipelines.build.cluster import dask_client

    items = [({"case_id": f"c{i}", "frames": [{"phase": "ED", "image": f"/r/c{i}.nii"}]},
              {"crop_shape": [128, 128], "seed": i}) for i in range(5)]
    with dask_client(2) as client:
        out = map_tasks(_task, [(i,) for i in range(5)], client=client, retries=0, progress=False)
        nested = map_tasks(_echo, items, client=client, retries=0, progress=False, batch=2)
        # every batch's future is released as its result arrives: nothing stays behind
        deadline = time.monotonic() + 10
        while (left := client.run_on_scheduler(_tasks_on_scheduler)) and time.monotonic() < deadline:
            time.sleep(0.05)  # releases reach the scheduler asynchronously
    assert out == map_tasks(_task, [(i,) for i in range(5)], client=None, progress=False)
    assert nested == [{"ok": True, "case": c, "plan": p} for c, p in items]  # JSON round trip
    assert left == 0


def _amm_running(dask_scheduler=None) -> bool:
    return dask_scheduler.extensions["amm"].running


def _monitor_intervals(dask_worker=None) -> dict:
    return {name: pc.callback_time for name, pc in dask_worker.periodic_callbacks.items()}


@pytest.mark.timeout(120)
def test_local_cluster_monitors_lightly_but_still_enforces_memory():
    """The build's own cluster has no dashboard: host metrics every 10 s, no active memory
    manager, no profiler; the memory monitor that enforces limits still runs twice a second."""
    from pipelines.build.cluster import dask_client

    with dask_client(2) as client:
        amm = client.run_on_scheduler(_amm_running)
        intervals = list(client.run(_monitor_intervals).values())
        nanny = next(iter(client.cluster.workers.values())).periodic_callbacks
    assert amm is False
    for pcs in intervals:
        assert pcs["monitor"] == 10_000 and pcs["memory_monitor"] == 500
        assert "profile" not in pcs
    assert nanny["memory_monitor"].callback_time == 500


def _kill_worker_on_2(x: int) -> dict:
    """Item 2 kills the worker process running it (as a segfault or the nanny's memory limit would)."""
    import os
    import signal

    from distributed import get_worker

    get_worker()  # never in the test process: raises ValueError outside a worker
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"ok": True, "x": x}


@pytest.mark.timeout(180)
def test_an_item_that_kills_its_worker_fails_alone_not_its_batch(caplog):
    import dask
    import distributed  # noqa: F401 - its config defaults, which dask.config.set restores

    from pipelines.build.cluster import dask_client

    # one worker death makes a task fail (default 3 retries: the same outcome, 4x the restarts)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), dask_client(2) as client:
        out = map_tasks(_kill_worker_on_2, [(i,) for i in range(6)], client=client, retries=0,
                        progress=False, batch=3)
    assert [r["ok"] for r in out] == [True, True, False, True, True, True]
    assert [r.get("x") for r in out] == [0, 1, None, 3, 4, 5]
    assert out[2]["exception"].startswith("KilledWorker")
    assert "lost their worker" in caplog.text
