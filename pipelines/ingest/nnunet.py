"""nnU-Net raw dataset layout: ``imagesTr``/``imagesTs``/``labelsTr`` + ``dataset.json``.

Label names in ``dataset.json`` are mapped to the project convention (0
background, 1 RV, 2 MYO, 3 LV); a name that cannot be mapped is a
configuration error, since every case would be wrong.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from cmrprep.cases import CaseSpec, FrameSpec, Problem
from cmrprep.plan import ConfigError

__all__ = ["LABEL_SYNONYMS", "label_map_from_names", "discover_nnunet"]

log = logging.getLogger(__name__)

#: Accepted label names (lower case, letters and digits only) -> project label.
LABEL_SYNONYMS: dict[str, int] = {
    **dict.fromkeys(("background", "bg", "bkg", "clearlabel", "none"), 0),
    **dict.fromkeys(("rv", "rvc", "rvcavity", "rvbp", "rightventricle", "rightventricular",
                     "rightventricularcavity", "rightventriclecavity", "rvbloodpool"), 1),
    **dict.fromkeys(("myo", "mlv", "lvm", "myocardium", "lvmyocardium", "myocard",
                     "leftventricularmyocardium", "leftventriclemyocardium"), 2),
    **dict.fromkeys(("lv", "lvc", "lvbp", "lvcavity", "leftventricle", "leftventricular",
                     "leftventricularcavity", "leftventriclecavity", "lvbloodpool"), 3),
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _label_pairs(labels: dict) -> list[tuple[str, int]]:
    """(name, value) pairs from nnU-Net v2 ``{name: value}`` or v1 ``{"value": name}``."""
    if all(str(k).isdigit() for k in labels) and all(isinstance(v, str) for v in labels.values()):
        return [(v, int(k)) for k, v in labels.items()]
    pairs = []
    for name, value in labels.items():
        if not isinstance(value, int):
            raise ConfigError(f"dataset.json label {name!r} has value {value!r}; region-based "
                              "(list) labels are not supported, give one integer per label.")
        pairs.append((name, value))
    return pairs


def label_map_from_names(labels: dict) -> tuple[tuple[int, int], ...] | None:
    """Map ``dataset.json`` labels to the project convention.

    Returns
    -------
    tuple of (int, int) or None
        ``(source, project)`` pairs, ``None`` when the mapping is the identity.

    Raises
    ------
    ConfigError
        A label name that is not a known synonym of background/RV/MYO/LV.

    Examples
    --------
    >>> label_map_from_names({"background": 0, "LVBP": 1, "LVM": 2, "RV": 3})
    ((0, 0), (1, 3), (2, 2), (3, 1))
    """
    pairs = _label_pairs(labels)
    unknown = [name for name, _ in pairs if _norm(name) not in LABEL_SYNONYMS]
    if unknown:
        raise ConfigError(f"dataset.json label names {unknown} cannot be mapped to background/RV/"
                          "MYO/LV; rename them (accepted e.g. 'RV', 'MYO', 'LV', 'right ventricle', "
                          "'myocardium', 'left ventricle', 'RVC', 'MLV', 'LVC').")
    mapped = tuple(sorted((value, LABEL_SYNONYMS[_norm(name)]) for name, value in pairs))
    targets = [b for _, b in mapped]
    if len(set(targets)) != len(targets):
        raise ConfigError(f"dataset.json labels {dict(pairs)} map two names to one class; "
                          "keep one name per class.")
    return None if all(a == b for a, b in mapped) else mapped


def _load_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text())
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


def discover_nnunet(root: Path) -> tuple[list[CaseSpec], list[Problem]]:
    """Cases of an nnU-Net raw dataset (``imagesTr`` with labels, ``imagesTs`` image-only).

    Raises
    ------
    ConfigError
        Unreadable ``dataset.json`` or unmappable label names.
    """
    meta = _load_dataset_json(root)
    label_map = label_map_from_names(meta["labels"])
    ending = _file_ending(meta.get("file_ending", ".nii.gz"), root)
    cases, problems = [], []
    for split, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        if (root / split).is_dir():
            lab_dir = root / labels if (root / labels).is_dir() else None
            c, p = _cases_in(root / split, lab_dir, ending, label_map)
            cases += c
            problems += p
    return cases, problems
