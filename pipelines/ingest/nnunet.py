"""nnU-Net raw dataset layout: ``imagesTr``/``imagesTs``/``labelsTr`` + ``dataset.json``.

The ``labels`` of ``dataset.json`` become the dataset's
:class:`~cmrprep.labels.LabelMap` (cardiac names canonicalised, any other
class kept by name).  Images named ``<patient>_frameNN`` are grouped into
patients by :func:`pipelines.ingest.patients.group_patients`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cmrprep.cases import CaseSpec, FrameSpec, Problem
from cmrprep.labels import LABEL_SYNONYMS, LabelMap, LabelMapError
from cmrprep.plan import ConfigError
from pipelines.ingest.readcache import ReadCache

__all__ = ["LABEL_SYNONYMS", "label_map_from_names", "discover_nnunet"]

log = logging.getLogger(__name__)

def label_map_from_names(labels: dict) -> LabelMap:
    """The dataset's :class:`~cmrprep.labels.LabelMap` from ``dataset.json`` ``labels``.

    Raises
    ------
    ConfigError
        Region-based (list) labels, no background, or two names for one class.

    Examples
    --------
    >>> label_map_from_names({"background": 0, "LVBP": 1, "LVM": 2, "RV": 3}).values
    ((0, 0), (1, 3), (2, 2), (3, 1))
    """
    try:
        return LabelMap.from_names(labels)
    except LabelMapError as exc:
        raise ConfigError(f"dataset.json labels {dict(labels)}: {exc}") from None


def _load_dataset_json(root: Path, cache: ReadCache | None = None) -> dict:
    path = root / "dataset.json"
    try:
        meta = (cache.read(path, "nnunet_dataset", lambda p: json.loads(Path(p).read_text()))
                if cache is not None else json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}); fix the JSON.") from exc
    if not isinstance(meta.get("labels"), dict):
        raise ConfigError(f"{path} has no 'labels' mapping; add it.")
    return meta


#: ``file_ending`` values accepted from ``dataset.json`` (what nnU-Net's readers take).
FILE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def _file_ending(value, root: Path) -> str:
    """Validate ``dataset.json``'s ``file_ending``: it becomes part of file names and globs.

    Anything but a known volume suffix (``"../x"``, ``"/"``, ``"*"``) could make
    the build read files outside the dataset, so it is refused.
    """
    if not isinstance(value, str) or value.lower() not in FILE_ENDINGS:
        raise ConfigError(f"{root / 'dataset.json'}: file_ending {value!r} is not one of "
                          f"{', '.join(FILE_ENDINGS)}; fix dataset.json.")
    return value


def _cases_in(folder: Path, labels_dir: Path | None, ending: str, label_map) -> tuple[list, list]:
    label_map = label_map.values
    cases, problems = [], []
    for img in sorted(folder.glob(f"*_0000{ending}")):
        cid = img.name[: -len(f"_0000{ending}")]
        if not cid:
            problems.append(Problem(img.name, str(img), "readable",
                                    f"file name {img.name!r} has no case id before _0000; rename it."))
            continue
        if (folder / f"{cid}_0001{ending}").exists():
            problems.append(Problem(cid, str(img), "channels",
                                    "multi-channel case (_0001 exists); using channel 0 only.",
                                    "warning"))
        label = labels_dir / f"{cid}{ending}" if labels_dir is not None else None
        if label is not None and not label.is_file():
            if folder.name == "imagesTr":
                problems.append(Problem(cid, str(label), "missing_file",
                                        "training image without label in labelsTr; add it."))
                continue
            label = None
        frames = (FrameSpec("F00", str(img), str(label) if label else None),)
        cases.append(CaseSpec(cid, "nnunet", frames, None, label_map if label else None,
                              {"split": folder.name}))
    return cases, problems


def discover_nnunet(root: Path, label_map: LabelMap | None = None, read_cache: ReadCache | None = None,
                    ) -> tuple[list[CaseSpec], list[Problem], LabelMap]:
    """Cases of an nnU-Net raw dataset (``imagesTr`` with labels, ``imagesTs`` image-only).

    ``label_map`` (a user's ``--label-map``) overrides ``dataset.json``'s labels;
    ``read_cache`` (:class:`~pipelines.ingest.readcache.ReadCache`) keeps ``dataset.json``'s
    content while the file is unchanged.

    Raises
    ------
    ConfigError
        Unreadable ``dataset.json`` or unmappable label names.
    """
    meta = _load_dataset_json(root, read_cache)
    label_map = label_map or label_map_from_names(meta["labels"])
    ending = _file_ending(meta.get("file_ending", ".nii.gz"), root)
    cases, problems = [], []
    for split, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        if (root / split).is_dir():
            lab_dir = root / labels if (root / labels).is_dir() else None
            c, p = _cases_in(root / split, lab_dir, ending, label_map)
            cases += c
            problems += p
    return cases, problems, label_map
