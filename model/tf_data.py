"""The store as a ``tf.data.Dataset`` (imports TensorFlow; never sets the Keras backend).

>>> store = ShardStore("shards")  # doctest: +SKIP
>>> train_idx, val_idx = split_by_patient(store, 0.2, seed=0)  # doctest: +SKIP
>>> ds = tf_dataset(store, train_idx, batch_size=16, class_weights="store")  # doctest: +SKIP
>>> net.fit(ds, steps_per_epoch=200, epochs=10)  # doctest: +SKIP

Batches are exactly :class:`model.data.SliceDataset`'s: drawn by the store's
sampling weights (or a uniform shuffle), batch ``i`` of epoch ``e`` seeded by
``(seed, e, i)``, optional augmentation, and with ``class_weights`` a third
element ``sample_weight (B, H, W) float32`` that Keras' built-in losses take.
The dataset is infinite by default (``epochs=None``): the epoch counter moves
on inside it, so pass ``steps_per_epoch`` to ``fit``; a finite dataset
(``epochs=k``) ends after ``k * steps`` batches.  Batches are produced by one
Python generator and prefetched by tf.data; open the store in memory
(``ShardStore(..., mode="memory")``) for the fastest reads.

``validation_tf_dataset`` gives the validation slices in order, unaugmented.

TensorFlow is optional: ``pip install tensorflow-cpu`` (Linux x86-64, Windows)
or ``tensorflow`` (macOS).  Importing this module does not change
``KERAS_BACKEND`` or ``keras.config.backend()``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

try:
    import tensorflow as tf
except ImportError as exc:  # pragma: no cover - depends on the user's install
    raise ImportError("model.tf_data needs TensorFlow: pip install tensorflow-cpu "
                      "(or tensorflow on macOS)") from exc

from model.data import SliceDataset, ValidationDataset
from model.reader import ShardStore, split_by_patient

__all__ = ["tf_dataset", "validation_tf_dataset", "ShardStore", "split_by_patient"]


def _signature(store: ShardStore, weighted: bool) -> tuple:
    h, w = store.slice_shape
    spec = (tf.TensorSpec((None, h, w, 1), tf.float32), tf.TensorSpec((None, h, w), tf.int32))
    if weighted:
        spec += (tf.TensorSpec((None, h, w), tf.float32),)
    return spec


def tf_dataset(store: ShardStore, indices: Any, batch_size: int = 16, *, seed: int = 0,
               augment: Callable | None = None, use_sampling: bool = True,
               steps_per_epoch: int | None = None, class_weights: Any = None,
               epochs: int | None = None, prefetch: int | None = None) -> "tf.data.Dataset":
    """Training batches of ``indices`` as a ``tf.data.Dataset``.

    Parameters
    ----------
    store : ShardStore
    indices : array of int
        Training slice indices (e.g. from :func:`split_by_patient`).
    batch_size, seed, augment, use_sampling, steps_per_epoch, class_weights
        As for :class:`model.data.SliceDataset`.
    epochs : int, optional
        Number of epochs before the dataset ends; ``None``: never ends.
    prefetch : int, optional
        Batches prefetched (default ``tf.data.AUTOTUNE``).

    Returns
    -------
    tf.data.Dataset
        Elements ``(x (B, H, W, 1) float32, y (B, H, W) int32[, w (B, H, W) float32])``.
    """
    source = SliceDataset(store, indices, batch_size, seed=seed, augment=augment,
                          use_sampling=use_sampling, steps_per_epoch=steps_per_epoch,
                          class_weights=class_weights)

    def batches():
        epoch = 0
        while epochs is None or epoch < epochs:
            source.set_epoch(epoch)
            for i in range(len(source)):
                yield source[i]
            epoch += 1

    ds = tf.data.Dataset.from_generator(
        batches, output_signature=_signature(store, source.class_weights is not None))
    return ds.prefetch(tf.data.AUTOTUNE if prefetch is None else int(prefetch))


def validation_tf_dataset(store: ShardStore, indices: Any, batch_size: int = 16) -> "tf.data.Dataset":
    """Validation slices ``indices`` in order, unaugmented (one pass; last batch may be short)."""
    source = ValidationDataset(store, indices, batch_size)

    def batches():
        for i in range(len(source)):
            x, y = source[i]
            yield x.astype(np.float32, copy=False), y

    return tf.data.Dataset.from_generator(batches, output_signature=_signature(store, False))
