"""A U-Net trained on PyTorch (channels-first inside) loads and predicts on TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.unet import build_unet

pytest.importorskip("tensorflow", reason="tensorflow-cpu is part of the dev extra on Linux x86-64")

ROOT = Path(__file__).resolve().parents[1]

_TF_PREDICT = r"""
import json, sys
import numpy as np
import keras
from model.saving import load_model_file
net = load_model_file(sys.argv[1], compile=True)
x = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(net.predict(x, verbose=0)))
print(json.dumps({"backend": keras.config.backend(), "conv": net.get_layer("enc0_conv1").data_format,
                  "compiled": net.optimizer is not None}))
"""


def test_tensorflow_without_onednn_runs_a_torch_trained_unet(tmp_path):
    """TF's plain CPU kernels refuse channels-first convolutions; load_model_file converts."""
    x = np.random.default_rng(5).normal(size=(2, 32, 32, 1)).astype(np.float32)
    net = build_unet((32, 32, 1), filters=(8, 16, 32), upsampling="transpose")
    net.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    assert net.get_layer("enc0_conv1").data_format == "channels_first"
    net.save(tmp_path / "net.keras")
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_ENABLE_ONEDNN_OPTS": "0",
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _TF_PREDICT, str(tmp_path / "net.keras"),
                          str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"backend": "tensorflow", "conv": "channels_last", "compiled": True}
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.asarray(net.predict(x, verbose=0)),
                               atol=1e-4)
