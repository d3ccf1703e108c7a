"""Realistic synthetic short-axis cine-CMR cases with ACDC labels.

A case is drawn from one seed (``SeedSequence(seed, spawn_key=(index, ...))``),
so the same ``(seed, index)`` gives the same arrays whatever else is rendered;
the noise of frame ``t`` has its own key, so the ED frame of a full cine equals
the ED frame of an ED/ES-only rendering.

The anatomy is defined in millimetres (see :mod:`cmrprep._phantom`): an LV of
45-55 mm diameter at ED (larger for DCM), a myocardial ring that thickens at
ES, papillary muscles inside the bright pool (labelled LV), an RV crescent
that vanishes before the apex, and unlabelled distractors (atria, aortic root
and pulmonary trunk above the base, descending aorta, lungs, liver, chest-wall
fat, spine, skeletal muscle as dark as myocardium).  Images then get a smooth
multiplicative bias, Rician noise and a random intensity scale (1 to ~4000).

``site="B"`` renders the same anatomy as another scanner/site would
(:func:`site_b`): coarser in-plane resolution (2.0-2.6 mm), thicker slices
(9-12 mm, each the average of three thin sub-slices: partial volume), weaker
blood-myocardium contrast, more noise (a blood-myocardium contrast-to-noise ratio
of 4-8 at the heart, against 8-30 for site A), in-plane blur, a strong non-linear
surface-coil fall-off, and images stored transposed (axes 0 and 1 swapped, the
affine with them).  Its parameters come from their own seed stream, so site A
cases are unchanged by its existence.  ``site_changes`` applies only some of
these changes (:data:`SITE_B_CHANGES`), with the values they have in the full
site B: which change costs a model how much, on the same patients.

Examples
--------
>>> case = generate_case(0, 0)
>>> sorted(case.labels) == sorted({case.ed, case.es})
True
>>> case.frame(case.ed).shape == case.labels[case.ed].shape
True
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

import numpy as np
from scipy.spatial.transform import Rotation

from cmrprep import _phantom as ph
from cmrprep.geometry import Geometry

__all__ = ["SyntheticCase", "generate_case", "generate_dataset", "contraction", "GROUPS",
           "VENDORS", "SITES", "SITE_B_CHANGES", "site_b"]

log = logging.getLogger(__name__)

GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")
#: M&Ms vendor letter -> (name, centres).
VENDORS = {"A": ("Siemens", (1, 6)), "B": ("Philips", (2, 3)), "C": ("GE", (4,)),
           "D": ("Canon", (5,))}
_ALNUM = np.array(list(string.ascii_uppercase + string.digits))
_MAX_SLICES = 18
SITES = ("A", "B")
#: Site B's blood-myocardium contrast-to-noise ratio at the LV centre (see :func:`site_b`).
SITE_B_CNR = (4.0, 8.0)
#: What site B changes (:func:`site_b`); ``generate_case(site_changes=...)`` applies a subset.
SITE_B_CHANGES = ("resolution", "thickness", "contrast", "blur", "coil", "transposed")


@dataclass(frozen=True)
class _Site:
    """Acquisition of another site: sub-slice offsets (partial volume), blur, coil, storage."""

    sub_depths: tuple[float, ...] = (0.0,)
    blur_px: float = 0.0
    coil: tuple[float, float, float] | None = None  # (u, v, length) mm: field 1 / (1 + (d / L)^2)
    transpose: bool = False


@dataclass(frozen=True, eq=False)
class SyntheticCase:
    """One synthetic cine case.

    Attributes
    ----------
    case_id : str
        ``patientNNN`` (1-based ``index``).
    code : str
        Six-character M&Ms-style external code.
    cine : ndarray
        ``[i, j, k, m]`` stored values (int16 or float32); time point ``m`` is
        frame ``frames[m]``.  Physical intensity is ``cine * scl_slope + scl_inter``.
    frames : tuple of int
        0-based frame index of each rendered time point.
    labels : dict of int to ndarray
        uint8 ``[i, j, k]`` ACDC labels at the ED and ES frames.
    ed, es : int
        0-based ED and ES frame indices.
    affine : ndarray
        4x4 voxel-to-RAS affine (possibly oblique and left-handed).
    n_frames : int
        Frames per cardiac cycle (metadata; ``len(frames)`` may be smaller).
    """

    case_id: str
    code: str
    cine: np.ndarray
    frames: tuple[int, ...]
    labels: dict[int, np.ndarray]
    ed: int
    es: int
    affine: np.ndarray
    n_frames: int
    group: str
    height: float
    weight: float
    vendor: str
    centre: int
    scl_slope: float = 1.0
    scl_inter: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def geometry(self) -> Geometry:
        """Geometry of one 3D frame."""
        return Geometry.from_affine(self.affine, self.cine.shape[:3])

    @property
    def vendor_name(self) -> str:
        """Manufacturer name of :attr:`vendor` (M&Ms convention)."""
        return VENDORS[self.vendor][0]

    def frame(self, t: int) -> np.ndarray:
        """Stored 3D array of 0-based frame ``t`` (raises ``KeyError`` if not rendered)."""
        if t not in self.frames:
            raise KeyError(f"{self.case_id}: frame {t} was not rendered "
                           f"(rendered {self.frames}); use full_cine=True")
        return self.cine[..., self.frames.index(t)]

    def intensity(self, t: int) -> np.ndarray:
        """Physical (scaled) float32 intensities of frame ``t``."""
        return (self.frame(t) * np.float32(self.scl_slope)
                + np.float32(self.scl_inter)).astype(np.float32)


def contraction(t: float, ed: int, es: int, n_frames: int) -> float:
    """Smooth periodic contraction: 0 at ED, 1 at ES, C1 at both turning points."""
    phi = ((t - ed) % n_frames) / n_frames
    sys = ((es - ed) % n_frames) / n_frames
    if phi <= sys:
        return float(0.5 * (1 - np.cos(np.pi * phi / sys)))
    return float(0.5 * (1 + np.cos(np.pi * (phi - sys) / (1 - sys))))


# ------------------------------------------------------------------ parameters
def _draw_timing(rng: np.random.Generator, n_frames: int | None) -> tuple[int, int, int]:
    drawn = int(rng.integers(20, 36))  # always drawn: n_frames must not shift the anatomy
    n = drawn if n_frames is None else int(n_frames)
    if n < 4:
        raise ValueError(f"n_frames must be >= 4, got {n}")
    ed = 0 if rng.random() < 0.8 else int(rng.integers(1, 3))
    es = (ed + max(1, round(rng.uniform(0.3, 0.38) * n))) % n
    return n, ed, es


def _draw_matrix(rng: np.random.Generator, heart: ph.Heart) -> tuple[int, int, float]:
    """In-plane matrix and spacing; the field of view (200-520 mm) grows with the heart.

    The area range keeps the foreground at 1-5 % of the voxels for every group.
    """
    k = max(1.0, (heart.r_epi[0] / 33.0) ** 2 * max(1.0, heart.rv_axes[0] / 1.7))
    while True:
        ni, nj = (int(x) for x in np.exp(rng.uniform(np.log(150), np.log(513), 2)))
        sp = float(rng.uniform(1.0, 2.0))
        fi, fj = ni * sp, nj * sp
        if 200 <= min(fi, fj) and max(fi, fj) <= 520 and 7e4 * k <= fi * fj <= 1.55e5 * k:
            return ni, nj, round(sp, 4)


def _draw_lv(rng: np.random.Generator, group: str) -> dict:
    """Group-dependent LV size, wall thickness and ejection fraction."""
    r = rng.uniform(22.5, 27.5)
    table = {"NOR": (1.0, (7, 10), (0.55, 0.70)), "RV": (1.0, (7, 10), (0.5, 0.65)),
             "DCM": (rng.uniform(1.15, 1.3), (6, 8), (0.12, 0.35)),
             "HCM": (rng.uniform(0.85, 0.95), (13, 18), (0.65, 0.8)),
             "MINF": (rng.uniform(1.05, 1.2), (6, 9), (0.25, 0.45))}
    factor, wall, ef = table[group]
    return {"r": r * factor, "wall": rng.uniform(*wall), "ef": rng.uniform(*ef)}


def _draw_heart(rng: np.random.Generator, group: str, apex: float, values: dict) -> ph.Heart:
    lv = _draw_lv(rng, group)
    descent = rng.uniform(8, 15) * (0.5 if group in ("DCM", "MINF") else 1.0)
    ratio = apex / (apex - descent)
    r_endo_es = lv["r"] * np.sqrt((1 - lv["ef"]) * ratio)
    r_epi = lv["r"] + lv["wall"]
    # myocardial volume is conserved: the ring area grows as the ventricle shortens
    r_epi_es = np.sqrt(r_endo_es ** 2 + (r_epi ** 2 - lv["r"] ** 2) * ratio)
    rv_big = 1.3 if group == "RV" else 1.0
    rv_angle = np.deg2rad(rng.uniform(140, 175))
    lateral = rv_angle + np.pi
    pap = ((lateral - rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.2)),
           (lateral + rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.2)))
    pr = rng.uniform(3.0, 4.5)
    # LA, RA, aortic root, pulmonary trunk: (du, dv, radius, height above base), mm
    atria = tuple((du + rng.uniform(-4, 4), dv + rng.uniform(-4, 4),
                   r * rng.uniform(0.85, 1.15), top)
                  for du, dv, r, top in ((5, -28, 20, 45), (-38, -22, 19, 45),
                                         (-14, 2, 13, 60), (-26, 27, 12, 50)))
    return ph.Heart(
        centre=(0.0, 0.0), tilt=tuple(rng.uniform(-0.12, 0.12, 2)),
        ellipticity=rng.uniform(0.0, 0.08), angle=rng.uniform(0, np.pi),
        power=rng.uniform(2.0, 2.8), apex=apex, apex_wall=lv["wall"] * rng.uniform(0.6, 0.9),
        base=(0.0, descent), r_endo=(lv["r"], r_endo_es), r_epi=(r_epi, r_epi_es),
        rv_angle=rv_angle, rv_offset=rng.uniform(0.5, 0.7),
        rv_axes=(rng.uniform(1.5, 1.85) * rv_big, rng.uniform(0.85, 1.0) * rv_big),
        rv_scale=(1.0, rng.uniform(0.72, 0.85) if group != "RV" else rng.uniform(0.85, 0.95)),
        rv_length=rng.uniform(0.7, 0.85), papillary=pap, pap_radius=(pr, pr * 1.35),
        fat=rng.uniform(1.0, 4.0), atria=atria, values=values)


def _draw_values(rng: np.random.Generator) -> dict:
    values = {k: v * rng.uniform(0.85, 1.15) for k, v in ph.TISSUE.items()}
    values.update(blood=1.0, lv_blood=1.0, rv_blood=rng.uniform(0.88, 1.0),
                  myo=rng.uniform(0.22, 0.32))
    values["muscle"] = values["myo"] * rng.uniform(0.95, 1.2)
    return values


def _draw_body(rng: np.random.Generator, values: dict, liver_top: float) -> ph.Body:
    a, b = rng.uniform(140, 175), rng.uniform(100, 130)
    fat, muscle = rng.uniform(5, 22), rng.uniform(8, 18)
    ai, bi = a - fat - muscle, b - fat - muscle
    sv = -b + fat + muscle + rng.uniform(30, 40)
    j = lambda: rng.uniform(0.9, 1.1)  # noqa: E731
    lungs = ((0.52 * ai * j(), -0.05 * bi, 0.5 * ai * j(), 0.85 * bi * j()),
             (-0.5 * ai * j(), -0.05 * bi, 0.5 * ai * j(), 0.88 * bi * j()))
    return ph.Body(axes=(a, b), fat=fat, muscle=muscle, spine_v=sv,
                   aorta=(rng.uniform(15, 30), sv + rng.uniform(22, 32), rng.uniform(9, 13)),
                   lungs=lungs, liver=(-0.35 * ai, -0.05 * bi, 0.7 * ai * j(), 0.85 * bi * j()),
                   liver_top=liver_top, values=values)


def _draw_stack(rng: np.random.Generator, apex_epi: float) -> tuple[np.ndarray, float, float]:
    """Slice depths (base first) with >= 1 empty slice above the base and below the apex."""
    ss = round(float(rng.uniform(5.0, 10.0)), 3)
    above, below = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    offset = rng.uniform(0.15, 0.85) * ss
    n_heart = int(np.floor((apex_epi - offset) / ss)) + 1
    n_heart = min(n_heart, _MAX_SLICES - above - below)
    below = max(below, 6 - above - n_heart)
    depth = (np.arange(above + n_heart + below) - above) * ss + offset
    # the epicardial apex must lie before the first slice below the apex
    apex_epi = min(apex_epi, depth[above + n_heart] - 0.3 * ss)
    return depth, ss, apex_epi


def _draw_affine(rng: np.random.Generator, sp: float, ss: float, shape) -> np.ndarray:
    """Oblique stack: uniformly random rotation, isotropic in-plane spacing."""
    rot = Rotation.random(random_state=rng).as_matrix()
    if rng.random() < 0.5:  # left-handed, as many DICOM-derived NIfTIs
        rot[:, 0] *= -1
    aff = np.eye(4)
    aff[:3, :3] = rot * np.array([sp, sp, ss])
    centre = rng.uniform(-60, 60, 3)
    aff[:3, 3] = centre - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return aff


# --------------------------------------------------------------------- render
@dataclass(frozen=True)
class _Plan:
    shape: tuple[int, int, int]
    spacing: float
    depth: np.ndarray
    body: ph.Body
    heart: ph.Heart
    heart_xy: tuple[float, float]
    pose: tuple[float, bool]
    bias: np.ndarray
    noise: float


def _draw_plan(rng: np.random.Generator, group: str) -> _Plan:
    values = _draw_values(rng)
    apex = rng.uniform(68, 88)
    heart = _draw_heart(rng, group, apex, values)
    depth, ss, apex_epi = _draw_stack(rng, apex + heart.apex_wall)
    heart = replace(heart, apex=min(apex, apex_epi - heart.apex_wall))
    body = _draw_body(rng, values, apex - rng.uniform(5, 35))
    ni, nj, sp = _draw_matrix(rng, heart)
    ext = ph.heart_extent(heart)
    fov = np.array([ni, nj]) * sp
    lo, hi = np.minimum(ext, fov / 2), np.maximum(fov - ext, fov / 2)
    xy = np.clip(fov * rng.uniform(0.35, 0.65, 2), lo, hi)
    hu, hv = rng.uniform(15, 35), rng.uniform(-5, 15)
    heart = replace(heart, centre=(hu, hv))
    pose = (float(rng.integers(4) * np.pi / 2 + rng.uniform(-0.4, 0.4)), bool(rng.random() < 0.5))
    return _Plan(shape=(ni, nj, len(depth)), spacing=sp, depth=depth, body=body, heart=heart,
                 heart_xy=(float(xy[0]), float(xy[1])), pose=pose,
                 bias=rng.normal(0.0, 0.2, 6), noise=float(rng.uniform(1 / 40, 1 / 12)))


def site_b(plan: _Plan, rng: np.random.Generator,
           changes: Iterable[str] = SITE_B_CHANGES) -> tuple[_Plan, _Site]:
    """Another scanner's acquisition of the same anatomy (see the module docstring).

    ``changes`` picks which of :data:`SITE_B_CHANGES` are applied; every parameter is
    drawn whatever the choice, so a change applied alone has the value it has in the
    full site B (which change costs a model how much, on the same patients).
    """
    changes = (changes,) if isinstance(changes, str) else tuple(changes)  # "coil" is one change
    unknown = set(changes) - set(SITE_B_CHANGES)
    if unknown:
        raise ValueError(f"unknown site-B change(s) {sorted(unknown)}; choose from {SITE_B_CHANGES}")
    new, site = _site_b_all(plan, rng)
    return _select(plan, new, site, frozenset(changes))


def _select(plan: _Plan, new: _Plan, site: _Site, changes: frozenset[str]) -> tuple[_Plan, _Site]:
    """``plan`` with only ``changes`` taken from the full site-B ``(new, site)``."""
    out, acq = plan, _Site()
    if "resolution" in changes:
        out = replace(out, shape=(*new.shape[:2], out.shape[2]), spacing=new.spacing, heart_xy=new.heart_xy)
    if "thickness" in changes:
        out = replace(out, shape=(*out.shape[:2], new.shape[2]), depth=new.depth)
        acq = replace(acq, sub_depths=site.sub_depths)
    if "contrast" in changes:
        out = replace(out, heart=new.heart, body=new.body, noise=new.noise)
    if "blur" in changes:
        acq = replace(acq, blur_px=site.blur_px)
    if "coil" in changes:
        acq = replace(acq, coil=site.coil)
    if "transposed" in changes:
        acq = replace(acq, transpose=True)
    return out, acq


def _site_b_all(plan: _Plan, rng: np.random.Generator) -> tuple[_Plan, _Site]:
    """Every site-B change drawn and applied."""
    sp = float(rng.uniform(2.0, 2.6))
    ni, nj, _ = plan.shape
    shape_ij = (max(48, int(round(ni * plan.spacing / sp))), max(48, int(round(nj * plan.spacing / sp))))
    ss = float(rng.uniform(9.0, 12.0))
    lo, hi = float(plan.depth.min()), float(plan.depth.max())
    depth = lo + np.arange(int(np.floor((hi - lo) / ss)) + 1) * ss
    if plan.depth[0] > plan.depth[-1]:
        depth = depth[::-1].copy()
    values = dict(plan.heart.values)
    values.update(myo=float(rng.uniform(0.45, 0.6)), rv_blood=float(rng.uniform(0.8, 0.95)))
    values["muscle"] = values["myo"] * float(rng.uniform(0.95, 1.15))
    heart = replace(plan.heart, values=values)
    body = replace(plan.body, values=values)
    scale = np.asarray(shape_ij) * sp / (np.asarray(plan.shape[:2]) * plan.spacing)
    xy = (plan.heart_xy[0] * scale[0], plan.heart_xy[1] * scale[1])
    coil = (float(rng.uniform(-40, 40)), float(body.axes[1] + rng.uniform(10, 30)),
            float(rng.uniform(60.0, 100.0)))
    # The noise follows from the blood-myocardium contrast-to-noise ratio at the LV centre,
    # after the coil fall-off has dimmed the signal there (the noise is not dimmed): CNR 4-8,
    # below every site-A case (8-30) but still a diagnostic cine.
    hu, hv = plan.heart.centre
    field = 2.0 / (1.0 + ((hu - coil[0]) ** 2 + (hv - coil[1]) ** 2) / coil[2] ** 2)
    noise = (values["lv_blood"] - values["myo"]) * field / float(rng.uniform(*SITE_B_CNR))
    new = replace(plan, shape=(*shape_ij, len(depth)), spacing=sp, depth=depth, heart=heart, body=body,
                  heart_xy=xy, noise=float(noise))
    site = _Site(sub_depths=(-ss / 3.0, 0.0, ss / 3.0), blur_px=float(rng.uniform(0.5, 1.0)),
                 coil=coil, transpose=True)
    return new, site


def _body_coords(plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
    """Body-frame ``(u, v)`` of every pixel; the LV centre lands on ``heart_xy``."""
    ni, nj, _ = plan.shape
    x = (np.arange(ni, dtype=np.float32) * plan.spacing - plan.heart_xy[0])[:, None]
    y = (np.arange(nj, dtype=np.float32) * plan.spacing - plan.heart_xy[1])[None, :]
    psi, mirror = plan.pose
    c, s = np.float32(np.cos(psi)), np.float32(np.sin(psi))
    u, v = c * x + s * y, c * y - s * x
    if mirror:
        v = -v
    return (u + np.float32(plan.heart.centre[0])).astype(np.float32), \
           (v + np.float32(plan.heart.centre[1])).astype(np.float32)


def _background(plan: _Plan, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    static = ph.Canvas(np.zeros(u.shape, np.float32), np.zeros(u.shape, np.uint8), plan.spacing)
    ph.paint_body_static(static, u, v, plan.body)
    out = np.empty(plan.shape, np.float32)
    for k, z in enumerate(plan.depth):
        canvas = ph.Canvas(static.image.copy(), static.label, plan.spacing)
        ph.paint_body_slice(canvas, u, v, plan.body, float(z))
        out[..., k] = canvas.image
    return out


def _heart_box(plan: _Plan) -> tuple[slice, slice]:
    half = ph.heart_extent(plan.heart) / plan.spacing + 2
    ci, cj = plan.heart_xy[0] / plan.spacing, plan.heart_xy[1] / plan.spacing
    return (slice(max(0, int(ci - half)), min(plan.shape[0], int(ci + half) + 1)),
            slice(max(0, int(cj - half)), min(plan.shape[1], int(cj + half) + 1)))


def _render_frame(plan: _Plan, background: np.ndarray, box, uv, c: float):
    image, label = background.copy(), np.zeros(plan.shape, np.uint8)
    for k, z in enumerate(plan.depth):
        canvas = ph.Canvas(image[box[0], box[1], k], label[box[0], box[1], k], plan.spacing)
        ph.paint_heart(canvas, uv[0], uv[1], plan.heart, float(z), c)
    return image, label


def _bias_field(plan: _Plan, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth multiplicative field, brighter toward the anterior coil."""
    b = plan.bias
    un, vn = u / np.float32(200.0), v / np.float32(200.0)
    log2d = b[0] * un + (b[1] + 0.3) * vn + b[2] * un * un + b[3] * vn * vn + b[4] * un * vn
    zn = (plan.depth - plan.depth.mean()) / 100.0
    field = np.exp(np.clip(log2d, -0.6, 0.6))[..., None] * np.exp(b[5] * zn)[None, None, :]
    return field.astype(np.float32)


def _draw_storage(rng: np.random.Generator) -> tuple[float, str, float, float]:
    """Intensity scale, storage dtype and NIfTI scl_slope / scl_inter."""
    scale = float(10 ** rng.uniform(0.0, 3.6))
    if rng.random() < 0.4:
        return scale, "float32", 1.0, 0.0
    if scale >= 300 and rng.random() < 0.6:
        return scale, "int16", 1.0, 0.0
    # stored values reach ~4000; float32-exact so the NIfTI header holds the same numbers
    slope = float(np.float32(scale * 2.0 / 4000.0))
    return scale, "int16", slope, float(np.float32(rng.uniform(-0.05, 0.05) * scale))


# ----------------------------------------------------------------- public API
def generate_case(seed: int, index: int, *, n_frames: int | None = None,
                  full_cine: bool = False, through_es: bool = False, site: str = "A",
                  site_changes: Iterable[str] = SITE_B_CHANGES) -> SyntheticCase:
    """Render synthetic case ``index`` of the dataset drawn from ``seed``.

    Parameters
    ----------
    seed, index : int
        Dataset seed and 0-based case index; the case is a pure function of both.
    n_frames : int, optional
        Frames per cycle; drawn from 20-35 when ``None``.
    full_cine : bool
        Render every frame; otherwise only ED and ES (fast).
    through_es : bool
        Render frames ``0 .. max(ed, es)`` (a shortened 4D for M&Ms-style files).
    site : {"A", "B"}
        ``"B"``: the same anatomy acquired as another site would (:func:`site_b`).
    site_changes : iterable of str
        With ``site="B"``, which of :data:`SITE_B_CHANGES` to apply (default: all).

    Returns
    -------
    SyntheticCase
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 0)))
    n, ed, es = _draw_timing(rng, n_frames)
    group = str(rng.choice(GROUPS))
    vendor = str(rng.choice(sorted(VENDORS)))
    meta = dict(group=group, height=float(round(rng.uniform(150, 195))),
                weight=float(round(rng.uniform(50, 110))), vendor=vendor,
                centre=int(rng.choice(VENDORS[vendor][1])),
                code="".join(rng.choice(_ALNUM, 6)))
    plan = _draw_plan(rng, group)
    storage = _draw_storage(rng)
    acquisition = _Site()
    if site == "B":  # its own stream: site A's draws are untouched
        plan, acquisition = site_b(plan, np.random.default_rng(
            np.random.SeedSequence(seed, spawn_key=(index, 2))), site_changes)
    affine = _draw_affine(rng, plan.spacing, float(abs(plan.depth[1] - plan.depth[0])), plan.shape)
    if rng.random() < 0.5:  # apex-first stacks: reverse the slice order
        plan = replace(plan, depth=plan.depth[::-1].copy())
    frames = tuple(range(n)) if full_cine else (
        tuple(range(max(ed, es) + 1)) if through_es else tuple(sorted({ed, es})))
    cine, labels = _render(plan, (seed, index), frames, (ed, es, n), storage, acquisition)
    if acquisition.transpose:  # stored with the in-plane axes swapped, the affine with them
        cine = np.ascontiguousarray(np.swapaxes(cine, 0, 1))
        labels = {t: np.ascontiguousarray(np.swapaxes(lab, 0, 1)) for t, lab in labels.items()}
        affine = affine[:, [1, 0, 2, 3]]
    log.debug("case %d: shape %s, spacing %.2f, frames %s", index, plan.shape, plan.spacing, frames)
    return SyntheticCase(case_id=f"patient{index + 1:03d}", cine=cine, frames=frames,
                         labels=labels, ed=ed, es=es, affine=affine, n_frames=n,
                         scl_slope=storage[2], scl_inter=storage[3],
                         extra={"dtype": storage[1], "scale": storage[0], "site": site}, **meta)


def _render(plan: _Plan, key: tuple[int, int], frames: tuple[int, ...],
            timing: tuple[int, int, int], storage: tuple, site: _Site = _Site()) -> tuple[np.ndarray, dict]:
    """Render ``frames``; the static background is shared, the heart box is redrawn.

    With several ``site.sub_depths`` each slice is the mean of thin sub-slices at those
    offsets (partial volume); its label is the middle sub-slice's.
    """
    n_sub = len(site.sub_depths)
    thin = plan if n_sub == 1 else replace(
        plan, depth=(plan.depth[:, None] + np.asarray(site.sub_depths)[None, :]).ravel(),
        shape=(*plan.shape[:2], plan.shape[2] * n_sub))
    u, v = _body_coords(thin)
    background = _background(thin, u, v)
    box = _heart_box(thin)
    uv = (u[box], v[box])
    bias = _bias_field(thin, u, v)[..., ::n_sub] if n_sub > 1 else _bias_field(plan, u, v)
    if site.coil is not None:
        cu, cv, length = site.coil
        d2 = ((u - np.float32(cu)) ** 2 + (v - np.float32(cv)) ** 2) / np.float32(length ** 2)
        bias = bias * (2.0 / (1.0 + d2))[..., None].astype(np.float32)
    ed, es, n = timing
    dtype = np.float32 if storage[1] == "float32" else np.int16
    cine = np.empty(plan.shape + (len(frames),), dtype)
    labels = {}
    for m, t in enumerate(frames):
        image, label = _render_frame(thin, background, box, uv, contraction(t, ed, es, n))
        if n_sub > 1:
            image = image.reshape(*image.shape[:2], -1, n_sub).mean(axis=-1)
            label = label[..., n_sub // 2::n_sub]
        if site.blur_px > 0:
            from scipy.ndimage import gaussian_filter

            image = gaussian_filter(image, sigma=(site.blur_px, site.blur_px, 0.0))
        noise = np.random.default_rng(np.random.SeedSequence(key[0], spawn_key=(key[1], 1, t)))
        cine[..., m] = ph.store(ph.rician(image * bias, plan.noise, noise), storage)
        if t in (ed, es):
            labels[t] = np.ascontiguousarray(label)
    return cine, labels


def generate_dataset(n: int, seed: int, **kwargs) -> Iterator[SyntheticCase]:
    """Yield ``generate_case(seed, i, **kwargs)`` for ``i`` in ``range(n)``."""
    for i in range(n):
        yield generate_case(seed, i, **kwargs)
