"""The main job: ``python -m pipelines.build RAW OUT`` or ``build(BuildConfig(raw, out))``.

Flow, one module per step:

1. discover the cases (:mod:`pipelines.ingest`) and survey them
   (:mod:`~pipelines.build.incremental`: which cases are unchanged, their
   header checks and input digests);
2. plan (:mod:`~pipelines.build.planning`: ``OUT/plan.json``);
3. per-case preprocessing on Dask (:mod:`~pipelines.build.tasks`), cached by
   content hash;
4. dataset statistics, class and sampling weights, a new sharded Zarr v3
   store version (:mod:`~pipelines.build.store`), published atomically
   (:mod:`~pipelines.build.outdir`);
5. the QC report rendered from the published store (:mod:`~pipelines.build.report`).

All cluster work happens inside one ``with dask_client(...)`` block, entered
only when there is work for it.  Exit codes: :mod:`pipelines.exitcodes`.
``OUT/logs/build.jsonl`` receives one JSON line per event.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from cmrprep.cases import CaseSpec, Problem
from cmrprep.plan import ConfigError, Plan
from pipelines.build import incremental, outdir
from pipelines.build.cluster import dask_client, map_tasks
from pipelines.build.config import BuildConfig, BuildResult
from pipelines.build.planning import fingerprint, resolve_plan
from pipelines.build.runlog import RunLog

__all__ = ["build", "BuildConfig", "BuildResult", "resolve_plan"]

log = logging.getLogger("pipelines.build")


def build(config: BuildConfig) -> BuildResult:
    """Build (or incrementally update) the store in ``config.out`` from the cases in ``config.raw``.

    Raises :class:`~cmrprep.plan.ConfigError` before any work for configuration
    problems, :class:`~pipelines.build.outdir.BuildLocked` when another build
    holds the output folder.  ``config.workers=0`` runs every case in this
    process (no Dask).
    """
    config.validate()
    out = Path(config.out)
    outdir.check_writable(out)
    with outdir.build_lock(out, wait=config.wait):
        return _Build(config).run()


class _Build:
    """One locked build: the steps of the module docstring, sharing the run's state."""

    def __init__(self, config: BuildConfig) -> None:
        self.cfg = config
        self.raw, self.out = Path(config.raw), Path(config.out)
        self.cache_dir = self.out / "cache"
        self.t0 = time.perf_counter()
        self.runlog = RunLog(self.out / "logs" / "build.jsonl")
        self.result = BuildResult(out=self.out)

    def run(self) -> BuildResult:
        from pipelines.build.report import remove_stale
        from pipelines.ingest import discover

        cfg, result = self.cfg, self.result
        self.runlog.event("start", raw=str(self.raw), dry_run=cfg.dry_run)
        disc = discover(self.raw, cfg.layout)
        result.quarantined.extend(p.to_dict() for p in disc.problems)
        self.cache_dir.mkdir(exist_ok=True)
        incremental.remove_leftovers(self.cache_dir)
        remove_stale(self.out)
        index = incremental.DigestIndex(self.cache_dir / "digests.json")
        headers, problems, digests = incremental.survey(disc.cases, index, self.cache_dir)
        result.quarantined.extend(p.to_dict() for p in problems)
        plan = resolve_plan(self.out, headers, plan_file=cfg.plan_file,
                            overrides=cfg.plan_overrides(), crop_mm=cfg.crop_mm)
        phash = incremental.plan_hash(plan.to_dict())
        previous = _previous_plan_hash(self.out)
        result.full_rebuild = previous is not None and previous != phash
        if result.full_rebuild:
            log.warning("plan changed since the last build: full rebuild of every case")
        cases = [h["case"] for h in headers]
        todo, keys = incremental.plan_work(cases, digests, phash, self.cache_dir)
        todo_ids = {c.case_id for c in todo}
        result.n_cases = len(cases)
        result.processed = [c.case_id for c in todo]
        result.reused = [c.case_id for c in cases if c.case_id not in todo_ids]
        result.removed = incremental.stale_entries(self.cache_dir, {c.case_id for c in cases})
        self.runlog.event("plan", plan_hash=phash, full_rebuild=result.full_rebuild,
                          to_process=result.processed, reused=len(result.reused),
                          removed=result.removed)
        if cfg.dry_run:
            result.seconds = time.perf_counter() - self.t0
            return result
        _write_json(self.out / "plan.json", plan.to_dict())
        reused_metas = self._metas([c for c in cases if c.case_id not in todo_ids], keys)
        needs_cluster = bool(todo) or not _store_is_current(
            self.out, _build_key(phash, [m["key"] for m in reused_metas]))
        with self._client(needs_cluster) as client:
            outcomes = self._process(todo, keys, plan, phash, client)
            self._learn(outcomes, keys, digests, index)
            result.quarantined.extend(_quarantine_records(outcomes, todo))
            bad = {q["case_id"] for q in result.quarantined}
            metas = self._metas([c for c in cases if c.case_id not in bad], keys)
            for meta in metas:
                result.warnings.extend(meta.get("warnings", []))
            incremental.remove_entries(self.cache_dir, result.removed)
            build_key = _build_key(phash, [m["key"] for m in metas])
            result.n_slices = int(sum(m["n_slices"] for m in metas))
            if _store_is_current(self.out, build_key):
                log.info("store is up to date (%d cases); nothing to publish", len(metas))
            else:
                self._publish(metas, plan, digests, build_key, client)
        if result.published and cfg.report:
            self._report(plan)
        _write_json(self.out / "fingerprint.json", fingerprint(metas, plan))
        result.seconds = time.perf_counter() - self.t0
        _write_json(self.out / "build_report.json", result.to_dict())
        self.runlog.event("end", **{k: v for k, v in result.to_dict().items() if k in
                                    ("n_cases", "n_slices", "exit_code", "seconds", "published")},
                          quarantined=[q["case_id"] for q in result.quarantined])
        return result

    def _client(self, needed: bool):
        cfg = self.cfg
        if not needed or (cfg.workers == 0 and not cfg.scheduler):
            return nullcontext(None)
        return dask_client(cfg.workers, memory_limit=cfg.memory_limit, scheduler=cfg.scheduler)

    def _metas(self, cases: list[CaseSpec], keys: dict[str, str | None]) -> list[dict[str, Any]]:
        """Cached metadata of ``cases`` whose entry matches their key, in case order."""
        return [m for c in cases if keys.get(c.case_id) is not None
                and (m := incremental.read_meta(self.cache_dir, c.case_id, keys[c.case_id])) is not None]

    def _process(self, todo, keys, plan: Plan, phash: str, client) -> list[dict]:
        from pipelines.build.tasks import process_case

        if not todo:
            return []
        items = [(c.to_dict(), plan.to_dict(), str(self.cache_dir), keys[c.case_id], phash)
                 for c in todo]

        def note(res: dict) -> None:
            self.runlog.event("case", case_id=res.get("case_id"), ok=res.get("ok"))

        outcomes = map_tasks(process_case, items, client=client, retries=self.cfg.retries,
                             progress=self.cfg.progress, on_result=note)
        self.runlog.event("cases_done", seconds=round(time.perf_counter() - self.t0, 3))
        return outcomes

    def _learn(self, outcomes: list[dict], keys: dict, digests: dict, index) -> None:
        """Keys and input digests computed by the workers, kept for this and later builds."""
        for res in outcomes:
            if not res.get("ok"):
                continue
            keys[res["case_id"]] = res["key"]
            for f, entry in res.get("digests", {}).items():
                digests[f] = entry[2]
                index.record(f, entry)
        index.save()

    def _publish(self, metas, plan: Plan, digests, build_key: str, client) -> None:
        """Write a new store version (shards as tasks on the cluster) and publish it."""
        from pipelines.build import store

        stats = store.dataset_statistics(metas, plan)
        tmp = outdir.new_version_dir(self.out, build_key[:12])

        def run_tasks(func, items):
            return map_tasks(func, items, client=client, retries=1, desc="shards", progress=False)

        store.write_version(tmp, self.cache_dir, metas, plan, stats, digests, build_key, run_tasks)
        final = outdir.publish(self.out, tmp, build_key[:12] + "-" + uuid.uuid4().hex[:6])
        self.result.published = True
        log.info("published %s (%d slices from %d cases)", final.name, self.result.n_slices, len(metas))
        self.runlog.event("published", seconds=round(time.perf_counter() - self.t0, 3))

    def _report(self, plan: Plan) -> None:
        from pipelines.build.report import render_build_report

        try:
            render_build_report(self.out, self.result, plan)
        except Exception as exc:  # noqa: BLE001 - the store is published and fine; keep going
            log.warning("QC report failed (%s: %s); the store is published, the previous report kept",
                        type(exc).__name__, exc)


def _build_key(phash: str, keys: list[str]) -> str:
    return incremental.plan_hash({"plan": phash, "keys": keys})


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
        return incremental.plan_hash(Plan.from_json((out / "plan.json").read_text()).to_dict())
    except ConfigError:
        return None


def _write_json(path: Path, obj: Any) -> None:
    incremental.atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
