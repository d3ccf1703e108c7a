"""Do the labels mean what the label map says?  An anatomical check of RV, MYO and LV.

In every short-axis slice the LV cavity is enclosed by the myocardium ring;
the RV cavity lies outside the ring, against the septum, and mostly borders
background.  So of the boundary of the true LV almost all touches the true
MYO, and none touches the RV.  :func:`contact_counts` counts in-plane
neighbouring voxel pairs of different classes; :func:`assess` scores each of
the six ways to assign the three labels to (RV, MYO, LV) by

``score(LV=a, MYO=b) = share of a's boundary touching b - share touching the third label``

and reports the best assignment.  A dataset whose labels follow another
convention (M&Ms writes LV as 1 and RV as 3, ACDC the reverse) scores its
declared map far below the best one; ``pipelines.build`` then refuses to
build and names the ``--label-map`` that fixes it.

Examples
--------
>>> lab = np.zeros((1, 40, 40), np.uint8)
>>> yy, xx = np.mgrid[:40, :40]
>>> r = np.hypot(yy - 20, xx - 24)
>>> lab[0][r < 10] = 2; lab[0][r < 6] = 3                       # MYO ring, LV inside
>>> lab[0][(np.hypot(yy - 20, xx - 8) < 7) & (r >= 10)] = 1    # RV against the septum
>>> res = assess(contact_counts(lab, (1, 2), 4), {"RV": 1, "MYO": 2, "LV": 3})
>>> res.best == {"RV": 1, "MYO": 2, "LV": 3}, res.contradicts
(True, False)
>>> assess(contact_counts(lab, (1, 2), 4), {"RV": 3, "MYO": 2, "LV": 1}).contradicts
True
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations
from typing import Mapping, Sequence

import numpy as np

__all__ = ["contact_counts", "assess", "Assessment", "check_convention", "ConventionCheck", "MARGIN", "ROLES"]

ROLES = ("RV", "MYO", "LV")
#: How much better than the declared assignment the best one must score to contradict it.
MARGIN = 0.25
#: Fewer boundary pairs than this on the LV or MYO: too little anatomy to judge.
MIN_PAIRS = 20


def contact_counts(label: np.ndarray, in_plane: Sequence[int], num_classes: int) -> np.ndarray:
    """Symmetric ``(C, C)`` counts of in-plane 4-neighbour voxel pairs with different classes.

    Parameters
    ----------
    label : ndarray of int
        Class indices ``0 .. C-1`` (any dimensionality).
    in_plane : sequence of int
        The two in-plane axes of ``label`` (pairs across slices are not counted).
    num_classes : int
        ``C``; larger values are ignored.

    Only the bounding box of the foreground is scanned.
    """
    lab = np.asarray(label)
    c = int(num_classes)
    out = np.zeros((c, c), dtype=np.int64)
    fg = lab != 0
    if not fg.any():
        return out
    box = []
    for ax in range(lab.ndim):
        other = tuple(a for a in range(lab.ndim) if a != ax)
        idx = np.flatnonzero(fg.any(axis=other))
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if ax in in_plane:  # one background voxel around the box, where the image has it
            lo, hi = max(lo - 1, 0), min(hi + 1, lab.shape[ax])
        box.append(slice(lo, hi))
    sub = lab[tuple(box)]
    if sub.max() >= c:
        sub = np.where(sub < c, sub, 0)
    for ax in in_plane:  # compare neighbours on views; only the boundary voxels are gathered
        a = np.moveaxis(sub, ax, 0)
        x, y = a[:-1], a[1:]
        diff = x != y
        codes = x[diff].astype(np.int64) * c + y[diff]
        out += np.bincount(codes, minlength=c * c).reshape(c, c)
    return out + out.T


@dataclass(frozen=True)
class Assessment:
    """Outcome of :func:`assess`: scores of the declared and the best (RV, MYO, LV) assignment."""

    declared: dict[str, int]
    best: dict[str, int]
    declared_score: float
    best_score: float
    judged: bool

    @property
    def contradicts(self) -> bool:
        """True when the labels clearly follow another assignment than the declared one."""
        return self.judged and self.best != self.declared and \
            self.best_score - self.declared_score > MARGIN


def _score(pairs: np.ndarray, lv: int, myo: int, rv: int) -> float:
    boundary = pairs[lv].sum()
    if boundary <= 0:
        return -1.0
    return float(pairs[lv, myo] - pairs[lv, rv]) / float(boundary)


def assess(pairs: np.ndarray, roles: Mapping[str, int]) -> Assessment:
    """Score the declared ``roles`` (``{"RV": i, "MYO": j, "LV": k}``) against the other five.

    ``pairs`` is a (sum of) :func:`contact_counts`.  Too little anatomy (a
    structure with fewer than :data:`MIN_PAIRS` boundary pairs) gives an
    assessment with ``judged=False``, which never contradicts.
    """
    declared = {r: int(roles[r]) for r in ROLES}
    idx = [declared[r] for r in ROLES]
    judged = all(pairs[i].sum() >= MIN_PAIRS for i in idx)
    best, best_score = declared, -np.inf
    for rv, myo, lv in permutations(idx):
        s = _score(pairs, lv, myo, rv)
        if s > best_score + 1e-12:
            best, best_score = {"RV": rv, "MYO": myo, "LV": lv}, s
    dec = _score(pairs, declared["LV"], declared["MYO"], declared["RV"])
    if abs(dec - best_score) <= 1e-12:
        best = declared
    return Assessment(declared, best, dec, float(best_score), judged)


@dataclass(frozen=True)
class ConventionCheck:
    """The dataset-level verdict of :func:`check_convention`.

    ``severity`` is ``"error"`` (more than half of the judged cases contradict
    the map: refuse to build), ``"warning"`` (a minority does: those cases are
    named), ``"ok"`` or ``"skipped"`` (the map lacks RV, MYO or LV, or no case
    had enough anatomy to judge).
    """

    severity: str
    message: str
    n_judged: int = 0
    contradicting: tuple[str, ...] = ()
    suggested_map: str | None = None

    def to_dict(self) -> dict:
        """JSON form."""
        return {"severity": self.severity, "message": self.message, "n_judged": self.n_judged,
                "contradicting": list(self.contradicting), "suggested_label_map": self.suggested_map}


def check_convention(contacts: Mapping[str, np.ndarray], label_map) -> ConventionCheck:
    """Check every case's RV/MYO/LV anatomy against ``label_map`` (a :class:`~cmrprep.labels.LabelMap`).

    Parameters
    ----------
    contacts : mapping of case id to ndarray
        Per case, :func:`contact_counts` summed over its frames, in the map's class indices.
    label_map : LabelMap
        The declared map.

    Returns
    -------
    ConventionCheck
        With the ``--label-map`` that would fix a contradiction.
    """
    roles = label_map.roles()
    if any(r not in roles for r in ROLES):
        return ConventionCheck("skipped", f"label-convention check skipped: the classes "
                               f"{list(label_map.classes)} do not include RV, MYO and LV")
    judged, bad, votes = 0, [], {}
    for cid in sorted(contacts):
        pairs = np.asarray(contacts[cid], dtype=np.int64)
        if pairs.shape != (label_map.num_classes,) * 2:
            continue
        res = assess(pairs, roles)
        if not res.judged:
            continue
        judged += 1
        if res.contradicts:
            bad.append(cid)
            key = tuple(sorted(res.best.items()))
            votes[key] = votes.get(key, 0) + 1
    if judged == 0:
        return ConventionCheck("skipped", "label-convention check skipped: no case has enough RV, "
                               "MYO and LV voxels to judge")
    if not bad:
        return ConventionCheck("ok", f"labels agree with the label map in all {judged} checked cases",
                               judged)
    best = dict(max(votes.items(), key=lambda kv: kv[1])[0])
    rename = {label_map.classes[best[r]]: r for r in ROLES}
    fixed = label_map.with_roles(rename)
    values = {c: [a for a, b in label_map.values if b == c] for c in range(label_map.num_classes)}
    swaps = [f"file value {'/'.join(map(str, values[best[r]]))} (declared "
             f"{label_map.classes[best[r]]}) looks like {r}" for r in ROLES
             if label_map.classes[best[r]] != r]
    shown = ", ".join(bad[:8]) + (", ..." if len(bad) > 8 else "")
    text = (f"labels contradict the label map '{label_map.spec()}' in {len(bad)} of {judged} checked "
            f"cases ({shown}): {'; '.join(swaps)} (the LV cavity must be enclosed by the myocardium, "
            f"the RV outside it). If the whole dataset uses that convention, pass "
            f"--label-map '{fixed.spec()}'")
    severity = "error" if 2 * len(bad) > judged else "warning"
    if severity == "warning":
        text += "; otherwise check the labels of these cases"
    return ConventionCheck(severity, text, judged, tuple(bad), fixed.spec())
