"""Dask client handling: a LocalCluster by default, an existing scheduler when given."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
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
    import dask

    local_dir = tempfile.mkdtemp(prefix="cmrprep-dask-")
    log.info("starting LocalCluster: %d workers x %d threads, memory limit %s",
             workers, threads_per_worker, memory_limit)
    method = "forkserver" if _forkserver_ready() else "spawn"
    try:
        with dask.config.set({"distributed.worker.multiprocessing-method": method}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                                   processes=True, memory_limit=memory_limit, dashboard_address=None,
                                   local_directory=local_dir, silence_logs=logging.WARNING)
        with cluster, Client(cluster) as client:
            yield client
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)  # workers' scratch space (spill, locks)


#: Environment of worker processes (distributed's ``distributed.nanny.pre-spawn-environ``
#: defaults): one BLAS/OpenMP thread per single-threaded worker, glibc trimming.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "MALLOC_TRIM_THRESHOLD_": "65536"}


def prestart_workers() -> None:
    """Launch the fork server now, so its imports overlap this process's own start-up.

    Call before :func:`dask_client` / :class:`BackgroundClient` for a local
    cluster; it returns at once (the server imports :data:`WORKER_PRELOAD` in
    its own process) and imports nothing heavy here (not even distributed).
    The server gets :data:`WORKER_ENV` (updated with dask's
    ``distributed.nanny.pre-spawn-environ`` when dask is already imported),
    which the workers forked from it inherit.
    """
    if not _forkserver_available():
        return
    from multiprocessing import forkserver

    env = dict(WORKER_ENV)
    if "dask" in sys.modules:
        import dask

        env.update({k: str(v) for k, v in
                    (dask.config.get("distributed.nanny.pre-spawn-environ", None) or {}).items()})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        forkserver.ensure_running()
    finally:
        _restore_env(saved)


#: Modules every local worker needs; the fork server imports them once for all workers.
WORKER_PRELOAD = ("distributed", "numpy", "nibabel", "SimpleITK", "isal.igzip", "zarr",
                  "pipelines.worker", "pipelines.ingest", "pipelines.assemble", "cmrprep.preprocess")
_FORKSERVER: bool | None = None


def _forkserver_available() -> bool:
    """Whether local workers start from a fork server (set up once per process).

    With ``spawn`` (distributed's default) every worker process imports
    distributed, NumPy, nibabel, SimpleITK and cmrprep itself: ~0.9 s of CPU
    each, competing with the client's header checks on a small machine.  The
    fork server imports them once and forks the workers from that
    single-threaded process (fork-safe, unlike forking the client).  The
    server lives as long as this process (idle, ~150 MB, shared with later
    clusters of the same process) and exits with it.  A worker the nanny
    restarts later (after a crash) is spawned as usual, as are all workers
    where ``forkserver`` is unavailable (Windows).
    """
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing

        _FORKSERVER = "forkserver" in multiprocessing.get_all_start_methods()
        if _FORKSERVER:
            multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_PRELOAD))
    return _FORKSERVER


def _forkserver_ready() -> bool:
    """:func:`_forkserver_available`, and distributed told to use our preload list."""
    if not _forkserver_available():
        return False
    import distributed.utils as dutils

    # distributed would otherwise set its own preload list (importing pandas here)
    dutils._forkserver_preload_set = True
    return True


class BackgroundClient:
    """:func:`dask_client` run in a thread, so cluster start-up overlaps other work.

    A LocalCluster takes 1-2 s to start its worker processes; the build starts
    one while it reads headers (and hashes cached inputs).  The thread enters and later
    exits the context (``distributed`` keeps the current client in a context
    variable, which must be reset in the context that set it).  :meth:`get`
    waits for the client (re-raising a start-up error); :meth:`close` tears it
    down and may be called more than once.
    """

    def __init__(self, workers: int = 2, *, memory_limit: str = "auto",
                 scheduler: str | None = None) -> None:
        self._args = (workers, memory_limit, scheduler)
        self._client: Any = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cmrprep-cluster", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        workers, memory_limit, scheduler = self._args
        try:
            with dask_client(workers, memory_limit=memory_limit, scheduler=scheduler) as client:
                self._client = client
                self._ready.set()
                self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 - re-raised by get()
            if self._error is None and self._client is None:
                self._error = exc
            else:
                log.warning("error while closing the Dask cluster: %s", exc)
        finally:
            self._ready.set()

    def get(self) -> Any:
        """The connected client (waits for start-up)."""
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self._client

    def close(self, wait: bool = True) -> None:
        """Shut the cluster down; ``wait=False`` lets it finish in the background."""
        self._stop.set()
        if wait:
            self._thread.join()


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
