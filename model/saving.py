"""Load a saved Keras model with a clear error instead of Keras' own traceback."""

from __future__ import annotations

import zipfile
from pathlib import Path

from cmrprep.plan import ConfigError

__all__ = ["load_model_file"]


def load_model_file(path: str | Path, *, compile: bool = False):
    """Load a ``.keras`` (or legacy ``.h5``) model; every failure is a :class:`ConfigError`.

    cmrprep's custom losses are registered first, so checkpoints written by
    :func:`model.train.train` load too.  A missing, truncated or corrupt file
    (an interrupted training, a partial copy) is reported with its path, size
    and the underlying error, and the fix.

    Raises
    ------
    ConfigError
        The file does not exist, is not a Keras archive, or Keras cannot rebuild it.
    """
    import keras

    import model.losses  # noqa: F401 - registers custom objects

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no Keras model at {p}; check the path (train with `python -m pipelines.train`).")
    if p.suffix == ".keras" and not zipfile.is_zipfile(p):
        raise ConfigError(f"{p} ({p.stat().st_size} bytes) is not a Keras archive (a .keras file is a zip): "
                          "it is truncated or corrupt, e.g. from an interrupted training or copy. "
                          "Copy it again or re-run the training.")
    try:
        return keras.saving.load_model(p, compile=compile)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a damaged archive
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise ConfigError(f"cannot load the Keras model {p} ({type(exc).__name__}: {msg}); the file is "
                          "corrupt or was saved by an incompatible Keras version. Copy it again or "
                          "re-run the training.") from exc
