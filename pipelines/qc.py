"""QC report of a build: montage, class-frequency plots and summaries in ``OUT/report``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cmrprep.plan import Plan
from pipelines.report import write_report
from pipelines.store import open_store

log = logging.getLogger(__name__)


def write_build_report(out: Path, stats: dict[str, Any], result: Any, plan: Plan) -> dict[str, Path]:
    """Write the report of the store just published in ``out`` (reads only montage slices)."""
    root = open_store(out)
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
    return write_report(out / "report", images=root["images"], labels=root["labels"],
                        slice_counts_raw=np.asarray(stats["class_counts_raw"]),
                        slice_counts=stats["slice_counts"], weights=stats["sampling_weights"],
                        summary=summary, quarantined=result.quarantined, warnings=result.warnings,
                        seed=plan.seed)
