"""Reduce step of the build: cached cases -> dataset statistics -> one store version.

Cases are assembled in sorted ``case_id`` order, so the store does not depend
on which worker finished first.  Images are streamed case by case and written
one whole shard at a time (memory stays flat in the number of cases).
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
from pathlib import Path
from typing import Any, Callable

import numpy as np

import cmrprep
from cmrprep import sampling as sampling_mod
from cmrprep import stats as stats_mod
from cmrprep import weights as weights_mod
from cmrprep.cases import CLASSES
from cmrprep.plan import Plan
from pipelines import cache as cache_mod
from pipelines import store as store_mod

log = logging.getLogger(__name__)


def dataset_statistics(metas: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """Class counts, class weights (all schemes) and sampling weights from cached metadata."""
    counts = _slice_counts(metas)
    raw = np.array([m["class_counts_raw"] for m in metas], dtype=np.int64).reshape(-1, 4)
    weights_all = weights_mod.compute_all(counts, plan.weight_scheme, beta=plan.effective_number_beta)
    w = sampling_mod.sampling_weights(counts, foreground_share=plan.foreground_share,
                                      balance_classes=plan.balance_classes)
    return {
        "slice_counts": counts,
        "class_counts": counts.sum(axis=0).tolist(),
        "class_counts_raw": raw.sum(axis=0).tolist(),
        "summary_after_crop": stats_mod.summarize(counts),
        "class_weights_all": weights_all["weights"],
        "class_weights": weights_all["weights"][plan.weight_scheme],
        "sampling_weights": w,
        "expected": sampling_mod.expected_class_share(counts, w),
        "natural": sampling_mod.expected_class_share(counts, np.full(len(w), 1.0 / max(len(w), 1))),
    }


def _slice_counts(metas: list[dict[str, Any]]) -> np.ndarray:
    rows = [np.asarray(m["class_counts"], dtype=np.int64).reshape(-1, 4) for m in metas]
    return np.concatenate(rows) if rows else np.zeros((0, 4), dtype=np.int64)


def _slice_arrays(cache_dir: Path, metas: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The per-slice arrays of the store (everything but images and labels), in store order."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*store_mod.SLICE_ARRAYS, "class_counts")}
    frame_offset = 0
    for case_no, meta in enumerate(metas):
        z = cache_mod.read_arrays(cache_dir, meta["case_id"],
                                  ("slice_index", "phase", "class_counts", "frame_local"))
        parts["slice_index"].append(z["slice_index"])
        parts["phase"].append(z["phase"])
        parts["class_counts"].append(z["class_counts"])
        parts["frame_index"].append((z["frame_local"] + frame_offset).astype(np.int32))
        parts["case_index"].append(np.full(len(z["slice_index"]), case_no, dtype=np.int32))
        frame_offset += len(meta["frames"])
    return {k: np.concatenate(v) for k, v in parts.items() if v}


def shard_task(store_path: str, cache_dir: str, pieces: list[tuple[str, int, int]],
               start: int) -> dict[str, Any]:
    """Dask task: fill one shard of ``images``/``labels`` from cached cases.

    ``pieces`` are ``(case_id, lo, hi)`` slice ranges (see :func:`pipelines.store.shard_plan`).
    """
    images, labels = [], []
    for case_id, lo, hi in pieces:
        z = cache_mod.read_arrays(cache_dir, case_id, ("images", "labels"))
        images.append(z["images"][lo:hi])
        labels.append(z["labels"][lo:hi])
    store_mod.write_shard(store_path, start, np.concatenate(images), np.concatenate(labels))
    return {"ok": True, "start": start, "n": int(sum(len(a) for a in images))}


def _case_records(metas: list[dict[str, Any]], digests: dict[str, str]) -> tuple[list, list]:
    cases, frames = [], []
    for meta in metas:
        case = meta["case"]
        first = len(frames)
        frames.extend(meta["frames"])
        files = cache_mod.case_files(case)
        cases.append({"case_id": meta["case_id"], "layout": case["layout"],
                      "source_files": files, "cine": case.get("cine"),
                      "frames": list(range(first, len(frames))),
                      "n_slices": meta["n_slices"]})
    return cases, frames


def provenance(digests: dict[str, str], plan: Plan, build_id: str) -> dict[str, Any]:
    """Input hashes, plan, package versions and time of a build."""
    from importlib.metadata import PackageNotFoundError, version

    def _version(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    versions = {"cmrprep": cmrprep.__version__, "numpy": np.__version__}
    versions.update({d: _version(d) for d in ("zarr", "dask", "nibabel", "SimpleITK")})
    return {"build_id": build_id, "input_hashes": dict(sorted(digests.items())),
            "plan": plan.to_dict(),
            "versions": {**versions, "python": platform.python_version()},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def write_version(path: Path, cache_dir: Path, metas: list[dict[str, Any]], plan: Plan,
                  stats: dict[str, Any], digests: dict[str, str], build_id: str,
                  start_tasks: Callable[[Callable[..., dict], list[tuple]],
                                        Callable[[], list[dict]]] | None = None) -> None:
    """Write a complete store version at ``path`` (a fresh directory).

    Shards of ``images``/``labels`` are independent files, so they are written
    by :func:`shard_task` calls started with ``start_tasks(func, items)``,
    which returns a function collecting their results (the build passes its
    Dask cluster; default: serially in this process); meanwhile this process
    writes the per-slice arrays and attributes.
    """
    n = int(sum(m["n_slices"] for m in metas))
    root = store_mod.create_store(path, n_slices=n, slice_shape=tuple(plan.crop_shape),
                                  image_dtype=plan.store_dtype, shard_slices=plan.shard_slices)
    shard = root["images"].shards[0]
    items = [(str(path), str(cache_dir), [(metas[c]["case_id"], lo, hi) for c, lo, hi in pieces], start)
             for start, pieces in store_mod.shard_plan([m["n_slices"] for m in metas], shard)]
    if start_tasks is None:
        def start_tasks(func, its):
            return lambda: [func(*it) for it in its]
    collect = start_tasks(shard_task, items)
    for key, values in _slice_arrays(cache_dir, metas).items():
        root[key][:] = values
    root["weights"][:] = stats["sampling_weights"]
    if plan.replicate:
        idx = sampling_mod.replicate_indices(stats["sampling_weights"], seed=plan.seed)
        root.create_array("replicated_index", data=np.asarray(idx, dtype=np.int64),
                          chunks=(max(len(idx), 1),))
    cases, frames = _case_records(metas, digests)
    root.update_attributes(_attributes(plan, stats, cases, frames, digests, build_id))  # one write
    results = collect()
    failed = [(it[3], r) for it, r in zip(items, results) if not r.get("ok")]
    if failed:
        start, res = failed[0]
        raise RuntimeError(f"writing the store shard at slice {start} failed: {res.get('exception')} "
                           f"({len(failed)} of {len(items)} shards failed)")
    written = sum(r["n"] for r in results)
    if written != n:
        raise RuntimeError(f"store assembly wrote {written} slices, expected {n}")


def _attributes(plan: Plan, stats: dict[str, Any], cases: list, frames: list,
                digests: dict[str, str], build_id: str) -> dict[str, Any]:
    return {
        "format_version": store_mod.FORMAT_VERSION,
        "build_key": build_id,
        "classes": list(CLASSES),
        "spacing": [plan.target_spacing, plan.target_spacing],
        "class_counts": stats["class_counts"],
        "class_counts_raw": stats["class_counts_raw"],
        "class_weights": stats["class_weights"],
        "class_weights_all": stats["class_weights_all"],
        "class_weight_scheme": plan.weight_scheme,
        "class_statistics": stats["summary_after_crop"],
        "sampling": {"foreground_share": plan.foreground_share,
                     "balance_classes": plan.balance_classes,
                     "expected_class_share": stats["expected"],
                     "natural_class_share": stats["natural"]},
        "cases": cases,
        "frames": frames,
        "plan": plan.to_dict(),
        "provenance": provenance(digests, plan, build_id),
    }
