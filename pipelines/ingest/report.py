"""Validate every discovered case and summarise the outcome as a JSON report.

A bad case never stops the others: each case is validated on its own and its
errors quarantine only that case.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmrprep.cases import CaseSpec, Problem
from pipelines.exitcodes import EXIT_OK, EXIT_QUARANTINE
from pipelines.ingest.layouts import discover
from pipelines.ingest.validate import validate_case

__all__ = ["IngestReport", "ingest"]

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """Outcome of :func:`ingest`.

    ``cases`` are the accepted (non-quarantined) case specs, sorted by id;
    ``quarantined`` are the errors, ``warnings`` the non-quarantining findings.
    """

    layout: str
    n_cases: int
    cases: list[CaseSpec] = field(default_factory=list)
    quarantined: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> list[str]:
        """Ids of accepted cases."""
        return [c.case_id for c in self.cases]

    @property
    def quarantined_ids(self) -> list[str]:
        """Sorted ids of quarantined cases."""
        return sorted({p.case_id for p in self.quarantined})

    @property
    def exit_code(self) -> int:
        """0 when every case passed, 3 when any was quarantined."""
        return EXIT_QUARANTINE if self.quarantined else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        """The machine-readable report written by the CLI."""
        def brief(p: Problem) -> dict[str, Any]:
            return {"case_id": p.case_id, "file": p.file, "check": p.check, "message": p.message}
        return {"layout": self.layout, "n_cases": self.n_cases, "ok": self.ok,
                "quarantined": [brief(p) for p in self.quarantined],
                "quarantined_ids": self.quarantined_ids,
                "warnings": [brief(p) for p in self.warnings]}

    def summary(self) -> str:
        """One human-readable paragraph."""
        lines = [f"{self.layout}: {self.n_cases} cases, {len(self.ok)} ok, "
                 f"{len(self.quarantined_ids)} quarantined, {len(self.warnings)} warnings"]
        lines += [f"  QUARANTINED {p}" for p in self.quarantined]
        return "\n".join(lines)


def _validate_all(cases: list[CaseSpec], workers: int) -> list[list[Problem]]:
    """``validate_case`` over all cases, in order; threads when ``workers > 1``."""
    if workers <= 1 or len(cases) <= 1:
        return [validate_case(c) for c in cases]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # zlib/numpy release the GIL
        return list(pool.map(validate_case, cases))


def ingest(root: str | Path, layout: str | None = None, *, image_glob: str | None = None,
           label_suffix: str = "_gt", label_pattern: str | None = None,
           mnms_csv: str | Path | None = None, workers: int = 1,
           report: str | Path | None = None) -> IngestReport:
    """Discover and validate every case under ``root``.

    Parameters
    ----------
    root, layout, image_glob, label_suffix, label_pattern, mnms_csv
        As for :func:`pipelines.ingest.discover`.
    workers : int
        Cases validated concurrently (threads); the result does not depend on it.
    report : str or Path, optional
        Where to write the JSON report (:meth:`IngestReport.to_dict`).

    Returns
    -------
    IngestReport

    Raises
    ------
    ConfigError
        From :func:`discover` (missing root, unknown layout, ...).
    """
    found = discover(root, layout, image_glob=image_glob, label_suffix=label_suffix,
                     label_pattern=label_pattern, mnms_csv=mnms_csv)
    errors = [p for p in found.problems if p.severity == "error"]
    warnings = [p for p in found.problems if p.severity != "error"]
    bad_ids = {p.case_id for p in errors}
    accepted = []
    for case, problems in zip(found.cases, _validate_all(found.cases, workers)):
        errors += [p for p in problems if p.severity == "error"]
        warnings += [p for p in problems if p.severity != "error"]
        if any(p.severity == "error" for p in problems) or case.case_id in bad_ids:
            continue
        accepted.append(case)
    n_cases = len({c.case_id for c in found.cases} | bad_ids)
    by_case = (lambda p: p.case_id)  # stable: keeps frame order within a case
    result = IngestReport(found.layout, n_cases, accepted, sorted(errors, key=by_case),
                          sorted(warnings, key=by_case))
    if report is not None:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    log.info("%s", result.summary().splitlines()[0])
    return result
