"""Label maps: which file value is which class, for any class set.

A :class:`LabelMap` turns the integer values of a dataset's label files into
the class indices ``0 .. C-1`` of the store.  Every way a dataset names its
labels is one of these: ACDC's identity (0 background, 1 RV, 2 MYO, 3 LV), the
M&Ms convention (1 LV, 2 MYO, 3 RV), nnU-Net's ``dataset.json`` ``labels``
and a user's ``--label-map '0=background,85=RV,170=MYO,255=LV'``.

Decisions
---------
* The order of the names in a map is the order of the classes in the store;
  class 0 must be the background (sampling, weights and Dice treat class 0 as
  "not foreground").
* Several file values may map to one class (``0=background,4=background``).
* Names of the cardiac structures are canonicalised (``"left ventricle"``,
  ``"LVBP"`` -> ``"LV"``; see :data:`LABEL_SYNONYMS`) so that the anatomy
  check and the clinical measures (EDV/ESV/EF, mass) find them in any
  dataset; other names (``scar``, ``edema``) are kept as written.

Examples
--------
>>> lm = LabelMap.parse("0=background,85=RV,170=MYO,255=LV")
>>> lm.classes
('background', 'RV', 'MYO', 'LV')
>>> lm.values
((0, 0), (85, 1), (170, 2), (255, 3))
>>> LabelMap.parse("0=bg,1=left ventricle").classes
('background', 'LV')
>>> MNMS.spec()
'0=background,3=RV,2=MYO,1=LV'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

__all__ = ["LabelMap", "LabelMapError", "LABEL_SYNONYMS", "CARDIAC", "ACDC", "MNMS", "canonical_name"]

#: The project's (ACDC's) cardiac class names, in their canonical order.
CARDIAC: tuple[str, ...] = ("background", "RV", "MYO", "LV")

#: Accepted spellings (lower case, letters and digits only) -> canonical class name.
LABEL_SYNONYMS: dict[str, str] = {
    **dict.fromkeys(("background", "bg", "bkg", "clearlabel", "none", "back"), "background"),
    **dict.fromkeys(("rv", "rvc", "rvcavity", "rvbp", "rightventricle", "rightventricular",
                     "rightventricularcavity", "rightventriclecavity", "rvbloodpool",
                     "rvendo", "rvendocardium"), "RV"),
    **dict.fromkeys(("myo", "mlv", "lvm", "myocardium", "lvmyocardium", "myocard",
                     "leftventricularmyocardium", "leftventriclemyocardium", "lvmyo",
                     "lvwall", "myocardial"), "MYO"),
    **dict.fromkeys(("lv", "lvc", "lvbp", "lvcavity", "leftventricle", "leftventricular",
                     "leftventricularcavity", "leftventriclecavity", "lvbloodpool",
                     "lvendo", "lvendocardium"), "LV"),
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+-]*$")


class LabelMapError(ValueError):
    """A label map that cannot be used; the message names the value and the fix."""


def canonical_name(name: str) -> str:
    """The canonical spelling of a class name (``"Left ventricle"`` -> ``"LV"``), else ``name``."""
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return LABEL_SYNONYMS.get(key, str(name).strip())


@dataclass(frozen=True)
class LabelMap:
    """File label values -> class indices, and the class names.

    Parameters
    ----------
    classes : tuple of str
        Class names; index ``i`` is class ``i`` in the store, ``classes[0]``
        is the background.
    values : tuple of (int, int)
        ``(file value, class index)`` pairs, sorted by file value; every
        class has at least one value.
    """

    classes: tuple[str, ...]
    values: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise LabelMapError(f"a label map needs a background and at least one class, got "
                                f"{list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise LabelMapError(f"class names {list(self.classes)} repeat a name")
        if self.classes[0] != "background":
            raise LabelMapError(f"the first class must be the background, got {self.classes[0]!r}; "
                                "list the background value first, e.g. '0=background,...'")
        if "background" in self.classes[1:]:
            raise LabelMapError("only class 0 may be the background")
        files = [a for a, _ in self.values]
        if len(set(files)) != len(files):
            raise LabelMapError(f"file value(s) {sorted({a for a in files if files.count(a) > 1})} "
                                "appear twice in the label map")
        used = {b for _, b in self.values}
        missing = [self.classes[c] for c in range(len(self.classes)) if c not in used]
        if missing or any(not 0 <= b < len(self.classes) for b in used):
            raise LabelMapError(f"classes {missing} have no file value in the label map")
        if any(a < 0 or a > 65535 for a in files):
            raise LabelMapError(f"label file values must be in 0..65535, got {files}")

    # -- construction ------------------------------------------------------------------
    @classmethod
    def identity(cls, classes: tuple[str, ...] = CARDIAC) -> "LabelMap":
        """File value ``i`` is class ``i`` (ACDC's convention by default)."""
        return cls(tuple(classes), tuple((i, i) for i in range(len(classes))))

    @classmethod
    def parse(cls, text: str) -> "LabelMap":
        """Parse ``'VALUE=NAME,VALUE=NAME,...'`` (order of first appearance = class order).

        Raises
        ------
        LabelMapError
            A malformed entry, a non-integer value, a repeated value or no background first.
        """
        classes: list[str] = []
        values: list[tuple[int, int]] = []
        for item in (s.strip() for s in str(text).split(",")):
            if not item:
                continue
            value, sep, name = item.partition("=")
            if not sep or not name.strip() or not _NAME.match(name.strip()):
                raise LabelMapError(f"label map entry {item!r} is not VALUE=NAME (e.g. "
                                    "'0=background,85=RV,170=MYO,255=LV')")
            try:
                v = int(value.strip())
            except ValueError:
                raise LabelMapError(f"label map entry {item!r}: {value.strip()!r} is not an "
                                    "integer file value") from None
            name = canonical_name(name)
            if name not in classes:
                classes.append(name)
            values.append((v, classes.index(name)))
        if not values:
            raise LabelMapError(f"empty label map {text!r}; give e.g. '0=background,1=LV'")
        return cls(tuple(classes), tuple(sorted(values)))

    @classmethod
    def from_names(cls, labels: Mapping[str, Any]) -> "LabelMap":
        """From nnU-Net ``dataset.json`` ``labels`` (v2 ``{name: value}``, v1 ``{"value": name}``).

        Known cardiac structures come first in ACDC order (background, RV,
        MYO, LV), then any other class by file value, so an nnU-Net ACDC
        dataset (``LVBP=1, LVM=2, RV=3``) builds the same store as ACDC itself.

        >>> LabelMap.from_names({"background": 0, "LVBP": 1, "LVM": 2, "RV": 3}).spec()
        '0=background,3=RV,2=MYO,1=LV'
        >>> LabelMap.from_names({"background": 0, "LV": 1, "scar": 2}).classes
        ('background', 'LV', 'scar')
        """
        pairs = _label_pairs(labels)
        named = [(canonical_name(n), v) for n, v in pairs]
        order = [c for c in CARDIAC if any(n == c for n, _ in named)]
        order += [n for n, _ in sorted(named, key=lambda p: p[1]) if n not in order]
        if "background" not in order:
            raise LabelMapError(f"dataset.json labels {dict(pairs)} have no background (value 0)")
        return cls(tuple(order), tuple(sorted((v, order.index(n)) for n, v in named)))

    @classmethod
    def from_pairs(cls, pairs, classes: tuple[str, ...] = CARDIAC) -> "LabelMap":
        """From ``(file value, class index)`` pairs (a :class:`~cmrprep.cases.CaseSpec`'s map)."""
        return cls(tuple(classes), tuple(sorted((int(a), int(b)) for a, b in pairs)))

    # -- use ---------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return len(self.classes)

    def spec(self) -> str:
        """The ``--label-map`` text of this map (classes in order)."""
        by_class = sorted(self.values, key=lambda p: (p[1], p[0]))
        return ",".join(f"{a}={self.classes[b]}" for a, b in by_class)

    def lut(self) -> np.ndarray:
        """Lookup table ``lut[file value] = class index`` (255 where a value is not mapped)."""
        lut = np.full(max(a for a, _ in self.values) + 1, 255, dtype=np.uint8)
        for a, b in self.values:
            lut[a] = b
        return lut

    def index(self, name: str) -> int | None:
        """Class index of a (canonicalised) name, or ``None``."""
        name = canonical_name(name)
        return self.classes.index(name) if name in self.classes else None

    def roles(self) -> dict[str, int]:
        """Indices of the cardiac structures this map has (``{"RV": 1, "MYO": 2, "LV": 3}``)."""
        return {c: self.classes.index(c) for c in CARDIAC[1:] if c in self.classes}

    def with_roles(self, permutation: Mapping[str, str]) -> "LabelMap":
        """The map with cardiac class names exchanged (``{"RV": "LV", "LV": "RV"}``), same order.

        >>> ACDC.with_roles({"RV": "LV", "LV": "RV"}).spec()
        '0=background,3=RV,2=MYO,1=LV'
        """
        renamed = tuple(permutation.get(c, c) for c in self.classes)
        order = [c for c in self.classes if c in renamed]
        return LabelMap(tuple(order), tuple(sorted((a, order.index(renamed[b])) for a, b in self.values)))

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"classes": [...], "values": [[file value, class], ...]}``."""
        return {"classes": list(self.classes), "values": [list(p) for p in self.values]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LabelMap":
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(d["classes"]), tuple(sorted((int(a), int(b)) for a, b in d["values"])))


def _label_pairs(labels: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(name, value) pairs from nnU-Net v2 ``{name: value}`` or v1 ``{"value": name}``."""
    if all(str(k).isdigit() for k in labels) and all(isinstance(v, str) for v in labels.values()):
        return [(v, int(k)) for k, v in labels.items()]
    pairs = []
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise LabelMapError(f"dataset.json label {name!r} has value {value!r}; region-based "
                                "(list) labels are not supported, give one integer per label.")
        pairs.append((str(name), value))
    return pairs


#: ACDC (and the project's default): 0 background, 1 RV, 2 MYO, 3 LV.
ACDC = LabelMap.identity(CARDIAC)
#: M&Ms: 1 LV, 2 MYO, 3 RV.
MNMS = LabelMap(CARDIAC, ((0, 0), (1, 3), (2, 2), (3, 1)))
