"""QC report of a build: montage, class-frequency plots and summaries in ``OUT/report``.

The report is rendered by :func:`report_task` from plain data gathered by
:func:`report_inputs` (the per-case cache, not the store: the build renders it
in a thread while the workers write the store shards) into a staging folder;
:func:`install_report` moves it into place once the store version it
describes is published.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cmrprep.plan import Plan
from pipelines import cache as cache_mod

log = logging.getLogger(__name__)

N_MONTAGE = 24


def report_inputs(cache_dir: Path, metas: list[dict[str, Any]], stats: dict[str, Any],
                  result: Any, plan: Plan) -> dict[str, Any]:
    """Everything :func:`report_task` needs, read from the per-case cache (no store access).

    ``result`` is the :class:`~pipelines.build.BuildResult` so far (counts,
    quarantined cases, warnings).
    """
    from pipelines.report import montage_indices

    sizes = np.array([m["n_slices"] for m in metas], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    picked = montage_indices(int(offsets[-1]), N_MONTAGE, plan.seed)
    images: dict[int, np.ndarray] = {}
    labels: dict[int, np.ndarray] = {}
    cases = np.searchsorted(offsets, picked, side="right") - 1
    for case_no in np.unique(cases):
        z = cache_mod.read_arrays(cache_dir, metas[case_no]["case_id"], ("images", "labels"))
        for i in picked[cases == case_no]:
            images[int(i)] = z["images"][int(i - offsets[case_no])]
            labels[int(i)] = z["labels"][int(i - offsets[case_no])]
    summary = {
        "plan": plan.to_dict(),
        "class_weight_scheme": plan.weight_scheme,
        "class_weights_all": stats["class_weights_all"],
        "class_counts_raw": stats["class_counts_raw"],
        "class_counts": stats["class_counts"],
        "expected_class_share": stats["expected"],
        "cases": result.n_cases, "slices": result.n_slices,
        "processed": len(result.processed), "reused": len(result.reused),
    }
    return {"images": images, "labels": labels,
            "slice_counts_raw": np.asarray(stats["class_counts_raw"]),
            "slice_counts": np.asarray(stats["slice_counts"]),
            "weights": np.asarray(stats["sampling_weights"]),
            "summary": summary, "quarantined": list(result.quarantined),
            "warnings": list(result.warnings), "seed": int(plan.seed), "n_montage": N_MONTAGE}


def report_task(report_dir: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Write the report files into ``report_dir`` (see :func:`pipelines.report.write_report`)."""
    from pipelines.report import write_report

    paths = write_report(report_dir, **inputs)
    return {"ok": True, "paths": {k: str(v) for k, v in paths.items()}}


def staging_dir(out: Path) -> Path:
    """A fresh folder to render the report into before it is installed."""
    tmp = out / f".report-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def install_report(out: Path, staged: Path) -> Path:
    """Replace ``out/report`` with the staged report folder."""
    final = out / "report"
    old = out / f".report-old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale(out: Path) -> None:
    """Delete report staging folders left by a killed build."""
    for p in list(out.glob(".report-tmp-*")) + list(out.glob(".report-old-*")):
        shutil.rmtree(p, ignore_errors=True)
