"""ShardStore, patient split, weighted sampling and deterministic batches."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from model.augment import Augmenter
from model.data import ShardStore, SliceDataset, StoreError, ValidationDataset, split_by_patient
from storefixture import write_store


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_store(out)
    return out


@pytest.fixture(scope="module")
def store(store_dir):
    return ShardStore(store_dir)


def test_store_in_memory_equals_streamed(store_dir, store):
    streamed = ShardStore(store_dir / "store.zarr", memory_budget=0, cache_shards=2)
    assert store.in_memory and not streamed.in_memory
    idx = np.random.default_rng(1).integers(0, store.n_slices, 40)
    for a, b in zip(store.get(idx), streamed.get(idx)):
        np.testing.assert_array_equal(a, b)
    assert len(streamed._cache) <= 2


def test_split_is_by_patient(store):
    train, val = split_by_patient(store, 0.34, seed=3)
    assert set(store.case_index[train]).isdisjoint(store.case_index[val])
    assert train.size + val.size == store.n_slices
    assert np.unique(store.case_index[val]).size == 2
    again = split_by_patient(store, 0.34, seed=3)
    np.testing.assert_array_equal(val, again[1])


def test_sampled_foreground_share_matches_store(store):
    ds = SliceDataset(store, np.arange(store.n_slices), batch_size=5000, seed=0)
    idx, _ = ds.batch_indices(0)
    share = store.foreground_slices()[idx].mean()
    expected = store.attrs["sampling"]["foreground_share"]
    assert share == pytest.approx(expected, abs=0.03)
    natural = store.foreground_slices().mean()
    assert abs(natural - expected) > 0.1  # the weights really oversample


def test_batches_deterministic_and_typed(store):
    train, _ = split_by_patient(store, 0.2, seed=0)
    make = lambda: SliceDataset(store, train, 4, seed=7, augment=Augmenter())  # noqa: E731
    a, b = make(), make()
    xa, ya = a[3]
    xb, yb = b[3]
    assert xa.shape == (4, 32, 32, 1) and xa.dtype == np.float32 and ya.dtype == np.int32
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    a.on_epoch_end()
    assert a.epoch == 1 and not np.array_equal(a[3][0], xa)
    b.on_epoch_end()
    b.on_epoch_end()  # Keras may call it twice: only a served epoch advances
    assert b.epoch == 1


def test_workers_do_not_repeat_augmentation(store):
    one_slice = np.flatnonzero(store.foreground_slices())[:1]
    ds = SliceDataset(store, one_slice, 2, seed=0, augment=Augmenter(), steps_per_epoch=8)
    worker = copy.deepcopy(ds)  # what a forked loader worker holds
    np.testing.assert_array_equal(worker[5][0], ds[5][0])  # same item, same result
    x0, x1 = ds[0][0], worker[1][0]
    assert not np.array_equal(x0, x1)  # other item: other augmentation of the same slice
    assert not np.array_equal(x0[0], x0[1])


def test_uniform_shuffle_covers_every_slice(store):
    train, _ = split_by_patient(store, 0.2, seed=0)
    ds = SliceDataset(store, train, 8, use_sampling=False, seed=1)
    seen = np.concatenate([ds.batch_indices(i)[0] for i in range(len(ds))])
    assert set(seen) == set(train)


def test_validation_dataset_in_order(store):
    _, val = split_by_patient(store, 0.2, seed=0)
    ds = ValidationDataset(store, val, 7)
    ys = np.concatenate([ds[i][1] for i in range(len(ds))])
    np.testing.assert_array_equal(ys, store.get(val)[1].astype(np.int32))


def test_store_without_weights_is_refused(tmp_path):
    write_store(tmp_path, with_weights=False)
    with pytest.raises(StoreError, match="weights"):
        ShardStore(tmp_path)


def test_labels_out_of_range_are_refused(tmp_path):
    write_store(tmp_path, bad_label=7)
    with pytest.raises(StoreError, match=r"\[7\] outside 0..3"):
        ShardStore(tmp_path)
    streamed = ShardStore(tmp_path, memory_budget=0)
    with pytest.raises(StoreError, match="outside"):
        streamed.get(np.array([streamed.n_slices - 1]))


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="pipelines.build"):
        ShardStore(tmp_path / "nowhere")


def test_sample_weights_are_the_class_weights_of_each_pixel(store):
    """#13: (x, y, sample_weight) batches for Keras' built-in losses."""
    cw = store.attrs["class_weights"]
    ds = SliceDataset(store, np.arange(store.n_slices), 8, seed=3, class_weights="store")
    x, y, w = ds[0]
    assert w.shape == y.shape and w.dtype == np.float32
    np.testing.assert_allclose(w, np.asarray(cw, np.float32)[y])
    x0, y0 = SliceDataset(store, np.arange(store.n_slices), 8, seed=3)[0]
    np.testing.assert_array_equal(x, x0)  # the same draw with or without weights
    np.testing.assert_array_equal(y, y0)
    ds = SliceDataset(store, np.arange(store.n_slices), 8, class_weights=[1, 2, 3, 4])
    np.testing.assert_array_equal(ds[0][2], np.array([1, 2, 3, 4], np.float32)[ds[0][1]])
    for bad in ([1, 2], [1, 2, -1, 3], "median"):
        with pytest.raises(Exception, match="class_weights"):
            SliceDataset(store, np.arange(store.n_slices), 8, class_weights=bad)


def test_plain_keras_fit_on_the_dataset_with_sample_weights(store):
    """A user's own Keras model (not cmrprep's U-Net) trains with model.fit and a built-in loss."""
    import keras

    h, w = store.slice_shape
    inp = keras.Input((h, w, 1))
    z = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    out = keras.layers.Conv2D(4, 1)(z)  # logits
    net = keras.Model(inp, out)
    net.compile(optimizer=keras.optimizers.Adam(1e-2),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ds = SliceDataset(store, np.arange(store.n_slices), 8, steps_per_epoch=4, class_weights="store")
    hist = net.fit(ds, epochs=2, verbose=0)
    losses = hist.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_pytorch_training_loop_over_the_dataset(store_dir):
    """#13: a plain PyTorch loop with WeightedRandomSampler over the store's sampling weights."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, WeightedRandomSampler

    from model.torch_data import TorchSliceDataset

    store = ShardStore(store_dir)
    train_idx, _ = split_by_patient(store, 0.2, seed=0)
    ds = TorchSliceDataset(store, train_idx, augment=Augmenter(), seed=1, class_weights="store")
    assert torch.equal(ds.sampling_weights, torch.as_tensor(store.weights[train_idx]))
    x, y, w = ds[0]
    assert x.shape == (1, *store.slice_shape) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(w, torch.as_tensor(store.attrs["class_weights"], dtype=torch.float32)[y])
    torch.testing.assert_close(ds[0][0], x)  # same seed, same epoch: same augmentation
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], x)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    sampler = WeightedRandomSampler(ds.sampling_weights, num_samples=64, replacement=True,
                                    generator=torch.Generator().manual_seed(0))
    losses = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        for xb, yb, wb in DataLoader(ds, batch_size=16, sampler=sampler, num_workers=0):
            loss = (F.cross_entropy(net(xb), yb, reduction="none") * wb).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
    assert np.isfinite(losses).all() and np.mean(losses[-4:]) < np.mean(losses[:4])
