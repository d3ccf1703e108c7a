"""Ingest: find every case of a raw dataset, read it safely and validate it.

Public API (see ``docs/DESIGN.md``)::

    DiscoveryOptions(layout, image_glob, label_suffix, label_pattern, mnms_csv,
                     label_map, patient_pattern).discover(root) -> Discovery
    discover(root, layout=None, *, image_glob=None, label_suffix="_gt",
             label_pattern=None, mnms_csv=None, label_map=None, patient_pattern=None) -> Discovery
    read_volume(path, *, case_id, frame=None) -> (ndarray, Geometry)
    load_frame(case, frame) -> LoadedFrame
    load_cine(case) -> (ndarray, Geometry) | None
    validate_case(case) -> list[Problem]
    ingest(root, options, ...) -> IngestReport  # what ``python -m pipelines.ingest`` runs
"""

from pipelines.ingest.layouts import LAYOUTS, MNMS_LABEL_MAP, Discovery, detect_layout, discover
from pipelines.ingest.options import DiscoveryOptions, add_discovery_arguments
from pipelines.ingest.readers import MAX_VOXELS, Header, read_cine, read_header, read_volume
from pipelines.ingest.report import IngestReport, ingest
from pipelines.ingest.validate import AFFINE_TOL_MM, LoadedFrame, load_cine, load_frame, validate_case

__all__ = ["LAYOUTS", "MNMS_LABEL_MAP", "Discovery", "DiscoveryOptions", "add_discovery_arguments",
           "detect_layout", "discover", "MAX_VOXELS",
           "Header", "read_cine", "read_header", "read_volume", "IngestReport", "ingest", "AFFINE_TOL_MM",
           "LoadedFrame", "load_cine", "load_frame", "validate_case"]
