"""Tasks run on the Dask workers: one case (read, validate, preprocess, stage), one case group of the store.

The tasks take and return plain JSON-like dicts (so they cross process
boundaries without pickled custom objects).  A case task stages its arrays and
records (:func:`pipelines.build.incremental.write_staged`) and returns the
small per-case summary the client needs (slice counts, per-slice class counts,
fingerprint); a group task writes the shards of one case group of the new
store version (:func:`pipelines.build.store.write_group`).  Data problems (:class:`~cmrprep.cases.CaseError`) come back
as a quarantine record; ``OSError`` propagates so Dask can retry transient
I/O failures.
"""

from __future__ import annotations

import json
import logging
import traceback
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from cmrprep.cases import CaseError, CaseSpec, FrameSpec, Problem, phase_code
from cmrprep.plan import Plan
from pipelines.build import incremental

log = logging.getLogger(__name__)


def frame_rng(seed: int, case_id: str, frame_no: int) -> np.random.Generator:
    """RNG for one frame: depends on the seed and the case, never on worker order."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(case_id.encode("utf-8", "surrogateescape")), frame_no]))


def _fingerprint(image: np.ndarray, label: np.ndarray | None, geometry,
                 intensity: dict[str, Any] | None = None,
                 label_counts: np.ndarray | None = None,
                 classes: tuple[str, ...] = ("background", "RV", "MYO", "LV")) -> dict[str, Any]:
    """Spacing, shape, intensity percentiles, class counts and shift features of one input frame.

    ``shift`` holds :func:`cmrprep.shift.frame_features`, the reference a trained
    model's new inputs are compared with.

    The percentiles come from the same deterministic strided subsample as the
    normalisation (``intensity``, the preprocessing record's statistics) when
    those were taken at 0.5/99.5, so the volume is not scanned twice.
    """
    from cmrprep.normalize import intensity_statistics
    from cmrprep.preprocess import STAT_SAMPLES

    if intensity is None or [float(p) for p in intensity["percentiles"]] != [0.5, 99.5]:
        intensity = intensity_statistics(image, percentiles=(0.5, 99.5),
                                         max_samples=STAT_SAMPLES).to_dict()
    counts = None
    if label_counts is not None:  # counted while the labels were checked
        counts = [int(c) for c in label_counts]
    elif label is not None:
        counts = np.bincount(label.ravel(order="K")).tolist()
    from cmrprep.shift import frame_features

    percentiles = {"p0.5": float(intensity["low"]), "p50": float(intensity["median"]),
                   "p99.5": float(intensity["high"])}
    return {"spacing": list(geometry.spacing), "shape": list(geometry.shape),
            "percentiles": percentiles, "class_counts": counts, "dtype": str(image.dtype),
            "shift": frame_features(image, geometry, label, percentiles, classes)}


def _configure_process() -> None:
    """Tune a Dask worker process once: one SimpleITK thread, glibc malloc reuse.

    * The LocalCluster runs one single-threaded worker process per core; ITK's
      default thread pool (one thread per core in every process) would
      oversubscribe the cores, and the crop-sized resampling is too small to
      gain from threads anyway.
    * The Dask nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which
      also freezes glibc's mmap threshold at 128 KiB: every volume-sized array
      is then a fresh ``mmap`` (page faults, zeroing) and processing a case
      takes ~1.7x longer (measured: 8.7 s instead of 5 s for 40 cases).  Fixed
      thresholds of 64 MiB (mmap) and 256 MiB (trim) keep freed buffers for
      reuse; a worker's memory is still returned above that.

    Serial builds (``workers=0``) are left as they are.
    """
    global _CONFIGURED
    if _CONFIGURED:
        return
    _CONFIGURED = True
    try:
        from distributed import get_worker
        get_worker()
    except (ImportError, ValueError):
        return
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to undo
        pass


_CONFIGURED = False


def _frame_block(case: CaseSpec, frame: FrameSpec, frame_no: int, plan: Plan):
    from cmrprep.preprocess import preprocess_frame
    from pipelines.ingest import load_frame

    loaded = load_frame(case, frame)
    prepared = preprocess_frame(loaded.image, loaded.label, loaded.geometry, plan,
                                rng=frame_rng(plan.seed, case.case_id, frame_no))
    s = prepared.images.shape[0]
    arrays = {
        "images": prepared.images, "labels": prepared.labels,
        "class_counts": prepared.class_counts, "class_counts_raw": prepared.class_counts_raw,
        "slice_index": np.arange(s, dtype=np.int32),
        "phase": np.full(s, phase_code(frame.phase), dtype=np.int8),
        "frame_local": np.full(s, frame_no, dtype=np.int32),
    }
    record = {"case_id": case.case_id, "phase": frame.phase, "image": frame.image,
              "label": frame.label, "image_frame": frame.image_frame, **prepared.record}
    fingerprint = _fingerprint(loaded.image, loaded.label, loaded.geometry,
                               prepared.record.get("intensity"), loaded.label_counts, plan.classes)
    return arrays, record, fingerprint, loaded.warnings


def select_frames(case: CaseSpec, plan: Plan) -> list[FrameSpec]:
    """Frames of a case to build: those whose phase is in ``plan.phases``, else all."""
    chosen = [f for f in case.frames if f.phase in plan.phases]
    return chosen or list(case.frames)


def process_cases(members: list[list[Any]], hashes: list[dict[str, str]],
                  fragment: bool) -> dict[str, Any]:
    """Dask task: :func:`process_case` for each of ``members`` (its arguments); with
    ``fragment``, the members being one whole store group, also write that group.

    When every member is processed, the group's shards and records are written
    from memory as a fragment (:func:`pipelines.build.store.write_fragment`)
    instead of staging each case: the cases are not written twice, and the
    store's slowest step runs while other cases are still being processed.
    Publishing then hard-links the fragment into place.  If a member is
    quarantined or unchanged, the others are staged one by one as usual.
    ``hashes`` are the input digests the client knows for each member (the
    store records them); those hashed here are added.

    Returns
    -------
    dict
        ``{"ok": True, "cases": [...]}``: one :func:`process_case` result per
        member, each with ``fragment`` (``{"key", "path", "sizes", "sep", "first"}``)
        when its group was written.
    """
    results = [process_case(*args, stage=not fragment) for args in members]
    if fragment:
        held = [r.pop("_staged", None) for r in results]
        if all(h is not None for h in held):
            _write_fragment(members, hashes, results, held)
        else:
            for args, h in zip(members, held):
                if h is not None:
                    incremental.write_staged(Path(args[2]), h[1]["key"], *h)
    return {"ok": True, "cases": results}


def _write_fragment(members, hashes, results, held) -> None:
    from pipelines.build.store import case_record, write_fragment

    plan = Plan.from_dict(members[0][1])
    parts = []
    for args, known, res, (arrays, meta) in zip(members, hashes, results, held):
        digests = {**known, **{f: v[-1] for f, v in res.get("digests", {}).items()}}
        parts.append({"arrays": arrays,
                      "record": case_record(meta, incremental.known_digests(args[0], digests)),
                      "summary": {k: res[k] for k in ("case_id", "key", "fingerprint_json",
                                                      *SUMMARY_FIELDS)}})
    info = write_fragment(Path(members[0][2]), plan, parts)
    for res, first in zip(results, info.pop("first")):
        res["fragment"] = {**info, "first": first}


#: What the client keeps of a case besides its id, key and fingerprint (:func:`case_summary`
#: and the loading warnings).
SUMMARY_FIELDS = ("n_slices", "n_frames", "class_counts_raw", "slices", "warnings")


def process_case(case_dict: dict[str, Any], plan_dict: dict[str, Any], staging: str,
                 key: str | None, plan_hash: str | None = None,
                 reuse: dict[str, Any] | None = None, *, stage: bool = True) -> dict[str, Any]:
    """Preprocess every frame of one case and stage it for the store.

    ``key=None`` (a case whose files are new or changed) means: hash the case's
    input files here, right before reading them, and derive the key with
    ``plan_hash`` -- the build then does not read any file twice.  ``reuse``
    (``{"key", "digests"}``) is given for a case the store holds: the files
    whose digest is still known are not hashed again, and when the key comes
    out as the stored one (a touched file, same content) nothing is processed.

    Returns
    -------
    dict
        ``{"case_id", "ok": True, "key", "digests", **summary}`` (``digests``:
        ``{file: [*stamp, digest]}`` of the files hashed here; ``summary``: see
        :func:`case_summary`), ``{"case_id", "ok": True, "key", "digests",
        "unchanged": True}`` or ``{"case_id", "ok": False, "problem": {...}}``.
        With ``stage=False`` the case is not staged; its arrays and record stay
        in this process, under ``_staged`` (for :func:`process_cases`).
    """
    _configure_process()
    case = CaseSpec.from_dict(case_dict)
    plan = Plan.from_dict(plan_dict)
    try:
        digests = {}
        if key is None:
            known = (reuse or {}).get("digests") or {}
            key, digests = _hash_inputs(case_dict, case.case_id, plan_hash, known)
            if reuse and key == reuse.get("key"):
                return {"case_id": case.case_id, "ok": True, "key": key, "digests": digests,
                        "unchanged": True}
        return {**_process(case, plan, Path(staging), key, stage), "digests": digests}
    except CaseError as exc:
        return {"case_id": case.case_id, "ok": False, "problem": exc.problem.to_dict()}
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad case must never take down the run
        log.debug("case %s failed:\n%s", case.case_id, traceback.format_exc())
        problem = Problem(case.case_id, case.frames[0].image if case.frames else None,
                          "processing", f"unexpected {type(exc).__name__}: {exc}")
        return {"case_id": case.case_id, "ok": False, "problem": problem.to_dict()}


def _hash_inputs(case_dict: dict[str, Any], case_id: str, plan_hash: str | None,
                 known: dict[str, str]) -> tuple[str, dict[str, list[Any]]]:
    """Cache key of a case from its input files (those not in ``known`` hashed here);
    an unreadable file is a CaseError."""
    if plan_hash is None:
        raise ValueError("process_case needs plan_hash when key is None")
    files = incremental.case_files(case_dict)
    todo = [f for f in files if f not in known]
    try:
        stamped = incremental.stamped_digests(todo)
    except OSError as exc:
        raise CaseError(Problem(case_id, str(getattr(exc, "filename", None) or files[0]), "readable",
                                f"cannot read: {exc}")) from exc
    digests = {**{f: known[f] for f in files if f in known}, **{f: v[-1] for f, v in stamped.items()}}
    return incremental.case_key(case_dict, digests, plan_hash), stamped


def _process(case: CaseSpec, plan: Plan, staging: Path, key: str, stage: bool = True) -> dict[str, Any]:
    if not case.has_labels:
        raise CaseError(Problem(case.case_id, None, "labels",
                                "case has no label files; the build needs labels "
                                "(use pipelines.predict for image-only inputs)"))
    from pipelines.ingest.validate import check_case

    errors = [p for p in check_case(case) if p.severity == "error"]
    if errors:  # what ingest would quarantine the case for, before any frame is read
        raise CaseError(errors[0])
    blocks, records, prints, warnings = [], [], [], []
    for frame_no, frame in enumerate(select_frames(case, plan)):
        arrays, record, fp, warn = _frame_block(case, frame, frame_no, plan)
        blocks.append(arrays)
        records.append(record)
        prints.append({"phase": frame.phase, **fp})
        warnings.extend(w.to_dict() for w in warn)
    merged = {k: np.concatenate([b[k] for b in blocks]) for k in incremental.STAGED_ARRAYS}
    merged["images"] = merged["images"].astype(plan.store_dtype, copy=False)  # as stored: half the bytes
    summary = case_summary(merged, len(records))
    contacts = _contacts(merged["labels"], plan)
    meta = {"case_id": case.case_id, "key": key, "case": case.to_dict(), "frames": records,
            "fingerprint": prints, "warnings": warnings,
            **{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in summary.items()}}
    # the fingerprint as JSON text: one string instead of ~70 small objects a case on the client
    result = {"case_id": case.case_id, "ok": True, "key": key,
              "fingerprint_json": json.dumps(prints, sort_keys=True),
              "warnings": warnings, "contacts": contacts, **summary}
    if stage:
        incremental.write_staged(staging, key, merged, meta)
    else:
        result["_staged"] = (merged, meta)
    return result


def _contacts(labels: np.ndarray, plan: Plan) -> list[list[int]] | None:
    """In-plane class contacts of the cropped (S, H, W) labels, for the label-convention check
    (``None`` when the classes lack RV, MYO or LV: the check does not apply)."""
    from cmrprep.anatomy import ROLES, contact_counts

    if not all(r in plan.classes for r in ROLES):
        return None
    return contact_counts(labels, (1, 2), plan.num_classes).tolist()


#: Leading columns of a summary's ``slices`` table; one column per class follows.
SLICE_COLUMNS = ("slice_index", "phase", "frame_local")


def case_summary(arrays: dict[str, np.ndarray], n_frames: int) -> dict[str, Any]:
    """What the client keeps of a case: counts and one small per-slice table, no image data.

    ``slices`` is an int32 ``(S, 3 + C)`` array: :data:`SLICE_COLUMNS`, then the
    per-slice class counts.  One array instead of four keeps the client's memory
    per case small (about 1 KB for 30 slices): at 100,000 cases the client holds
    every summary until the store is written.
    """
    table = np.column_stack([np.asarray(arrays[k], dtype=np.int32) for k in SLICE_COLUMNS]
                            + [np.asarray(arrays["class_counts"], dtype=np.int32)])
    return {"n_slices": int(arrays["images"].shape[0]), "n_frames": int(n_frames),
            "class_counts_raw": arrays["class_counts_raw"].sum(axis=0).tolist(), "slices": table}


def slice_column(summary: dict[str, Any], name: str) -> np.ndarray:
    """Column ``name`` (one of :data:`SLICE_COLUMNS`, or ``"class_counts"``: all class columns)
    of a summary's ``slices`` table (a list when it comes from a staged JSON record)."""
    table = np.asarray(summary["slices"], dtype=np.int32).reshape(int(summary["n_slices"]), -1)
    if name == "class_counts":
        return table[:, len(SLICE_COLUMNS):]
    return table[:, SLICE_COLUMNS.index(name)]


def group_task(version: str, previous: str | None, staging: str, group: dict[str, Any]) -> dict[str, Any]:
    """Dask task: put one case group into a new store version (see :func:`pipelines.build.store.write_group`)."""
    from pipelines.build.store import write_group

    return write_group(Path(version), Path(previous) if previous else None, Path(staging), group)
