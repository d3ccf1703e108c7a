"""Class-weight schemes for a weighted loss (4 classes: bg, RV, MYO, LV).

Every scheme returns one float per class, **normalised so that the mean over
classes is 1** (``sum(w) == C``).  With per-pixel sample weights and Keras'
``sum_over_batch_size`` reduction this keeps the loss on the same scale as the
unweighted loss, so learning rates need no retuning when switching schemes.

Absent classes (``N_c == 0``) would get an infinite (inverse frequency,
effective number) or undefined (median frequency) weight.  As MONAI's
``GeneralizedDiceLoss`` does with infinite weights, an absent class gets the
**maximum weight of the present classes** (before normalisation) and the result
is never ``inf`` or ``NaN``; the rule is applied to every scheme so that they
agree.  If no class is present at all, all weights are 1.

``counts`` arguments accept either class totals ``(C,)`` or a per-slice table
``(S, C)`` (summed over slices).

Examples
--------
>>> w = inverse_frequency([900, 50, 30, 20])
>>> [round(v, 4) for v in w]
[0.0426, 0.766, 1.2766, 1.9149]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmrprep import stats
from cmrprep.plan import WEIGHT_SCHEMES, ConfigError

__all__ = ["inverse_frequency", "median_frequency", "enet", "effective_number",
           "compute_all", "default_beta", "WEIGHT_SCHEMES"]

log = logging.getLogger(__name__)

ArrayLike = Sequence[float] | np.ndarray


def inverse_frequency(counts: ArrayLike) -> list[float]:
    """Inverse class frequency, ``w_c = N / (C * N_c)`` (sklearn ``"balanced"``).

    Parameters
    ----------
    counts : array_like, (C,) or (S, C)
        Voxel counts per class.

    Returns
    -------
    list of float
        ``C`` weights, mean 1.  Unbounded: with a 97 % background the
        background weight is tiny and rare classes dominate.
    """
    n = _totals(counts)
    present = n > 0
    raw = np.zeros_like(n)
    raw[present] = n.sum() / (len(n) * n[present])
    return _finish(raw, present)


def median_frequency(counts: ArrayLike, image_presence_voxels: ArrayLike | None = None) -> list[float]:
    """Median-frequency balancing (Eigen & Fergus 2015, SegNet).

    ``freq_c = N_c / P_c`` where ``P_c`` is the total number of voxels of the
    slices (images) that contain class ``c``; ``w_c = median(freq) / freq_c``,
    the median taken over present classes.  Bounded in practice (a few x for
    small classes), hence the plan's default.

    Parameters
    ----------
    counts : array_like, (C,) or (S, C)
        Voxel counts per class.
    image_presence_voxels : array_like of shape (C,), optional
        ``P_c``; required when ``counts`` are totals, derived with
        :func:`cmrprep.stats.presence_voxels` when ``counts`` is a per-slice
        table.

    Returns
    -------
    list of float
        ``C`` weights, mean 1.
    """
    if image_presence_voxels is None:
        if np.ndim(counts) != 2:
            raise ValueError("median_frequency needs image_presence_voxels when counts are class "
                             "totals; pass the per-slice (S, C) table instead")
        image_presence_voxels = stats.presence_voxels(np.asarray(counts))
    n = _totals(counts)
    p = np.asarray(image_presence_voxels, dtype=np.float64).reshape(-1)
    if p.shape != n.shape:
        raise ValueError(f"image_presence_voxels has {p.size} entries for {n.size} classes")
    present = (n > 0) & (p > 0)
    freq = np.zeros_like(n)
    freq[present] = n[present] / p[present]
    raw = np.zeros_like(n)
    if present.any():
        raw[present] = np.median(freq[present]) / freq[present]
    return _finish(raw, present)


def enet(counts: ArrayLike, c: float = 1.02) -> list[float]:
    """ENet weighting (Paszke et al. 2016), ``w_c = 1 / ln(c + p_c)`` with ``p_c = N_c / N``.

    With ``c = 1.02`` raw weights lie in ``[1.42, 50.5]`` before normalisation.

    Parameters
    ----------
    counts : array_like, (C,) or (S, C)
    c : float
        Must be > 1 so that the logarithm stays positive.

    Returns
    -------
    list of float
        ``C`` weights, mean 1.
    """
    if not c > 1.0:
        raise ConfigError(f"enet constant c must be > 1 (e.g. 1.02), got {c}")
    n = _totals(counts)
    present = n > 0
    raw = np.zeros_like(n)
    if present.any():
        raw[present] = 1.0 / np.log(c + n[present] / n.sum())
    return _finish(raw, present)


def default_beta(counts: ArrayLike) -> float:
    """``1 - 1/max(N_c)``: the effective-number beta that scales with the data.

    Returns 0.0 when every count is 0 or the largest count is 1.
    """
    n_max = float(_totals(counts).max(initial=0.0))
    return 1.0 - 1.0 / n_max if n_max > 1 else 0.0


def effective_number(counts: ArrayLike, beta: float | None = None) -> list[float]:
    """Class-balanced weights from the effective number of samples (Cui et al. 2019).

    ``E_c = (1 - beta**N_c) / (1 - beta)`` and ``w_c ∝ 1 / E_c``.

    Why ``beta = None`` means ``1 - 1/max(N_c)``: the commonly copied
    ``beta = 0.9999`` was chosen for *image* counts.  At voxel counts
    ``beta**N_c = exp(N_c * ln beta) ≈ exp(-1e-4 * N_c)``, which is 4.5e-5 at
    ``N_c = 1e5`` and 3.7e-44 at ``N_c = 1e6``; every class then has
    ``E_c ≈ 1 / (1 - beta) = 1e4`` and all weights are equal (no rebalancing).
    With ``beta = 1 - 1/N_max``, ``beta**N_c ≈ exp(-N_c / N_max)``: the
    largest class saturates (``E ≈ 0.63 N_max``) and a class ``r = N_c/N_max``
    times smaller gets ``E ≈ r N_max``, i.e. inverse-frequency-like weights for
    rare classes, softened for common ones.

    Parameters
    ----------
    counts : array_like, (C,) or (S, C)
    beta : float in (0, 1), optional
        ``None`` uses :func:`default_beta`.

    Returns
    -------
    list of float
        ``C`` weights, mean 1.
    """
    n = _totals(counts)
    if beta is None:
        beta = default_beta(n)
    elif not 0.0 < beta < 1.0:
        raise ConfigError(f"effective_number_beta must be in (0, 1), got {beta}; "
                          "or leave it unset (null) to use 1 - 1/max(N_c)")
    present = n > 0
    raw = np.zeros_like(n)
    if beta == 0.0:  # at most one voxel per class: every E_c is 1
        raw[present] = 1.0
    elif present.any():
        # 1 - beta**N as -expm1(N * ln(beta)): keeps precision when beta is within 1e-7 of 1.
        raw[present] = (1.0 - beta) / -np.expm1(n[present] * np.log(beta))
    return _finish(raw, present)


def compute_all(slice_counts: np.ndarray, scheme: str, beta: float | None = None) -> dict[str, Any]:
    """All weight schemes from a per-slice count table, with the chosen default.

    Parameters
    ----------
    slice_counts : ndarray of shape (S, C)
        Per-slice class counts (after cropping).
    scheme : str
        Default scheme, one of :data:`cmrprep.plan.WEIGHT_SCHEMES`.
    beta : float, optional
        Effective-number beta (``None``: ``1 - 1/max(N_c)``).

    Returns
    -------
    dict
        ``{"default": scheme, "weights": {name: [C floats] for every scheme},
        "effective_number_beta": beta actually used}``; JSON-able.

    Raises
    ------
    ConfigError
        For an unknown scheme (the message lists the valid ones) or a beta
        outside (0, 1).
    """
    if scheme not in WEIGHT_SCHEMES:
        raise ConfigError(f"unknown weight_scheme {scheme!r}; choose one of {', '.join(WEIGHT_SCHEMES)}")
    table = np.asarray(slice_counts)
    if table.ndim != 2:
        raise ValueError(f"slice_counts must be a (S, C) table, got shape {table.shape}")
    used_beta = default_beta(table) if beta is None else float(beta)
    absent = np.flatnonzero(table.sum(axis=0) == 0).tolist()
    if absent and len(absent) < table.shape[1]:
        log.warning("class(es) %s have no voxel; every scheme gives them the largest weight of the "
                    "present classes", absent)
    all_w = {
        "inverse_frequency": inverse_frequency(table),
        "median_frequency": median_frequency(table),
        "enet": enet(table),
        "effective_number": effective_number(table, beta),
    }
    log.debug("class weights (%s default): %s", scheme, all_w)
    return {"default": scheme, "weights": {k: all_w[k] for k in WEIGHT_SCHEMES},
            "effective_number_beta": used_beta}


# -- helpers -------------------------------------------------------------------
def _totals(counts: ArrayLike) -> np.ndarray:
    """Class totals as float64 (C,), validated (finite, >= 0)."""
    arr = np.asarray(counts, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr.sum(axis=0)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"counts must be class totals (C,) or a (S, C) table, got shape {np.shape(counts)}")
    if not np.all(np.isfinite(arr)) or arr.min() < 0:
        raise ValueError(f"counts must be finite and >= 0, got {arr.tolist()}")
    return arr


def _finish(raw: np.ndarray, present: np.ndarray) -> list[float]:
    """Fill absent classes with the max present weight, normalise to mean 1."""
    if not present.any():
        log.warning("no class has any voxel; class weights default to 1")
        return [1.0] * len(raw)
    w = raw.astype(np.float64, copy=True)
    if not present.all():
        absent = np.flatnonzero(~present).tolist()
        log.debug("class(es) %s absent; they get the largest weight of the present classes", absent)
        w[~present] = w[present].max()
    w = w * (len(w) / w.sum())
    return [float(v) for v in w]
