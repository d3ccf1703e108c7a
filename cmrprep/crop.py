"""Fixed-size in-plane crop around the heart centre, with padding, jitter and inverse.

Coordinates are voxel indices ``(i, j)`` of the (resampled, canonical) array
the crop is applied to.  A :class:`CropBox` may extend beyond the image
(negative ``start`` or past the end): :func:`crop` pads there and
:func:`uncrop` drops the padded part, so ``uncrop(crop(x, b), b)`` equals
``x`` inside the box.

The centre pixel convention: a box of size ``h`` centred on ``c`` starts at
``floor(c - (h - 1) / 2 + 0.5)``, so a half-integer centre of an even box is
exact (``c = 63.5, h = 128 -> 0..127``).

Examples
--------
>>> import numpy as np
>>> box = crop_box_around((5.0, 5.0), (4, 4), (8, 8))
>>> box.start, box.stop
((4, 4), (8, 8))
>>> x = np.arange(64).reshape(8, 8)
>>> bool((uncrop(crop(x, box), box)[4:8, 4:8] == x[4:8, 4:8]).all())
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["CropBox", "CropError", "center_from_label", "crop_box_around", "jittered_center",
           "crop", "uncrop", "foreground_outside", "foreground_extent", "check_crop_fits"]


class CropError(ValueError):
    """The heart does not fit in the crop; ``needed_px``/``needed_mm`` give the minimum size."""

    def __init__(self, message: str, needed_px: tuple[int, int], needed_mm: tuple[float, float]):
        super().__init__(message)
        self.needed_px = needed_px
        self.needed_mm = needed_mm


@dataclass(frozen=True)
class CropBox:
    """In-plane crop window.

    Parameters
    ----------
    start : tuple of int
        ``(i0, j0)`` first row/column of the box in the source array (may be
        negative or past the end: padded).
    size : tuple of int
        ``(h, w)`` box size in pixels.
    shape : tuple of int
        ``(I, J)`` in-plane shape of the source array (needed by :func:`uncrop`).
    """

    start: tuple[int, int]
    size: tuple[int, int]
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if min(self.size) < 1 or min(self.shape) < 1:
            raise ValueError(f"crop size {self.size} and shape {self.shape} must be positive")

    @property
    def stop(self) -> tuple[int, int]:
        """Exclusive end ``(i0 + h, j0 + w)``."""
        return (self.start[0] + self.size[0], self.start[1] + self.size[1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"start": list(self.start), "size": list(self.size), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CropBox":
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(int(v) for v in d["start"]), tuple(int(v) for v in d["size"]),  # type: ignore[arg-type]
                   tuple(int(v) for v in d["shape"]))  # type: ignore[arg-type]


def _fg_bbox(label: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive ``(lo, hi)`` in-plane bounding box of ``label > 0`` over all slices."""
    fg = np.asarray(label) > 0
    if fg.ndim > 2:
        fg = fg.reshape(fg.shape[0], fg.shape[1], -1).any(axis=2)
    rows, cols = np.nonzero(fg.any(axis=1))[0], np.nonzero(fg.any(axis=0))[0]
    if rows.size == 0:
        return None
    return np.array([rows[0], cols[0]]), np.array([rows[-1], cols[-1]])


def center_from_label(label: np.ndarray) -> tuple[float, float]:
    """Centre ``(ci, cj)`` of the foreground bounding box over all slices.

    Raises
    ------
    ValueError
        If ``label`` has no foreground.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((10, 10, 2), np.uint8); lab[2:5, 4:8, 1] = 1
    >>> center_from_label(lab)
    (3.0, 5.5)
    """
    box = _fg_bbox(label)
    if box is None:
        raise ValueError("label has no foreground voxel; cannot centre the crop on it")
    lo, hi = box
    return (float(lo[0] + hi[0]) / 2, float(lo[1] + hi[1]) / 2)


def _start(center: float, size: int) -> int:
    return int(np.floor(center - (size - 1) / 2 + 0.5))


def crop_box_around(center: Sequence[float], size: Sequence[int], shape: Sequence[int]) -> CropBox:
    """Box of ``size`` pixels centred on ``center`` in an array of in-plane ``shape``."""
    if len(center) != 2 or not all(np.isfinite(center)):
        raise ValueError(f"center must be two finite voxel coordinates, got {center!r}")
    size = (int(size[0]), int(size[1]))
    return CropBox((_start(center[0], size[0]), _start(center[1], size[1])), size,
                   (int(shape[0]), int(shape[1])))


def foreground_extent(label: np.ndarray) -> tuple[int, int]:
    """In-plane size ``(h, w)`` in pixels of the foreground bounding box (0, 0 if none)."""
    box = _fg_bbox(label)
    if box is None:
        return (0, 0)
    return (int(box[1][0] - box[0][0] + 1), int(box[1][1] - box[0][1] + 1))


def check_crop_fits(label: np.ndarray, size: Sequence[int], spacing: float) -> None:
    """Raise :class:`CropError` if the heart's bounding box is larger than ``size``."""
    ext = foreground_extent(label)
    if ext[0] > size[0] or ext[1] > size[1]:
        need = (max(ext[0], int(size[0])), max(ext[1], int(size[1])))
        mm = (need[0] * spacing, need[1] * spacing)
        raise CropError(f"crop smaller than the heart: need at least {mm[0]:.0f} x {mm[1]:.0f} mm "
                        f"({need[0]} x {need[1]} px at {spacing} mm), crop is "
                        f"{size[0]} x {size[1]} px", need, mm)


def jittered_center(center: Sequence[float], label: np.ndarray | None, size: Sequence[int],
                    jitter_px: float, rng: np.random.Generator) -> tuple[float, float]:
    """Shift ``center`` uniformly within a disc of radius ``jitter_px``, keeping the heart inside.

    The shifted centre is clamped per axis so that the crop box still holds the
    foreground bounding box of every slice.  If the heart is larger than the
    box the clamp is impossible and the unshifted centre is returned.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((64, 64, 1), np.uint8); lab[20:40, 20:40] = 1
    >>> c = jittered_center((29.5, 29.5), lab, (32, 32), 20, np.random.default_rng(0))
    >>> b = crop_box_around(c, (32, 32), (64, 64))
    >>> foreground_outside(lab, b)
    0
    """
    if jitter_px < 0:
        raise ValueError(f"jitter_px must be >= 0, got {jitter_px}")
    r = jitter_px * np.sqrt(rng.random())
    theta = 2 * np.pi * rng.random()
    c = np.array([center[0] + r * np.cos(theta), center[1] + r * np.sin(theta)])
    box = _fg_bbox(label) if label is not None else None
    if box is None:
        return (float(c[0]), float(c[1]))
    lo, hi = box
    half = (np.asarray(size, dtype=np.float64) - 1) / 2
    low, high = hi - half, lo + half  # centre range keeping lo..hi inside the box
    if np.any(low > high):
        return (float(center[0]), float(center[1]))
    c = np.clip(c, low, high)
    return (float(c[0]), float(c[1]))


def _overlap(box: CropBox) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices of the source array and of the box that overlap."""
    src, dst = [], []
    for a in (0, 1):
        s0, s1 = max(box.start[a], 0), min(box.stop[a], box.shape[a])
        s1 = max(s1, s0)
        src.append(slice(s0, s1))
        dst.append(slice(s0 - box.start[a], s1 - box.start[a]))
    return (src[0], src[1]), (dst[0], dst[1])


def crop(array: np.ndarray, box: CropBox, fill: float = 0) -> np.ndarray:
    """Crop ``array[i, j, ...]`` to ``[h, w, ...]``, padding with ``fill`` outside the image."""
    if tuple(array.shape[:2]) != tuple(box.shape):
        raise ValueError(f"array in-plane shape {array.shape[:2]} differs from box.shape {box.shape}")
    out = np.full(tuple(box.size) + array.shape[2:], fill, dtype=array.dtype)
    src, dst = _overlap(box)
    out[dst] = array[src]
    return out


def uncrop(cropped: np.ndarray, box: CropBox, fill: float = 0) -> np.ndarray:
    """Inverse of :func:`crop`: place ``cropped[h, w, ...]`` back into ``[I, J, ...]``."""
    if tuple(cropped.shape[:2]) != tuple(box.size):
        raise ValueError(f"cropped in-plane shape {cropped.shape[:2]} differs from box.size {box.size}")
    out = np.full(tuple(box.shape) + cropped.shape[2:], fill, dtype=cropped.dtype)
    src, dst = _overlap(box)
    out[src] = cropped[dst]
    return out


def foreground_outside(label: np.ndarray, box: CropBox) -> int:
    """Number of foreground voxels (``label > 0``) of ``label[i, j, ...]`` outside ``box``."""
    fg = np.asarray(label) > 0
    src, _ = _overlap(box)
    return int(fg.sum() - fg[src].sum())
