"""The build's Dask client (a LocalCluster by default, an existing scheduler when given) and
task mapping with per-task failure capture."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)


@contextmanager
def dask_client(workers: int = 2, *, threads_per_worker: int = 1, memory_limit: str = "auto",
                scheduler: str | None = None, scheduler_timeout: float = 60.0) -> Iterator[Any]:
    """Yield a ``distributed.Client``; tear the cluster down on exit.

    The local cluster is private to this build: every comm (scheduler,
    nannies, workers, client) is TLS with a temporary certificate authority
    created for the run and required of every peer (mutual TLS), bound to
    127.0.0.1, so no other local user can connect and submit code; the HTTP
    servers Dask starts on every node (the dashboard, ``/metrics``) are
    given no routes and closed once the cluster is up, so nothing else
    listens.

    Parameters
    ----------
    workers : int
        Worker processes of the LocalCluster (ignored with ``scheduler``).
    threads_per_worker : int
        Threads per worker process; 1 suits SimpleITK/NumPy-heavy tasks.
    memory_limit : str
        Per-worker memory limit (``"auto"`` splits system memory).
    scheduler : str or None
        Address of an existing scheduler (``tcp://host:8786`` or ``tls://...``;
        TLS credentials come from the Dask configuration,
        ``distributed.comm.tls.*``); workers there must see the same input and
        output paths (shared filesystem).
    scheduler_timeout : float
        Seconds to wait for ``scheduler`` to answer and to have at least one
        worker; then :class:`~cmrprep.plan.ConfigError` (the build never hangs
        holding its lock).
    """
    saved = {k: os.environ.get(k) for k in _SPAWN_ENV}
    try:
        if scheduler:
            with _remote_client(scheduler, scheduler_timeout) as client:
                yield client
        else:
            with _local_client(workers, threads_per_worker, memory_limit) as client:
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
def _remote_client(scheduler: str, timeout: float) -> Iterator[Any]:
    from distributed import Client

    from cmrprep.plan import ConfigError

    log.info("connecting to Dask scheduler %s (timeout %g s)", scheduler, timeout)
    try:
        client = Client(scheduler, timeout=f"{timeout}s")
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"cannot reach the Dask scheduler {scheduler} within {timeout:g} s "
                          f"({type(exc).__name__}: {exc}); check the address, or raise "
                          "--scheduler-timeout.") from exc
    with client:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise ConfigError(f"the Dask scheduler {scheduler} has no worker after {timeout:g} s; "
                              "start workers (`dask worker ADDRESS`) or raise --scheduler-timeout. "
                              "Nothing was built.") from None
        yield client


#: HTTP routes of every Dask node of the local cluster: none (no dashboard, no /metrics).
_NO_HTTP = {"distributed.scheduler.http.routes": [], "distributed.worker.http.routes": []}

#: Monitoring of the local cluster, which has no dashboard to show it.  Dask's defaults
#: sample every worker's threads every 10 ms (``profile``), the nannies' memory every
#: 100 ms, host CPU/disk/network every 500 ms and tick the event loop every 20 ms; the
#: scheduler and nannies live in the build's own process, so that was ~35 ms of its CPU per
#: second of build (a third of the client's CPU in a 400-case build).  With these settings an
#: idle 2-worker cluster costs the build's process ~8 ms of CPU per second (17 with a 200 ms
#: tick; the tick only checks that the event loop is not blocked for seconds).  The host
#: metrics (CPU, network) feed only the dashboard, so they are sampled every 10 s; the
#: active memory manager, which drops redundant copies of task results every 2 s, is off
#: (the build's results are small and never replicated); the client refreshes its cached
#: view of the workers every 30 s (``Client.scheduler_info()`` still asks afresh).  Those
#: three took 10.8-11.4 ms/s down to 8.0-8.8 (30 s idle, 2 workers).  Memory limits are
#: still enforced within half a second: the nannies and workers read their process's
#: memory themselves, not the host metrics.
_LIGHT_MONITORING = {
    "distributed.worker.profile.enabled": False,
    "distributed.worker.memory.monitor-interval": "500ms",
    "distributed.admin.system-monitor.interval": "10s",
    "distributed.admin.system-monitor.disk": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.scheduler.active-memory-manager.start": False,
    "distributed.client.scheduler-info-interval": "30s",
    # distributed keeps its last 1,000 messages per connection, transitions and events for
    # debugging ("logs for developers"); the scheduler's copies of compute-task messages hold
    # every batch's arguments, so the build's memory grew with the dataset (~3 KB a case)
    "distributed.admin.low-level-log-length": 20,
}


#: Seconds between the LocalCluster's copies of its description (name, type) into the
#: scheduler's metadata, which only a dashboard or notebook widget shows.  Dask's default, 1 s,
#: is a TLS round trip a second inside the build's process (~1 ms of CPU a second, idle
#: 2-worker cluster: 6.6-7.7 ms/s against 7.8-8.0 ms/s).
_CLUSTER_INFO_SYNC_S = 30


@contextmanager
def _local_client(workers: int, threads_per_worker: int, memory_limit: str) -> Iterator[Any]:
    import dask
    from distributed import Client, LocalCluster

    local_dir = tempfile.mkdtemp(prefix="cmrprep-dask-")
    log.info("starting LocalCluster: %d workers x %d threads, memory limit %s (TLS, loopback)",
             workers, threads_per_worker, memory_limit)
    try:
        config = {**_NO_HTTP, **_LIGHT_MONITORING}  # read by every node as it starts
        with dask.config.set(config):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                                   processes=True, memory_limit=memory_limit, dashboard_address=None,
                                   host="127.0.0.1", protocol="tls://", security=temporary_security(),
                                   local_directory=local_dir, silence_logs=logging.WARNING,
                                   scheduler_sync_interval=_CLUSTER_INFO_SYNC_S)
        with cluster:
            with dask.config.set(config):
                client = Client(cluster)
            with client:
                _close_http_servers(cluster, client)
                yield client
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)  # workers' scratch space (spill, locks)


def temporary_security() -> Any:
    """A ``distributed.Security`` for one private cluster: a new key and self-signed certificate.

    What ``Security.temporary()`` does (in memory only; every role presents the
    certificate and requires it of its peers), with an elliptic-curve key (P-256)
    instead of RSA-2048: generating it takes microseconds instead of ~80 ms of
    the client's CPU, and each TLS handshake's signature is cheaper, which a
    nightly run of a few cases pays once per connection.

    >>> sec = temporary_security()
    >>> sec.require_encryption, sec.tls_ca_file == sec.tls_worker_cert == sec.tls_client_cert
    (True, True)
    >>> "BEGIN PRIVATE KEY" in sec.tls_scheduler_key
    True
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from distributed.security import Security

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-internal")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("dask-internal")]), critical=False)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return Security(require_encryption=True, tls_ca_file=cert_pem,
                    tls_client_key=key_pem, tls_client_cert=cert_pem,
                    tls_scheduler_key=key_pem, tls_scheduler_cert=cert_pem,
                    tls_worker_key=key_pem, tls_worker_cert=cert_pem)


def _close_http_servers(cluster: Any, client: Any) -> None:
    """Stop the HTTP server Dask starts on the scheduler and on each worker (unasked-for)."""
    def stop_worker_http(dask_worker=None):
        server = getattr(dask_worker, "http_server", None)
        if server is not None:
            server.stop()
        return True

    def stop_scheduler_http():
        server = getattr(cluster.scheduler, "http_server", None)
        if server is not None:
            server.stop()

    client.run(stop_worker_http)
    cluster.sync(_call_async, stop_scheduler_http)


async def _call_async(func: Callable[[], None]) -> None:
    """Run ``func`` on the cluster's event loop (tornado servers are stopped from their loop)."""
    func()


#: Most items in one task (:func:`batch_size`).  A 1,600-case build on 2 workers with 32 (50
#: case tasks) spent 2.59 s of the client process's CPU and 72 s, with 16 (100 tasks) 2.92 s
#: and 74 s: the tail of a larger last batch costs less than the tasks it saves.
MAX_BATCH = 32


def map_tasks(func: Callable[..., dict], items: list[tuple], *, client: Any | None,
              retries: int = 2, desc: str = "cases", progress: bool = True,
              on_result: Callable[[dict], None] | None = None, batch: int | None = None,
              cost: list[float] | None = None, max_batch: int = MAX_BATCH,
              units: list[int] | None = None) -> list[dict]:
    """Run ``func(*item)`` for every item; results come back in input order.

    With ``client=None`` the items run serially in this process (debugging,
    tiny inputs).  On a cluster, items are sent in batches of ``batch`` per
    task (default: :func:`batch_size`, at most ``max_batch``; raise it for
    items of a few milliseconds, such as header reads): Dask's per-task cost
    in the client process (3-7 ms of CPU over TLS, scheduler included) would
    otherwise be a serial share of the build that grows with the dataset.
    With ``cost`` (an estimate per item), batches are of about equal cost instead (:func:`plan_batches`) and the
    costliest are submitted first, so a few heavy items among many light ones
    (the groups rewritten by a nightly run among the linked ones) spread over
    the workers instead of queueing behind each other in one batch.  An item
    whose exception survives ``retries`` retries
    (``OSError``, transient) or any other exception is returned as
    ``{"ok": False, "exception": "..."}``, never raised, so one bad case
    cannot take down the run.  An item that kills its worker process (a
    crash in native code, the nanny's memory limit) fails alone: the items
    of every task whose worker was lost run again one at a time, each alone on
    the cluster, after the others; the one that kills its worker each time
    Dask retries it (``distributed.scheduler.allowed-failures``) comes back as
    ``{"ok": False, "exception": "KilledWorker: ..."}``.  This is why the local
    cluster's workers are processes, even for a nightly run of a few cases
    where threads would start 1.6 s sooner.  ``units`` (per item) is what the
    progress bar counts when an item holds several cases.

    Items must be JSON-serialisable (NumPy scalars and arrays arrive as
    numbers and lists): each batch crosses to its worker as one JSON text,
    which Dask neither walks for dependencies (its argument parser visits
    every nested dict, list and tuple: ~0.3 s of client CPU for 1,600 cases)
    nor keeps on the scheduler as thousands of small objects (~6 KB a case).
    A batch's future is released as soon as its result is read, so the
    scheduler and the workers forget finished tasks during the run.

    Examples
    --------
    >>> map_tasks(lambda x: {"ok": True, "x": 1 / x}, [(1,), (0,)], client=None, progress=False)
    [{'ok': True, 'x': 1.0}, {'ok': False, 'exception': 'ZeroDivisionError: division by zero'}]
    """
    from tqdm.auto import tqdm

    results: list[dict | None] = [None] * len(items)
    steps = units or [1] * len(items)
    bar = tqdm(total=sum(steps), desc=desc, unit="case", disable=not progress)
    if client is None:
        for i, item in enumerate(items):
            results[i] = _call(func, item, retries)
            _done(bar, on_result, results[i], steps[i])
    else:
        from distributed import as_completed

        workers = _n_workers(client)
        spans = plan_batches(cost if cost is not None else [1.0] * len(items), workers, batch,
                             max_batch)

        def submit(start: int, stop: int) -> Any:
            return client.submit(_run_batch, func, json.dumps(items[start:stop], default=_plain),
                                 retries, pure=False)

        futures = [submit(a, b) for a, b in spans]
        index = {f.key: span for f, span in zip(futures, spans)}
        pending = as_completed(futures)
        del futures  # as_completed holds each future until it yields it
        lost: list[int] = []
        for fut in pending:
            start, stop = index.pop(fut.key)
            try:
                batch_results = fut.result()
            except Exception as exc:  # noqa: BLE001 - the worker was lost (items never raise)
                lost.extend(range(start, stop))
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                continue
            finally:
                fut.release()
            for k, res in enumerate(batch_results):
                results[start + k] = res
                _done(bar, on_result, res, steps[start + k])
        if lost:
            log.warning("%s: tasks of %d items lost their worker (%s); running those items again "
                        "one at a time, so that only an item that kills its worker fails",
                        desc, len(lost), reason)
        for i in lost:  # alone on the cluster: no other task shares the fate of its worker
            fut = submit(i, i + 1)
            try:
                results[i] = fut.result()[0]
            except Exception as exc:  # noqa: BLE001 - this item kills its worker
                results[i] = {"ok": False, "exception": f"{type(exc).__name__}: {exc}"}
            fut.release()
            _done(bar, on_result, results[i], steps[i])
    bar.close()
    return [r if r is not None else {"ok": False, "exception": "no result"} for r in results]


def plan_batches(cost: list[float], n_workers: int, batch: int | None = None,
                 max_batch: int = MAX_BATCH) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` spans of items, costliest first.

    With ``batch``, or equal costs, every span holds ``batch`` items (default
    :func:`batch_size`).  Otherwise a span closes when its cost reaches the
    total over ``8 * n_workers`` or it holds ``max_batch`` items, so a heavy
    item is a task of its own and light ones share one.

    Examples
    --------
    >>> plan_batches([1.0] * 100, 2)[:3]
    [(0, 6), (6, 12), (12, 18)]
    >>> plan_batches([1, 1, 50, 1, 1, 40, 1], 1)
    [(2, 3), (5, 6), (0, 2), (3, 5), (6, 7)]
    """
    n = len(cost)
    if batch is not None or len(set(cost)) <= 1:
        size = batch or batch_size(n, n_workers, max_batch)
        return [(a, min(a + size, n)) for a in range(0, n, size)]
    target = sum(cost) / max(8 * n_workers, 1)
    spans, start, acc = [], 0, 0.0
    for i, c in enumerate(cost):
        if i > start and (acc + c > target or i - start >= max_batch):
            spans.append((start, i))
            start, acc = i, 0.0
        acc += c
    spans.append((start, n))
    return sorted(spans, key=lambda s: -sum(cost[s[0]:s[1]]))


def batch_size(n_items: int, n_workers: int, max_batch: int = MAX_BATCH) -> int:
    """Items per task: about 8 tasks per worker, at most ``max_batch`` items each (load stays balanced).

    >>> batch_size(400, 2), batch_size(10, 2), batch_size(100_000, 100), batch_size(1600, 2, 128)
    (25, 1, 32, 100)
    """
    return max(1, min(max_batch, n_items // max(8 * n_workers, 1)))


def _n_workers(client: Any) -> int:
    try:
        return max(1, len(client.scheduler_info().get("workers", {})))
    except Exception:  # noqa: BLE001 - only a sizing hint
        return 1


def _plain(value: Any) -> Any:
    """JSON form of a NumPy scalar or array in a task's arguments (anything else is an error)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"map_tasks items must be JSON-serialisable; got {type(value).__name__}")


def _run_batch(func: Callable[..., dict], items_json: str, retries: int) -> list[dict]:
    """Worker side of :func:`map_tasks`: every item of a batch (JSON text), each with its own retries."""
    return [_call(func, tuple(item), retries) for item in json.loads(items_json)]


def _call(func: Callable[..., dict], item: tuple, retries: int = 0) -> dict:
    for attempt in range(retries + 1):
        try:
            return func(*item)
        except OSError as exc:  # transient I/O (a flaky share): try again
            if attempt == retries:
                return {"ok": False, "exception": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # noqa: BLE001 - reported per case
            return {"ok": False, "exception": f"{type(exc).__name__}: {exc}"}
    return {"ok": False, "exception": "no attempt"}


def _done(bar: Any, on_result: Callable[[dict], None] | None, res: dict | None,
          step: int = 1) -> None:
    bar.update(step)
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
