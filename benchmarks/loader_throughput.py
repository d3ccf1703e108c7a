"""Loader throughput, memory and sampling fidelity, from the store to the trainer.

    python benchmarks/loader_throughput.py SHARDS [--mode auto|memory|stream] [--seconds 15]
    python benchmarks/loader_throughput.py --synthetic 2000000 --synthetic-dir /tmp/big [--mode stream]

Prints, on one core (OpenCV and BLAS limited to one thread, the process pinned to one
CPU): the store's open time, slices/s delivered with weighted sampling without and with
augmentation, peak RSS, and the per-class voxel shares of the sampled slices against the
exact weighted draw (the store's weights over the training split, drawn independently
per slice) and against their expectation.  ``--mode stream`` forces the shard pool on a
store that would fit in memory.

``--synthetic N`` writes (once; reused when present) a store of ``N`` slices of
128x128 directly with zarr, in the build's layout (float16 images, uint8 labels, chunks
of 16 and shards of 256 slices, Blosc lz4 + bitshuffle): short-axis phantoms of 20
slices per subject (``N / 20`` subjects) and sampling weights giving foreground
slices 1/3 of the mass, as the build does.  Its slices are noise-free and compress
well (about 20 GB of float16 become a few GB on disk), so shard reads there are
cheaper than on real data; the 800-case store built from synthetic cases is the
realistic case.  Targets (issue #17): >= 5,000 slices/s without augmentation, more
than the trainer consumes (~15 slices/s on 2 cores) with it, peak RSS <= 1.5 GB, open
<= 2 s, sampled class shares within 2 percentage points of the exact weighted draw.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

SLICES_PER_SUBJECT = 20
SIZE = 128


def _phantoms(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled short-axis slices (LV disc, myocardial ring, RV crescent; some empty)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    labels = np.zeros((n, SIZE, SIZE), np.uint8)
    for k in range(n):
        if k % 5 == 0:
            continue  # basal/apical slices without heart
        cy, cx, r = 64 + rng.uniform(-8, 8), 64 + rng.uniform(-8, 8), rng.uniform(8, 18)
        d = np.hypot(yy - cy, xx - cx)
        rv = (np.hypot(yy - cy, xx - (cx - r - 6)) < r + 4) & (d > r + 6)
        labels[k][rv] = 1
        labels[k][d <= r + 5] = 2
        labels[k][d <= r] = 3
    level = np.array([-0.3, 1.2, -0.8, 1.5], np.float32)
    bias = 0.3 * (yy / SIZE - 0.5)
    images = (level[labels] + bias).astype(np.float16)
    return images, labels


def write_synthetic(path: Path, n_slices: int, shard: int = 256) -> Path:
    """Write a store of ``n_slices`` slices directly with zarr (see module docstring)."""
    import zarr
    from tqdm.auto import tqdm
    from zarr.codecs import BloscCodec, BloscShuffle

    store = path / "store.zarr"
    if (path / "complete").exists():
        return store
    templates, tlabels = _phantoms(64)
    counts_t = np.stack([np.bincount(t.ravel(), minlength=4) for t in tlabels]).astype(np.int64)
    root = zarr.open_group(str(store), mode="w", zarr_format=3)
    comp = BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle)
    arrays = {name: root.create_array(name, shape=(n_slices, SIZE, SIZE), dtype=dtype,
                                      chunks=(16, SIZE, SIZE), shards=(shard, SIZE, SIZE),
                                      compressors=comp, fill_value=0)
              for name, dtype in (("images", "float16"), ("labels", "uint8"))}
    which = (np.arange(n_slices) * 7 + np.arange(n_slices) // 64) % len(templates)
    with zarr.config.set({"array.write_empty_chunks": True}):
        for lo in tqdm(range(0, n_slices, shard), desc="synthetic shards", unit="shard"):
            sel = which[lo:lo + shard]
            arrays["images"][lo:lo + sel.size] = templates[sel]
            arrays["labels"][lo:lo + sel.size] = tlabels[sel]
    counts = counts_t[which]
    fg = counts[:, 1:].sum(axis=1) > 0
    mass = max(fg.mean(), 1 / 3)
    weights = np.where(fg, mass / fg.sum(), (1 - mass) / max((~fg).sum(), 1))
    small = {"weights": weights / weights.sum(), "class_counts": counts,
             "case_index": (np.arange(n_slices) // SLICES_PER_SUBJECT).astype(np.int32)}
    for name, data in small.items():
        root.create_array(name, shape=data.shape, dtype=data.dtype,
                          chunks=(min(len(data), 1 << 20), *data.shape[1:]), fill_value=0)[...] = data
    root.attrs.update({"classes": ["background", "RV", "MYO", "LV"], "format_version": 1,
                       "class_weights": [1.0, 1.0, 1.0, 1.0], "synthetic": True})
    (path / "complete").write_text("ok\n")
    return store


def _rate(ds, seconds: float) -> float:
    ds[0]  # warm-up (first pool, augmenter construction)
    t0 = time.perf_counter()
    n = i = 0
    while time.perf_counter() - t0 < seconds:
        x, _ = ds[i % len(ds)][:2]
        n += x.shape[0]
        i += 1
    return n / (time.perf_counter() - t0)


def _shares(counts: np.ndarray, idx: np.ndarray) -> np.ndarray:
    c = counts[idx].sum(axis=0).astype(np.float64)
    return c / c.sum()


def class_share_report(store, train_idx: np.ndarray, ds, n_draws: int) -> list[str]:
    """Sampled vs exact weighted-draw vs expected per-class voxel shares (in %)."""
    from model.reader import AliasTable

    counts = store.class_counts
    p = store.weights[train_idx] / store.weights[train_idx].sum()
    expected = (p[:, None] * counts[train_idx]).sum(axis=0)
    expected = expected / expected.sum()
    batches = -(-n_draws // ds.batch_size)
    sampled = np.concatenate([ds.batch_indices(i % len(ds))[0] for i in range(batches)])
    exact = train_idx[AliasTable(p).sample(np.random.default_rng(12345), sampled.size)]
    s, e = _shares(counts, sampled), _shares(counts, exact)
    names = list(store.attrs.get("classes", ["background", "RV", "MYO", "LV"]))
    lines = [f"class shares over {sampled.size} draws (%): "
             "class, loader, exact weighted draw, expectation, |loader - exact| pp"]
    for c, name in enumerate(names):
        lines.append(f"  {name:12s} {100 * s[c]:7.3f} {100 * e[c]:7.3f} {100 * expected[c]:7.3f} "
                     f"{100 * abs(s[c] - e[c]):6.3f}")
    lines.append(f"  max |loader - exact| = {100 * np.abs(s - e).max():.3f} pp, "
                 f"max |loader - expectation| = {100 * np.abs(s - expected).max():.3f} pp")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print open time, slices/s, peak RSS and class shares for one store."""
    from pipelines.backend import use_cli_default_backend

    use_cli_default_backend()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="?", help="build output folder (or store); or use --synthetic")
    p.add_argument("--synthetic", type=int, help="write/read a synthetic store of this many slices")
    p.add_argument("--synthetic-dir", type=Path, default=Path("/tmp/cmrprep-loader-bench"))
    p.add_argument("--mode", choices=["auto", "memory", "stream"], default="auto")
    p.add_argument("--pool-shards", type=int, default=None, help="default: 4096 slices' worth")
    p.add_argument("--seconds", type=float, default=15.0, help="per throughput measurement")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--share-draws", type=int, default=200_000)
    a = p.parse_args(argv)
    if a.synthetic:
        t0 = time.perf_counter()
        a.shards = write_synthetic(a.synthetic_dir, a.synthetic)
        print(f"synthetic store {a.shards} ready in {time.perf_counter() - t0:.1f} s")
    if not a.shards:
        p.error("give SHARDS or --synthetic N")
    import cv2

    cv2.setNumThreads(1)
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass
    from model.augment import Augmenter
    from model.data import ShardStore, SliceDataset, split_by_patient

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    store = ShardStore(a.shards, mode=a.mode)
    train_idx, _ = split_by_patient(store, 0.2, seed=0)
    opened = time.perf_counter() - t0
    print(f"store {store.path}: {store.n_slices} slices, "
          f"{'in memory' if store.in_memory else 'streamed'}; opened in {opened:.2f} s "
          f"({len(train_idx)} training slices)")
    for name, aug in (("sampling, no augmentation", None), ("sampling + augmentation", Augmenter())):
        ds = SliceDataset(store, train_idx, a.batch_size, seed=0, augment=aug, pool_shards=a.pool_shards)
        print(f"{name:28s} {_rate(ds, a.seconds):9.0f} slices/s/core")
    resident = ds.pool.resident_shards() if ds.pool is not None else "-"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB (before opening the store: {rss0:.0f} MiB); "
          f"shards held by the pool: {resident}")
    for line in class_share_report(store, train_idx, SliceDataset(
            store, train_idx, a.batch_size, seed=1, pool_shards=a.pool_shards), a.share_draws):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
