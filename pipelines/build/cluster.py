"""The build's Dask client (a LocalCluster by default, an existing scheduler when given) and
task mapping with per-task failure capture."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)


@contextmanager
def dask_client(workers: int = 2, *, threads_per_worker: int = 1, memory_limit: str = "auto",
                scheduler: str | None = None) -> Iterator[Any]:
    """Yield a ``distributed.Client``; tear the cluster down on exit.

    Parameters
    ----------
    workers : int
        Worker processes of the LocalCluster (ignored with ``scheduler``).
    threads_per_worker : int
        Threads per worker process; 1 suits SimpleITK/NumPy-heavy tasks.
    memory_limit : str
        Per-worker memory limit (``"auto"`` splits system memory).
    scheduler : str or None
        Address of an existing scheduler (``tcp://host:8786``); workers there
        must see the same input and output paths (shared filesystem).
    """
    saved = {k: os.environ.get(k) for k in _SPAWN_ENV}
    try:
        with _client(workers, threads_per_worker, memory_limit, scheduler) as client:
            yield client
    finally:
        _restore_env(saved)


#: Variables distributed's nanny writes into *this* process's environment to pass them to
#: the workers it spawns (``distributed.nanny.pre-spawn-environ``).  Left there, a later
#: ``import torch`` in the same process (build then train, as in the demo) would run on
#: one thread: measured 1.8 s/step instead of 1.0 s/step.
_SPAWN_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextmanager
def _client(workers: int, threads_per_worker: int, memory_limit: str,
            scheduler: str | None) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    if scheduler:
        log.info("connecting to Dask scheduler %s", scheduler)
        with Client(scheduler, timeout="30s") as client:
            yield client
        return
    local_dir = tempfile.mkdtemp(prefix="cmrprep-dask-")
    log.info("starting LocalCluster: %d workers x %d threads, memory limit %s",
             workers, threads_per_worker, memory_limit)
    try:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                               processes=True, memory_limit=memory_limit, dashboard_address=None,
                               local_directory=local_dir, silence_logs=logging.WARNING)
        with cluster, Client(cluster) as client:
            yield client
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)  # workers' scratch space (spill, locks)


def map_tasks(func: Callable[..., dict], items: list[tuple], *, client: Any | None,
              retries: int = 2, desc: str = "cases", progress: bool = True,
              on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ``func(*item)`` for every item; results come back in input order.

    With ``client=None`` the tasks run serially in this process (debugging,
    tiny inputs).  A task whose exception survives its retries is returned
    as ``{"ok": False, "exception": "..."}``, never raised, so one bad case
    cannot take down the run.
    """
    return start_tasks(func, items, client=client, retries=retries, desc=desc, progress=progress,
                       on_result=on_result)()


def start_tasks(func: Callable[..., dict], items: list[tuple], *, client: Any | None,
                retries: int = 2, desc: str = "cases", progress: bool = True,
                on_result: Callable[[dict], None] | None = None) -> Callable[[], list[dict]]:
    """:func:`map_tasks` in two steps: submit now, collect with the returned function.

    The caller does its own work while the cluster runs the tasks; without a
    client the tasks run (serially, in this process) when results are collected.
    """
    futures = ([client.submit(func, *item, retries=retries, pure=False) for item in items]
               if client is not None else None)

    def collect() -> list[dict]:
        from tqdm.auto import tqdm

        results: list[dict | None] = [None] * len(items)
        bar = tqdm(total=len(items), desc=desc, unit="case", disable=not progress)
        if futures is None:
            for i, item in enumerate(items):
                results[i] = _call(func, item)
                _done(bar, on_result, results[i])
        else:
            from distributed import as_completed

            index = {f.key: i for i, f in enumerate(futures)}
            for fut in as_completed(futures):
                try:
                    res = fut.result()
                except Exception as exc:  # noqa: BLE001 - reported per case
                    res = {"ok": False, "exception": f"{type(exc).__name__}: {exc}"}
                results[index[fut.key]] = res
                _done(bar, on_result, res)
        bar.close()
        return [r if r is not None else {"ok": False, "exception": "no result"} for r in results]

    return collect


def _call(func: Callable[..., dict], item: tuple) -> dict:
    try:
        return func(*item)
    except Exception as exc:  # noqa: BLE001 - reported per case
        return {"ok": False, "exception": f"{type(exc).__name__}: {exc}"}


def _done(bar: Any, on_result: Callable[[dict], None] | None, res: dict | None) -> None:
    bar.update(1)
    if on_result is not None and res is not None:
        on_result(res)


def quiet_dask_logs() -> None:
    """Drop ``distributed``'s INFO chatter (every connection) from the root handlers.

    distributed sets its loggers' levels from its own configuration, so a filter
    on the handlers is what works; its warnings and errors (worker deaths, memory
    pressure) still show.
    """
    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith("distributed")

    for handler in logging.getLogger().handlers:
        handler.addFilter(keep)
