"""Patients, not images: group one-image cases into patients with several frames.

Generic and nnU-Net raw datasets hold one file per frame (``patient001_frame01``,
``patient001_frame12``).  Taken one image per case, the ED and ES frames of a
patient could land on both sides of a train/validation split and no ejection
fraction could be computed.  :func:`group_patients` applies a regular
expression to each case id (the image's stem): group 1 is the patient id, an
optional group 2 names the frame.  A frame named ``ED``/``ES`` (any case) gets
that phase; a number ``n`` becomes phase ``F<nn>``; the frames of a patient
are ordered by that number.  Without phases, ``pipelines.evaluate`` takes the
frame with the largest ground-truth LV volume as end-diastole and the smallest
as end-systole.

Examples
--------
>>> from cmrprep.cases import CaseSpec, FrameSpec
>>> cases = [CaseSpec(f"p1_frame{n:02d}", "nnunet", (FrameSpec("F00", f"p1_frame{n:02d}.nii.gz"),))
...          for n in (1, 12)]
>>> grouped, problems = group_patients(cases, NNUNET_PATIENT)
>>> [(c.case_id, [f.phase for f in c.frames]) for c in grouped]
[('p1', ['F01', 'F12'])]
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace

from cmrprep.cases import CaseSpec, FrameSpec, Problem

__all__ = ["NNUNET_PATIENT", "group_patients", "frame_phase"]

log = logging.getLogger(__name__)

#: nnU-Net raw default: ``<patient>_frameNN`` (e.g. nnU-Net's ACDC conversion, Dataset027).
NNUNET_PATIENT = r"^(.+?)_frame(\d+)$"


def frame_phase(key: str | None, fallback: str) -> str:
    """Phase name of a frame key: ``ED``/``ES``, ``F<nn>`` for a number, else the key itself."""
    if key is None:
        return fallback
    if key.upper() in ("ED", "ES"):
        return key.upper()
    if key.isdigit():
        return f"F{int(key):02d}"
    return re.sub(r"[^A-Za-z0-9_-]", "_", key) or fallback


def _order(key: str | None) -> tuple:
    if key is None:
        return (2, "")
    if key.upper() in ("ED", "ES"):
        return (0, key.upper())
    return (1, int(key)) if key.isdigit() else (1, key)


def group_patients(cases: list[CaseSpec], pattern: str | re.Pattern,
                   ) -> tuple[list[CaseSpec], list[Problem]]:
    """Merge the cases whose ids share a patient (``pattern`` group 1) into one case each.

    A case id the pattern does not match stays a case of its own (logged).  Two
    images that give a patient the same frame, or a patient whose images have
    labels for some frames only, are problems naming the files; that patient is
    not built and the other patients go on.
    """
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    groups: dict[str, list[tuple[str | None, CaseSpec]]] = {}
    unmatched = 0
    for case in cases:
        m = rx.search(case.case_id)
        if m is None or not m.group(1):
            unmatched += 1
            groups.setdefault(case.case_id, []).append((None, case))
            continue
        key = m.group(2) if rx.groups >= 2 else None
        groups.setdefault(m.group(1), []).append((key, case))
    if unmatched:
        log.info("patient pattern %r matched %d of %d images; the others are cases of their own",
                 rx.pattern, len(cases) - unmatched, len(cases))
    out, problems = [], []
    for patient, members in groups.items():
        if len(members) == 1 and members[0][0] is None:
            out.append(replace(members[0][1], patient=patient))
            continue
        try:
            out.append(_merge(patient, sorted(members, key=lambda kc: (_order(kc[0]), kc[1].case_id))))
        except ValueError as exc:
            problems.extend(Problem(patient, c.frames[0].image, "patient", str(exc)) for _, c in members)
    out.sort(key=lambda c: c.case_id)
    return out, problems


def _merge(patient: str, members: list[tuple[str | None, CaseSpec]]) -> CaseSpec:
    frames: list[FrameSpec] = []
    for n, (key, case) in enumerate(members):
        for fr in case.frames:
            phase = frame_phase(key, f"F{n:02d}")
            if len(case.frames) > 1:
                phase = f"{phase}_{fr.phase}"
            frames.append(replace(fr, phase=phase))
    phases = [f.phase for f in frames]
    dup = sorted({p for p in phases if phases.count(p) > 1})
    if dup:
        files = [f.image for f in frames if f.phase in dup]
        raise ValueError(f"frames {dup} of patient {patient!r} come from several images ({files}); "
                         "make --patient-pattern's group 2 tell them apart.")
    labelled = [f.label is not None for f in frames]
    if any(labelled) and not all(labelled):
        missing = [f.image for f in frames if f.label is None]
        raise ValueError(f"patient {patient!r} has labels for some frames only (no label for "
                         f"{missing}); add them or move the unlabelled images out.")
    first = members[0][1]
    meta = {**first.metadata, "images": [c.case_id for _, c in members]}
    return CaseSpec(patient, first.layout, tuple(frames), None, first.label_map, meta, patient=patient)
