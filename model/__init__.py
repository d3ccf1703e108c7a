"""Bundled Keras 3 U-Net trainer.

Importing ``model`` (or any cmrprep module) never chooses a Keras backend:
``KERAS_BACKEND`` and ``~/.keras/keras.json`` stay as the user set them, and
the model code uses only ``keras.ops`` so it runs on any backend.  The
command-line entry points (``python -m pipelines.train|predict|demo``,
``cmrprep ...``) default to PyTorch when ``KERAS_BACKEND`` is unset
(:func:`pipelines.backend.use_cli_default_backend`): fastest on CPU in our
measurements, 1.1 s/step vs 1.75 (JAX) and 2.3 (TensorFlow) for the default
U-Net at 128x128, batch 16, 2 cores.  In Python, set it yourself before the
first ``import keras``::

    import os
    os.environ.setdefault("KERAS_BACKEND", "torch")
"""
