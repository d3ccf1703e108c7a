"""cmrprep: data preparation and class rebalancing for cardiac MRI segmentation.

The library holds pure stage functions; file I/O and Dask live in ``pipelines``.
"""

from cmrprep.cases import CLASSES, CaseError, CaseSpec, FrameSpec, Problem
from cmrprep.geometry import Geometry
from cmrprep.plan import ConfigError, Plan

__version__ = "0.1.0"

__all__ = ["CLASSES", "CaseError", "CaseSpec", "FrameSpec", "Problem", "Geometry",
           "ConfigError", "Plan", "__version__"]
