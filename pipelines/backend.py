"""The Keras backend of cmrprep's command-line entry points (never of the library)."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["CLI_DEFAULT_BACKEND", "use_cli_default_backend"]

log = logging.getLogger(__name__)

#: Backend the CLIs use when ``KERAS_BACKEND`` is unset (the CPU build of PyTorch is a
#: dependency of the ``train`` extra).
CLI_DEFAULT_BACKEND = "torch"


def use_cli_default_backend() -> str:
    """Make ``KERAS_BACKEND`` default to PyTorch for this CLI process; return the backend in use.

    Called first thing by the entry points that run Keras; the user's
    ``KERAS_BACKEND`` always wins.  ``~/.keras/keras.json`` is not consulted:
    Keras writes ``"tensorflow"`` there on its first import, so it does not
    tell a user's choice from Keras' default.  Library imports never call this.
    """
    if "keras" in sys.modules:  # already imported by the caller: its backend is fixed
        import keras

        return keras.config.backend()
    return os.environ.setdefault("KERAS_BACKEND", CLI_DEFAULT_BACKEND)
