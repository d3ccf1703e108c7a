"""The preprocessing plan: a small, human-editable JSON document.

The build derives a plan from the dataset fingerprint (e.g. the median in-plane
spacing), writes it to ``plan.json`` and then follows it.  A person may edit
the file and re-run the build with ``--plan plan.json``; any change of the plan
forces a full rebuild.

Defaults and why
----------------
* ``target_spacing``: the dataset's median in-plane spacing (nnU-Net's rule),
  the slice axis is never resampled (CMR slices are 5-10 mm, training is 2D).
* ``crop_shape`` 128x128 pixels at the target spacing (~160-200 mm, enough for
  LV + RV at the ACDC spacing range), centred on the heart.
* ``clip_percentiles`` 0.5-99.5 then z-score per volume: robust to intensity
  scales from 1 to thousands and to bright outliers (fat, flow artefacts).
* ``weight_scheme`` ``"median_frequency"``: bounded (a few x for small
  classes), unlike inverse frequency which explodes on background-dominated
  data; all schemes are stored regardless.
* ``foreground_share`` 1/3 as nnU-Net's ``oversample_foreground_percent``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = ["Plan", "ConfigError", "WEIGHT_SCHEMES", "PLAN_VERSION"]

PLAN_VERSION = 1
WEIGHT_SCHEMES = ("inverse_frequency", "median_frequency", "enet", "effective_number")
IMAGE_INTERPOLATIONS = ("linear", "bspline")
LABEL_INTERPOLATIONS = ("onehot_linear", "nearest")
STORE_DTYPES = ("float32", "float16")


class ConfigError(ValueError):
    """A configuration problem detected before any work; the message says what to change."""


@dataclass(frozen=True)
class Plan:
    """Parameters of a build. See the module docstring for the defaults' rationale.

    Parameters
    ----------
    target_spacing : float or None
        In-plane spacing in mm of the stored slices; ``None`` until resolved
        from the fingerprint (median in-plane spacing).
    crop_shape : tuple of int
        In-plane crop size in pixels at ``target_spacing``.
    crop_jitter_mm : float
        Maximum random shift of the training crop centre (uniform in a disc),
        so that a label-free centre error at inference costs no accuracy.  The
        shift is clamped so that all foreground stays inside the crop.
    clip_percentiles : tuple of float
        Lower/upper percentiles for intensity clipping before z-scoring.
    image_interpolation, label_interpolation : str
        ``linear``/``bspline``; ``onehot_linear`` (nnU-Net style) or ``nearest``.
    weight_scheme : str
        Default class-weight scheme, one of :data:`WEIGHT_SCHEMES`.
    effective_number_beta : float or None
        Beta of the effective-number scheme; ``None`` uses ``1 - 1/N_max``
        (the largest class count) so it does not degenerate at voxel counts in
        the millions.
    foreground_share : float
        Minimum share of sampled slices that contain foreground.
    balance_classes : bool
        Balance foreground classes among foreground slices by sampling weight.
    replicate : bool
        Also store ``replicated_index``: slice indices materialising the
        oversampling for consumers that cannot sample by weight.
    store_dtype : str
        ``float16`` (default) or ``float32`` for ``images``.  Stored slices are
        z-scored (values within about -5..10), where float16 keeps a relative
        precision of 5e-4, far below the image noise; it halves the store and
        the memory a loader needs.  Loaders convert to float32.
    shard_slices : int
        Slices per shard (inner chunks of up to 16 slices, see
        :data:`pipelines.build.store.CHUNK_SLICES`).  Each case group starts
        at a shard boundary, so smaller shards waste less padding.
    group_cases : int
        Mean number of cases per store group (content-defined: a group ends
        after a case whose id hashes to 0 modulo this number, or, past 1.5x
        this number, to an even value; see
        :func:`pipelines.build.store.group_layout`).  A changed case
        rewrites only its group; smaller groups mean less rewriting per
        change and more padding slices.
    phases : tuple of str
        Frames to use where a case offers several (``ED``, ``ES``).
    classes : tuple of str
        Class names, index ``i`` = label value ``i`` in the store; class 0 is
        the background.  Set by the build from the dataset's label map
        (:class:`cmrprep.labels.LabelMap`); ACDC's four classes by default.
    seed : int
        Seed of every random choice of the build.
    """

    target_spacing: float | None = None
    crop_shape: tuple[int, int] = (128, 128)
    crop_jitter_mm: float = 12.0
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    image_interpolation: str = "linear"
    label_interpolation: str = "onehot_linear"
    weight_scheme: str = "median_frequency"
    effective_number_beta: float | None = None
    foreground_share: float = 1.0 / 3.0
    balance_classes: bool = True
    replicate: bool = False
    store_dtype: str = "float16"
    shard_slices: int = 64
    group_cases: int = 8
    phases: tuple[str, ...] = ("ED", "ES")
    classes: tuple[str, ...] = ("background", "RV", "MYO", "LV")
    seed: int = 0
    version: int = PLAN_VERSION

    # -- derived -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    @property
    def crop_mm(self) -> tuple[float, float]:
        """Physical crop size in mm (requires a resolved ``target_spacing``)."""
        if self.target_spacing is None:
            raise ConfigError("plan.target_spacing is not resolved yet")
        return (self.crop_shape[0] * self.target_spacing, self.crop_shape[1] * self.target_spacing)

    def with_crop_mm(self, crop_mm: float | tuple[float, float]) -> "Plan":
        """Return a plan whose crop covers ``crop_mm`` millimetres at the target spacing."""
        if self.target_spacing is None:
            raise ConfigError("set target_spacing before crop_mm")
        mm = (crop_mm, crop_mm) if isinstance(crop_mm, (int, float)) else tuple(crop_mm)
        if min(mm) <= 0:
            raise ConfigError(f"crop size must be positive, got {mm} mm")
        shape = tuple(int(round(m / self.target_spacing)) for m in mm)
        return replace(self, crop_shape=shape)  # type: ignore[arg-type]

    # -- validation ----------------------------------------------------------
    def validate(self) -> "Plan":
        """Raise :class:`ConfigError` naming the field and the fix; return self."""
        if self.target_spacing is not None and not (self.target_spacing > 0):
            raise ConfigError(f"target_spacing must be > 0 mm, got {self.target_spacing}; "
                              "pass e.g. --spacing 1.25")
        if self.target_spacing is not None and self.target_spacing > 10:
            raise ConfigError(f"target_spacing {self.target_spacing} mm is implausible for in-plane "
                              "CMR (expected 0.5-3 mm)")
        if len(self.crop_shape) != 2 or min(self.crop_shape) < 16:
            raise ConfigError(f"crop_shape must be two sizes >= 16 px, got {list(self.crop_shape)}")
        lo, hi = self.clip_percentiles
        if not (0 <= lo < hi <= 100):
            raise ConfigError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {[lo, hi]}")
        _choice("weight_scheme", self.weight_scheme, WEIGHT_SCHEMES)
        _choice("image_interpolation", self.image_interpolation, IMAGE_INTERPOLATIONS)
        _choice("label_interpolation", self.label_interpolation, LABEL_INTERPOLATIONS)
        _choice("store_dtype", self.store_dtype, STORE_DTYPES)
        if not (0.0 <= self.foreground_share <= 1.0):
            raise ConfigError(f"foreground_share must be in [0, 1], got {self.foreground_share}")
        if self.effective_number_beta is not None and not (0 < self.effective_number_beta < 1):
            raise ConfigError(f"effective_number_beta must be in (0, 1), got {self.effective_number_beta}")
        if self.crop_jitter_mm < 0:
            raise ConfigError(f"crop_jitter_mm must be >= 0, got {self.crop_jitter_mm}")
        if self.shard_slices < 1:
            raise ConfigError(f"shard_slices must be >= 1, got {self.shard_slices}")
        if self.group_cases < 1:
            raise ConfigError(f"group_cases must be >= 1, got {self.group_cases}")
        if len(self.classes) < 2 or self.classes[0] != "background" or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes must be distinct names with 'background' first and at least "
                              f"one more class, got {list(self.classes)}")
        if len(self.classes) > 255:
            raise ConfigError(f"{len(self.classes)} classes do not fit uint8 labels (at most 255)")
        if self.version != PLAN_VERSION:
            raise ConfigError(f"plan version {self.version} is not supported (expected {PLAN_VERSION})")
        return self

    # -- JSON ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    def to_json(self) -> str:
        """Pretty JSON text, stable key order."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        """Build and validate a plan; unknown keys are a :class:`ConfigError`."""
        known = {f.name for f in fields(cls)} | {"num_classes"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown plan key(s) {unknown}; valid keys are {sorted(known)}")
        kw = dict(d)
        legacy = kw.pop("num_classes", None)  # plans written before classes were named
        if legacy is not None and int(legacy) != len(kw.get("classes") or cls.classes):
            raise ConfigError(f"plan num_classes {legacy} disagrees with its classes "
                              f"{kw.get('classes') or list(cls.classes)}; remove num_classes")
        for key in ("crop_shape", "clip_percentiles", "phases", "classes"):
            if key in kw and kw[key] is not None:
                kw[key] = tuple(kw[key])
        if "crop_shape" in kw:
            kw["crop_shape"] = tuple(int(v) for v in kw["crop_shape"])
        return cls(**kw).validate()

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Parse JSON text (see :meth:`from_dict`)."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"plan is not valid JSON: {exc}") from exc
        if not isinstance(d, dict):
            raise ConfigError("plan JSON must be an object")
        return cls.from_dict(d)

    def updated(self, **changes: Any) -> "Plan":
        """Copy with ``changes`` applied (``None`` values are ignored), validated."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None}).validate()


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")
