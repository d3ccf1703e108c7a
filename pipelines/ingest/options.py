"""The discovery options every command that reads a dataset shares.

``ingest``, ``build``, ``predict`` and ``evaluate`` (and their Python
functions) take one :class:`DiscoveryOptions`; their command lines get the same
arguments from :func:`add_discovery_arguments`, so a dataset that ``ingest``
reads is read the same way by ``build``.

Examples
--------
>>> opts = DiscoveryOptions(layout="generic", image_glob="*.nii", label_pattern="{stem}_seg{ext}",
...                         label_map="0=background,85=RV,170=MYO,255=LV")
>>> opts.validate().parsed_label_map().classes
('background', 'RV', 'MYO', 'LV')
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from cmrprep.labels import LabelMap, LabelMapError
from cmrprep.plan import ConfigError

__all__ = ["DiscoveryOptions", "add_discovery_arguments", "LAYOUTS"]

LAYOUTS = ("acdc", "mnms", "nnunet", "generic", "dicom", "images")


@dataclass(frozen=True)
class DiscoveryOptions:
    """How to find cases and read their labels.

    Parameters
    ----------
    layout : str, optional
        ``acdc``, ``mnms``, ``nnunet``, ``generic``, ``dicom`` or ``images``; detected when ``None``.
    image_glob : str, optional
        Generic layout: glob of image files relative to the input folder.
    label_suffix : str
        Generic layout: ``X.nii.gz`` pairs with ``X<suffix>.nii.gz``.  DICOM:
        NIfTI labels in a case folder end with it (``cine_gt.nii.gz``, 4D, or
        ``..._frameNN_gt.nii.gz``, 3D).
    label_pattern : str, optional
        Generic layout: label file name with ``{stem}`` and ``{ext}``
        (``'{stem}_seg{ext}'``); overrides ``label_suffix``.
    mnms_csv : str, optional
        M&Ms metadata CSV (default: searched next to the input).
    label_map : str or LabelMap, optional
        File values -> class names, ``'0=background,85=RV,170=MYO,255=LV'``;
        overrides the layout's own convention (see :mod:`cmrprep.labels`).
    patient_pattern : str, optional
        Regular expression searched in each image's name (its stem); group 1
        is the patient id, an optional group 2 the frame (``ED``/``ES`` or a
        number).  Images of one patient become the frames of one case.
        nnU-Net raw data defaults to ``<patient>_frameNN``.
    """

    layout: str | None = None
    image_glob: str | None = None
    label_suffix: str = "_gt"
    label_pattern: str | None = None
    mnms_csv: str | None = None
    label_map: str | LabelMap | None = None
    patient_pattern: str | None = None

    def validate(self) -> "DiscoveryOptions":
        """Raise :class:`ConfigError` for options that cannot work; return self."""
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}; use one of {', '.join(LAYOUTS)}.")
        self.parsed_label_map()
        self.compiled_patient_pattern()
        if self.label_pattern is not None:
            try:
                self.label_pattern.format(stem="x", ext=".nii.gz")
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(f"--label-pattern {self.label_pattern!r} may only use {{stem}} and "
                                  f"{{ext}} ({exc}); e.g. '{{stem}}_seg{{ext}}'") from None
        if self.mnms_csv is not None and not Path(self.mnms_csv).is_file():
            raise ConfigError(f"--mnms-csv {self.mnms_csv} does not exist; fix the path.")
        return self

    def parsed_label_map(self) -> LabelMap | None:
        """The label map as a :class:`LabelMap` (``None`` when the layout's own applies)."""
        if self.label_map is None or isinstance(self.label_map, LabelMap):
            return self.label_map
        try:
            return LabelMap.parse(self.label_map)
        except LabelMapError as exc:
            raise ConfigError(f"--label-map {self.label_map!r}: {exc}") from None

    def compiled_patient_pattern(self) -> re.Pattern | None:
        """``patient_pattern`` compiled (``None`` when not set)."""
        if self.patient_pattern is None:
            return None
        try:
            pattern = re.compile(self.patient_pattern)
        except re.error as exc:
            raise ConfigError(f"--patient-pattern {self.patient_pattern!r} is not a regular "
                              f"expression: {exc}") from None
        if pattern.groups < 1:
            raise ConfigError(f"--patient-pattern {self.patient_pattern!r} has no group; group 1 is "
                              r"the patient id, e.g. '^(.+)_frame(\d+)$'")
        return pattern

    def discover(self, root: str | Path, read_cache=None):
        """:func:`pipelines.ingest.discover` with these options (and ``read_cache``, see there)."""
        from pipelines.ingest.layouts import discover

        return discover(root, **self.to_kwargs(), read_cache=read_cache)

    def to_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of :func:`~pipelines.ingest.discover`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the label map as its text)."""
        d = self.to_kwargs()
        if isinstance(self.label_map, LabelMap):
            d["label_map"] = self.label_map.spec()
        return d

    @classmethod
    def coerce(cls, options: "DiscoveryOptions | str | None" = None,
               layout: str | None = None) -> "DiscoveryOptions":
        """``options`` as :class:`DiscoveryOptions`: a layout name, ``None`` (auto), or options.

        ``layout`` (the older keyword of the Python functions) sets the layout of
        options that have none.
        """
        if options is None or isinstance(options, str):
            options = cls(layout=options)
        if not isinstance(options, cls):
            raise ConfigError(f"options must be DiscoveryOptions or a layout name, got {type(options).__name__}")
        if layout is not None and options.layout is None:
            options = replace(options, layout=layout)
        return options.validate()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DiscoveryOptions":
        """From arguments added by :func:`add_discovery_arguments`."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def add_discovery_arguments(parser: argparse.ArgumentParser,
                            layouts: tuple[str, ...] = LAYOUTS) -> argparse.ArgumentParser:
    """Add the shared discovery arguments (``--layout`` ... ``--patient-pattern``) to ``parser``."""
    g = parser.add_argument_group("reading the dataset (the same on every command)")
    g.add_argument("--layout", choices=layouts, help="force the layout (default: auto-detect)")
    g.add_argument("--image-glob", help="generic layout: glob of image files relative to the input, "
                                        "e.g. '*.nii' or '*/images/*.nii.gz'")
    g.add_argument("--label-suffix", default="_gt",
                   help="generic layout: X.nii.gz pairs with X<suffix>.nii.gz")
    g.add_argument("--label-pattern", help="generic layout: label file name from the image's, "
                                           "e.g. '{stem}_seg{ext}' (overrides --label-suffix)")
    g.add_argument("--mnms-csv", help="M&Ms metadata CSV (default: searched next to the input)")
    g.add_argument("--label-map", help="file label values -> class names in class order, e.g. "
                                       "'0=background,85=RV,170=MYO,255=LV' or '0=background,1=LV' "
                                       "(default: the layout's convention; ACDC 0-3 = bg,RV,MYO,LV)")
    g.add_argument("--patient-pattern", help="regex on image names: group 1 = patient id, optional "
                                             r"group 2 = frame (ED/ES or a number), e.g. "
                                             r"'^(.+)_frame(\d+)$' (nnU-Net default)")
    return parser
