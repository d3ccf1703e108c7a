"""Loader throughput: slices/s delivered to the trainer, with sampling, with and without augmentation.

    python benchmarks/loader_throughput.py SHARDS [--batches 60] [--batch-size 16]

Runs on one core (OpenCV and BLAS limited to one thread) so the numbers are per core.
Target: >= 400 slices/s/core with augmentation, far above the ~15 slices/s a 2-core CPU
trains the default U-Net at, so the trainer never waits on data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _rate(ds, batches: int) -> float:
    ds[0]  # warm-up (first shard read, augmenter construction)
    t0 = time.perf_counter()
    n = 0
    for i in range(batches):
        x, _ = ds[i % len(ds)][:2]
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    """Print slices/s for each loader configuration."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards")
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)
    import cv2

    cv2.setNumThreads(1)
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass
    from model.augment import Augmenter
    from model.data import ShardStore, SliceDataset, split_by_patient

    t0 = time.perf_counter()
    store = ShardStore(a.shards)
    train_idx, _ = split_by_patient(store, 0.2, seed=0)
    print(f"store opened in {time.perf_counter() - t0:.2f} s ({len(train_idx)} training slices)")
    for name, aug in (("sampling, no augmentation", None), ("sampling + augmentation", Augmenter())):
        ds = SliceDataset(store, train_idx, a.batch_size, seed=0, augment=aug)
        print(f"{name:28s} {_rate(ds, a.batches):9.0f} slices/s/core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
