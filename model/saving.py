"""Load a saved Keras model with a clear error instead of Keras' own traceback."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from cmrprep.plan import ConfigError

__all__ = ["load_model_file"]

log = logging.getLogger(__name__)


def load_model_file(path: str | Path, *, compile: bool = False):
    """Load a ``.keras`` (or legacy ``.h5``) model; every failure is a :class:`ConfigError`.

    cmrprep's custom losses are registered first, so checkpoints written by
    :func:`model.train.train` load too.  A missing, truncated or corrupt file
    (an interrupted training, a partial copy) is reported with its path, size
    and the underlying error, and the fix.

    With the TensorFlow backend, a U-Net trained on PyTorch (which computes
    channels-first inside, :func:`model.unet.build_unet`) is returned as the
    identical channels-last network (:func:`model.unet.channels_last`):
    TensorFlow runs channels-first convolutions on a CPU only through oneDNN
    (with ``TF_ENABLE_ONEDNN_OPTS=0`` they fail).  With
    ``compile=True`` it is compiled again with the saved loss and a fresh
    optimizer of the saved configuration (the optimizer's state, which only
    a resumed training would use, is not carried over).

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
        net = keras.saving.load_model(p, compile=compile)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a damaged archive
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise ConfigError(f"cannot load the Keras model {p} ({type(exc).__name__}: {msg}); the file is "
                          "corrupt or was saved by an incompatible Keras version. Copy it again or "
                          "re-run the training.") from exc
    return _native_layout(net, p, compile)


def _native_layout(net, path: Path, compile: bool):
    """``net``, channels-last inside where the backend is TensorFlow (see :func:`load_model_file`)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return net
    from model.unet import channels_last

    same = channels_last(net)
    if same is net:
        return net
    log.info("%s computes channels-first inside (trained on PyTorch); running it channels-last on "
             "TensorFlow (same weights)", path)
    if compile and getattr(net, "optimizer", None) is not None:
        optimizer = type(net.optimizer).from_config(net.optimizer.get_config())
        same.compile(optimizer=optimizer, loss=net.loss)
    return same
