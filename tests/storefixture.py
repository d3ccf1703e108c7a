"""Write a tiny slice store following the schema of docs/DESIGN.md ("Store").

The arrays are created and the shards written by the build's own store code
(:func:`pipelines.build.store.create_store`, :func:`~pipelines.build.store.write_shards`),
so the schema cannot drift; only the content is synthetic.  Each synthetic 'patient' is a short-axis stack: an LV disc (3)
ringed by myocardium (2) with an RV crescent (1) beside it, shrinking towards
the apex; the first and last slices of each stack hold background only.
Images are bright blood pools, dark myocardium and mid-grey background plus
noise, z-scored per patient.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cmrprep.plan import Plan
from pipelines.build.store import create_store, write_shards

__all__ = ["write_store", "synthetic_case"]


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _slice(size: int, cy: float, cx: float, r_lv: float, rv: bool) -> np.ndarray:
    lab = np.zeros((size, size), np.uint8)
    if r_lv <= 0:
        return lab
    epi = _disc(lab.shape, cy, cx, r_lv + 2.0)
    if rv:
        lab[_disc(lab.shape, cy, cx - r_lv - 1.5, r_lv + 1.5) & ~_disc(lab.shape, cy, cx, r_lv + 3)] = 1
    lab[epi] = 2
    lab[_disc(lab.shape, cy, cx, r_lv)] = 3
    return lab


def synthetic_case(rng: np.random.Generator, n_slices: int = 10, size: int = 32,
                   n_empty: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Images (S, H, W) float32 z-scored and labels (S, H, W) uint8 of one patient."""
    cy, cx = size / 2 + rng.uniform(-2, 2), size / 2 + 2 + rng.uniform(-2, 2)
    radii = np.linspace(2.0, 5.5, n_slices - 2 * n_empty)[::-1] * size / 32
    labels = np.zeros((n_slices, size, size), np.uint8)
    for k, r in enumerate(radii):
        labels[n_empty + k] = _slice(size, cy, cx, r, rv=k < len(radii) - 1)
    level = np.array([0.35, 0.8, 0.15, 0.9], np.float32)
    images = level[labels] + rng.normal(0, 0.06, labels.shape).astype(np.float32)
    images = images * rng.uniform(50, 500)  # arbitrary scanner scale, removed by z-score
    images = (images - images.mean()) / images.std()
    return images.astype(np.float32), labels


def _weights(counts: np.ndarray, foreground_share: float) -> np.ndarray:
    fg = counts[:, 1:].sum(axis=1) > 0
    mass = max(fg.mean(), foreground_share)
    w = np.where(fg, mass / max(fg.sum(), 1), (1 - mass) / max((~fg).sum(), 1))
    return w / w.sum()


def _attrs(counts: np.ndarray, weights: np.ndarray, n_patients: int, n_slices: int,
           foreground_share: float, with_class_weights: bool) -> dict:
    totals = counts.sum(axis=0)
    freq = totals / totals.sum()
    cw = (np.median(freq) / np.maximum(freq, 1e-12)).round(6).tolist()
    fg = counts[:, 1:].sum(axis=1) > 0
    share = (weights[:, None] * counts / counts.sum(axis=1, keepdims=True)).sum(axis=0)
    cases = [{"case_id": f"patient{p:03d}", "layout": "synthetic", "files": {}, "frames": [p]}
             for p in range(n_patients)]
    frames = [{"case_id": f"patient{p:03d}", "phase": "ED"} for p in range(n_patients)]
    attrs = {
        "classes": ["background", "RV", "MYO", "LV"], "spacing": [1.5, 1.5],
        "class_counts": totals.tolist(), "class_counts_raw": totals.tolist(),
        "class_weight_scheme": "median_frequency",
        "sampling": {"foreground_share": float(weights[fg].sum()),
                     "expected_class_share": share.tolist()},
        "cases": cases, "frames": frames,
        "plan": Plan(target_spacing=1.5, crop_shape=(32, 32), shard_slices=16).to_dict(),
        "provenance": {"synthetic": True}, "format_version": 1,
    }
    if with_class_weights:
        attrs.update(class_weights=cw, class_weights_all={"median_frequency": cw})
    return attrs


def write_store(path: str | Path, *, n_patients: int = 6, slices_per_patient: int = 10,
                size: int = 32, seed: int = 0, foreground_share: float = 0.8,
                shard_slices: int = 16, with_weights: bool = True,
                with_class_weights: bool = True, bad_label: int | None = None) -> Path:
    """Write ``path/store.zarr`` and return the store path.

    Parameters
    ----------
    path : path
        Build output folder to create.
    n_patients, slices_per_patient, size : int
        Store dimensions (N = n_patients * slices_per_patient slices of size x size).
    seed : int
        Seed of positions and noise.
    foreground_share : float
        Minimum sampling mass of slices with foreground.
    shard_slices : int
        Slices per shard (inner chunks of up to 16 slices, as the build writes).
    with_weights, with_class_weights : bool
        Omit the ``weights`` array / ``class_weights`` attribute to test refusals.
    bad_label : int, optional
        Write this (invalid) label value into the last slice.
    """
    rng = np.random.default_rng(seed)
    parts = [synthetic_case(rng, slices_per_patient, size) for _ in range(n_patients)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if bad_label is not None:
        labels[-1, :2, :2] = bad_label
    counts = np.stack([np.bincount(lab.ravel(), minlength=4)[:4] for lab in labels]).astype(np.int64)
    weights = _weights(counts, foreground_share)
    store = Path(path) / "store.zarr"
    n = images.shape[0]
    root = create_store(store, n_slices=n, slice_shape=(size, size), image_dtype="float32",
                        shard_slices=shard_slices)
    write_shards(store, 0, images, labels)  # whole shards, as the build writes them
    case_index = np.repeat(np.arange(n_patients, dtype=np.int32), slices_per_patient)
    small = {"case_index": case_index, "frame_index": case_index.copy(),
             "slice_index": np.tile(np.arange(slices_per_patient, dtype=np.int32), n_patients),
             "phase": np.zeros(n, np.int8), "class_counts": counts}
    for name, data in small.items():
        root[name][...] = data
    if with_weights:
        root["weights"][...] = weights
    else:
        del root["weights"]
    root.attrs.update(_attrs(counts, weights, n_patients, slices_per_patient, foreground_share,
                             with_class_weights))
    return store
