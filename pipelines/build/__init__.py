"""The main job: ``python -m pipelines.build RAW OUT`` or ``build(BuildConfig(raw, out))``.

Flow, one module per step:

1. discover the cases (:mod:`pipelines.ingest`) and survey them
   (:mod:`~pipelines.build.incremental`: which cases are unchanged, their
   header checks and input digests);
2. plan (:mod:`~pipelines.build.planning`: ``OUT/plan.json``);
3. per-case preprocessing on Dask (:mod:`~pipelines.build.tasks`) of the new
   and changed cases only (content-hash keys), staged until published;
4. dataset statistics, class and sampling weights, a new sharded Zarr v3
   store version (:mod:`~pipelines.build.store`) that hard-links the unchanged
   case groups of the previous one and writes the others, published atomically
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
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from cmrprep.cases import CaseSpec, Problem
from cmrprep.plan import ConfigError, Plan
from pipelines.build import incremental, outdir
from pipelines.build.cluster import dask_client, map_tasks
from pipelines.build.config import BuildConfig, BuildResult
from pipelines.build.planning import resolve_plan
from pipelines.build.runlog import RunLog, peak_rss_mib
from pipelines.build.tasks import SUMMARY_FIELDS

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
        job = _Build(config)
        try:
            return job.run()
        finally:
            job._stack.close()  # the Dask client, if one was started


class _Build:
    """One locked build: the steps of the module docstring, sharing the run's state."""

    def __init__(self, config: BuildConfig) -> None:
        self.cfg = config
        # resolved: ``../raw`` and ``/abs/raw`` are the same inputs (case keys hold paths)
        self.raw, self.out = Path(config.raw).resolve(), Path(config.out)
        self.staging, self.state = self.out / "staging", self.out / "state"
        self.t0, self.cpu0, self.thread_cpu0 = time.perf_counter(), time.process_time(), time.thread_time()
        self.runlog = RunLog(self.out / "logs" / "build.jsonl")
        self.result = BuildResult(out=self.out)
        self._stack, self._client_ = ExitStack(), None
        self._header_problems: list[dict[str, Any]] = []
        self._shift = _ShiftFold()

    def run(self) -> BuildResult:
        from pipelines.build.report import remove_stale
        from pipelines.ingest import discover

        cfg, result, out = self.cfg, self.result, self.out
        self.runlog.event("start", raw=str(self.raw), dry_run=cfg.dry_run)
        disc = self._discover()
        self.label_map = disc.label_map
        result.quarantined.extend(p.to_dict() for p in disc.problems)
        for folder in (self.staging, self.state):
            folder.mkdir(exist_ok=True)
        incremental.remove_leftovers(self.staging)
        remove_stale(out)
        current = outdir.current_version(out)
        index = incremental.StoreIndex(current)
        self._damaged_groups = self._verify(index)
        digest_index = incremental.DigestIndex(self.state)
        headers, digests = incremental.survey(disc.cases, digest_index)
        if not headers:  # an empty or unmounted RAW, or every case unreadable: change nothing
            raise ConfigError(_nothing_usable(result.quarantined, self.raw))
        try:
            overrides = {**cfg.plan_overrides(), "classes": disc.label_map.classes}
            plan = resolve_plan(out, headers, plan_file=cfg.plan_file, overrides=overrides,
                                crop_mm=cfg.crop_mm, read_spacings=self._read_spacings)
        except ConfigError:
            if self._header_problems and len(self._header_problems) == len(headers):
                raise ConfigError(_nothing_usable(result.quarantined + self._header_problems,
                                                  self.raw)) from None
            raise
        phash = incremental.plan_hash(plan.to_dict())
        result.full_rebuild = index.plan is not None and incremental.plan_hash(index.plan) != phash
        if result.full_rebuild:
            log.warning("plan changed since the last build: full rebuild of every case")
        cases = sorted((h["case"] for h in headers), key=lambda c: c.case_id)
        todo, keys, staged = incremental.plan_work(cases, digests, phash, index, self.staging)
        todo_ids = {c.case_id for c in todo}
        result.n_cases = len(cases)
        result.processed = [c.case_id for c in todo]
        result.reused = [c.case_id for c in cases if c.case_id not in todo_ids]
        result.removed = incremental.removed_cases(index, {c.case_id for c in cases})
        self.runlog.event("plan", plan_hash=phash, full_rebuild=result.full_rebuild,
                          to_process=result.processed, reused=len(result.reused),
                          removed=result.removed)
        if cfg.dry_run:
            result.seconds = time.perf_counter() - self.t0
            return result
        damaged = bool(self._damaged_groups) or index.unreadable
        base_key = _current_key(current)
        unchanged = not todo and cases and not damaged and (
            _build_key(phash, [keys[c.case_id] for c in cases]) == base_key)
        client = self._client() if not unchanged else None
        try:
            outcomes = self._process(cases, todo, keys, digests, index, plan, phash, client)
            self._check_convention(outcomes)
            self._learn(outcomes, keys, digests, digest_index)
            for res in outcomes:  # recorded above: the client keeps only the per-case summary
                res.pop("contacts", None)
                res.pop("digests", None)
            result.quarantined.extend(_quarantine_records(outcomes, todo))
            bad = {q["case_id"] for q in result.quarantined}
            done = {r["case_id"]: r for r in outcomes if r.get("ok") and not r.get("unchanged")}
            # a touched file with the same content: the stored case stands
            result.reused.extend(r["case_id"] for r in outcomes if r.get("unchanged"))
            entries = self._entries([c for c in cases if c.case_id not in bad], keys, digests,
                                    done, staged, index)
            if not entries:
                raise ConfigError(_nothing_usable(result.quarantined, self.raw))
            result.n_cases = len(entries)  # the cases in the store (quarantined ones are listed apart)
            result.processed = [c.case_id for c in todo if c.case_id in done]
            del outcomes, done  # the entries hold what publishing needs of each case
            for entry in entries:
                result.warnings.extend(entry.get("warnings") or [])
            build_key = _build_key(phash, [e["key"] for e in entries])
            result.n_slices = int(sum(e["n_slices"] for e in entries))
            if build_key == base_key and not damaged:
                log.info("store is up to date (%d cases); nothing to publish", len(entries))
            else:
                self._publish(entries, plan, build_key, current, index, client)
            self._clear_staging(client)
        finally:
            self._stack.close()
        _write_json(out / "plan.json", plan.to_dict())  # the plan of the published version
        incremental.clear_staging(self.staging)
        if result.published and cfg.report:
            self._report(plan)
            self.runlog.event("report", seconds=round(time.perf_counter() - self.t0, 3))
        self._fingerprint(entries, plan, build_key, base_key, set(index.case_ids))
        result.seconds = time.perf_counter() - self.t0
        result.client_cpu_s = round(time.process_time() - self.cpu0, 3)
        result.client_main_thread_cpu_s = round(time.thread_time() - self.thread_cpu0, 3)
        result.client_peak_rss_mib = round(peak_rss_mib(), 1)
        _write_json(out / "build_report.json", result.to_dict())
        self.runlog.event("end", **{k: v for k, v in result.to_dict().items() if k in
                                    ("n_cases", "n_slices", "exit_code", "seconds", "published",
                                     "client_cpu_s", "client_main_thread_cpu_s",
                                     "client_peak_rss_mib")},
                          quarantined=[q["case_id"] for q in result.quarantined])
        return result

    def _discover(self):
        """Find the cases; metadata files unchanged since the last build are not read again.

        ``OUT/state/discovery-v<FORMAT>/`` keeps what discovery read
        (``Info.cfg``, the M&Ms CSV, ``dataset.json``, DICOM headers) by the
        files' stat stamps (:class:`~pipelines.ingest.readcache.ReadCache`, kept
        as an :class:`~pipelines.build.incremental.JsonBuckets` map, so a run
        rewrites only the entries that changed): with the digest index, an
        unchanged re-run opens no input file.  The single ``discovery.json``
        of earlier versions is removed (its reads are made once more).
        """
        from pipelines.ingest.readcache import FORMAT, ReadCache

        buckets = incremental.JsonBuckets(self.state / f"discovery-v{FORMAT}")
        cache = ReadCache(buckets.load())
        disc = self.cfg.discovery.discover(self.raw, read_cache=cache)
        if cache.changed and not self.cfg.dry_run:
            buckets.save(cache.entries)
            (self.state / "discovery.json").unlink(missing_ok=True)
        log.debug("discovery: %d metadata reads reused, %d read", cache.hits, cache.misses)
        return disc

    def _verify(self, index: incremental.StoreIndex) -> set[str]:
        """Find damaged data in the published version; its cases are processed again.

        Every build checks each shard file's size against the size recorded
        when it was written (one ``stat`` per shard) and that each group's
        records exist.  The cases of a damaged group are dropped from the
        index, so they are read from RAW again and the group is rewritten;
        the repaired cases are named in the log and the result.
        """
        if index.version is None:
            return set()
        cases, groups = index.damaged()
        if cases:
            log.warning("store version %s is damaged: %d shard groups (%d cases: %s%s) have missing "
                        "or resized files; those cases are processed again from the inputs",
                        index.version.name, len(groups), len(cases), ", ".join(cases[:8]),
                        ", ..." if len(cases) > 8 else "")
            index.forget(cases)
            self.result.repaired = cases
            self.runlog.event("repair", cases=cases, groups=sorted(groups))
        if index.unreadable:
            self.result.repaired = ["(whole store: unreadable case table)"]
        return groups

    def _client(self):
        """The build's Dask client, started on first use (``None``: run in this process)."""
        cfg = self.cfg
        if self._client_ is None and (cfg.workers > 0 or cfg.scheduler):
            self._client_ = self._stack.enter_context(
                dask_client(cfg.workers, memory_limit=cfg.memory_limit, scheduler=cfg.scheduler,
                            scheduler_timeout=cfg.scheduler_timeout))
        return self._client_

    def _read_spacings(self, cases: list[CaseSpec]) -> list[list[float] | None]:
        """Header spacings of ``cases``, read by the workers (a first build's plan needs them)."""
        from pipelines.build.planning import header_task

        results = map_tasks(header_task, [(c.to_dict(),) for c in cases], client=self._client(),
                            retries=self.cfg.retries, desc="headers", progress=False,
                            max_batch=128)  # a header read takes milliseconds
        self._header_problems = [r["problem"] for r in results if r.get("problem")]
        return [r.get("spacing") for r in results]

    def _process(self, cases, todo, keys, digests, index, plan: Plan, phash: str,
                 client) -> list[dict]:
        """Process ``todo`` on the cluster; one result per case of ``todo``, in its order.

        A case the store holds whose files changed stamp goes with its stored key
        and the digests still known, so its worker hashes only the changed files
        and skips the case when the content is the same.  The new cases of a
        store group that is new as a whole (every case of a first build) go as
        one task, which also writes the group (:func:`~pipelines.build.tasks.process_cases`).
        """
        from pipelines.build.tasks import process_cases

        if not todo:
            return []
        plan_dict = plan.to_dict()
        args = {}
        for c in todo:
            d, reuse = c.to_dict(), None
            if keys[c.case_id] is None and c.case_id in index:
                reuse = {"key": index.key_of(c.case_id), "digests": incremental.known_digests(d, digests)}
            args[c.case_id] = (d, plan_dict, str(self.staging), keys[c.case_id], phash, reuse)
        units = _units(cases, args, plan.group_cases)

        def item(unit: list[str], whole: bool) -> tuple:
            return ([args[cid] for cid in unit],
                    [incremental.known_digests(args[cid][0], digests) for cid in unit], whole)

        def note(res: dict) -> None:  # a failed task's cases are logged once their fate is known
            self.runlog.events("case", [{"case_id": case.get("case_id"), "ok": case.get("ok")}
                                        for case in res.get("cases", [])])
            self._shift.add(res.get("cases", []))

        results = map_tasks(process_cases, [item(unit, whole) for unit, whole in units],
                            client=client, retries=self.cfg.retries, progress=self.cfg.progress,
                            on_result=note, cost=[float(len(u)) for u, _ in units],
                            units=[len(u) for u, _ in units])
        done = [(unit, res) for (unit, _), res in zip(units, results)]
        # A task of several cases that failed as a whole (its worker died: one case crashed it or
        # outgrew the memory limit) runs again one case per task, so only the culprit fails.
        whole_failures = [unit for unit, res in done if "cases" not in res and len(unit) > 1]
        if whole_failures:
            log.warning("%d tasks of several cases failed as a whole; preparing their %d cases one "
                        "by one", len(whole_failures), sum(map(len, whole_failures)))
            singles = [[cid] for unit in whole_failures for cid in unit]
            again = map_tasks(process_cases, [item(one, False) for one in singles], client=client,
                              retries=self.cfg.retries, progress=False, on_result=note)
            done = [(u, r) for u, r in done if "cases" in r or len(u) == 1] + list(zip(singles, again))
        failed = [{"case_id": cid, "ok": False} for unit, res in done if "cases" not in res
                  for cid in unit]
        if failed:
            self.runlog.events("case", failed)
        by_id, shared = {}, {}
        for unit, res in done:  # a failed task: its error for each case
            for cid, case in zip(unit, res["cases"] if "cases" in res else
                                 [{**res, "case_id": cid} for cid in unit]):
                by_id[cid] = case
                frag = case.get("fragment")
                if frag:  # one copy of a group's path and shard sizes for all its cases
                    frag.update(shared.setdefault(frag["key"], {k: frag[k] for k in
                                                                ("path", "sizes", "sep")}))
        self.runlog.event("cases_done", seconds=round(time.perf_counter() - self.t0, 3))
        return [by_id[c.case_id] for c in todo]

    def _check_convention(self, outcomes: list[dict]) -> None:
        """Refuse (ConfigError, exit 2, nothing published) when most new cases contradict the label map.

        The workers count, per processed case, which classes touch in-plane
        (:func:`cmrprep.anatomy.contact_counts` on the cropped labels); the
        verdict is :func:`cmrprep.anatomy.check_convention`.  A minority of
        contradicting cases is a warning naming them; a map without RV, MYO
        and LV skips the check with a logged note.
        """
        from cmrprep.anatomy import check_convention

        contacts = {r["case_id"]: r["contacts"] for r in outcomes if r.get("ok") and r.get("contacts")}
        if not contacts and all(r in self.label_map.roles() for r in ("RV", "MYO", "LV")):
            return  # nothing new to judge (cases reused from the store were judged when built)
        verdict = check_convention(contacts, self.label_map)
        self.result.label_convention = verdict.to_dict()
        self.runlog.event("label_convention", **verdict.to_dict())
        if verdict.severity == "error":
            incremental.clear_staging(self.staging)  # computed under the wrong map: never reuse
            raise ConfigError(f"{verdict.message}. Nothing was built.")
        if verdict.severity == "warning":
            log.warning("%s", verdict.message)
            self.result.warnings.extend(
                Problem(cid, None, "label_convention", verdict.message, "warning").to_dict()
                for cid in verdict.contradicting)
        else:
            log.info("%s", verdict.message)

    def _learn(self, outcomes: list[dict], keys: dict, digests: dict, index) -> None:
        """Keys and input digests computed by the workers, kept for this and later builds."""
        for res in outcomes:
            if not res.get("ok"):
                continue
            keys[res["case_id"]] = res["key"]
            for f, entry in res.get("digests", {}).items():
                digests[f] = entry[-1]
                index.record(f, entry)
        index.save()

    def _entries(self, cases: list[CaseSpec], keys: dict, digests: dict, done: dict,
                 staged: dict, index: incremental.StoreIndex) -> list[dict[str, Any]]:
        """Per usable case, in store order: key, where its data is, and its summary."""
        old = _OldSlices(index)
        entries = []
        for case in cases:
            cid = case.case_id
            base = {"case_id": cid, "key": keys[cid], "patient": case.patient_id}
            if cid in done or cid in staged:
                src = done.get(cid) or staged[cid]
                entry = {**base, "source": "fragment" if src.get("fragment") else "staged",
                         **{k: src[k] for k in SUMMARY_FIELDS}, "fragment": src.get("fragment")}
                if entry["source"] == "staged":  # its record is written at publishing
                    entry["hashes"] = incremental.known_digests(case.to_dict(), digests)
                if cid not in self._shift.case_ids:  # staged by an interrupted build
                    self._shift.add([{"case_id": cid, "ok": True,
                                      "fingerprint_json": src.get("fingerprint_json"),
                                      "fingerprint": src.get("fingerprint")}])
                entries.append(entry)
            else:
                entries.append({**base, "source": "store", **old.summary(cid)})
        return entries

    def _publish(self, entries, plan: Plan, build_key: str, current: Path | None,
                 index: incremental.StoreIndex, client) -> None:
        """Write a new store version (groups as tasks on the cluster) and publish it."""
        from pipelines.build import store

        stats = store.dataset_statistics(entries, plan)
        tmp = outdir.new_version_dir(self.out, build_key[:12])

        def run_tasks(func, items, cost):
            return map_tasks(func, items, client=client, retries=1, desc="groups", progress=False,
                             cost=cost)

        previous = None if index.unreadable else current  # nothing can be reused from it
        counts = store.write_version(tmp, previous, self.staging, entries, plan, stats, build_key,
                                     run_tasks, old_groups={g[0]: g for g in index.groups
                                                            if g[0] not in self._damaged_groups})
        final = outdir.publish(self.out, tmp, build_key[:12] + "-" + uuid.uuid4().hex[:6])
        self.result.published = True
        log.info("published %s (%d slices from %d cases; %d of %d groups rewritten)", final.name,
                 self.result.n_slices, len(entries), counts["groups_written"], counts["groups"])
        self.runlog.event("published", seconds=round(time.perf_counter() - self.t0, 3), **counts)

    def _clear_staging(self, client) -> None:
        """Delete the staged cases (the published version holds them), on the cluster.

        Unlinking a staged case frees its blocks in the kernel (0.1-0.4 ms each,
        more while the file is still being written back): done serially here it
        cost 0.15-0.6 s of this process's CPU in a 1,600-case build, growing with
        the dataset; the workers delete in parallel.
        """
        files = incremental.staged_files(self.staging)
        batches = [(files[i:i + _UNLINK_BATCH],) for i in range(0, len(files), _UNLINK_BATCH)]
        map_tasks(incremental.remove_files, batches, client=client, retries=1,
                  desc="staging", progress=False, batch=1)

    def _report(self, plan: Plan) -> None:
        from pipelines.build.report import render_build_report

        try:
            render_build_report(self.out, self.result, plan)
        except Exception as exc:  # noqa: BLE001 - the store is published and fine; keep going
            log.warning("QC report failed (%s: %s); the store is published, the previous report kept",
                        type(exc).__name__, exc)

    def _fingerprint(self, entries: list[dict[str, Any]], plan: Plan, build_key: str,
                     base_key: str | None, old_ids: set[str]) -> None:
        """``OUT/fingerprint.json``: the dataset's acquisition ranges, updated for what changed.

        It holds ``shift_reference`` (:func:`cmrprep.shift.summarize` of every
        frame's shift features: the ranges a model trained on this store compares
        new inputs with, copied into the training run), ``target_spacing``,
        ``n_cases`` and the ``build_key`` of the store version it describes.  Each
        case's own fingerprint (spacing, shape, intensity percentiles, class
        voxel counts, shift features) is in its store record
        (:func:`pipelines.build.store.read_records`), not here: this file stays
        the same size however many cases the store holds.

        A first build (or a full rebuild) uses the reference folded from its
        workers' results as they arrived and from the cases an interrupted
        build had staged (:class:`_ShiftFold`).  When the run
        only added cases to the version the file describes, that reference of
        the new cases is merged into the file's (:func:`cmrprep.shift.merge`,
        work proportional to the new cases); after a removal, a changed case
        or without a valid file, it is summarized again from every record of
        the published version, read one group at a time.
        """
        from cmrprep.shift import merge, summarize

        path = self.out / "fingerprint.json"
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict):
            previous = {}
        known = isinstance(previous.get("shift_reference"), dict)
        if known and previous.get("build_key") == build_key:
            return  # nothing changed since it was written
        new = [e for e in entries if e["source"] != "store"]
        additions_only = (known and base_key is not None and previous.get("build_key") == base_key
                          and not self.result.full_rebuild and not self.result.repaired
                          and bool(old_ids)
                          # every stored case is still there, and each one processed now is new
                          and len(entries) == len(old_ids) + len(new)
                          and not any(e["case_id"] in old_ids for e in new))
        folded = self._shift  # exactly the new cases, unless one had no fingerprint
        if (folded.case_ids == {e["case_id"] for e in new}
                and (additions_only or len(new) == len(entries))):
            reference = folded.reference or summarize([])
            if additions_only:
                reference = merge(previous["shift_reference"], reference)
        else:  # a removal or a changed case: every case's record, read one group at a time
            from pipelines.build.store import iter_records

            reference = summarize(f for r in iter_records(self.out / "store.zarr")
                                  for f in _shift_frames(r.get("fingerprint")))
        _write_json(path, {"build_key": build_key, "n_cases": len(entries),
                           "shift_reference": reference, "target_spacing": plan.target_spacing,
                           "per_case": "each case's fingerprint is in its store record "
                                       "(pipelines.build.store.read_records)"})


class _ShiftFold:
    """The shift reference of the cases processed in this run, folded in as results arrive.

    Each case's fingerprint (~1 KB of JSON) is read once, when its task's result
    comes back, and dropped: the client keeps one reference and the ids folded
    into it, not every new case's fingerprint until the end of the run.  The
    fold is exact (:func:`cmrprep.shift.merge`), so it equals summarizing every
    frame at the end.

    Examples
    --------
    >>> fold = _ShiftFold()
    >>> fold.add([{"case_id": "a", "ok": True,
    ...            "fingerprint_json": '[{"shift": {"inplane_mm": 1.5}}]'},
    ...           {"case_id": "b", "ok": False}])
    >>> fold.reference, fold.case_ids
    ({'n_frames': 1, 'inplane_mm': [1.5, 1.5]}, {'a'})
    """

    def __init__(self) -> None:
        self.reference: dict[str, Any] | None = None
        self.case_ids: set[str] = set()

    def add(self, results: list[dict[str, Any]]) -> None:
        """Fold the fingerprints of ``results`` (case results of one task) and drop them.

        A result carries its fingerprint as JSON text (``fingerprint_json``, from a
        worker) or parsed (``fingerprint``, a case staged by an interrupted build).
        """
        from cmrprep.shift import merge, summarize

        frames, ids = [], []
        for res in results:
            text = res.pop("fingerprint_json", None)
            fingerprint = json.loads(text) if text is not None else res.get("fingerprint")
            if res.get("ok") and fingerprint is not None:
                frames.extend(_shift_frames(fingerprint))
                ids.append(res["case_id"])
        if ids:
            part = summarize(frames)
            self.reference = part if self.reference is None else merge(self.reference, part)
            self.case_ids.update(ids)


def _shift_frames(fingerprint: Any) -> list[dict[str, Any]]:
    """The shift features of a case's fingerprint (a list of frames, or one frame)."""
    frames = fingerprint if isinstance(fingerprint, list) else [fingerprint]
    return [f["shift"] for f in frames if isinstance(f, dict) and f.get("shift")]


def _units(cases: list[CaseSpec], todo: dict[str, tuple], mean_cases: int
           ) -> list[tuple[list[str], bool]]:
    """Tasks of the processing step: ``(case ids, whole group)``, in store order.

    Store groups (:func:`pipelines.build.store.group_members`, over every case)
    whose cases are all to be processed go whole, unless one is a stored case
    whose files were only touched (it may turn out unchanged: it carries a
    ``reuse`` argument); every other case to process goes alone.
    """
    from pipelines.build.store import group_members

    units = []
    for members in group_members([c.case_id for c in cases], mean_cases):
        ids = [cases[i].case_id for i in members]
        if all(cid in todo and todo[cid][5] is None for cid in ids):
            units.append((ids, True))
        else:
            units.extend(([cid], False) for cid in ids if cid in todo)
    return units


def _build_key(phash: str, keys: list[str]) -> str:
    return incremental.plan_hash({"plan": phash, "keys": keys})


def _quarantine_records(outcomes: list[dict], todo: list[CaseSpec]) -> list[dict]:
    recs = []
    for case, res in zip(todo, outcomes):
        if res.get("ok"):
            continue
        if "problem" in res:
            recs.append(res["problem"])
        elif str(res.get("exception", "")).startswith("KilledWorker"):
            recs.append(Problem(case.case_id, case.frames[0].image, "processing",
                                "the worker process preparing this case died each time it was "
                                "tried (a crash in native code, or more memory than the worker's "
                                "limit); the other cases are built. Check the case's files, or "
                                "raise --memory-limit").to_dict())
        else:
            recs.append(Problem(case.case_id, case.frames[0].image, "processing",
                                f"task failed after retries: {res.get('exception')}").to_dict())
    return recs


#: Staged files deleted by one cleanup task (:meth:`_Build._clear_staging`).
_UNLINK_BATCH = 256



class _OldSlices:
    """Summaries of the cases the published version holds, from its small arrays (read once)."""

    def __init__(self, index: incremental.StoreIndex) -> None:
        self.index = index
        self._arrays: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._arrays is None:
            import zarr

            root = zarr.open_group(str(self.index.version), mode="r")
            self._arrays = {k: root[k][...] for k in ("slice_index", "phase", "frame_index",
                                                      "class_counts")}
        return self._arrays

    def summary(self, case_id: str) -> dict[str, Any]:
        a, row = self._load(), self.index.table[self.index.row(case_id)]
        first, n = int(row[0]), int(row[1])
        sl = slice(first, first + n)
        frames = a["frame_index"][sl]
        table = np.column_stack([a["slice_index"][sl], a["phase"][sl], frames - frames.min(),
                                 a["class_counts"][sl]]).astype(np.int32)  # tasks.SLICE_COLUMNS
        return {"n_slices": n, "n_frames": int(row[3]), "class_counts_raw": [int(v) for v in row[4:]],
                "slices": table,
                "warnings": self.index.warnings.get(case_id, []),
                "old_first_slice": first, "old_group": self.index.groups[int(row[2])][0]}


def _current_key(current: Path | None) -> str | None:
    if current is None:
        return None
    try:
        return json.loads((current / "zarr.json").read_text())["attributes"].get("build_key")
    except (OSError, ValueError, KeyError):
        return None


def _nothing_usable(quarantined: list[dict[str, Any]], raw: Path) -> str:
    if not quarantined:
        return (f"no case found in {raw}: check the folder (an unmounted share?) and --layout; "
                "nothing was changed")
    lines = [f"  {q['case_id']}: {q.get('check')}: {q.get('message')} [{q.get('file')}]"
             for q in quarantined[:20]]
    more = f"\n  ... and {len(quarantined) - 20} more" if len(quarantined) > 20 else ""
    return (f"no usable case in {raw}: all {len(quarantined)} were quarantined; nothing was "
            "published:\n" + "\n".join(lines) + more)


def _write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Atomic JSON file; ``indent=None`` for the large ones (the C encoder, ~10x faster)."""
    incremental.atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")
