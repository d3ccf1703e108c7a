"""The main job: ``python -m pipelines.build RAW OUT``.

Flow: discover + validate headers -> fingerprint -> plan (``OUT/plan.json``)
-> per-case preprocessing on Dask (cached by content hash) -> dataset
statistics, class weights and sampling weights -> a new sharded Zarr v3 store
version published atomically at ``OUT/store.zarr`` -> QC report.

Exit codes: 0 success, 3 success with quarantined cases, 2 configuration
error, 1 failure.  ``OUT/logs/build.jsonl`` receives one JSON line per event.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmrprep.cases import CaseError, CaseSpec, Problem
from cmrprep.plan import ConfigError, Plan
from pipelines import cache as cache_mod, outdir
from pipelines.cluster import (BackgroundClient, map_tasks, prestart_workers, quiet_dask_logs,
                               start_tasks)
from pipelines.runlog import RunLog

log = logging.getLogger("pipelines.build")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_QUARANTINE = 0, 1, 2, 3
MIN_CROP_MM = 64.0


@dataclass
class BuildResult:
    """What a build did; ``exit_code`` follows the module docstring."""

    out: Path
    n_cases: int = 0
    n_slices: int = 0
    processed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    full_rebuild: bool = False
    published: bool = False
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_QUARANTINE if self.quarantined else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "out"}
        return {"out": str(self.out), **d, "exit_code": self.exit_code}


def resolve_plan(out: Path, headers: list[dict[str, Any]], *, plan_file: str | None,
                 overrides: dict[str, Any], crop_mm: float | None) -> Plan:
    """Plan from ``--plan``, else the output folder's ``plan.json``, else derived.

    A plan once written is reused by later (incremental) builds, so a new case
    never silently changes the target spacing of the others; pass different
    options or edit ``plan.json`` to change it (this forces a full rebuild).
    """
    if plan_file:
        try:
            plan = Plan.from_json(Path(plan_file).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read plan {plan_file}: {exc.strerror}") from exc
    elif (out / "plan.json").exists():
        plan = Plan.from_json((out / "plan.json").read_text())
    else:
        plan = Plan()
    plan = plan.updated(**overrides)
    if plan.target_spacing is None:
        for h in headers:  # cases taken unchanged from the cache were not read yet
            if h["spacing"] is None:
                h["spacing"] = _spacing(h["case"])
        inplane = [min(h["spacing"][:2]) for h in headers]
        if not inplane:
            raise ConfigError("no readable case to derive the target spacing from; pass --spacing")
        plan = plan.updated(target_spacing=round(float(statistics.median(inplane)), 4))
    if crop_mm is not None:
        plan = plan.with_crop_mm(crop_mm).validate()
    if min(plan.crop_mm) < MIN_CROP_MM:
        raise ConfigError(f"crop of {plan.crop_mm[0]:.0f}x{plan.crop_mm[1]:.0f} mm is smaller than a "
                          f"heart (LV+RV span ~100-130 mm); use --crop-mm >= {MIN_CROP_MM:.0f}")
    return plan


def _headers(cases: list[CaseSpec], digests: cache_mod.DigestIndex,
             cache_dir: Path) -> tuple[list, list, dict]:
    """Check each case's first header; hash the inputs of cases the cache knows.

    A cached case whose files all have the size and mtime recorded when it
    was built is taken as it is (its header was checked then): an unchanged
    re-run reads no file and does not even import nibabel.  Its ``spacing``
    is ``None`` until :func:`_spacing` needs it.  A case without a cache entry
    is processed whatever its digests are, so its files are hashed by the
    worker that reads them (see :func:`pipelines.worker.process_case`)
    instead of being read twice.
    """
    ok, problems, file_digests, to_hash = [], [], {}, {}
    for case in cases:
        files = cache_mod.case_files(case.to_dict())
        cached = (cache_dir / f"{case.case_id}.json").exists()
        known = digests.unchanged(files) if cached else None
        if known is not None:
            file_digests.update(known)
            ok.append({"case": case, "spacing": None})
            continue
        try:
            ok.append({"case": case, "spacing": _spacing(case)})
        except CaseError as exc:
            problems.append(exc.problem)
            continue
        except OSError as exc:
            problems.append(Problem(case.case_id, getattr(exc, "filename", None), "readable",
                                    f"cannot read: {exc}"))
            continue
        if cached:
            to_hash[case.case_id] = files
    try:
        file_digests.update(digests.digest_many([f for fs in to_hash.values() for f in fs]))
    except OSError:  # find which case's file vanished or is unreadable; keep the others
        keep = []
        for h in ok:
            try:
                file_digests.update({f: digests.digest(f) for f in to_hash.get(h["case"].case_id, [])})
                keep.append(h)
            except OSError as exc:
                problems.append(Problem(h["case"].case_id, getattr(exc, "filename", None), "readable",
                                        f"cannot read: {exc}"))
        ok = keep
    return ok, problems, file_digests


def _spacing(case: CaseSpec) -> list[float]:
    """Spacing of a case's first image from its header (raises CaseError when unreadable)."""
    from pipelines.ingest import read_header

    return list(read_header(case.frames[0].image, case_id=case.case_id).geometry.spacing)


def build(raw: str | Path, out: str | Path, *, layout: str | None = None,
          plan_file: str | None = None, spacing: float | None = None,
          crop_mm: float | None = None, weight_scheme: str | None = None,
          foreground_share: float | None = None, seed: int | None = None,
          store_dtype: str | None = None, replicate: bool | None = None,
          workers: int = 2, memory_limit: str = "auto", scheduler: str | None = None,
          retries: int = 2, dry_run: bool = False, wait: bool = False,
          report: bool = True, progress: bool = True) -> BuildResult:
    """Build (or incrementally update) the store in ``out`` from the cases in ``raw``.

    ``workers=0`` runs every case in this process (no Dask; for debugging).
    Raises :class:`ConfigError` before any work for configuration problems.
    """
    raw, out = Path(raw), Path(out)
    overrides = dict(target_spacing=spacing, weight_scheme=weight_scheme, seed=seed,
                     foreground_share=foreground_share, store_dtype=store_dtype, replicate=replicate)
    Plan().updated(**overrides)  # validates overrides before touching anything
    if not raw.exists():
        raise ConfigError(f"input {raw} does not exist; pass the folder with your cases")
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    outdir.check_writable(out)
    with outdir.build_lock(out, wait=wait):
        return _locked_build(raw, out, layout, plan_file, overrides, crop_mm, workers,
                             memory_limit, scheduler, retries, dry_run, report, progress)


def _locked_build(raw, out, layout, plan_file, overrides, crop_mm, workers, memory_limit,
                  scheduler, retries, dry_run, report, progress) -> BuildResult:
    t0 = time.perf_counter()
    runlog = RunLog(out / "logs" / "build.jsonl")
    result = BuildResult(out=out)
    runlog.event("start", raw=str(raw), dry_run=dry_run)
    cluster = _Cluster(workers, memory_limit, scheduler)
    if not dry_run and not (out / "cache").is_dir():
        cluster.start()  # a first build surely has work: start before discovery
    try:
        from pipelines.ingest import discover

        disc = discover(raw, layout)
        if not dry_run and _has_uncached(disc.cases, out / "cache"):
            cluster.start()  # overlaps start-up with the header checks
        return _build_cases(raw, out, disc, plan_file, overrides, crop_mm, cluster, retries, dry_run,
                            report, progress, runlog, result, t0)
    finally:
        cluster.close()


class _Cluster:
    """The build's Dask client: started early when there is surely work, else on first use.

    ``workers=0`` without ``scheduler`` means no Dask (:meth:`client` is ``None``).
    """

    def __init__(self, workers: int, memory_limit: str, scheduler: str | None) -> None:
        self.workers, self.memory_limit, self.scheduler = workers, memory_limit, scheduler
        self._bg: BackgroundClient | None = None

    @property
    def started(self) -> bool:
        """Whether a client exists or is starting (never true without Dask)."""
        return self._bg is not None

    def start(self) -> None:
        if self.workers > 0 and not self.scheduler and self._bg is None:
            prestart_workers()
        if (self.workers > 0 or self.scheduler) and self._bg is None:
            self._bg = BackgroundClient(self.workers, memory_limit=self.memory_limit,
                                        scheduler=self.scheduler)

    def client(self):
        self.start()
        return self._bg.get() if self._bg is not None else None

    def release(self) -> None:
        """Start shutting down; the build finishes meanwhile (:meth:`close` joins)."""
        if self._bg is not None:
            self._bg.close(wait=False)

    def close(self) -> None:
        if self._bg is not None:
            self._bg.close()


def _has_uncached(cases: list[CaseSpec], cache_dir: Path) -> bool:
    """Whether some case has no cache entry at all (cheap: no hashing)."""
    return any(not (cache_dir / f"{c.case_id}.json").exists() for c in cases)


def _build_cases(raw, out, disc, plan_file, overrides, crop_mm, cluster, retries, dry_run,
                 report, progress, runlog, result, t0) -> BuildResult:
    """Everything after discovery."""
    result.quarantined.extend(p.to_dict() for p in disc.problems)
    (out / "cache").mkdir(exist_ok=True)
    for leftover in (out / "cache").glob(".*.tmp"):  # from a killed build
        leftover.unlink(missing_ok=True)
    from pipelines.qc import remove_stale

    remove_stale(out)
    digest_index = cache_mod.DigestIndex(out / "cache" / "digests.json")
    headers, problems, digests = _headers(disc.cases, digest_index, out / "cache")
    result.quarantined.extend(p.to_dict() for p in problems)
    plan = resolve_plan(out, headers, plan_file=plan_file, overrides=overrides, crop_mm=crop_mm)
    phash = cache_mod.plan_hash(plan.to_dict())
    previous = _previous_plan_hash(out)
    result.full_rebuild = previous is not None and previous != phash
    if result.full_rebuild:
        log.warning("plan changed since the last build: full rebuild of every case")
    cases = [h["case"] for h in headers]
    todo, keys = _plan_work(cases, digests, phash, out / "cache")
    result.n_cases = len(cases)
    result.processed = [c.case_id for c in todo]
    result.reused = [c.case_id for c in cases if c not in todo]
    result.removed = _stale_cache_entries(out / "cache", {c.case_id for c in cases})
    runlog.event("plan", plan_hash=phash, full_rebuild=result.full_rebuild, to_process=result.processed,
                 reused=len(result.reused), removed=result.removed)
    if dry_run:
        result.seconds = time.perf_counter() - t0
        return result
    _write_json(out / "plan.json", plan.to_dict())
    if todo:
        _warm_imports(report)
    outcomes = _run_cases(todo, keys, plan, phash, out / "cache", cluster, retries, progress, runlog)
    if todo:
        runlog.event("cases_done", seconds=round(time.perf_counter() - t0, 3))
    _learn_digests(outcomes, keys, digests, digest_index)
    digest_index.save()
    result.quarantined.extend(_quarantine_records(outcomes, todo))
    bad = {q["case_id"] for q in result.quarantined}
    metas = [m for c in cases if c.case_id not in bad
             and keys[c.case_id] is not None
             and (m := cache_mod.read_meta(out / "cache", c.case_id, keys[c.case_id])) is not None]
    for meta in metas:
        result.warnings.extend(meta.get("warnings", []))
    _remove_entries(out / "cache", result.removed)
    build_key = cache_mod.plan_hash({"plan": phash, "keys": [m["key"] for m in metas]})
    result.n_slices = int(sum(m["n_slices"] for m in metas))
    if _store_is_current(out, build_key):
        log.info("store is up to date (%d cases); nothing to publish", len(metas))
    else:
        _publish(out, metas, plan, digests, build_key, result, report, cluster)
        runlog.event("published", seconds=round(time.perf_counter() - t0, 3))
    cluster.release()
    _write_json(out / "fingerprint.json", _fingerprint(metas, plan))
    result.seconds = time.perf_counter() - t0
    _write_json(out / "build_report.json", result.to_dict())
    runlog.event("end", **{k: v for k, v in result.to_dict().items() if k in
                           ("n_cases", "n_slices", "exit_code", "seconds", "published")},
                 quarantined=[q["case_id"] for q in result.quarantined])
    return result


def _plan_work(cases, digests, phash, cache_dir):
    """Cases to process and their keys (``None``: not hashed yet, the worker hashes it)."""
    keys, todo = {}, []
    for case in cases:
        d = case.to_dict()
        files = cache_mod.case_files(d)
        keys[case.case_id] = None
        if all(f in digests for f in files):
            keys[case.case_id] = cache_mod.case_key(d, {f: digests[f] for f in files}, phash)
            if cache_mod.read_meta(cache_dir, case.case_id, keys[case.case_id]) is not None:
                continue
        todo.append(case)
    return todo, keys


def _run_cases(todo, keys, plan, phash, cache_dir, cluster, retries, progress, runlog) -> list[dict]:
    from pipelines.worker import process_case

    if not todo:
        return []
    items = [(c.to_dict(), plan.to_dict(), str(cache_dir), keys[c.case_id], phash) for c in todo]

    def note(res: dict) -> None:
        runlog.event("case", case_id=res.get("case_id"), ok=res.get("ok"))

    return map_tasks(process_case, items, client=cluster.client(), retries=retries,
                     progress=progress, on_result=note)


def _warm_imports(report: bool) -> None:
    """Import what the end of the build needs (zarr, Pillow) while the workers process
    cases: this process only waits then, and the store and report are on the critical path."""
    import importlib
    import threading

    names = ["pipelines.assemble"] + (["pipelines.report", "PIL.Image", "PIL.ImageDraw"]
                                      if report else [])

    def run() -> None:
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError:  # the report step reports it properly
                pass

    threading.Thread(target=run, name="cmrprep-imports", daemon=True).start()


def _learn_digests(outcomes: list[dict], keys: dict, digests: dict, index) -> None:
    """Keys and input digests computed by the workers, kept for this and later builds."""
    for res in outcomes:
        if not res.get("ok"):
            continue
        keys[res["case_id"]] = res["key"]
        for f, entry in res.get("digests", {}).items():
            digests[f] = entry[2]
            index.record(f, entry)


def _quarantine_records(outcomes: list[dict], todo: list[CaseSpec]) -> list[dict]:
    recs = []
    for case, res in zip(todo, outcomes):
        if res.get("ok"):
            continue
        if "problem" in res:
            recs.append(res["problem"])
        else:
            recs.append(Problem(case.case_id, case.frames[0].image, "processing",
                                f"task failed after retries: {res.get('exception')}").to_dict())
    return recs


def _publish(out, metas, plan, digests, build_key, result, report, cluster) -> None:
    """Write and publish a new store version; the QC report renders meanwhile.

    The store shards are tasks on the cluster's workers when it is running
    (else written here); the report renders in a thread of this process,
    which otherwise only waits, and the cluster shuts down as soon as the
    shards are written.
    """
    from concurrent.futures import ThreadPoolExecutor

    from pipelines import assemble  # zarr: imported after the cluster started

    stats = assemble.dataset_statistics(metas, plan)
    client = cluster.client() if cluster.started else None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmrprep-report") as pool:
        staged = job = None
        if report:
            from pipelines import qc

            staged = qc.staging_dir(out)
            job = pool.submit(lambda: qc.report_task(
                str(staged), qc.report_inputs(out / "cache", metas, stats, result, plan)))
        tmp = outdir.new_version_dir(out, build_key[:12])

        def shards(func, items):
            return start_tasks(func, items, client=client, retries=1, desc="shards", progress=False)

        assemble.write_version(tmp, out / "cache", metas, plan, stats, digests, build_key, shards)
        cluster.release()
        final = outdir.publish(out, tmp, build_key[:12] + "-" + uuid.uuid4().hex[:6])
        result.published = True
        log.info("published %s (%d slices from %d cases)", final.name, result.n_slices, len(metas))
        if job is not None:
            _install_report(out, staged, job)


def _install_report(out: Path, staged: Path, job) -> None:
    from pipelines import qc

    try:
        job.result()
    except Exception as exc:  # noqa: BLE001 - the store is published and fine; keep going
        log.warning("QC report failed (%s: %s); the store is published, the previous report kept",
                    type(exc).__name__, exc)
        shutil.rmtree(staged, ignore_errors=True)
        return
    qc.install_report(out, staged)


def _store_is_current(out: Path, build_key: str) -> bool:
    current = outdir.current_version(out)
    if current is None:
        return False
    try:
        return json.loads((current / "zarr.json").read_text())["attributes"].get("build_key") == build_key
    except (OSError, ValueError, KeyError):
        return False


def _previous_plan_hash(out: Path) -> str | None:
    if not (out / "plan.json").exists() or outdir.current_version(out) is None:
        return None
    try:
        return cache_mod.plan_hash(Plan.from_json((out / "plan.json").read_text()).to_dict())
    except ConfigError:
        return None


def _stale_cache_entries(cache_dir: Path, present: set[str]) -> list[str]:
    return sorted(p.stem for p in cache_dir.glob("*.json")
                  if p.stem != "digests" and p.stem not in present)


def _remove_entries(cache_dir: Path, ids: list[str]) -> None:
    for cid in ids:
        for suffix in (".json", ".npz"):
            (cache_dir / f"{cid}{suffix}").unlink(missing_ok=True)


def _fingerprint(metas: list[dict], plan: Plan) -> dict[str, Any]:
    return {"cases": {m["case_id"]: m["fingerprint"] for m in metas},
            "target_spacing": plan.target_spacing}


def _write_json(path: Path, obj: Any) -> None:
    cache_mod.atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m pipelines.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw", help="folder with cases (ACDC, M&Ms, nnU-Net raw or generic layout)")
    p.add_argument("out", help="output folder (store.zarr, plan.json, report/, ...)")
    p.add_argument("--layout", choices=["acdc", "mnms", "nnunet", "generic"])
    p.add_argument("--plan", dest="plan_file", help="use this plan JSON (edit a previous plan.json)")
    p.add_argument("--spacing", type=float, help="in-plane target spacing in mm (default: median)")
    p.add_argument("--crop-mm", type=float, help="crop size in mm (default: 128 px at the spacing)")
    p.add_argument("--weight-scheme", help="inverse_frequency|median_frequency|enet|effective_number")
    p.add_argument("--foreground-share", type=float, help="min share of foreground slices (0.33)")
    p.add_argument("--seed", type=int)
    p.add_argument("--store-dtype", choices=["float32", "float16"])
    p.add_argument("--replicate", action="store_true", default=None,
                   help="also store replicated_index (materialized oversampling)")
    p.add_argument("--workers", type=int, default=2, help="local Dask worker processes (0: no Dask)")
    p.add_argument("--memory-limit", default="auto", help="per-worker memory limit, e.g. 4GiB")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler")
    p.add_argument("--retries", type=int, default=2, help="retries for transient task errors")
    p.add_argument("--dry-run", action="store_true", help="list what would change, do nothing")
    p.add_argument("--wait", action="store_true", help="wait for a running build instead of failing")
    p.add_argument("--no-report", action="store_true", help="skip the QC report")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_dask_logs()
    try:
        res = build(args.raw, args.out, layout=args.layout, plan_file=args.plan_file,
                    spacing=args.spacing, crop_mm=args.crop_mm, weight_scheme=args.weight_scheme,
                    foreground_share=args.foreground_share, seed=args.seed,
                    store_dtype=args.store_dtype, replicate=args.replicate, workers=args.workers,
                    memory_limit=args.memory_limit, scheduler=args.scheduler, retries=args.retries,
                    dry_run=args.dry_run, wait=args.wait, report=not args.no_report,
                    progress=not args.quiet)
    except (ConfigError, PermissionError, outdir.BuildLocked) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    except OSError as exc:
        log.error("build failed with an I/O error: %s (disk full, permissions or a vanished "
                  "input?); the previous store version is intact", exc)
        return EXIT_FAILURE
    except Exception:  # noqa: BLE001 - top-level failure, logged with traceback
        log.exception("build failed; the previous store version is intact")
        return EXIT_FAILURE
    _print_summary(res, dry_run=args.dry_run)
    return res.exit_code


def _print_summary(res: BuildResult, dry_run: bool = False) -> None:
    if dry_run:
        print(f"dry run: {res.n_cases} cases; would process {len(res.processed)}, reuse "
              f"{len(res.reused)}, remove {len(res.removed)}"
              + ("; the plan changed: full rebuild" if res.full_rebuild else ""))
        for label, ids in (("process", res.processed), ("remove", res.removed)):
            for cid in ids:
                print(f"  {label} {cid}")
        return
    if res.full_rebuild:
        print("the plan changed since the last build: every case was reprocessed")
    verb = "processed"
    print(f"{res.n_cases} cases: {verb} {len(res.processed)}, reused {len(res.reused)}, "
          f"removed {len(res.removed)}, quarantined {len(res.quarantined)}; "
          f"{res.n_slices} slices in {res.out / 'store.zarr'} ({res.seconds:.1f} s)")
    for q in res.quarantined:
        print(f"  QUARANTINED {q['case_id']}: {q.get('check')}: {q.get('message')} [{q.get('file')}]")


if __name__ == "__main__":
    code = main()
    # Everything is written, fsynced and logged and every thread joined; tearing down the
    # interpreter (final garbage collection, thousands of modules of distributed, zarr and
    # matplotlib) would add ~0.45 s to every run.  The fork server and resource tracker
    # exit when this process's pipes close.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
