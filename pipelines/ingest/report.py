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

from cmrprep.anatomy import check_convention
from cmrprep.cases import CaseSpec, Problem
from cmrprep.labels import ACDC, LabelMap
from cmrprep.plan import ConfigError
from pipelines.exitcodes import EXIT_CONFIG, EXIT_OK, EXIT_QUARANTINE
from pipelines.ingest.options import DiscoveryOptions
from pipelines.ingest.validate import inspect_case

__all__ = ["IngestReport", "ingest"]

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """Outcome of :func:`ingest`.

    ``cases`` are the accepted (non-quarantined) case specs, sorted by id;
    ``quarantined`` are the errors, ``warnings`` the non-quarantining findings;
    ``convention`` is the dataset's label-convention verdict
    (:class:`cmrprep.anatomy.ConventionCheck` as a dict).
    """

    layout: str
    n_cases: int
    cases: list[CaseSpec] = field(default_factory=list)
    quarantined: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    label_map: LabelMap = ACDC
    convention: dict[str, Any] = field(default_factory=dict)
    #: Dataset-shift warnings against a training reference (:mod:`cmrprep.shift`); warnings only.
    shift: list[dict[str, Any]] = field(default_factory=list)

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
        """0 every case passed; 3 some were quarantined; 2 no usable case, or the labels
        contradict the label map (``build`` would refuse)."""
        if self.convention.get("severity") == "error" or not self.cases:
            return EXIT_CONFIG
        return EXIT_QUARANTINE if self.quarantined else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        """The machine-readable report written by the CLI."""
        def brief(p: Problem) -> dict[str, Any]:
            return {"case_id": p.case_id, "file": p.file, "check": p.check, "message": p.message}
        return {"layout": self.layout, "n_cases": self.n_cases, "ok": self.ok,
                "classes": list(self.label_map.classes), "label_map": self.label_map.spec(),
                "label_convention": self.convention, "shift": self.shift,
                "patients": {c.case_id: [f.phase for f in c.frames] for c in self.cases},
                "quarantined": [brief(p) for p in self.quarantined],
                "quarantined_ids": self.quarantined_ids,
                "warnings": [brief(p) for p in self.warnings]}

    def summary(self) -> str:
        """One human-readable paragraph."""
        lines = [f"{self.layout}: {self.n_cases} cases, {len(self.ok)} ok, "
                 f"{len(self.quarantined_ids)} quarantined, {len(self.warnings)} warnings"]
        lines.insert(1, f"  classes {', '.join(self.label_map.classes)} (label map "
                        f"'{self.label_map.spec()}')")
        lines += [f"  QUARANTINED {p}" for p in self.quarantined]
        if self.convention.get("severity") in ("error", "warning"):
            lines.append(f"  LABEL CONVENTION {self.convention['severity'].upper()}: "
                         f"{self.convention['message']}")
        lines += [f"  SHIFT {w['message']}" for w in self.shift]
        if not self.cases:
            lines.append("  no usable case: nothing could be built from this input")
        return "\n".join(lines)


def _validate_all(cases: list[CaseSpec], workers: int) -> list[tuple[list[Problem], Any]]:
    """``inspect_case`` over all cases, in order; threads when ``workers > 1``."""
    if workers <= 1 or len(cases) <= 1:
        return [inspect_case(c) for c in cases]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # zlib/numpy release the GIL
        return list(pool.map(inspect_case, cases))


def load_reference(path: str | Path) -> dict[str, Any]:
    """The shift reference of a run folder, a build folder, or one of their JSON files."""
    p = Path(path)
    candidates = [p] if p.is_file() else [p / "training_fingerprint.json", p / "fingerprint.json"]
    for c in candidates:
        if c.is_file():
            try:
                data = json.loads(c.read_text())
            except ValueError as exc:
                raise ConfigError(f"--reference {c} is not JSON: {exc}") from None
            ref = data.get("shift_reference", data) if c.name == "fingerprint.json" else data
            if not isinstance(ref, dict) or "n_frames" not in ref:
                raise ConfigError(f"--reference {c} has no shift reference; rebuild the training store "
                                  "with this cmrprep (its fingerprint.json gains shift_reference)")
            return ref
    raise ConfigError(f"--reference {p}: no training_fingerprint.json (a training run) or "
                      "fingerprint.json (a build output) there")


def ingest(root: str | Path, options: DiscoveryOptions | str | None = None, *, workers: int = 1,
           report: str | Path | None = None, reference: str | Path | None = None) -> IngestReport:
    """Discover and validate every case under ``root``, and check the labels' convention.

    Parameters
    ----------
    root : str or Path
        Dataset folder or one image.
    options : DiscoveryOptions or str, optional
        How to read the dataset (the same options as ``build``); a string is a layout.
    workers : int
        Cases validated concurrently (threads); the result does not depend on it.
    report : str or Path, optional
        Where to write the JSON report (:meth:`IngestReport.to_dict`).
    reference : str or Path, optional
        A training run folder (its ``training_fingerprint.json``), a build output
        folder (its ``fingerprint.json``) or either file: the dataset's acquisition
        is compared with it and every feature outside the training range is a
        named warning (``shift``; :mod:`cmrprep.shift`).

    Returns
    -------
    IngestReport

    Raises
    ------
    ConfigError
        From :func:`discover` (missing root, unknown layout, ...).
    """
    if not isinstance(options, DiscoveryOptions):
        options = DiscoveryOptions(layout=options)
    found = options.discover(root)
    errors = [p for p in found.problems if p.severity == "error"]
    warnings = [p for p in found.problems if p.severity != "error"]
    bad_ids = {p.case_id for p in errors}
    ref = load_reference(reference) if reference is not None else None
    accepted, contacts, features = [], {}, {}
    for case, (problems, pairs, feats) in zip(found.cases, _validate_all(found.cases, workers)):
        if feats:
            features[case.case_id] = feats
        errors += [p for p in problems if p.severity == "error"]
        warnings += [p for p in problems if p.severity != "error"]
        if any(p.severity == "error" for p in problems) or case.case_id in bad_ids:
            continue
        accepted.append(case)
        if pairs is not None:
            contacts[case.case_id] = pairs
    n_cases = len({c.case_id for c in found.cases} | bad_ids)
    by_case = (lambda p: p.case_id)  # stable: keeps frame order within a case
    convention = check_convention(contacts, found.label_map) if contacts else None
    result = IngestReport(found.layout, n_cases, accepted, sorted(errors, key=by_case),
                          sorted(warnings, key=by_case), found.label_map,
                          convention.to_dict() if convention else {})
    if ref is not None:
        from cmrprep.shift import compare

        result.shift = compare(ref, features)
        for w in result.shift:
            log.warning("dataset shift: %s (%s)", w["message"], w["code"])
    if convention is not None:
        (log.error if convention.severity == "error" else
         log.warning if convention.severity == "warning" else log.info)("%s", convention.message)
    if report is not None:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    log.info("%s", result.summary().splitlines()[0])
    return result
