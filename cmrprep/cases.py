"""Case descriptions produced by ingest and consumed by every later step.

These are plain, frozen, JSON-serialisable records: paths and metadata only,
never pixel data.  Pixel data travels as ``(array, Geometry)`` pairs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: Default class set (ACDC): index -> name.  A dataset's own class set is its
#: :class:`cmrprep.labels.LabelMap`; the plan and the store record it.
CLASSES: tuple[str, ...] = ("background", "RV", "MYO", "LV")
#: Integer codes of the cardiac phases in stores (anything else is 2).
PHASE_CODES = {"ED": 0, "ES": 1}


def phase_code(phase: str) -> int:
    """Integer code of a phase name (0 ED, 1 ES, 2 anything else)."""
    return PHASE_CODES.get(phase, 2)



@dataclass(frozen=True)
class FrameSpec:
    """One 3D frame of a case to be processed (e.g. the ED frame).

    Parameters
    ----------
    phase : str
        ``"ED"``, ``"ES"`` or ``"F<nn>"`` for other frames / single volumes.
    image : str
        Path of the image file (3D, or 4D with ``image_frame`` chosen), or of a
        DICOM series directory.
    label : str or None
        Path of the label file, ``None`` for image-only inputs.
    image_frame, label_frame : int or None
        0-based index along the 4th (time) axis when the file is 4D.
    """

    phase: str
    image: str
    label: str | None = None
    image_frame: int | None = None
    label_frame: int | None = None


@dataclass(frozen=True)
class CaseSpec:
    """Everything ingest knows about one patient/case before reading pixels.

    Parameters
    ----------
    case_id : str
        Unique, filesystem-safe identifier (e.g. ``patient001``).
    layout : str
        ``acdc``, ``mnms``, ``nnunet``, ``generic`` or ``images``.
    frames : tuple of FrameSpec
        Frames to process.
    cine : str or None
        4D cine file used for label-free heart localisation, if any.
    label_map : tuple of (int, int) pairs or None
        ``(file value, class index)`` pairs of the dataset's
        :class:`~cmrprep.labels.LabelMap`; ``None`` means ACDC's identity
        (0 bg, 1 RV, 2 MYO, 3 LV).
    metadata : dict
        Layout-specific metadata (ACDC ``Info.cfg`` keys, M&Ms CSV row, ...).
    patient : str or None
        Patient id; ``None`` means the case id (a case is one patient).
    """

    case_id: str
    layout: str
    frames: tuple[FrameSpec, ...]
    cine: str | None = None
    label_map: tuple[tuple[int, int], ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    patient: str | None = None

    @property
    def patient_id(self) -> str:
        """The patient this case belongs to (its own id unless set)."""
        return self.patient or self.case_id

    @property
    def has_labels(self) -> bool:
        """True when every frame has a label file."""
        return all(f.label is not None for f in self.frames)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, equal to ``dataclasses.asdict(self)``.

        Built field by field (``asdict`` deep-copies recursively: ~60 us a case, and a
        cached copy doubled what the client holds per case); ``metadata`` is a shallow
        copy, so its nested values are shared with the spec and are read-only.

        Examples
        --------
        >>> from dataclasses import asdict
        >>> spec = CaseSpec("p1", "acdc", (FrameSpec("ED", "p1_frame01.nii.gz", "p1_gt.nii.gz"),),
        ...                 metadata={"Group": "NOR"})
        >>> spec.to_dict() == asdict(spec)
        True
        """
        return {"case_id": self.case_id, "layout": self.layout,
                "frames": tuple(dict(f.__dict__) for f in self.frames), "cine": self.cine,
                "label_map": self.label_map, "metadata": dict(self.metadata),
                "patient": self.patient}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CaseSpec":
        """Inverse of :meth:`to_dict`."""
        frames = tuple(FrameSpec(**f) for f in d["frames"])
        lm = d.get("label_map")
        lm = tuple((int(a), int(b)) for a, b in lm) if lm is not None else None
        return cls(case_id=d["case_id"], layout=d["layout"], frames=frames,
                   cine=d.get("cine"), label_map=lm, metadata=dict(d.get("metadata") or {}),
                   patient=d.get("patient"))


@dataclass(frozen=True)
class Problem:
    """A validation finding, quarantining (``severity="error"``) or not.

    Messages name the case, the file and the offending value, and say how to
    fix it when that is known.
    """

    case_id: str
    file: str | None
    check: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f" [{self.file}]" if self.file else ""
        return f"{self.case_id}{where}: {self.check}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


class CaseError(Exception):
    """Raised for a problem that quarantines one case; carries a :class:`Problem`."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem
