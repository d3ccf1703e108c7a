"""Keras datasets over the slice store: weighted training batches and validation batches.

The store is read by :mod:`model.reader` (one opened version, in memory when it
fits, else streamed); this module adds the ``keras.utils.PyDataset`` layer:

* :class:`SliceDataset` draws training slices with probability proportional
  to the store's ``weights`` (renormalised over the training subset), or
  shuffles them uniformly (``use_sampling=False``).  In memory the draw is
  exact and O(1) per slice (:class:`~model.reader.AliasTable`); a streamed
  store is sampled through a :class:`~model.reader.ShardPool` (each draw has
  the same marginal distribution; memory bounded by ``pool_shards``).  Batch
  ``i`` of epoch ``e`` depends only on ``(seed, e, i)`` through
  ``np.random.SeedSequence([seed, e, i])`` (and the pool of its round on
  ``(seed, e, i // batches_per_round)``): loader workers (threads or forked
  processes) never repeat each other's draws or augmentations, and a run is
  reproducible whatever the worker count.
* :class:`ValidationDataset` iterates the validation slices in order,
  without augmentation.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np

import keras

from cmrprep.plan import ConfigError
from model.reader import (DEFAULT_POOL_SHARDS, NUM_CLASSES, AliasTable, ShardPool, ShardStore,
                          StoreError, class_weight_table, resolve_store_path, split_by_patient)

__all__ = ["StoreError", "ShardStore", "ShardPool", "resolve_store_path", "split_by_patient",
           "SliceDataset", "ValidationDataset", "NUM_CLASSES"]

log = logging.getLogger(__name__)


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
        uniform shuffle per epoch (a uniform draw with replacement when the
        store is streamed).
    steps_per_epoch : int, optional
        Batches per epoch; default ``ceil(len(indices) / batch_size)``.
    pool_shards, draws_per_shard : int
        Streamed stores only: shards per pool round and draws per pool shard
        (see :class:`~model.reader.ShardPool`); a round is
        ``pool_shards * draws_per_shard // batch_size`` batches.
    class_weights : sequence of float or "store", optional
        Per-class weights; batches are then ``(x, y, sample_weight)`` with
        ``sample_weight[b, h, w] = class_weights[y[b, h, w]]`` (float32), the
        form Keras' built-in losses take for segmentation (Keras refuses
        ``class_weight=`` for such targets). ``"store"``: the weights of the
        scheme the store was built with (``store.attrs["class_weights"]``).
    **kwargs
        ``workers``, ``use_multiprocessing``, ``max_queue_size`` of PyDataset.

    Examples
    --------
    Plain Keras on a store, class-weighted (``net`` compiled with any Keras loss):

    >>> store = ShardStore("shards")  # doctest: +SKIP
    >>> train_idx, val_idx = split_by_patient(store, 0.2, seed=0)  # doctest: +SKIP
    >>> ds = SliceDataset(store, train_idx, 16, class_weights="store")  # doctest: +SKIP
    >>> net.fit(ds, epochs=10)  # doctest: +SKIP
    """

    def __init__(self, store: ShardStore, indices: np.ndarray, batch_size: int = 16, *,
                 seed: int = 0, augment: Callable | None = None, use_sampling: bool = True,
                 steps_per_epoch: int | None = None, pool_shards: int | None = DEFAULT_POOL_SHARDS,
                 draws_per_shard: int | None = None, class_weights: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.class_weights = class_weight_table(class_weights, store)
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
        self.pool: ShardPool | None = None
        self._table: AliasTable | None = None
        if not store.in_memory:
            uniform = None if use_sampling else np.ones(store.n_slices)
            self.pool = ShardPool(store, self.indices, uniform, pool_shards=pool_shards,
                                  draws_per_shard=draws_per_shard, seed=self.seed)
            self.batches_per_round = max(1, self.pool.round_slices // self.batch_size)
        elif use_sampling:
            self._table = AliasTable(self.probs)
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
        if self.pool is not None:
            return self.pool.draw(self.epoch, int(i) // self.batches_per_round, rng,
                                  self.batch_size), rng
        if self.use_sampling:
            return self.indices[self._table.sample(rng, self.batch_size)], rng
        if self._perm is None:
            perm_rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
            self._perm = perm_rng.permutation(self.indices)
        pos = np.arange(i * self.batch_size, (i + 1) * self.batch_size)
        return np.take(self._perm, pos, mode="wrap"), rng

    def _slices(self, i: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.pool is None:
            return self.store.get(idx)
        rnd = int(i) // self.batches_per_round
        nxt = (self.epoch, rnd + 1) if (rnd + 1) * self.batches_per_round < len(self) \
            else (self.epoch + 1, 0)
        return self.pool.fetch(self.epoch, rnd, idx, next_round=nxt)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range 0..{len(self) - 1}")
        self._served = True
        idx, rng = self.batch_indices(i)
        images, labels = self._slices(i, idx)
        if self.augment is not None:
            seeds = rng.integers(0, 2**32, size=idx.size, dtype=np.uint64)
            pairs = [self.augment(im, lab, int(s)) for im, lab, s in zip(images, labels, seeds)]
            images = np.stack([p[0] for p in pairs])
            labels = np.stack([p[1] for p in pairs])
        x, y = images[..., None].astype(np.float32, copy=False), labels.astype(np.int32)
        if self.class_weights is None:
            return x, y
        return x, y, self.class_weights[labels]

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
        return images[..., None], labels.astype(np.int32)
