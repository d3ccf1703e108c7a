"""Private rendering kernels of the synthetic cine-CMR phantom.

Everything here is geometry in physical millimetres: shapes are ellipses given
by an approximate signed distance field (SDF), painted back to front onto a
``Canvas`` (image + label).  The partial-volume ramp is one pixel wide (a box
filter of the ideal image), labels are the crisp ``sdf < 0`` sets.

Two frames of reference are used:

* the *body frame* ``(u, v)`` in mm: ``u`` toward the patient's left, ``v``
  anterior, origin at the thorax centre, and
* the *depth* ``z`` in mm along the short-axis stack: ``z = 0`` is the ED base
  plane, ``z`` grows toward the apex.

The parameter records are built (and randomised) in :mod:`cmrprep.synthetic`;
this module draws nothing at random (the noise kernel takes a Generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Tissue intensities before bias, noise and scaling (bright-blood SSFP).
TISSUE = {"air": 0.0, "fat": 0.9, "muscle": 0.3, "mediastinum": 0.38, "lung": 0.05,
          "liver": 0.42, "bone": 0.35, "marrow": 0.55, "csf": 0.85, "blood": 1.0,
          "myo": 0.27, "wall": 0.25}


@dataclass
class Canvas:
    """A 2D image with its label map, painted in place (back to front)."""

    image: np.ndarray
    label: np.ndarray
    pixel: float

    def paint(self, sdf: np.ndarray, value: float, label: int | None = None) -> None:
        """Blend ``value`` where ``sdf < 0`` with a one-pixel partial-volume ramp."""
        occ = np.clip(0.5 - sdf / self.pixel, 0.0, 1.0)
        self.image += occ * (value - self.image)
        if label is not None:
            self.label[sdf < 0] = label


def ellipse_sdf(u: np.ndarray, v: np.ndarray, centre: tuple[float, float],
                axes: tuple[float, float], angle: float = 0.0) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse, first order in ``rho - 1``.

    Parameters
    ----------
    u, v : ndarray
        Body-frame coordinates of the pixels (mm).
    centre : (float, float)
        Ellipse centre.
    axes : (float, float)
        Semi-axes (mm) along the rotated ``u`` and ``v`` directions.
    angle : float
        Rotation of the first semi-axis from ``u`` (radians).
    """
    du, dv = u - np.float32(centre[0]), v - np.float32(centre[1])
    if angle:
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        du, dv = c * du + s * dv, c * dv - s * du
    a, b = max(axes[0], 1e-3), max(axes[1], 1e-3)
    p, q = du / np.float32(a), dv / np.float32(b)
    rho = np.sqrt(p * p + q * q)
    g = np.sqrt((p / np.float32(a)) ** 2 + (q / np.float32(b)) ** 2)
    # rho / |grad rho * rho| is bounded by the semi-axes; at the centre use the smaller one.
    scale = np.divide(rho, g, out=np.full_like(rho, min(a, b)), where=g > 0)
    return (rho - 1.0) * scale


def profile(x: np.ndarray | float, power: float) -> np.ndarray:
    """Super-ellipsoid radius profile: 1 at ``x = 0`` (base), 0 at ``x >= 1`` (apex)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    return (1.0 - x ** power) ** (1.0 / power)


# --------------------------------------------------------------------------- body
@dataclass(frozen=True)
class Body:
    """Thorax outline and the organs that surround the heart (body frame, mm)."""

    axes: tuple[float, float]
    fat: float
    muscle: float
    spine_v: float
    aorta: tuple[float, float, float]
    lungs: tuple[tuple[float, float, float, float], ...]
    liver: tuple[float, float, float, float]
    liver_top: float
    values: dict


def paint_body_static(canvas: Canvas, u: np.ndarray, v: np.ndarray, body: Body) -> None:
    """Slice-invariant layers: outline, fat, muscle, mediastinum."""
    val = body.values
    outline = ellipse_sdf(u, v, (0.0, 0.0), body.axes)
    canvas.paint(outline, val["fat"])
    canvas.paint(outline + body.fat, val["muscle"])
    canvas.paint(outline + body.fat + body.muscle, val["mediastinum"])


def paint_body_slice(canvas: Canvas, u: np.ndarray, v: np.ndarray, body: Body,
                     z: float) -> None:
    """Depth-dependent layers: lungs give way to the liver below the heart."""
    val = body.values
    below = z - body.liver_top
    lung_scale = float(np.clip(1.0 - below / 70.0, 0.35, 1.0))
    for cu, cv, a, b in body.lungs:
        canvas.paint(ellipse_sdf(u, v, (cu, cv), (a * lung_scale, b * lung_scale)),
                     val["lung"])
    liver_scale = float(np.sqrt(np.clip(below / 45.0, 0.0, 1.0)))
    if liver_scale > 0.05:
        cu, cv, a, b = body.liver
        canvas.paint(ellipse_sdf(u, v, (cu, cv), (a * liver_scale, b * liver_scale)),
                     val["liver"])
    paint_spine(canvas, u, v, body)


def paint_spine(canvas: Canvas, u: np.ndarray, v: np.ndarray, body: Body) -> None:
    """Vertebral body, spinal canal, paraspinal muscles and descending aorta."""
    val, sv = body.values, body.spine_v
    for side in (-1.0, 1.0):
        canvas.paint(ellipse_sdf(u, v, (side * 32.0, sv - 22.0), (20.0, 14.0)), val["muscle"])
    canvas.paint(ellipse_sdf(u, v, (0.0, sv), (17.0, 15.0)), val["bone"])
    canvas.paint(ellipse_sdf(u, v, (0.0, sv), (11.0, 9.0)), val["marrow"])
    canvas.paint(ellipse_sdf(u, v, (0.0, sv - 23.0), (7.0, 6.0)), val["csf"])
    au, av, ar = body.aorta
    canvas.paint(ellipse_sdf(u, v, (au, av), (ar + 1.5, ar + 1.5)), val["wall"])
    canvas.paint(ellipse_sdf(u, v, (au, av), (ar, ar)), val["blood"])


# -------------------------------------------------------------------------- heart
@dataclass(frozen=True)
class Heart:
    """Heart geometry; pairs hold ``(ED, ES)`` values interpolated by contraction."""

    centre: tuple[float, float]
    tilt: tuple[float, float]
    ellipticity: float
    angle: float
    power: float
    apex: float
    apex_wall: float
    base: tuple[float, float]
    r_endo: tuple[float, float]
    r_epi: tuple[float, float]
    rv_angle: float
    rv_offset: float
    rv_axes: tuple[float, float]
    rv_scale: tuple[float, float]
    rv_length: float
    papillary: tuple[tuple[float, float], ...]
    pap_radius: tuple[float, float]
    fat: float
    atria: tuple[tuple[float, float, float, float], ...]
    values: dict


def _lerp(pair: tuple[float, float], c: float) -> float:
    return pair[0] + (pair[1] - pair[0]) * c


def paint_heart(canvas: Canvas, u: np.ndarray, v: np.ndarray, heart: Heart,
                z: float, c: float) -> None:
    """Paint the heart slice at depth ``z`` and contraction ``c`` (0 ED, 1 ES)."""
    base = _lerp(heart.base, c)
    if z < base:
        paint_atria(canvas, u, v, heart, base - z)
        return
    length = heart.apex - base
    zz = z - base
    cu = heart.centre[0] + heart.tilt[0] * zz
    cv = heart.centre[1] + heart.tilt[1] * zz
    r_epi = _lerp(heart.r_epi, c) * float(profile(zz / (length + heart.apex_wall), heart.power))
    if r_epi <= 0.5:
        return
    r_endo = _lerp(heart.r_endo, c) * float(profile(zz / length, heart.power))
    e = heart.ellipticity
    epi_axes = (r_epi * (1 + e), r_epi * (1 - e))
    rv_sdf = _rv_sdf(u, v, heart, (cu, cv), r_epi, zz / length, c)
    epi = ellipse_sdf(u, v, (cu, cv), epi_axes, heart.angle)
    fat = epi if rv_sdf is None else np.minimum(epi, rv_sdf - 3.0)
    canvas.paint(fat - heart.fat, heart.values["fat"])
    if rv_sdf is not None:
        canvas.paint(rv_sdf - 3.0, heart.values["wall"])
        canvas.paint(rv_sdf, heart.values["rv_blood"], 1)
    canvas.paint(epi, heart.values["myo"], 2)
    if r_endo > 0.5:
        endo_axes = (r_endo * (1 + e), r_endo * (1 - e))
        canvas.paint(ellipse_sdf(u, v, (cu, cv), endo_axes, heart.angle),
                     heart.values["lv_blood"], 3)
        _paint_papillary(canvas, u, v, heart, (cu, cv), r_endo, zz / length, c)


def _rv_sdf(u: np.ndarray, v: np.ndarray, heart: Heart, centre: tuple[float, float],
            r_epi: float, depth: float, c: float) -> np.ndarray | None:
    """SDF of the RV cavity ellipse (the LV painted later cuts the crescent)."""
    scale = _lerp(heart.rv_scale, c) * float(profile(depth / heart.rv_length, 1.8))
    if scale < 0.3:
        return None
    direction = np.array([np.cos(heart.rv_angle), np.sin(heart.rv_angle)])
    rv_centre = np.asarray(centre) + direction * r_epi * heart.rv_offset
    # the radial semi-axis shrinks with the RV so the crescent thins and vanishes apically
    axes = (heart.rv_axes[0] * r_epi * scale, heart.rv_axes[1] * r_epi * scale ** 1.5)
    return ellipse_sdf(u, v, tuple(rv_centre), axes, heart.rv_angle + np.pi / 2)


def _paint_papillary(canvas: Canvas, u: np.ndarray, v: np.ndarray, heart: Heart,
                     centre: tuple[float, float], r_endo: float, depth: float,
                     c: float) -> None:
    """Dark papillary muscles attached to the wall, labelled as LV cavity (ACDC)."""
    if not 0.15 < depth < 0.75:
        return
    radius = _lerp(heart.pap_radius, c) * float(np.sin(np.pi * (depth - 0.15) / 0.6)) ** 0.5
    radius = min(radius, 0.35 * r_endo)
    if radius < 1.0:
        return
    for angle, size in heart.papillary:
        dist = r_endo - 0.8 * radius * size
        pc = (centre[0] + dist * np.cos(angle), centre[1] + dist * np.sin(angle))
        r = radius * size
        canvas.paint(ellipse_sdf(u, v, pc, (r, r)), heart.values["myo"] * 1.1)


def paint_atria(canvas: Canvas, u: np.ndarray, v: np.ndarray, heart: Heart,
                height: float) -> None:
    """Unlabelled bright atria, aortic root and pulmonary trunk above the base."""
    for du, dv, r, top in heart.atria:
        if height > top:
            continue
        rr = r * float(profile(height / top, 2.5)) ** 0.5
        if rr < 2.0:
            continue
        centre = (heart.centre[0] + du, heart.centre[1] + dv)
        canvas.paint(ellipse_sdf(u, v, centre, (rr + 2.0, rr + 2.0)), heart.values["myo"])
        canvas.paint(ellipse_sdf(u, v, centre, (rr, rr * 0.85)), heart.values["lv_blood"])


def heart_extent(heart: Heart) -> float:
    """Half width (mm) of a box around the LV centre holding the whole heart."""
    r = max(heart.r_epi)
    rv = r * (heart.rv_offset + max(heart.rv_axes)) + 8.0
    atria = max((np.hypot(du, dv) + rad + 3.0 for du, dv, rad, _ in heart.atria), default=0.0)
    tilt = float(np.hypot(*heart.tilt)) * heart.apex
    return float(max(r + heart.fat, rv, atria) + tilt + 2.0)


# ------------------------------------------------------------------ acquisition
def rician(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of complex Gaussian noise added to ``image`` (Rician statistics)."""
    re = image + np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
    im = np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(re * re + im * im)


def store(image: np.ndarray, storage: tuple[float, str, float, float]) -> np.ndarray:
    """Scale to the case intensity range and quantise to the storage dtype."""
    scale, dtype, slope, inter = storage
    value = image * np.float32(scale)
    if dtype == "float32":
        return value
    raw = np.rint((value - np.float32(inter)) / np.float32(slope))
    return np.clip(raw, -32768, 32767).astype(np.int16)
