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
from cmrprep.stats import slice_class_counts

__all__ = ["target_geometry", "resample_inplane", "resample_inplane_window",
           "resample_cine_inplane", "resample_label_inplane", "resample_label_inplane_support",
           "resample_to_reference"]

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
    """Resample ``[i, j, k, c]`` float32 channels -> ``[I, J, K, c]``, one 3D call per channel.

    One filter, configured once with the output grid (no reference image is
    allocated), executes every channel.
    """
    frame = _index_frame(geometry, ref)
    out_shape = [int(s) for s in ref.shape[:3]]
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(out_shape)
    resampler.SetInterpolator(interp)
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampler.SetUseNearestNeighborExtrapolator(True)
    if frame is None:
        grid = _world_frame(sitk.Image([1, 1, 1], sitk.sitkUInt8), ref)
        resampler.SetOutputSpacing(grid.GetSpacing())
        resampler.SetOutputOrigin(grid.GetOrigin())
        resampler.SetOutputDirection(grid.GetDirection())
    else:
        resampler.SetOutputSpacing(frame[0])
        resampler.SetOutputOrigin(frame[1])
    out = np.empty((*out_shape, channels.shape[3]), dtype=np.float32)
    for c in range(channels.shape[3]):
        img = sitk.GetImageFromArray(np.ascontiguousarray(channels[..., c].T, dtype=np.float32))
        if frame is None:
            img = _world_frame(img, geometry)
        res = resampler.Execute(img)  # held: the array view does not keep the image alive
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
                         num_classes: int, background: bool | None = None) -> np.ndarray:
    """Linearly resampled one-hot ``[I, J, K, C]``; absent classes get ``-1``.

    Only foreground classes present somewhere are resampled; background is
    ``1 - sum(foreground)`` (linear weights sum to one).  ``background``
    overrides whether class 0 counts as present (``label`` may be a block of
    a larger label whose border is background).
    """
    present = np.array([bool((label == c).any()) for c in range(num_classes)])
    if background is not None:
        present[0] = background
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
    return slice_class_counts(label.transpose(2, 0, 1), num_classes) > 0


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


def resample_label_inplane_support(label: np.ndarray, geometry: Geometry,
                                   spacing: float | tuple[float, float], *,
                                   method: str = "onehot_linear", num_classes: int = 4
                                   ) -> tuple[np.ndarray, tuple[int, int], Geometry]:
    """:func:`resample_label_inplane` restricted to the window holding all foreground.

    Returns ``(window, (i0, j0), ref)``: ``window`` is ``out[i0:i0 + h, j0:j0 + w]``
    of the full result ``out`` on ``ref`` (the full target grid), and ``out`` is
    0 everywhere else.  Only that window is computed (see "Support window" in
    the module doc), which is what makes the build fast: the heart covers a
    small part of the field of view.

    Examples
    --------
    >>> import numpy as np
    >>> g = Geometry.from_affine(np.diag([1.0, 1.0, 8.0, 1.0]), (40, 40, 1))
    >>> lab = np.zeros((40, 40, 1), np.uint8); lab[20:24, 10:14] = 3
    >>> win, start, ref = resample_label_inplane_support(lab, g, 2.0)
    >>> full, _ = resample_label_inplane(lab, g, 2.0)
    >>> h, w = win.shape[:2]
    >>> bool((full[start[0]:start[0] + h, start[1]:start[1] + w] == win).all())
    True
    >>> int((full > 0).sum()) == int((win > 0).sum())
    True
    """
    _check_label(label, geometry, num_classes)
    ref = target_geometry(geometry, spacing)
    win, start = _resample_label_support(label, geometry, ref, method, num_classes, per_slice=True)
    return win, (start[0], start[1]), ref


def _fg_support_window(label: np.ndarray, geometry: Geometry,
                       ref: Geometry) -> tuple[tuple[int, int], ...] | None:
    """Window ``((i0, i1), (j0, j1), (k0, k1))`` of ``ref`` outside which the label resamples to 0.

    ``None`` when no useful window exists: oblique grids, foreground touching
    the in-plane border (extrapolation would carry it outwards), no
    foreground at all, or a window that is the whole grid.
    """
    frame = _index_frame(geometry, ref)
    if frame is None:
        return None
    scale, offset = frame
    fg = label > 0
    rows = np.flatnonzero(fg.any(axis=(1, 2)))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(fg[rows[0]:rows[-1] + 1].any(axis=(0, 2)))
    window = []
    for ax, (lo, hi) in enumerate(((rows[0], rows[-1]), (cols[0], cols[-1]))):
        n_src, n_ref = label.shape[ax], ref.shape[ax]
        if lo == 0 or hi == n_src - 1:
            return None
        # linear weights are non-zero only for source positions in (lo - 1, hi + 1)
        t0 = int(np.floor((lo - 1 - offset[ax]) / scale[ax])) - 1
        t1 = int(np.ceil((hi + 1 - offset[ax]) / scale[ax])) + 2
        window.append((max(t0, 0), min(t1, n_ref)))
    window.append((0, int(ref.shape[2])))
    if all(w == (0, n) for w, n in zip(window, ref.shape[:3])):
        return None
    return tuple(window)


def _source_block(geometry: Geometry, ref: Geometry, window, margin: int) -> tuple[slice, ...]:
    """Source index block whose data fully determine the ``ref`` samples in ``window``."""
    scale, offset = _index_frame(geometry, ref)  # type: ignore[misc]
    block = []
    for ax in range(3):
        t0, t1 = window[ax]
        s_lo = offset[ax] + scale[ax] * t0
        s_hi = offset[ax] + scale[ax] * (t1 - 1)
        lo = max(int(np.floor(s_lo)) - margin, 0)
        hi = min(int(np.floor(s_hi)) + 2 + margin, int(geometry.shape[ax]))
        block.append(slice(lo, max(hi, lo + 1)))
    return tuple(block)


def _sub_geometry(geometry: Geometry, start: tuple[int, ...], shape: tuple[int, ...]) -> Geometry:
    """Geometry of ``array[start[0]:, start[1]:, start[2]:]`` cut to ``shape``."""
    m = geometry.matrix
    m[:3, 3] = m[:3, 3] + m[:3, :3] @ np.asarray(start, dtype=np.float64)
    return Geometry.from_affine(m, shape)


def resample_inplane_window(image: np.ndarray, geometry: Geometry,
                            spacing: float | tuple[float, float],
                            window: tuple[tuple[int, int], tuple[int, int]], *,
                            interpolation: str = "linear") -> tuple[np.ndarray, Geometry]:
    """:func:`resample_inplane` computed only on ``window = ((i0, i1), (j0, j1))`` of the target grid.

    Returns ``(values, ref)``: ``values`` (float32, ``(i1 - i0, j1 - j0, K)``)
    equals ``resample_inplane(...)[0][i0:i1, j0:j1]`` up to float rounding,
    and ``ref`` is the *full* target geometry.  For ``linear`` only the source
    block the window needs goes to SimpleITK; ``bspline`` (whose prefilter is
    global) gets the whole source.

    Examples
    --------
    >>> import numpy as np
    >>> g = Geometry.from_affine(np.diag([2.0, 2.0, 8.0, 1.0]), (20, 30, 2))
    >>> x = np.random.default_rng(0).normal(size=(20, 30, 2))
    >>> full, _ = resample_inplane(x, g, 1.0)
    >>> win, _ = resample_inplane_window(x, g, 1.0, ((5, 17), (30, 41)))
    >>> bool(np.allclose(win, full[5:17, 30:41], atol=1e-5))
    True
    """
    _check_array(image, geometry, 3, "image")
    if interpolation not in ("linear", "bspline"):
        raise ValueError(f"interpolation must be 'linear' or 'bspline', got {interpolation!r}")
    ref = target_geometry(geometry, spacing)
    (i0, i1), (j0, j1) = ((int(a), int(b)) for a, b in window)
    if not (0 <= i0 < i1 <= ref.shape[0] and 0 <= j0 < j1 <= ref.shape[1]):
        raise ValueError(f"window {window!r} must be a non-empty part of the target grid "
                         f"{tuple(ref.shape[:2])}")
    if _same_grid(geometry, ref):
        return np.array(image[i0:i1, j0:j1], dtype=np.float32), ref
    sub_ref = _sub_geometry(ref, (i0, j0, 0), (i1 - i0, j1 - j0, ref.shape[2]))
    if _index_frame(geometry, ref) is None or interpolation != "linear":
        return _resample_values(image, geometry, sub_ref, interpolation), ref
    block = _source_block(geometry, ref, ((i0, i1), (j0, j1), (0, int(ref.shape[2]))), margin=1)
    src = image[block]
    src_geo = _sub_geometry(geometry, tuple(b.start for b in block), src.shape)
    return _resample_values(src, src_geo, sub_ref, interpolation), ref


def _resample_label(label: np.ndarray, geometry: Geometry, ref: Geometry, method: str,
                    num_classes: int, per_slice: bool) -> np.ndarray:
    win, start = _resample_label_support(label, geometry, ref, method, num_classes, per_slice)
    if win.shape == tuple(ref.shape[:3]):
        return win
    out = np.zeros(ref.shape[:3], dtype=np.uint8)
    out[tuple(slice(a, a + n) for a, n in zip(start, win.shape))] = win
    return out


def _resample_label_support(label: np.ndarray, geometry: Geometry, ref: Geometry, method: str,
                            num_classes: int, per_slice: bool
                            ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resampled label on its support window of ``ref`` (the whole grid when there is none)."""
    if method not in ("onehot_linear", "nearest"):
        raise ValueError(f"method must be 'onehot_linear' or 'nearest', got {method!r}")
    if _same_grid(geometry, ref):
        return label.astype(np.uint8, copy=True), (0, 0, 0)
    window = _fg_support_window(label, geometry, ref)
    border_is_background = window is not None
    start: tuple[int, int, int] = (0, 0, 0)
    if window is not None:
        block = _source_block(geometry, ref, window, margin=1)
        start = (window[0][0], window[1][0], window[2][0])
        label = label[block]
        geometry = _sub_geometry(geometry, tuple(b.start for b in block), label.shape)
        ref = _sub_geometry(ref, start, tuple(w[1] - w[0] for w in window))
    if method == "nearest":
        return _nearest(label, geometry, ref), start
    prob = _class_probabilities(label, geometry, ref, num_classes,
                                background=True if border_is_background else None)
    if per_slice:
        present_in = _presence(label, num_classes)
        if border_is_background:
            present_in[:, 0] = True
        prob = np.where(present_in[None, None], prob, np.float32(-1.0))
    out = np.argmax(prob, axis=-1).astype(np.uint8)
    if per_slice:
        painted = _restore_lost(out, prob, lambda: _nearest(label, geometry, ref), present_in)
        if painted:
            log.debug("restored %d (slice, class) pairs lost by one-hot resampling", painted)
    return out, start


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
