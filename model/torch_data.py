"""The store as a PyTorch ``Dataset`` (no Keras import; the backend is never touched).

>>> from torch.utils.data import DataLoader, WeightedRandomSampler  # doctest: +SKIP
>>> store = ShardStore("shards")  # doctest: +SKIP
>>> train_idx, val_idx = split_by_patient(store, 0.2, seed=0)  # doctest: +SKIP
>>> ds = TorchSliceDataset(store, train_idx, augment=Augmenter(), class_weights="store")  # doctest: +SKIP
>>> sampler = WeightedRandomSampler(ds.sampling_weights, num_samples=len(ds), replacement=True,
...                                 generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
>>> for x, y, w in DataLoader(ds, batch_size=16, sampler=sampler, num_workers=2):  # doctest: +SKIP
...     loss = (F.cross_entropy(net(x), y, reduction="none") * w).mean()

``sampling_weights`` are the store's per-slice sampling weights (foreground
oversampling, class balance) restricted to ``indices``: a
``WeightedRandomSampler`` over them draws exactly the store's sampling
policy.  Items are ``(x (1, H, W) float32, y (H, W) int64)``, plus the
per-pixel class weight ``w (H, W) float32`` with ``class_weights``.  The
augmentation of item ``i`` in epoch ``e`` is seeded by ``(seed, e, i)``
(call :meth:`TorchSliceDataset.set_epoch` each epoch), so runs are
reproducible whatever ``num_workers``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from cmrprep.plan import ConfigError
from model.reader import ShardStore, class_weight_table, split_by_patient

__all__ = ["TorchSliceDataset", "ShardStore", "split_by_patient"]


class TorchSliceDataset(torch.utils.data.Dataset):
    """Slices ``indices`` of a :class:`~model.reader.ShardStore` as a map-style Dataset.

    Parameters
    ----------
    store : ShardStore
    indices : array of int
        Store slice indices (e.g. the training part of :func:`split_by_patient`).
    augment : callable, optional
        ``augment(image, label, seed) -> (image, label)`` (e.g. :class:`model.augment.Augmenter`).
    seed : int
        Base seed of the per-item augmentation seeds.
    class_weights : "store", sequence of float or None
        Adds the per-pixel weight ``class_weights[y]`` to each item.
    """

    def __init__(self, store: ShardStore, indices: Any, *, augment: Callable | None = None,
                 seed: int = 0, class_weights: Any = None) -> None:
        self.store, self.indices = store, np.asarray(indices, dtype=np.int64)
        if self.indices.size == 0:
            raise ConfigError("no slices given; check the split and the store")
        self.augment, self.seed, self.epoch = augment, int(seed), 0
        self.class_weights = class_weight_table(class_weights, store)

    @property
    def sampling_weights(self) -> torch.Tensor:
        """The store's sampling weight of each item (for ``WeightedRandomSampler``), float64."""
        return torch.as_tensor(np.asarray(self.store.weights, dtype=np.float64)[self.indices])

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentation seeds of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int):
        if not 0 <= int(i) < len(self):
            raise IndexError(f"item {i} out of range 0..{len(self) - 1}")
        images, labels = self.store.get(self.indices[[int(i)]])
        image, label = images[0], labels[0]
        if self.augment is not None:
            s = np.random.SeedSequence([self.seed, self.epoch, int(i)]).generate_state(1)[0]
            image, label = self.augment(image, label, int(s))
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)[None])
        y = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        if self.class_weights is None:
            return x, y
        return x, y, torch.from_numpy(self.class_weights[np.asarray(label, dtype=np.intp)])
