"""Importing cmrprep never changes the user's Keras backend (#13)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROBE = r"""
import importlib, importlib.util, json, os, pkgutil, sys
names = []
for pkg in ("cmrprep", "pipelines", "model"):
    mod = importlib.import_module(pkg)
    names.append(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if info.name.endswith("__main__"):
            continue
        if info.name == "model.tf_data" and importlib.util.find_spec("tensorflow") is None:
            continue  # optional: needs TensorFlow (tests/test_tf_data.py)
        importlib.import_module(info.name)
        names.append(info.name)
import keras
print(json.dumps({"env": os.environ.get("KERAS_BACKEND"), "backend": keras.config.backend(),
                  "modules": len(names)}))
"""


def _probe(tmp_path, env_backend=None, json_backend="torch", probe=_PROBE):
    home = tmp_path / "keras_home"
    home.mkdir(exist_ok=True)
    (home / "keras.json").write_text(json.dumps({"backend": json_backend, "floatx": "float32",
                                                 "epsilon": 1e-07, "image_data_format": "channels_last"}))
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(home)
    if env_backend:
        env["KERAS_BACKEND"] = env_backend
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_every_module_sets_no_backend(tmp_path):
    res = _probe(tmp_path)
    assert res["modules"] > 30
    assert res["env"] is None and res["backend"] == "torch"  # from keras.json, not from us


_TF_PROBE = r"""
import importlib, json, os, pkgutil
for pkg in ("cmrprep", "pipelines"):
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
import sys
assert "keras" not in sys.modules, "a library module imported keras at import time"
try:
    import model.unet, keras
    got = keras.config.backend()
except ImportError as exc:  # TensorFlow is not installed here: the user's choice still stood
    got = "tensorflow" if "tensorflow" in str(exc) else repr(exc)
print(json.dumps({"env": os.environ.get("KERAS_BACKEND"), "backend": got}))
"""


def test_a_tensorflow_users_keras_json_is_honoured(tmp_path):
    """keras.json says tensorflow: cmrprep must not switch it to torch (TF need not be installed)."""
    res = _probe(tmp_path, json_backend="tensorflow", probe=_TF_PROBE)
    assert res == {"env": None, "backend": "tensorflow"}


def test_importing_every_module_keeps_the_users_env_backend(tmp_path):
    res = _probe(tmp_path, "torch")
    assert res["env"] == "torch" and res["backend"] == "torch"


def test_cli_default_is_torch_unless_the_user_chose():
    code = ("import os, sys; from pipelines.backend import use_cli_default_backend as u; "
            "print(u())")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "torch"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "KERAS_BACKEND": "jax"},
                         capture_output=True, text=True)
    assert out.stdout.strip() == "jax"
