"""Evaluate predictions in the original geometry: ``python -m pipelines.evaluate PRED GT``.

For every ground-truth frame found in GT (any supported layout) the matching
prediction is ``PRED/**/<image stem>_pred.nii.gz`` (what ``pipelines.predict``
writes).  Reports per case, frame and class Dice and HD95 (mm); LV and RV
end-diastolic/end-systolic volumes and ejection fraction with the error
against ground truth when ED and ES are known.  Writes ``metrics.csv``,
``clinical.csv`` and ``summary.md`` to ``--out`` (default ``PRED/evaluation``).

A prediction whose shape or affine differs from its ground truth is an error
naming both files.  Exit codes: 0 ok, 3 some frames could not be evaluated,
2 configuration error, 1 failure.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cmrprep.cases import CLASSES, CaseError, Problem
from cmrprep.metrics import ejection_fraction, per_class_metrics
from cmrprep.plan import ConfigError
from pipelines.exitcodes import EXIT_CONFIG, EXIT_OK, EXIT_QUARANTINE, help_formatter, plain_text
from pipelines.ingest.options import DiscoveryOptions, add_discovery_arguments

log = logging.getLogger("pipelines.evaluate")
AFFINE_TOL = 1e-3


def prediction_name(image_path: str, frame: int | None = None) -> str:
    """File name of the prediction for an input image (``X.nii.gz`` -> ``X_pred.nii.gz``)."""
    from pipelines.ingest.readers import volume_stem

    stem = volume_stem(image_path)
    if frame is not None:
        stem = f"{stem}_frame{frame + 1:02d}"
    return f"{stem}_pred.nii.gz"


def _index_predictions(pred: Path) -> dict[str, Path]:
    return {p.name: p for p in pred.rglob("*_pred.nii.gz")}


def _check_geometry(pred_geom, gt_geom, pred_file: Path, gt_file: str, case_id: str) -> None:
    if tuple(pred_geom.shape) != tuple(gt_geom.shape):
        raise CaseError(Problem(case_id, str(pred_file), "geometry",
                                f"prediction shape {tuple(pred_geom.shape)} differs from ground truth "
                                f"{gt_file} shape {tuple(gt_geom.shape)}"))
    diff = pred_geom.max_affine_difference(gt_geom)
    if diff > AFFINE_TOL:
        raise CaseError(Problem(case_id, str(pred_file), "geometry",
                                f"prediction affine differs from ground truth {gt_file} by up to "
                                f"{diff:.4g} mm; predictions must be written in the input geometry"))


#: g/ml, for myocardial mass.
MYOCARDIAL_DENSITY = 1.05


def evaluate_frame(case, frame, pred_file: Path, classes: tuple[str, ...] = CLASSES,
                   pred_to_gt: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Metric rows (one per foreground class of ``classes``) of one frame.

    ``pred_to_gt[k]`` is the ground-truth class index of predicted class ``k``
    (identity when ``None``).
    """
    from pipelines.ingest import load_frame, read_volume

    gt = load_frame(case, frame)
    pred, pred_geom = read_volume(pred_file, case_id=case.case_id)
    _check_geometry(pred_geom, gt.geometry, pred_file, frame.label, case.case_id)
    pred = np.rint(pred).astype(np.int64)
    if pred_to_gt is not None:
        bad = np.unique(pred[(pred < 0) | (pred >= len(pred_to_gt))])
        if bad.size:
            raise CaseError(Problem(case.case_id, str(pred_file), "prediction",
                                    f"prediction values {bad[:5].tolist()} are not classes of the run "
                                    f"(0..{len(pred_to_gt) - 1}, see predict_report.json)"))
        pred = pred_to_gt[pred]
    metrics = per_class_metrics(pred, gt.label, gt.geometry.spacing, range(1, len(classes)))
    return [{"case_id": case.case_id, "patient": case.patient_id, "phase": frame.phase,
             "class": classes[c], "prediction": str(pred_file), **m} for c, m in metrics.items()]


def _phases(d: dict, struct: str) -> tuple[str, str, str] | None:
    """``(ED phase, ES phase, how)`` of one case: declared, else the largest/smallest GT volume."""
    phases = sorted({ph for ph, _ in d})
    if "ED" in phases and "ES" in phases:
        return "ED", "ES", "declared"
    vols = {ph: d[(ph, struct)]["volume_gt_ml"] for ph in phases if (ph, struct) in d}
    if len(vols) < 2:
        return None
    ed, es = max(vols, key=vols.get), min(vols, key=vols.get)
    return (ed, es, "largest/smallest ground-truth LV volume") if ed != es else None


def clinical_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LV/RV EDV, ESV, EF and LV myocardial mass at ED (prediction, truth, error) per patient.

    ED and ES are the frames so named (ACDC, M&Ms, ``--patient-pattern`` with
    ED/ES); a patient whose frames are numbered instead (nnU-Net ``_frameNN``,
    a cine) with two or more labelled frames takes ED = the frame with the
    largest ground-truth LV volume and ES = the smallest (column ``phases``).
    Mass is the ED myocardium volume times :data:`MYOCARDIAL_DENSITY` (1.05 g/ml,
    the value used by ACDC and the SCMR post-processing guidelines).  Structures
    the class set does not have are left out.
    """
    by_case: dict[str, dict] = {}
    for r in rows:
        by_case.setdefault(r["case_id"], {})[(r["phase"], r["class"])] = r
    out = []
    for cid, d in sorted(by_case.items()):
        classes = {c for _, c in d}
        ref = "LV" if "LV" in classes else "RV"
        phases = _phases(d, ref) if ref in classes else None
        if phases is None:
            continue
        ed_ph, es_ph, how = phases
        for struct in ("LV", "RV"):
            ed, es = d.get((ed_ph, struct)), d.get((es_ph, struct))
            if ed is None or es is None:
                continue
            rec = {"case_id": cid, "patient": ed.get("patient", cid), "structure": struct,
                   "ed_phase": ed_ph, "es_phase": es_ph, "phases": how}
            for src in ("pred", "gt"):
                edv, esv = ed[f"volume_{src}_ml"], es[f"volume_{src}_ml"]
                rec.update({f"edv_{src}_ml": edv, f"esv_{src}_ml": esv,
                            f"ef_{src}_pct": ejection_fraction(edv, esv)})
            for q in ("edv", "esv"):
                rec[f"{q}_error_ml"] = rec[f"{q}_pred_ml"] - rec[f"{q}_gt_ml"]
            rec["ef_error_pct"] = rec["ef_pred_pct"] - rec["ef_gt_pct"]
            myo = d.get((ed_ph, "MYO"))
            if struct == "LV" and myo is not None:
                for src in ("pred", "gt"):
                    rec[f"myo_mass_{src}_g"] = myo[f"volume_{src}_ml"] * MYOCARDIAL_DENSITY
                rec["myo_mass_error_g"] = rec["myo_mass_pred_g"] - rec["myo_mass_gt_g"]
            out.append(rec)
    return out


def summarize(rows: list[dict[str, Any]], classes: tuple[str, ...] = CLASSES) -> dict[str, dict[str, float]]:
    """Mean Dice and HD95 per foreground class over frames (NaNs left out)."""
    summary = {}
    for name in classes[1:]:
        sel = [r for r in rows if r["class"] == name]
        summary[name] = {k: _nanmean([r[k] for r in sel]) for k in ("dice", "hd95_mm")}
    summary["mean_foreground"] = {k: _nanmean([summary[n][k] for n in classes[1:]])
                                  for k in ("dice", "hd95_mm")}
    return summary


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def prediction_classes(pred: Path) -> tuple[str, ...] | None:
    """The run's classes recorded in ``PRED/predict_report.json`` (``None`` when absent)."""
    report = pred / "predict_report.json"
    if not report.is_file():
        return None
    try:
        classes = json.loads(report.read_text()).get("classes")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {report}: {exc}") from None
    return tuple(classes) if classes else None


def class_correspondence(pred_classes: tuple[str, ...] | None, gt_classes: tuple[str, ...]) -> np.ndarray | None:
    """``pred_to_gt`` lookup: predicted class index -> ground-truth class index, by class name.

    A predicted class the ground truth does not have counts as background (logged).
    """
    from cmrprep.labels import canonical_name

    if pred_classes is None or tuple(pred_classes) == tuple(gt_classes):
        return None
    gt_index = {canonical_name(n): i for i, n in enumerate(gt_classes)}
    lut = np.zeros(len(pred_classes), dtype=np.int64)
    for k, name in enumerate(pred_classes):
        lut[k] = gt_index.get(canonical_name(name), 0)
        if k and canonical_name(name) not in gt_index:
            log.warning("predicted class %r is not a ground-truth class (%s); counted as background",
                        name, ", ".join(gt_classes))
    missing = [n for n in gt_classes[1:] if canonical_name(n) not in {canonical_name(p) for p in pred_classes}]
    if missing:
        log.warning("ground-truth classes %s are not predicted by the run (classes %s); their Dice is 0",
                    missing, list(pred_classes))
    return lut


def evaluate(pred: str | Path, gt: str | Path, out: str | Path | None = None, *,
             options: DiscoveryOptions | None = None, layout: str | None = None) -> dict[str, Any]:
    """Evaluate every ground-truth frame with a matching prediction; write CSVs and a summary.

    ``options`` are the shared discovery options of the ground truth (the same
    ``--label-map`` as ``build``); classes are matched by name with the run's
    (``PRED/predict_report.json``).
    """
    options = DiscoveryOptions.coerce(options, layout)
    pred, gt = Path(pred), Path(gt)
    for p, what in ((pred, "prediction"), (gt, "ground truth")):
        if not p.exists():
            raise ConfigError(f"{what} folder {p} does not exist")
    out = Path(out) if out else pred / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    preds = _index_predictions(pred)
    disc = options.discover(gt)
    classes = disc.label_map.classes
    pred_to_gt = class_correspondence(prediction_classes(pred), classes)
    rows, problems = [], [p.to_dict() for p in disc.problems if p.severity == "error"]
    for case in disc.cases:
        for frame in case.frames:
            if frame.label is None:
                continue
            name = prediction_name(frame.image, frame.image_frame if _is_4d_source(case) else None)
            if name not in preds:
                problems.append(Problem(case.case_id, frame.image, "prediction",
                                        f"no prediction {name} under {pred}").to_dict())
                continue
            try:
                rows.extend(evaluate_frame(case, frame, preds[name], classes, pred_to_gt))
            except CaseError as exc:
                problems.append(exc.problem.to_dict())
    clinical = clinical_rows(rows)
    summary = summarize(rows, classes)
    _write_outputs(out, rows, clinical, summary, problems)
    return {"rows": rows, "clinical": clinical, "summary": summary, "problems": problems,
            "classes": list(classes), "out": str(out)}


def _is_4d_source(case) -> bool:
    return any(f.image_frame is not None for f in case.frames)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
        w.writeheader()
        w.writerows(rows)


def _write_outputs(out: Path, rows, clinical, summary, problems) -> None:
    _write_csv(out / "metrics.csv", rows)
    _write_csv(out / "clinical.csv", clinical)
    lines = ["# Evaluation", "", "| class | Dice | HD95 (mm) |", "|---|---|---|"]
    for name, m in summary.items():
        lines.append(f"| {name} | {m['dice']:.4f} | {m['hd95_mm']:.2f} |")
    if clinical:
        lines += ["", "| patient | structure | ED/ES | EF (%) | EF truth (%) | EDV err (mL) | ESV err (mL) "
                      "| EF err (%) |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['case_id']} | {c['structure']} | {c['ed_phase']}/{c['es_phase']} | "
                  f"{c['ef_pred_pct']:.1f} | {c['ef_gt_pct']:.1f} | {c['edv_error_ml']:.1f} | "
                  f"{c['esv_error_ml']:.1f} | {c['ef_error_pct']:.1f} |" for c in clinical]
    if problems:
        lines += ["", "## Not evaluated", ""] + [f"- {p['case_id']}: {p['message']} [{p['file']}]"
                                                 for p in problems]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=plain_text(__doc__),
                                formatter_class=help_formatter())
    p.add_argument("pred", help="folder with *_pred.nii.gz files")
    p.add_argument("gt", help="ground-truth folder in any supported layout")
    p.add_argument("--out", help="output folder (default PRED/evaluation)")
    add_discovery_arguments(p, ("acdc", "mnms", "nnunet", "generic", "dicom"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = evaluate(a.pred, a.gt, a.out, options=DiscoveryOptions.from_args(a))
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    print(Path(res["out"], "summary.md").read_text())
    for prob in res["problems"]:
        print(f"ERROR {prob['case_id']}: {prob['message']} [{prob['file']}]")
    return EXIT_QUARANTINE if res["problems"] else EXIT_OK


if __name__ == "__main__":
    from pipelines.exitcodes import run_main

    sys.exit(run_main(main, 'interrupted; no summary written'))
