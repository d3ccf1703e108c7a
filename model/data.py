"""Reading the slice store for training: in-memory or shard-streamed, patient split, datasets.

The store (``SHARDS/store.zarr``, schema in docs/DESIGN.md) keeps one slice
per chunk and many slices per shard.  Random single-slice reads through
zarr-python cost ~1-2 ms each, so :class:`ShardStore` reads whole arrays
(when ``images`` + ``labels`` fit in ``memory_budget``) or whole shards
(kept in a small LRU cache) and serves slices from NumPy.

Datasets are ``keras.utils.PyDataset`` subclasses:

* :class:`SliceDataset` draws training slices with probability proportional
  to the store's ``weights`` (renormalised over the training subset), or
  shuffles them uniformly (``use_sampling=False``).  Batch ``i`` of epoch
  ``e`` depends only on ``(seed, e, i)`` through
  ``np.random.SeedSequence([seed, e, i])``: loader workers (threads or
  forked processes) never repeat each other's draws or augmentations, and a
  run is reproducible whatever the worker count.
* :class:`ValidationDataset` iterates the validation slices in order,
  without augmentation.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr

import model  # noqa: F401  (sets KERAS_BACKEND before keras is imported)
import keras

from cmrprep.plan import ConfigError

__all__ = ["StoreError", "ShardStore", "resolve_store_path", "split_by_patient", "SliceDataset",
           "ValidationDataset"]

log = logging.getLogger(__name__)

NUM_CLASSES = 4
REQUIRED_ARRAYS = ("images", "labels", "weights", "case_index")


class StoreError(ConfigError):
    """The store cannot be used for training; the message names the array and the fix."""


def resolve_store_path(path: str | Path) -> Path:
    """Return the ``store.zarr`` path; accepts the build output folder or the store itself."""
    p = Path(path)
    if (p / "store.zarr" / "zarr.json").exists():
        return p / "store.zarr"
    if (p / "zarr.json").exists():
        return p
    raise StoreError(f"no cmrprep store at {path}: expected {p}/store.zarr/zarr.json; "
                     "run `python -m pipelines.build RAW OUT` first")


def _check_labels(labels: np.ndarray, where: str) -> None:
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        bad = np.unique(labels[labels >= NUM_CLASSES])[:5].tolist()
        raise StoreError(f"labels in {where} contain values {bad} outside 0..{NUM_CLASSES - 1}; "
                         "rebuild the store (label remapping/interpolation went wrong)")


class ShardStore:
    """Read-only access to a slice store, held in memory when it fits.

    Parameters
    ----------
    path : str or Path
        Build output folder containing ``store.zarr``, or the store itself.
    memory_budget : int
        Bytes allowed for ``images`` + ``labels`` in memory; above it slices
        are streamed shard by shard.
    cache_shards : int
        Shards kept in the LRU cache when streaming.
    """

    def __init__(self, path: str | Path, memory_budget: int = 4 * 1024**3,
                 cache_shards: int = 8) -> None:
        self.path = resolve_store_path(path)
        self.memory_budget, self.cache_shards = int(memory_budget), max(1, int(cache_shards))
        root = zarr.open_group(str(self.path), mode="r")
        self.array_names = sorted(root.array_keys())
        missing = [a for a in REQUIRED_ARRAYS if a not in self.array_names]
        if missing:
            raise StoreError(f"store {self.path} lacks array(s) {missing}; rebuild it with "
                             "`python -m pipelines.build` (sampling weights are written by the build)")
        self.attrs: dict[str, Any] = dict(root.attrs)
        self.weights = self._read_weights(root)
        self.case_index = np.asarray(root["case_index"][...], dtype=np.int64)
        self.class_counts = (np.asarray(root["class_counts"][...], dtype=np.int64)
                             if "class_counts" in self.array_names else None)
        images, labels = root["images"], root["labels"]
        self.n_slices, self.slice_shape = int(images.shape[0]), tuple(images.shape[1:])
        self._check_shapes(labels)
        self.shard_len = int(images.shards[0] if images.shards else images.chunks[0])
        self.in_memory = images.nbytes + labels.nbytes <= self.memory_budget
        self._images = self._labels = None
        if self.in_memory:
            self._images = np.asarray(images[...], dtype=np.float32)
            self._labels = np.asarray(labels[...], dtype=np.uint8)
            _check_labels(self._labels, str(self.path))
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        log.info("store %s: %d slices %s, %s", self.path, self.n_slices, self.slice_shape,
                 "in memory" if self.in_memory else f"streamed ({self.shard_len} slices/shard)")

    def _read_weights(self, root: zarr.Group) -> np.ndarray:
        w = np.asarray(root["weights"][...], dtype=np.float64)
        if w.ndim != 1 or not np.all(np.isfinite(w)) or (w < 0).any() or not w.sum() > 0:
            raise StoreError(f"store {self.path}: `weights` must be finite, >= 0 and not all 0; "
                             "rebuild the store")
        return w

    def _check_shapes(self, labels: zarr.Array) -> None:
        n = self.n_slices
        if tuple(labels.shape) != (n, *self.slice_shape):
            raise StoreError(f"labels shape {labels.shape} != images shape {(n, *self.slice_shape)}")
        for name, arr in (("weights", self.weights), ("case_index", self.case_index)):
            if arr.shape[0] != n:
                raise StoreError(f"`{name}` has {arr.shape[0]} entries for {n} slices")
        if self.class_counts is not None and self.class_counts.shape != (n, NUM_CLASSES):
            raise StoreError(f"`class_counts` shape {self.class_counts.shape} != ({n}, {NUM_CLASSES})")

    # -- slice access ----------------------------------------------------------
    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (k, H, W) float32 and labels (k, H, W) uint8 of slice ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_slices):
            raise IndexError(f"slice index out of range 0..{self.n_slices - 1}")
        if self.in_memory:
            return self._images[idx], self._labels[idx]
        images = np.empty((idx.size, *self.slice_shape), dtype=np.float32)
        labels = np.empty((idx.size, *self.slice_shape), dtype=np.uint8)
        for shard in np.unique(idx // self.shard_len):
            sel = np.flatnonzero(idx // self.shard_len == shard)
            img, lab = self._shard(int(shard))
            local = idx[sel] - shard * self.shard_len
            images[sel], labels[sel] = img[local], lab[local]
        return images, labels

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """One whole shard from the LRU cache (read on a miss)."""
        with self._lock:
            if shard in self._cache:
                self._cache.move_to_end(shard)
                return self._cache[shard]
        root = zarr.open_group(str(self.path), mode="r")
        lo, hi = shard * self.shard_len, min((shard + 1) * self.shard_len, self.n_slices)
        block = (np.asarray(root["images"][lo:hi], dtype=np.float32),
                 np.asarray(root["labels"][lo:hi], dtype=np.uint8))
        _check_labels(block[1], f"{self.path} slices {lo}..{hi - 1}")
        with self._lock:
            self._cache[shard] = block
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        return block

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- metadata --------------------------------------------------------------
    def foreground_slices(self) -> np.ndarray:
        """Boolean (N,) mask of slices with any foreground (from ``class_counts``)."""
        if self.class_counts is None:
            raise StoreError("store lacks `class_counts`; rebuild it")
        return self.class_counts[:, 1:].sum(axis=1) > 0

    def check_attrs(self) -> dict[str, Any]:
        """Store attributes plus ``arrays`` (array names), for :func:`model.checks.check_wiring`."""
        return {**self.attrs, "arrays": list(self.array_names)}


def split_by_patient(store: ShardStore, val_fraction: float = 0.2,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split slice indices by case so that no case is in both parts.

    Parameters
    ----------
    store : ShardStore
        Provides ``case_index``.
    val_fraction : float
        Share of cases (not slices) for validation, in [0, 1); rounded, at
        least one case when > 0.
    seed : int
        Seed of the case permutation.

    Returns
    -------
    train_idx, val_idx : ndarray of int64
        Sorted slice indices.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cases = np.unique(store.case_index)
    n_val = 0 if val_fraction == 0 else max(1, int(round(val_fraction * cases.size)))
    if n_val >= cases.size:
        raise ConfigError(f"val_fraction {val_fraction} leaves no training case out of "
                          f"{cases.size}; lower it or add cases")
    val_cases = np.random.default_rng(seed).permutation(cases)[:n_val]
    is_val = np.isin(store.case_index, val_cases)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


class SliceDataset(keras.utils.PyDataset):
    """Training batches ``(x (B, H, W, 1) float32, y (B, H, W) int32)``.

    Parameters
    ----------
    store : ShardStore
        Slice source.
    indices : ndarray
        Training slice indices.
    batch_size : int
        Slices per batch.
    seed : int
        Base seed; batch ``i`` of epoch ``e`` uses ``SeedSequence([seed, e, i])``.
    augment : callable, optional
        ``augment(image, label, seed) -> (image, label)``, e.g.
        :class:`model.augment.Augmenter`.
    use_sampling : bool
        Draw by the store's ``weights`` (with replacement); else a seeded
        uniform shuffle per epoch.
    steps_per_epoch : int, optional
        Batches per epoch; default ``ceil(len(indices) / batch_size)``.
    **kwargs
        ``workers``, ``use_multiprocessing``, ``max_queue_size`` of PyDataset.
    """

    def __init__(self, store: ShardStore, indices: np.ndarray, batch_size: int = 16, *,
                 seed: int = 0, augment: Callable | None = None, use_sampling: bool = True,
                 steps_per_epoch: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store, self.indices = store, np.asarray(indices, dtype=np.int64)
        if self.indices.size == 0:
            raise ConfigError("no training slices; check val_fraction and the store")
        if batch_size < 1 or (steps_per_epoch is not None and steps_per_epoch < 1):
            raise ConfigError(f"batch_size and steps_per_epoch must be >= 1, got "
                              f"{batch_size}, {steps_per_epoch}")
        self.batch_size, self.seed, self.augment = int(batch_size), int(seed), augment
        self.use_sampling, self.steps_per_epoch = use_sampling, steps_per_epoch
        weights = store.weights[self.indices]
        if use_sampling and not weights.sum() > 0:
            raise StoreError("sampling weights of the training slices sum to 0; rebuild the store "
                             "or pass use_sampling=False")
        self.probs = weights / weights.sum() if use_sampling else np.full(
            self.indices.size, 1.0 / self.indices.size)
        self.epoch, self._served, self._perm = 0, False, None

    def __len__(self) -> int:
        return self.steps_per_epoch or math.ceil(self.indices.size / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches ``__getitem__`` returns (used on resume)."""
        self.epoch, self._served, self._perm = int(epoch), False, None

    def on_epoch_end(self) -> None:
        """Advance the epoch (Keras may call this several times; only a served epoch counts)."""
        if self._served:
            self.set_epoch(self.epoch + 1)

    def batch_indices(self, i: int) -> tuple[np.ndarray, np.random.Generator]:
        """Slice indices of batch ``i`` and the generator for its augmentation seeds."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, int(i)]))
        if self.use_sampling:
            return rng.choice(self.indices, size=self.batch_size, p=self.probs), rng
        if self._perm is None:
            perm_rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
            self._perm = perm_rng.permutation(self.indices)
        pos = np.arange(i * self.batch_size, (i + 1) * self.batch_size)
        return np.take(self._perm, pos, mode="wrap"), rng

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range 0..{len(self) - 1}")
        self._served = True
        idx, rng = self.batch_indices(i)
        images, labels = self.store.get(idx)
        if self.augment is not None:
            seeds = rng.integers(0, 2**32, size=idx.size, dtype=np.uint64)
            pairs = [self.augment(im, lab, int(s)) for im, lab, s in zip(images, labels, seeds)]
            images = np.stack([p[0] for p in pairs])
            labels = np.stack([p[1] for p in pairs])
        return images[..., None].astype(np.float32), labels.astype(np.int32)

    def foreground_pixel_share(self) -> float:
        """Expected foreground pixel share of a drawn slice (from ``class_counts``)."""
        counts = self.store.class_counts
        if counts is None:
            return float("nan")
        sub = counts[self.indices].astype(np.float64)
        fg = sub[:, 1:].sum(axis=1) / np.maximum(sub.sum(axis=1), 1.0)
        return float((self.probs * fg).sum())


class ValidationDataset(keras.utils.PyDataset):
    """Validation batches in slice order, without augmentation (last batch may be short)."""

    def __init__(self, store: ShardStore, indices: np.ndarray, batch_size: int = 16,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store, self.indices = store, np.asarray(indices, dtype=np.int64)
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return math.ceil(self.indices.size / self.batch_size)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range 0..{len(self) - 1}")
        idx = self.indices[i * self.batch_size:(i + 1) * self.batch_size]
        images, labels = self.store.get(idx)
        return images[..., None].astype(np.float32), labels.astype(np.int32)
