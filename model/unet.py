"""Classic 2D U-Net (Ronneberger et al. 2015) in backend-agnostic Keras 3.

The output is a linear ``Conv2D(num_classes, 1)`` named ``"logits"``;
pair it with a loss built with ``from_logits=True`` (see
:func:`model.losses.make_loss`).  ``output="softmax"`` appends a softmax
layer named ``"softmax"`` for users who want probabilities; the loss must
then use ``from_logits=False`` (:func:`model.checks.check_wiring` refuses
the other pairing, which would be a double softmax).

Inputs and outputs are channels-last, ``(B, H, W, C)``, on every backend.
Inside, the network computes in the layout its backend's convolutions run
natively (``data_format``): channels-first on PyTorch, channels-last
elsewhere.  Keras' PyTorch backend otherwise copies every convolution's
input to channels-first and its output back (two copies per convolution,
and two more in the backward pass): the default U-Net's training step took
0.43 s instead of 0.31 s for 8 slices of 128 x 128 on 2 CPU cores.  The
weights are the same in either layout; :func:`channels_last` turns a
channels-first network into an identical channels-last one, which
:func:`model.saving.load_model_file` does on TensorFlow (whose CPU kernels
run channels-first convolutions only through oneDNN: TensorFlow 2.21 with
``TF_ENABLE_ONEDNN_OPTS=0`` fails on them, as may builds without oneDNN).

The softmax layer is :class:`ChannelSoftmax`, written with ``keras.ops``
primitives (``exp``/``sum``) instead of the fused softmax kernel: with the
torch backend, ``activation="softmax"`` crashed in the backward pass
("grad_input must be contiguous") on the channels-last conv output.

Examples
--------
>>> net = build_unet((32, 32, 1), filters=(8, 16, 32))
>>> net.output_shape
(None, 32, 32, 4)
"""

from __future__ import annotations

import logging
from typing import Sequence

import keras
from keras import layers, ops

from cmrprep.plan import ConfigError

__all__ = ["build_unet", "resolve_norm", "default_data_format", "channels_last", "ChannelSoftmax",
           "NORMS", "OUTPUTS", "UPSAMPLING", "DATA_FORMATS"]

log = logging.getLogger(__name__)

OUTPUTS = ("logits", "softmax")
NORMS = ("batch", "instance", "none")
UPSAMPLING = ("upsample", "transpose")
DATA_FORMATS = ("channels_first", "channels_last")

#: Names of the two layers that move between the channels-last interface and a
#: channels-first inside (:func:`build_unet`, :func:`channels_last`).
_TO_FIRST, _TO_LAST = "to_channels_first", "to_channels_last"


@keras.saving.register_keras_serializable(package="cmrprep")
class ChannelSoftmax(layers.Layer):
    """Numerically stable softmax over the last axis from elementary ops."""

    def call(self, inputs):
        shifted = inputs - ops.stop_gradient(ops.max(inputs, axis=-1, keepdims=True))
        e = ops.exp(shifted)
        return e / ops.sum(e, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return input_shape


def _channel_axis(data_format: str) -> int:
    return 1 if data_format == "channels_first" else -1


def _conv_block(x, n_filters: int, norm: str, name: str, data_format: str):
    """Two 3x3 convolutions, each followed by ``norm`` (see :func:`build_unet`) and ReLU."""
    axis = _channel_axis(data_format)
    for k in (1, 2):
        x = layers.Conv2D(n_filters, 3, padding="same", use_bias=norm == "none",
                          kernel_initializer="he_normal", data_format=data_format,
                          name=f"{name}_conv{k}")(x)
        if norm == "batch":
            # momentum 0.9 (PyTorch's default): running statistics settle within tens of
            # steps, which matters for minutes-long CPU runs validated every epoch.
            x = layers.BatchNormalization(axis=axis, momentum=0.9, name=f"{name}_bn{k}")(x)
        elif norm == "instance":
            # each channel of each slice over its own pixels, with a learned scale and shift
            # (groups=-1: one group per channel), the same in training and prediction
            x = layers.GroupNormalization(groups=-1, axis=axis, epsilon=1e-5,
                                          name=f"{name}_in{k}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{k}")(x)
    return x


def _upsample(x, n_filters: int, mode: str, name: str, data_format: str):
    """Double the spatial size: nearest-neighbour upsampling + 2x2 conv, or a transposed conv."""
    if mode == "transpose":
        return layers.Conv2DTranspose(n_filters, 2, strides=2, padding="same",
                                      kernel_initializer="he_normal", data_format=data_format,
                                      name=f"{name}_up")(x)
    x = layers.UpSampling2D(2, data_format=data_format, name=f"{name}_up")(x)
    return layers.Conv2D(n_filters, 2, padding="same", activation="relu",
                         kernel_initializer="he_normal", data_format=data_format,
                         name=f"{name}_upconv")(x)


def default_data_format() -> str:
    """The layout the active backend's convolutions run natively.

    ``"channels_first"`` on PyTorch, ``"channels_last"`` on TensorFlow and JAX.
    """
    return "channels_first" if keras.backend.backend() == "torch" else "channels_last"


def channels_last(net: keras.Model) -> keras.Model:
    """The same network computing channels-last inside; ``net`` itself if it already does.

    For a U-Net built channels-first (:func:`build_unet` on PyTorch) that must
    run where channels-first convolutions may not (TensorFlow on a CPU): every
    layer's ``data_format`` and channel axis are switched, the two layout
    layers become identities, and the weights are copied (their shapes do not
    depend on the layout).  Outputs are equal up to float rounding.

    Examples
    --------
    >>> net = build_unet((32, 32, 1), filters=(8, 16), data_format="channels_first")
    >>> same = channels_last(net)
    >>> [layer.name for layer in same.layers if "channels" in layer.name]
    ['to_channels_first', 'to_channels_last']
    >>> same.get_layer("enc0_conv1").data_format
    'channels_last'
    """
    if _TO_FIRST not in {layer.name for layer in net.layers}:
        return net  # channels-last already, or not a network of build_unet's: left as it is
    config = net.get_config()
    for layer in config["layers"]:
        cfg = layer["config"]
        layer.pop("build_config", None)  # channels-first shapes; each layer is built on its call
        if layer["class_name"] == "Permute" and cfg.get("name") in (_TO_FIRST, _TO_LAST):
            layer["class_name"], layer["module"], layer["registered_name"] = "Identity", "keras.layers", None
            layer["config"] = {k: cfg[k] for k in ("name", "trainable", "dtype") if k in cfg}
        elif cfg.get("data_format") == "channels_first":
            cfg["data_format"] = "channels_last"
        elif layer["class_name"] in ("GroupNormalization", "BatchNormalization", "Concatenate") \
                and cfg.get("axis") == 1:
            cfg["axis"] = -1
    same = keras.Model.from_config(config, custom_objects={"ChannelSoftmax": ChannelSoftmax})
    same.set_weights(net.get_weights())
    return same


def resolve_norm(norm: str, batch_norm: bool | None) -> str:
    """``norm``, or what the older ``batch_norm`` switch asks for when given.

    >>> resolve_norm("instance", None), resolve_norm("instance", False)
    ('instance', 'none')
    """
    if batch_norm is None:
        return norm
    return "batch" if batch_norm else "none"


def _resolve_filters(filters: Sequence[int], filter_scale: float, depth: int | None) -> list[int]:
    """Apply ``depth`` (number of resolution levels) and ``filter_scale``."""
    levels = list(filters)
    if depth is not None:
        if not 2 <= depth <= len(levels):
            raise ConfigError(f"depth must be in 2..{len(levels)} for filters {levels}, got {depth}")
        levels = levels[:depth]
    if len(levels) < 2:
        raise ConfigError(f"a U-Net needs at least 2 filter levels, got {levels}")
    if filter_scale <= 0:
        raise ConfigError(f"filter_scale must be > 0, got {filter_scale}")
    return [max(1, int(round(f * filter_scale))) for f in levels]


def _check_input(input_shape: Sequence[int], n_levels: int, num_classes: int, output: str,
                 upsampling: str) -> None:
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (H, W, channels), got {tuple(input_shape)}")
    step = 2 ** (n_levels - 1)
    for size in input_shape[:2]:
        if size is not None and size % step:
            raise ConfigError(f"input size {tuple(input_shape[:2])} must be divisible by {step} "
                              f"for {n_levels} levels; change the crop or pass depth=")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    if output not in OUTPUTS:
        raise ConfigError(f"output must be one of {OUTPUTS}, got {output!r}")
    if upsampling not in UPSAMPLING:
        raise ConfigError(f"upsampling must be one of {UPSAMPLING}, got {upsampling!r}")


def build_unet(input_shape: Sequence[int | None] = (128, 128, 1), num_classes: int = 4,
               filters: Sequence[int] = (16, 32, 64, 128, 256), batch_norm: bool | None = None,
               filter_scale: float = 1.0, depth: int | None = None, output: str = "logits",
               upsampling: str = "upsample", input_norm: bool = True,
               norm: str = "instance", data_format: str | None = None) -> keras.Model:
    """Build a U-Net with ``len(filters)`` resolution levels.

    Parameters
    ----------
    input_shape : tuple
        ``(H, W, channels)``; H and W divisible by ``2 ** (levels - 1)``.
    num_classes : int
        Output channels (4: background, RV, MYO, LV).
    filters : sequence of int
        Filters per level, the last one is the bottleneck (default: 4 pooling
        steps, the classic U-Net).
    batch_norm : bool, optional
        The older switch: ``True`` is ``norm="batch"``, ``False`` ``norm="none"``.
    filter_scale : float
        Multiplier applied to every entry of ``filters``.
    depth : int, optional
        Use only the first ``depth`` levels of ``filters``.
    output : {"logits", "softmax"}
        Linear logits (default) or probabilities.
    upsampling : {"upsample", "transpose"}
        ``UpSampling2D`` + 2x2 conv, or ``Conv2DTranspose``.
    input_norm : bool
        z-score each input slice over its own pixels first (a parameter-free
        ``GroupNormalization(groups=1)`` named ``"input_norm"``; default on).
        The store's slices are z-scored per volume, so a site whose volume
        statistics are dominated by something outside the heart (a bright
        chest wall beside a surface coil) hands the network a crop whose heart
        is several times darker than in training; normalising the crop itself
        removes that difference (issue #12).  The layer travels with the saved
        model, so prediction normalises exactly as training did.
    norm : {"instance", "batch", "none"}
        Normalisation after every convolution.  ``"instance"`` (default, as
        nnU-Net): each channel of each slice over its own pixels, with a learned
        scale and shift; the same computation in training and prediction, so a
        new site's slices are normalised by their own statistics.  ``"batch"``:
        the training batches' statistics, frozen for prediction; a site whose
        features are distributed otherwise gets them mis-scaled (on the
        synthetic site B, 20 minutes on 2 cores: foreground Dice 0.751 with
        batch and 0.809 with instance normalisation, 0.951 and 0.945 on the
        training site; ``benchmarks/site_shift.py``).  ``"none"``: the plain
        classic, which sits on a loss plateau for its first ~5 minutes on 2
        cores (validation Dice 0.69 after 6 minutes, against 0.90 with batch
        normalisation).
    data_format : {"channels_first", "channels_last"}, optional
        The layout inside the network (inputs and outputs are channels-last
        either way); default :func:`default_data_format`, the backend's native
        one (see the module docstring).  A channels-first network starts with a
        ``Permute`` layer named ``"to_channels_first"`` after the input
        normalisation and ends with ``"to_channels_last"`` after ``"logits"``.

    Returns
    -------
    keras.Model
        Maps ``(B, H, W, channels)`` float32 to ``(B, H, W, num_classes)``.
    """
    levels = _resolve_filters(filters, filter_scale, depth)
    norm = resolve_norm(norm, batch_norm)
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    _check_input(input_shape, len(levels), num_classes, output, upsampling)
    fmt = data_format or default_data_format()
    if fmt not in DATA_FORMATS:
        raise ConfigError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x, skips = inputs, []
    if input_norm:
        x = layers.GroupNormalization(groups=1, axis=-1, center=False, scale=False, epsilon=1e-5,
                                      name="input_norm")(x)
    if fmt == "channels_first":
        x = layers.Permute((3, 1, 2), name=_TO_FIRST)(x)
    for i, f in enumerate(levels[:-1]):
        x = _conv_block(x, f, norm, f"enc{i}", fmt)
        skips.append(x)
        x = layers.MaxPooling2D(2, data_format=fmt, name=f"enc{i}_pool")(x)
    x = _conv_block(x, levels[-1], norm, "bottleneck", fmt)
    for i in reversed(range(len(levels) - 1)):
        x = _upsample(x, levels[i], upsampling, f"dec{i}", fmt)
        x = layers.Concatenate(axis=_channel_axis(fmt), name=f"dec{i}_concat")([skips[i], x])
        x = _conv_block(x, levels[i], norm, f"dec{i}", fmt)
    x = layers.Conv2D(num_classes, 1, activation=None, data_format=fmt, name="logits")(x)
    if fmt == "channels_first":
        x = layers.Permute((2, 3, 1), name=_TO_LAST)(x)
    if output == "softmax":
        x = ChannelSoftmax(name="softmax")(x)
    net = keras.Model(inputs, x, name="unet")
    log.debug("built U-Net levels=%s params=%d output=%s data_format=%s", levels, net.count_params(),
              output, fmt)
    return net
