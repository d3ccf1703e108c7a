"""A user's own Keras network on a cmrprep store: through ``train(model=...)`` and through plain
``model.fit`` on ``SliceDataset(..., class_weights="store")`` (sample weights), same budget.

    python benchmarks/user_model.py --cases 24 --minutes 4

The network is not cmrprep's U-Net: a small two-level encoder-decoder with a logits head (what a
user might bring). Both runs train on the same patients; per-class Dice is measured on the same
held-out patients' slices (split by patient, seed 0). Prints one line per run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def users_net():
    """Two-level encoder-decoder with batch normalisation and a linear (logits) head.

    Logits, not softmax: Keras 3's ``SparseCategoricalCrossentropy(from_logits=False)`` fails on
    the torch backend for (B, H, W, C) outputs ("grad_input must be contiguous"); logits with
    ``from_logits=True`` is the numerically sound pairing anyway.
    """
    import keras

    def block(z, n):
        for _ in range(2):
            z = keras.layers.Conv2D(n, 3, padding="same", use_bias=False)(z)
            z = keras.layers.BatchNormalization()(z)
            z = keras.layers.Activation("relu")(z)
        return z

    inp = keras.Input((None, None, 1))
    a = block(inp, 16)
    b = block(keras.layers.MaxPooling2D()(a), 32)
    c = block(keras.layers.MaxPooling2D()(b), 64)
    b2 = block(keras.layers.Concatenate()([keras.layers.UpSampling2D()(c), b]), 32)
    a2 = block(keras.layers.Concatenate()([keras.layers.UpSampling2D()(b2), a]), 16)
    return keras.Model(inp, keras.layers.Conv2D(4, 1)(a2), name="users_net")


def dice_per_class(net, store, idx) -> dict[str, float]:
    x, y = store.get(idx)
    pred = np.argmax(np.asarray(net.predict(x[..., None], batch_size=32, verbose=0)), axis=-1)
    out = {}
    for c, name in ((1, "rv"), (2, "myo"), (3, "lv")):
        inter = float(((pred == c) & (y == c)).sum())
        denom = float((pred == c).sum() + (y == c).sum())
        out[name] = round(2 * inter / denom, 3) if denom else float("nan")
    return out


class _Deadline:
    def __init__(self, minutes):
        import keras

        class Stop(keras.callbacks.Callback):
            def on_train_batch_end(cb, batch, logs=None):
                if time.monotonic() > self.end:
                    cb.model.stop_training = True

        self.end = time.monotonic() + 60 * minutes
        self.callback = Stop()


def main(argv: list[str] | None = None) -> int:
    """Build a synthetic store, train the user's network both ways, print per-class Dice."""
    from pipelines.backend import use_cli_default_backend

    use_cli_default_backend()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--work", type=Path, default=Path("/tmp/cmrprep-user-model"))
    a = p.parse_args(argv)
    import keras

    from model.augment import Augmenter
    from model.data import ShardStore, SliceDataset, split_by_patient
    from model.train import train
    from pipelines.build import BuildConfig, build
    from pipelines.synthesize import synthesize

    raw, out = a.work / "raw", a.work / "shards"
    if not raw.exists():
        synthesize(raw, a.cases, 5, layout="acdc")
    build(BuildConfig(raw, out, workers=2, progress=False, report=False))
    store = ShardStore(out)
    train_idx, val_idx = split_by_patient(store, 0.2, seed=0)
    val_idx = val_idx[np.asarray(store.case_index)[val_idx] >= 0]

    t0 = time.monotonic()
    res = train(out, a.work / "run_train", epochs=10_000, max_minutes=a.minutes, model=users_net(),
                steps_per_epoch=50, verbose=0, collapse_patience=0)
    net = keras.saving.load_model(a.work / "run_train" / "best.keras", compile=False)
    print(f"train(model=users_net): {res.epochs_completed} epochs in {time.monotonic() - t0:.0f} s, "
          f"held-out Dice {dice_per_class(net, store, val_idx)}")

    keras.utils.set_random_seed(0)
    net = users_net()
    net.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ds = SliceDataset(store, train_idx, 16, augment=Augmenter(), steps_per_epoch=50, class_weights="store")
    stop = _Deadline(a.minutes)
    t0 = time.monotonic()
    hist = net.fit(ds, epochs=10_000, callbacks=[stop.callback], verbose=0)
    print(f"model.fit + sample weights: {len(hist.history['loss'])} epochs in {time.monotonic() - t0:.0f} s, "
          f"held-out Dice {dice_per_class(net, store, val_idx)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
