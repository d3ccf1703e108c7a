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
from typing import Any, Iterator

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


def _blocks(cache_dir: Path, metas: list[dict[str, Any]]) -> Iterator[dict[str, np.ndarray]]:
    frame_offset = 0
    for case_no, meta in enumerate(metas):
        arrays = cache_mod.read_arrays(cache_dir, meta["case_id"])
        s = arrays["images"].shape[0]
        yield {"images": arrays["images"], "labels": arrays["labels"],
               "class_counts": arrays["class_counts"], "slice_index": arrays["slice_index"],
               "phase": arrays["phase"],
               "case_index": np.full(s, case_no, dtype=np.int32),
               "frame_index": (arrays["frame_local"] + frame_offset).astype(np.int32)}
        frame_offset += len(meta["frames"])


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
    import dask
    import nibabel
    import SimpleITK
    import zarr

    return {"build_id": build_id, "input_hashes": dict(sorted(digests.items())),
            "plan": plan.to_dict(),
            "versions": {"cmrprep": cmrprep.__version__, "numpy": np.__version__,
                         "zarr": zarr.__version__, "dask": dask.__version__,
                         "nibabel": nibabel.__version__, "SimpleITK": SimpleITK.Version_VersionString(),
                         "python": platform.python_version()},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def write_version(path: Path, cache_dir: Path, metas: list[dict[str, Any]], plan: Plan,
                  stats: dict[str, Any], digests: dict[str, str], build_id: str) -> None:
    """Write a complete store version at ``path`` (a fresh directory)."""
    n = int(sum(m["n_slices"] for m in metas))
    root = store_mod.create_store(path, n_slices=n, slice_shape=tuple(plan.crop_shape),
                                  image_dtype=plan.store_dtype, shard_slices=plan.shard_slices)
    written = store_mod.write_slices(root, _blocks(cache_dir, metas), plan.shard_slices)
    if written != n:
        raise RuntimeError(f"store assembly wrote {written} slices, expected {n}")
    root["weights"][:] = stats["sampling_weights"]
    if plan.replicate:
        idx = sampling_mod.replicate_indices(stats["sampling_weights"], seed=plan.seed)
        root.create_array("replicated_index", data=np.asarray(idx, dtype=np.int64),
                          chunks=(max(len(idx), 1),))
    cases, frames = _case_records(metas, digests)
    root.attrs.update(_attributes(plan, stats, cases, frames, digests, build_id))


def _attributes(plan: Plan, stats: dict[str, Any], cases: list, frames: list,
                digests: dict[str, str], build_id: str) -> dict[str, Any]:
    return {
        "format_version": store_mod.FORMAT_VERSION,
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
