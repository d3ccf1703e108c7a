"""Planning: the dataset fingerprint's spacings -> the build plan (``OUT/plan.json``)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

from cmrprep.cases import CaseSpec
from cmrprep.plan import ConfigError, Plan

__all__ = ["MIN_CROP_MM", "resolve_plan", "header_spacing", "fingerprint"]

MIN_CROP_MM = 64.0


def resolve_plan(out: Path, headers: list[dict[str, Any]], *, plan_file: str | Path | None,
                 overrides: dict[str, Any], crop_mm: float | None,
                 read_spacings: Callable[[list[CaseSpec]], list[list[float] | None]] | None = None) -> Plan:
    """Plan from ``plan_file``, else the output folder's ``plan.json``, else derived.

    A plan once written is reused by later (incremental) builds, so a new case
    never silently changes the target spacing of the others; pass different
    options or edit ``plan.json`` to change it (this forces a full rebuild).
    ``headers`` are ``{"case", "spacing"}`` records; ``None`` spacings are
    read only when the target spacing must be derived, by
    ``read_spacings(cases)`` (the build maps :func:`header_task` over its
    cluster; ``None`` for an unreadable header, whose case the processing
    then quarantines with its reason).  Default: read here, one by one.
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
        missing = [h for h in headers if h["spacing"] is None]
        reader = read_spacings or (lambda cases: [header_task(c.to_dict())["spacing"] for c in cases])
        for h, spacing in zip(missing, reader([h["case"] for h in missing])):
            h["spacing"] = spacing
        inplane = [min(h["spacing"][:2]) for h in headers if h["spacing"] is not None]
        if not inplane:
            raise ConfigError("no readable case to derive the target spacing from; pass --spacing")
        plan = plan.updated(target_spacing=round(float(statistics.median(inplane)), 4))
    if crop_mm is not None:
        plan = plan.with_crop_mm(crop_mm).validate()
    if min(plan.crop_mm) < MIN_CROP_MM:
        raise ConfigError(f"crop of {plan.crop_mm[0]:.0f}x{plan.crop_mm[1]:.0f} mm is smaller than a "
                          f"heart (LV+RV span ~100-130 mm); use --crop-mm >= {MIN_CROP_MM:.0f}")
    return plan


def header_spacing(case: CaseSpec) -> list[float]:
    """Spacing of a case's first image from its header (raises CaseError when unreadable)."""
    from pipelines.ingest import read_header

    return list(read_header(case.frames[0].image, case_id=case.case_id).geometry.spacing)


def header_task(case_dict: dict[str, Any]) -> dict[str, Any]:
    """Spacing of a case's first image from its header, ``None`` when it cannot be read."""
    from cmrprep.cases import CaseError

    try:
        return {"ok": True, "spacing": header_spacing(CaseSpec.from_dict(case_dict))}
    except CaseError as exc:
        return {"ok": True, "spacing": None, "problem": exc.problem.to_dict()}
    except OSError as exc:
        return {"ok": True, "spacing": None,
                "problem": {"case_id": case_dict["case_id"], "file": getattr(exc, "filename", None),
                            "check": "readable", "message": f"cannot read: {exc}"}}
