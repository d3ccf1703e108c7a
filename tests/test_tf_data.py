"""The store as a tf.data dataset, used as a TensorFlow user would (#13).

Runs in a fresh process with ``KERAS_BACKEND=tensorflow`` (the test session itself
runs Keras on PyTorch, and one process cannot hold two Keras backends).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storefixture import write_store

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("tensorflow", reason="tensorflow-cpu is part of the dev extra on Linux x86-64")

_SCRIPT = r"""
import json, sys
import numpy as np
import keras
from model.tf_data import tf_dataset, validation_tf_dataset, ShardStore, split_by_patient
from model.data import SliceDataset
from model.augment import Augmenter

store = ShardStore(sys.argv[1])
train_idx, val_idx = split_by_patient(store, 0.34, seed=0)
aug = Augmenter()
ds = tf_dataset(store, train_idx, batch_size=8, seed=5, augment=aug, class_weights="store",
                steps_per_epoch=3)
ref = SliceDataset(store, train_idx, 8, seed=5, augment=aug, class_weights="store", steps_per_epoch=3)
got = list(ds.take(6).as_numpy_iterator())       # two epochs
same = []
for k, (x, y, w) in enumerate(got):
    ref.set_epoch(k // 3)
    rx, ry, rw = ref[k % 3]
    same.append(bool(np.array_equal(x, rx) and np.array_equal(y, ry) and np.array_equal(w, rw)))
epochs_differ = not np.array_equal(got[0][1], got[3][1])

inp = keras.Input((32, 32, 1))
h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
out = keras.layers.Conv2D(4, 1, activation="softmax")(h)
net = keras.Model(inp, out)
net.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
hist = net.fit(tf_dataset(store, train_idx, 8, seed=1, class_weights="store"),
               steps_per_epoch=4, epochs=2, verbose=0,
               validation_data=validation_tf_dataset(store, val_idx, 8))
n_val = sum(int(x.shape[0]) for x, _ in validation_tf_dataset(store, val_idx, 8).as_numpy_iterator())
print(json.dumps({"backend": keras.config.backend(), "same": same, "epochs_differ": epochs_differ,
                  "shapes": [list(a.shape) for a in got[0]], "dtypes": [str(a.dtype) for a in got[0]],
                  "loss": hist.history["loss"], "val_loss": hist.history["val_loss"],
                  "n_val": n_val, "val_expected": int(len(val_idx))}))
"""


def test_tf_dataset_feeds_keras_fit_on_tensorflow(tmp_path):
    store = write_store(tmp_path / "shards", n_patients=6, slices_per_patient=8)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(store)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["backend"] == "tensorflow"  # the user's choice, kept
    assert res["same"] == [True] * 6  # exactly SliceDataset's batches, epoch by epoch
    assert res["epochs_differ"]
    assert res["shapes"] == [[8, 32, 32, 1], [8, 32, 32], [8, 32, 32]]
    assert res["dtypes"] == ["float32", "int32", "float32"]
    assert len(res["loss"]) == 2 and all(v == v and v > 0 for v in res["loss"])
    assert res["n_val"] == res["val_expected"]


def test_importing_tf_data_keeps_the_torch_backend(tmp_path):
    probe = ("import os, keras, model.tf_data, json; "
             "print(json.dumps([os.environ.get('KERAS_BACKEND'), keras.config.backend()]))")
    env = {**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["torch", "torch"]
