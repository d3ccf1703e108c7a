"""Class statistics of label slices: per-slice counts (map), then sums (reduce).

The map step :func:`slice_class_counts` turns a stack of label slices into a
``(S, C)`` table of voxel counts; tables of several cases are joined with
:func:`merge_counts`; :func:`summarize` reduces a table to a small JSON-able
dict.  The build computes the statistics before cropping (after resampling)
and after cropping with the same functions, so the two are comparable.

Examples
--------
>>> import numpy as np
>>> lab = np.zeros((3, 4, 4), dtype=np.uint8)
>>> lab[1, :2, :2] = 1
>>> lab[2, 0, :] = 3
>>> slice_class_counts(lab).tolist()
[[16, 0, 0, 0], [12, 4, 0, 0], [12, 0, 0, 4]]
>>> s = summarize(slice_class_counts(lab))
>>> s["n_slices"], s["empty_slice_share"]
(3, 0.3333333333333333)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmrprep.cases import CLASSES

__all__ = ["slice_class_counts", "summarize", "merge_counts", "presence_voxels"]

log = logging.getLogger(__name__)


def slice_class_counts(label_slices: np.ndarray, num_classes: int = 4) -> np.ndarray:
    """Voxel count of every class in every slice.

    One vectorised comparison pass per class, then a count per slice.  A
    ``np.bincount`` with per-slice offsets would first cast every voxel to
    int64: about 10x slower on uint8 labels.  Any strided view works (e.g.
    ``label.transpose(2, 0, 1)`` of an ``[i, j, k]`` volume).

    Parameters
    ----------
    label_slices : ndarray of shape (S, H, W)
        Integer labels in ``0 .. num_classes - 1`` (uint8 in the store).
    num_classes : int
        Number of classes ``C`` (4: background, RV, MYO, LV).

    Returns
    -------
    ndarray of shape (S, C), int64

    Raises
    ------
    ValueError
        If the array is not 3D, not integer, or holds a value outside
        ``0 .. num_classes - 1``.
    """
    labels = np.asarray(label_slices)
    if labels.ndim != 3:
        raise ValueError(f"label_slices must be (S, H, W), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label_slices must have an integer dtype, got {labels.dtype}; "
                         "resample labels with nearest/one-hot interpolation")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    n_slices = labels.shape[0]
    if labels.size == 0:
        return np.zeros((n_slices, num_classes), dtype=np.int64)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"label values must be in 0..{num_classes - 1}, found range [{lo}, {hi}]; "
                         "remap source labels to the project convention first")
    labels = np.ascontiguousarray(labels)  # one copy of a strided view: each pass then streams
    counts = np.empty((n_slices, num_classes), dtype=np.int64)
    for c in range(num_classes):
        mask = labels == c
        # count_nonzero of a whole contiguous slice is a popcount loop; with ``axis`` it is a
        # generic (3x slower) sum
        counts[:, c] = [np.count_nonzero(m) for m in mask]
    return counts


def merge_counts(tables: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate per-case ``(S_i, C)`` count tables into one ``(sum S_i, C)`` table.

    Parameters
    ----------
    tables : sequence of ndarray
        Tables with the same number of columns; an empty sequence gives a
        ``(0, 4)`` table.

    Returns
    -------
    ndarray of shape (S, C), int64
    """
    arrays = [_as_table(t) for t in tables]
    if not arrays:
        return np.zeros((0, len(CLASSES)), dtype=np.int64)
    widths = {a.shape[1] for a in arrays}
    if len(widths) != 1:
        raise ValueError(f"count tables disagree on the number of classes: {sorted(widths)}")
    return np.concatenate(arrays, axis=0)


def presence_voxels(slice_counts: np.ndarray) -> np.ndarray:
    """Per class, the total voxels of the slices that contain that class.

    This is the denominator of median-frequency balancing (Eigen & Fergus):
    ``freq_c = N_c / presence_voxels[c]``.

    Parameters
    ----------
    slice_counts : ndarray of shape (S, C)

    Returns
    -------
    ndarray of shape (C,), int64
    """
    counts = _as_table(slice_counts)
    per_slice_total = counts.sum(axis=1)
    return ((counts > 0) * per_slice_total[:, None]).sum(axis=0).astype(np.int64)


def summarize(counts: np.ndarray, frame_ids: Sequence[Any] | np.ndarray | None = None,
              class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Reduce a per-slice count table to JSON-able dataset statistics.

    Parameters
    ----------
    counts : ndarray of shape (S, C)
        Output of :func:`slice_class_counts` / :func:`merge_counts`.
    frame_ids : sequence of length S, optional
        Frame identifier of every slice (e.g. ``frame_index``); adds
        ``n_frames`` and the share of frames containing each class.
    class_names : sequence of str, optional
        Defaults to :data:`cmrprep.cases.CLASSES` when ``C == 4``.

    Returns
    -------
    dict
        ``classes``, ``n_slices``, ``n_voxels``, ``class_counts`` (totals),
        ``class_fractions`` (voxel share), ``slice_presence`` (share of slices
        containing the class), ``empty_slice_share`` (background-only slices),
        ``foreground_slice_share`` and, with ``frame_ids``, ``n_frames`` and
        ``frame_presence``.  Shares are 0.0 for an empty table.
    """
    table = _as_table(counts)
    n_slices, n_classes = table.shape
    totals = table.sum(axis=0)
    n_voxels = int(totals.sum())
    present = table > 0
    foreground = present[:, 1:].any(axis=1)
    out: dict[str, Any] = {
        "classes": _names(n_classes, class_names),
        "n_slices": int(n_slices),
        "n_voxels": n_voxels,
        "class_counts": [int(v) for v in totals],
        "class_fractions": _shares(totals, n_voxels),
        "slice_presence": _shares(present.sum(axis=0), n_slices),
        "empty_slice_share": _share(n_slices - int(foreground.sum()), n_slices),
        "foreground_slice_share": _share(int(foreground.sum()), n_slices),
    }
    if frame_ids is not None:
        out.update(_frame_summary(present, frame_ids))
    return out


# -- helpers -------------------------------------------------------------------
def _as_table(counts: np.ndarray) -> np.ndarray:
    table = np.asarray(counts)
    if table.ndim != 2:
        raise ValueError(f"class counts must be a (S, C) table, got shape {table.shape}")
    if table.size and not np.issubdtype(table.dtype, np.integer):
        if not np.all(np.mod(table, 1) == 0):
            raise ValueError("class counts must be whole numbers")
    table = table.astype(np.int64, copy=False)
    if table.size and int(table.min()) < 0:
        raise ValueError(f"class counts must be >= 0, found {int(table.min())}")
    return table


def _frame_summary(present: np.ndarray, frame_ids: Sequence[Any] | np.ndarray) -> dict[str, Any]:
    ids = np.asarray(frame_ids)
    if ids.shape != (present.shape[0],):
        raise ValueError(f"frame_ids must have one entry per slice ({present.shape[0]}), "
                         f"got shape {ids.shape}")
    if ids.size == 0:
        return {"n_frames": 0, "frame_presence": [0.0] * present.shape[1]}
    _, inverse = np.unique(ids, return_inverse=True)
    n_frames = int(inverse.max()) + 1
    per_frame = np.zeros((n_frames, present.shape[1]), dtype=bool)
    np.logical_or.at(per_frame, inverse.ravel(), present)
    return {"n_frames": n_frames, "frame_presence": _shares(per_frame.sum(axis=0), n_frames)}


def _names(n_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is not None:
        if len(class_names) != n_classes:
            raise ValueError(f"{len(class_names)} class names for {n_classes} classes")
        return list(class_names)
    return list(CLASSES) if n_classes == len(CLASSES) else [f"class{c}" for c in range(n_classes)]


def _share(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def _shares(nums: np.ndarray, den: float) -> list[float]:
    return [_share(v, den) for v in nums]
