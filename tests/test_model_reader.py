"""Store reader: alias sampling, the streaming shard pool, version isolation, bounded memory."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

from model.data import SliceDataset
from model.reader import AliasTable, ShardPool, ShardStore, StoreError, split_by_patient
from pipelines.build import outdir
from storefixture import write_store


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_store(out, n_patients=24, slices_per_patient=10, shard_slices=16, seed=3)
    return out


def _class_shares(store: ShardStore, idx: np.ndarray) -> np.ndarray:
    c = store.class_counts[idx].sum(axis=0).astype(float)
    return c / c.sum()


@pytest.mark.parametrize("weights", [
    [1.0, 0.0, 3.0, 0.5],
    np.r_[1e6, np.ones(999)],                  # one column absorbs all the others
    np.r_[np.zeros(500), np.ones(3)],          # mostly zeros
    np.random.default_rng(0).random(10_000) ** 4,
])
def test_alias_table_encodes_the_distribution_exactly(weights):
    w = np.asarray(weights, float)
    table = AliasTable(w)
    np.testing.assert_allclose(table.probabilities(), w / w.sum(), atol=1e-12)
    draws = table.sample(np.random.default_rng(1), 50_000)
    assert not np.isin(draws, np.flatnonzero(w == 0)).any()


def test_alias_table_refuses_bad_weights():
    for bad in ([], [0.0, 0.0], [1.0, -1.0], [np.nan, 1.0]):
        with pytest.raises(ValueError, match="weights"):
            AliasTable(bad)


def test_in_memory_keeps_the_stored_dtype(store_dir):
    import zarr

    write_store(store_dir.parent / "f16", shard_slices=16)
    root = zarr.open_group(str(store_dir.parent / "f16" / "store.zarr"), mode="r+")
    images = np.asarray(root["images"][...]).astype(np.float16)
    del root["images"]
    root.create_array("images", data=images, chunks=(16, 32, 32))
    store = ShardStore(store_dir.parent / "f16")
    assert store.in_memory and store._images.dtype == np.float16
    x, _ = store.get(np.array([3, 5]))
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, images[[3, 5]].astype(np.float32))


def test_streamed_sampling_matches_in_memory_in_distribution(store_dir):
    mem, streamed = ShardStore(store_dir), ShardStore(store_dir, mode="stream")
    assert mem.in_memory and not streamed.in_memory
    train, _ = split_by_patient(mem, 0.25, seed=0)
    a = SliceDataset(mem, train, 16, seed=0, steps_per_epoch=500)
    b = SliceDataset(streamed, train, 16, seed=0, steps_per_epoch=500, pool_shards=3)
    assert a.pool is None and b.pool is not None
    ia = np.concatenate([a.batch_indices(i)[0] for i in range(500)])
    ib = np.concatenate([b.batch_indices(i)[0] for i in range(500)])
    assert np.isin(ib, train).all()
    np.testing.assert_allclose(_class_shares(mem, ib), _class_shares(mem, ia), atol=0.01)
    p = mem.weights[train] / mem.weights[train].sum()
    expected = (p[:, None] * mem.class_counts[train]).sum(axis=0)
    np.testing.assert_allclose(_class_shares(mem, ib), expected / expected.sum(), atol=0.01)
    # the data served for the drawn indices are the stored slices
    x, y = b[7]
    idx, _ = b.batch_indices(7)
    xm, ym = mem.get(idx)
    np.testing.assert_array_equal(x[..., 0], xm)
    np.testing.assert_array_equal(y, ym)


def test_pool_marginal_is_the_exact_weighted_draw(store_dir):
    """Averaged over pool rounds, a draw's distribution is the store's weighted draw."""
    store = ShardStore(store_dir, mode="stream")
    train, _ = split_by_patient(store, 0.25, seed=0)
    pool = ShardPool(store, train, pool_shards=2, draws_per_shard=8, seed=5)
    n, length = store.n_slices, store.shard_len
    p = np.zeros(n)
    p[train] = store.weights[train] / store.weights[train].sum()
    marginal, uniform_shards = np.zeros(n), np.zeros(n)
    rounds = 20_000
    for rnd in range(rounds):
        shards, table = pool._round(0, rnd)
        mix = table.probabilities()
        for slot, s in enumerate(shards):
            part = mix[slot * length:(slot + 1) * length]
            marginal[s * length:s * length + part.size][:n - s * length] += part[:n - s * length]
    marginal /= rounds
    assert marginal[np.setdiff1d(np.arange(n), train)].sum() == 0
    assert np.abs(marginal - p).sum() < 0.03
    # what a pool drawn without the shards' weights would give instead
    for s in range(store.n_shards):
        w = p[s * length:(s + 1) * length]
        if w.sum():
            uniform_shards[s * length:s * length + w.size] = w / w.sum() / np.count_nonzero(
                [p[k * length:(k + 1) * length].sum() for k in range(store.n_shards)])
    assert np.abs(uniform_shards - p).sum() > 3 * np.abs(marginal - p).sum()


def test_streamed_batches_deterministic_whatever_the_order_and_workers(store_dir):
    store = ShardStore(store_dir, mode="stream")
    train, _ = split_by_patient(store, 0.25, seed=0)
    make = lambda: SliceDataset(store, train, 8, seed=11, pool_shards=2,  # noqa: E731
                                draws_per_shard=8, steps_per_epoch=12)
    a, b = make(), make()
    forward = [a[i] for i in range(12)]
    worker = copy.deepcopy(b)  # what a forked loader worker holds
    backward = {i: (worker if i % 2 else b)[i] for i in reversed(range(12))}
    for i, (x, y) in enumerate(forward):
        np.testing.assert_array_equal(x, backward[i][0])
        np.testing.assert_array_equal(y, backward[i][1])
    assert a.batches_per_round == 2
    other = SliceDataset(store, train, 8, seed=12, pool_shards=2, draws_per_shard=8, steps_per_epoch=12)
    assert not np.array_equal(other.batch_indices(0)[0], a.batch_indices(0)[0])


def test_tiny_pool_bounds_memory(store_dir):
    store = ShardStore(store_dir, mode="stream")
    train, _ = split_by_patient(store, 0.25, seed=0)
    ds = SliceDataset(store, train, 4, seed=0, pool_shards=1, draws_per_shard=4, steps_per_epoch=60)
    held = []
    for i in range(60):
        ds[i]
        held.append(ds.pool.resident_shards())
    assert max(held) <= 2  # this round's shard and the next round's
    assert len({tuple(ds.pool.round_shards(0, r)) for r in range(60)}) > 1  # the pool rotates


def test_reader_keeps_the_version_it_opened(tmp_path):
    """A rebuild that publishes meanwhile changes nothing for an open reader (#14.1)."""
    out = tmp_path / "out"
    out.mkdir()

    def publish(n_patients: int, seed: int) -> None:
        staged = tmp_path / f"staged{seed}"
        write_store(staged, n_patients=n_patients, seed=seed, shard_slices=16)
        tmp = outdir.new_version_dir(out, f"v{seed}")
        os.replace(staged / "store.zarr", tmp)
        outdir.publish(out, tmp, f"v{seed}")

    publish(6, seed=1)
    reader = ShardStore(out, mode="stream")
    before = reader.get(np.arange(reader.n_slices))
    n_before = reader.n_slices
    publish(9, seed=2)  # a later build: more slices, other data
    assert ShardStore(out, mode="stream").n_slices != n_before
    again = copy.deepcopy(reader)  # a loader worker reopening the arrays
    for r in (reader, again):
        assert r.n_slices == n_before
        for a, b in zip(before, r.get(np.arange(n_before))):
            np.testing.assert_array_equal(a, b)
    publish(7, seed=3)
    publish(8, seed=4)  # the first version is pruned now
    fresh = copy.deepcopy(reader)
    with pytest.raises(StoreError, match="was removed"):
        fresh.get(np.array([0]))
