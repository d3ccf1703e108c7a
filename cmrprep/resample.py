"""In-plane resampling with SimpleITK; the slice axis (k) is never resampled.

Grid convention (physical extent preserved, centred)
----------------------------------------------------
Along each in-plane axis the new size is ``round(n * old / new)`` and the new
grid is **centred on the old field of view**: the world position of the FOV
centre (voxel ``(n - 1) / 2``) is unchanged, and the FOV edges (voxel
``-0.5`` and ``n - 0.5``) move by at most a quarter of a new voxel
(rounding of the size), split evenly between both sides.  When
``n * old / new`` is an integer the FOV corners are preserved exactly.  The
direction cosines and the slice axis (spacing, count, positions) are
unchanged, so all slices are resampled in **one** 3D SimpleITK call whose
sample points fall exactly on the input slices (no through-plane mixing).
Samples just outside the FOV use nearest-neighbour extrapolation.

Labels (``method="onehot_linear"``, nnU-Net style)
--------------------------------------------------
The label is one-hot encoded (a C-component vector image), resampled
linearly in one call, and the argmax is taken.  Guarantees, per slice:

* **no new class**: a class absent from an input slice gets probability
  ``-1`` in that output slice before the argmax;
* **no lost structure**: if a class present in an input slice vanishes from
  the output slice (thin or tiny structures when downsampling), its pixels
  from a *nearest-neighbour* resampling of that slice are painted back; if
  even nearest loses it, the single pixel with the highest interpolated
  probability of that class is painted.  Painting happens in class order
  1..C-1, so a later class may overwrite an earlier one on a shared pixel.

Examples
--------
>>> import numpy as np
>>> from cmrprep.geometry import Geometry
>>> g = Geometry.from_affine(np.diag([2.0, 2.0, 8.0, 1.0]), (20, 30, 3))
>>> out, g2 = resample_inplane(np.ones((20, 30, 3)), g, 1.0)
>>> out.shape, g2.spacing, out.dtype.name
((40, 60, 3), (1.0, 1.0, 8.0), 'float32')
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk

from cmrprep.geometry import Geometry, to_sitk

__all__ = ["target_geometry", "resample_inplane", "resample_cine_inplane",
           "resample_label_inplane", "resample_to_reference"]

log = logging.getLogger(__name__)

_INTERP = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}
_SAME_RTOL = 1e-6


def _check_spacing(spacing: float | tuple[float, float]) -> tuple[float, float]:
    sp = (float(spacing), float(spacing)) if np.isscalar(spacing) else tuple(map(float, spacing))
    if len(sp) != 2 or not all(np.isfinite(sp)) or min(sp) <= 0:
        raise ValueError(f"spacing must be a positive in-plane spacing in mm, got {spacing!r}")
    return sp  # type: ignore[return-value]


def _check_array(array: np.ndarray, geometry: Geometry, ndim: int, name: str) -> None:
    if array.ndim != ndim or tuple(array.shape[:3]) != tuple(geometry.shape[:3]):
        raise ValueError(f"{name} must be {ndim}D with spatial shape {geometry.shape}, "
                         f"got shape {array.shape}")


def target_geometry(geometry: Geometry, spacing: float | tuple[float, float]) -> Geometry:
    """Geometry of the in-plane resampled grid (see the module doc for the convention).

    Examples
    --------
    >>> import numpy as np
    >>> g = Geometry.from_affine(np.diag([1.5, 1.5, 8.0, 1.0]), (10, 10, 2))
    >>> t = target_geometry(g, 3.0)
    >>> t.shape, t.origin
    ((5, 5, 2), (0.75, 0.75, 0.0))
    """
    new_sp = _check_spacing(spacing)
    m = geometry.matrix
    old_sp = np.asarray(geometry.spacing)
    out = m.copy()
    shape = list(geometry.shape[:3])
    centre_idx = (np.asarray(shape, dtype=np.float64) - 1) / 2
    for ax in (0, 1):
        n_new = max(1, int(round(shape[ax] * old_sp[ax] / new_sp[ax])))
        out[:3, ax] = m[:3, ax] / old_sp[ax] * new_sp[ax]
        shape[ax] = n_new
    new_centre_idx = (np.asarray(shape, dtype=np.float64) - 1) / 2
    out[:3, 3] = m[:3, :3] @ centre_idx + m[:3, 3] - out[:3, :3] @ new_centre_idx
    return Geometry.from_affine(out, shape)


def _same_grid(a: Geometry, b: Geometry) -> bool:
    if tuple(a.shape[:3]) != tuple(b.shape[:3]):
        return False
    return a.max_affine_difference(b) <= _SAME_RTOL * max(1.0, float(np.abs(a.matrix).max()))


def _world_frame(image: sitk.Image, geometry: Geometry) -> sitk.Image:
    geo = to_sitk(np.zeros((1, 1, 1), dtype=np.uint8), geometry.with_shape((1, 1, 1)))
    image.SetSpacing(geo.GetSpacing())
    image.SetDirection(geo.GetDirection())
    image.SetOrigin(geo.GetOrigin())
    return image


def _index_frame(geometry: Geometry, ref: Geometry) -> tuple[list[float], list[float]] | None:
    """Spacing/origin of ``ref`` in the source's *index* space, if axis-aligned there.

    The in-plane grids of this module share direction cosines and slice
    positions with their source, so ref index -> source index is a per-axis
    scale and shift.  ITK resamples such axis-aligned grids several times
    faster than oblique ones, and the result is the same.
    """
    m = np.linalg.solve(geometry.matrix, ref.matrix)
    diag = np.diag(m)[:3]
    off = m[:3, :3] - np.diag(diag)
    if np.abs(off).max() > 1e-9 * max(1.0, float(np.abs(diag).max())) or diag.min() <= 0:
        return None
    return [float(v) for v in diag], [float(v) for v in m[:3, 3]]


def _resample_channels(channels: np.ndarray, geometry: Geometry, ref: Geometry,
                       interp: int) -> np.ndarray:
    """Resample ``[i, j, k, c]`` float32 channels -> ``[I, J, K, c]``, one 3D call per channel."""
    frame = _index_frame(geometry, ref)
    out_shape = [int(s) for s in ref.shape[:3]]
    reference = sitk.Image(out_shape, sitk.sitkUInt8)
    if frame is None:
        reference = _world_frame(reference, ref)
    else:
        reference.SetSpacing(frame[0])
        reference.SetOrigin(frame[1])
    out = np.empty((*out_shape, channels.shape[3]), dtype=np.float32)
    for c in range(channels.shape[3]):
        img = sitk.GetImageFromArray(np.ascontiguousarray(channels[..., c].T, dtype=np.float32))
        if frame is None:
            img = _world_frame(img, geometry)
        res = sitk.Resample(img, reference, sitk.Transform(), interp, 0.0, sitk.sitkFloat32, True)
        out[..., c] = sitk.GetArrayViewFromImage(res).T
    return out


def _resample_values(array: np.ndarray, geometry: Geometry, ref: Geometry,
                     interpolation: str) -> np.ndarray:
    if interpolation not in _INTERP:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {interpolation!r}")
    chans = array[..., None] if array.ndim == 3 else array
    if _same_grid(geometry, ref):
        out = np.array(chans, dtype=np.float32)
    else:
        out = _resample_channels(chans.astype(np.float32, copy=False), geometry, ref,
                                 _INTERP[interpolation])
    return out[..., 0] if array.ndim == 3 else out


def resample_inplane(image: np.ndarray, geometry: Geometry, spacing: float | tuple[float, float],
                     *, interpolation: str = "linear") -> tuple[np.ndarray, Geometry]:
    """Resample a 3D image in-plane to ``spacing`` mm (``linear`` or cubic ``bspline``).

    Returns a new float32 array and its geometry (see :func:`target_geometry`).
    When the grid is unchanged the values are copied exactly.
    """
    _check_array(image, geometry, 3, "image")
    if interpolation not in ("linear", "bspline"):
        raise ValueError(f"interpolation must be 'linear' or 'bspline', got {interpolation!r}")
    ref = target_geometry(geometry, spacing)
    return _resample_values(image, geometry, ref, interpolation), ref


def resample_cine_inplane(cine: np.ndarray, geometry: Geometry,
                          spacing: float | tuple[float, float], *,
                          interpolation: str = "linear") -> tuple[np.ndarray, Geometry]:
    """Resample a 4D cine ``[i, j, k, t]`` in-plane; all frames in one call (t as vector)."""
    _check_array(cine, geometry, 4, "cine")
    if interpolation not in ("linear", "bspline"):
        raise ValueError(f"interpolation must be 'linear' or 'bspline', got {interpolation!r}")
    ref = target_geometry(geometry, spacing)
    return _resample_values(cine, geometry, ref, interpolation), ref


def _class_probabilities(label: np.ndarray, geometry: Geometry, ref: Geometry,
                         num_classes: int) -> np.ndarray:
    """Linearly resampled one-hot ``[I, J, K, C]``; absent classes get ``-1``.

    Only foreground classes present somewhere are resampled; background is
    ``1 - sum(foreground)`` (linear weights sum to one).
    """
    present = np.bincount(label.ravel(), minlength=num_classes)[:num_classes] > 0
    fg = [c for c in range(1, num_classes) if present[c]]
    prob = np.full((*ref.shape[:3], num_classes), -1.0, dtype=np.float32)
    if fg:
        onehot = np.stack([label == c for c in fg], axis=-1).astype(np.float32)
        prob[..., fg] = _resample_channels(onehot, geometry, ref, sitk.sitkLinear)
    prob[..., 0] = 1.0 - prob[..., fg].sum(axis=-1) if present[0] else -1.0
    return prob


def _nearest(label: np.ndarray, geometry: Geometry, ref: Geometry) -> np.ndarray:
    out = _resample_channels(label[..., None].astype(np.float32), geometry, ref,
                             sitk.sitkNearestNeighbor)
    return out[..., 0].round().astype(np.uint8)


def _check_label(label: np.ndarray, geometry: Geometry, num_classes: int) -> None:
    _check_array(label, geometry, 3, "label")
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must have an integer dtype, got {label.dtype}")
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"label values must be in 0..{num_classes - 1}, "
                         f"got {int(label.min())}..{int(label.max())}")


def _restore_lost(out: np.ndarray, prob: np.ndarray, nearest, present_in: np.ndarray) -> int:
    """Paint classes present in the input slice but missing in ``out`` (in place).

    ``nearest`` is a zero-argument callable giving the nearest-neighbour
    resampling; it is only computed when something was lost.
    """
    lost = present_in & ~_presence(out, prob.shape[-1])
    lost[:, 0] = False
    if not lost.any():
        return 0
    near = nearest()
    for k, c in zip(*np.nonzero(lost)):
        mask = near[:, :, k] == c
        if not mask.any():
            mask = np.zeros(mask.shape, dtype=bool)
            mask.flat[int(np.argmax(prob[:, :, k, c]))] = True
        out[:, :, k][mask] = c
    return int(lost.sum())


def _presence(label: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, C)`` bool: class ``c`` occurs in slice ``k``."""
    k = label.shape[2]
    flat = label.transpose(2, 0, 1).reshape(k, -1).astype(np.int64) + \
        num_classes * np.arange(k)[:, None]
    return (np.bincount(flat.ravel(), minlength=k * num_classes).reshape(k, num_classes) > 0)


def resample_label_inplane(label: np.ndarray, geometry: Geometry,
                           spacing: float | tuple[float, float], *,
                           method: str = "onehot_linear",
                           num_classes: int = 4) -> tuple[np.ndarray, Geometry]:
    """Resample a 3D label map in-plane (``onehot_linear`` or ``nearest``) -> uint8.

    See the module doc for the guarantees of ``onehot_linear`` (no new class,
    no lost structure per slice).

    Examples
    --------
    >>> import numpy as np
    >>> g = Geometry.from_affine(np.diag([1.0, 1.0, 8.0, 1.0]), (8, 8, 1))
    >>> lab = np.zeros((8, 8, 1), np.uint8); lab[3:5, 3:5] = 3
    >>> out, _ = resample_label_inplane(lab, g, 2.0)
    >>> sorted(np.unique(out).tolist())
    [0, 3]
    """
    _check_label(label, geometry, num_classes)
    ref = target_geometry(geometry, spacing)
    return _resample_label(label, geometry, ref, method, num_classes, per_slice=True), ref


def _resample_label(label: np.ndarray, geometry: Geometry, ref: Geometry, method: str,
                    num_classes: int, per_slice: bool) -> np.ndarray:
    if method not in ("onehot_linear", "nearest"):
        raise ValueError(f"method must be 'onehot_linear' or 'nearest', got {method!r}")
    if _same_grid(geometry, ref):
        return label.astype(np.uint8, copy=True)
    if method == "nearest":
        return _nearest(label, geometry, ref)
    prob = _class_probabilities(label, geometry, ref, num_classes)
    if per_slice:
        present_in = _presence(label, num_classes)
        prob = np.where(present_in[None, None], prob, np.float32(-1.0))
    out = np.argmax(prob, axis=-1).astype(np.uint8)
    if per_slice:
        painted = _restore_lost(out, prob, lambda: _nearest(label, geometry, ref), present_in)
        if painted:
            log.debug("restored %d (slice, class) pairs lost by one-hot resampling", painted)
    return out


def resample_to_reference(array: np.ndarray, geometry: Geometry, reference: Geometry, *,
                          is_label: bool, method: str = "onehot_linear",
                          interpolation: str = "linear", num_classes: int = 4) -> np.ndarray:
    """Resample ``array`` onto the grid of ``reference`` (e.g. back to the original grid).

    Parameters
    ----------
    array : ndarray
        3D ``[i, j, k]`` array on ``geometry``.
    reference : Geometry
        Target grid; any affine is accepted (full 3D resampling).
    is_label : bool
        Labels use ``method`` (``onehot_linear`` argmax restricted to the
        classes present in ``array``, or ``nearest``) and come back as uint8;
        images use ``interpolation`` and come back as float32.

    Returns
    -------
    ndarray
        Array of shape ``reference.shape``; an exact copy when the grids match.
    """
    _check_array(array, geometry, 3, "array")
    if is_label:
        _check_label(array, geometry, num_classes)
        return _resample_label(array, geometry, reference, method, num_classes, per_slice=False)
    return _resample_values(array, geometry, reference, interpolation)
