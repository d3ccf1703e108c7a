"""Classic 2D U-Net (Ronneberger et al. 2015) in backend-agnostic Keras 3.

The last layer is a linear ``Conv2D(num_classes, 1)`` named ``"logits"``;
pair it with a loss built with ``from_logits=True`` (see
:func:`model.losses.make_loss`).  ``output="softmax"`` appends a softmax
layer named ``"softmax"`` for users who want probabilities; the loss must
then use ``from_logits=False`` (:func:`model.checks.check_wiring` refuses
the other pairing, which would be a double softmax).

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

__all__ = ["build_unet", "resolve_norm", "ChannelSoftmax", "NORMS", "OUTPUTS", "UPSAMPLING"]

log = logging.getLogger(__name__)

OUTPUTS = ("logits", "softmax")
NORMS = ("batch", "instance", "none")
UPSAMPLING = ("upsample", "transpose")


@keras.saving.register_keras_serializable(package="cmrprep")
class ChannelSoftmax(layers.Layer):
    """Numerically stable softmax over the last axis from elementary ops."""

    def call(self, inputs):
        shifted = inputs - ops.stop_gradient(ops.max(inputs, axis=-1, keepdims=True))
        e = ops.exp(shifted)
        return e / ops.sum(e, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return input_shape


def _conv_block(x, n_filters: int, norm: str, name: str):
    """Two 3x3 convolutions, each followed by ``norm`` (see :func:`build_unet`) and ReLU."""
    for k in (1, 2):
        x = layers.Conv2D(n_filters, 3, padding="same", use_bias=norm == "none",
                          kernel_initializer="he_normal", name=f"{name}_conv{k}")(x)
        if norm == "batch":
            # momentum 0.9 (PyTorch's default): running statistics settle within tens of
            # steps, which matters for minutes-long CPU runs validated every epoch.
            x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{k}")(x)
        elif norm == "instance":
            # each channel of each slice over its own pixels, with a learned scale and shift
            # (groups=-1: one group per channel), the same in training and prediction
            x = layers.GroupNormalization(groups=-1, epsilon=1e-5, name=f"{name}_in{k}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{k}")(x)
    return x


def _upsample(x, n_filters: int, mode: str, name: str):
    """Double the spatial size: nearest-neighbour upsampling + 2x2 conv, or a transposed conv."""
    if mode == "transpose":
        return layers.Conv2DTranspose(n_filters, 2, strides=2, padding="same",
                                      kernel_initializer="he_normal", name=f"{name}_up")(x)
    x = layers.UpSampling2D(2, name=f"{name}_up")(x)
    return layers.Conv2D(n_filters, 2, padding="same", activation="relu",
                         kernel_initializer="he_normal", name=f"{name}_upconv")(x)


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
               norm: str = "instance") -> keras.Model:
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
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x, skips = inputs, []
    if input_norm:
        x = layers.GroupNormalization(groups=1, axis=-1, center=False, scale=False, epsilon=1e-5,
                                      name="input_norm")(x)
    for i, f in enumerate(levels[:-1]):
        x = _conv_block(x, f, norm, f"enc{i}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{i}_pool")(x)
    x = _conv_block(x, levels[-1], norm, "bottleneck")
    for i in reversed(range(len(levels) - 1)):
        x = _upsample(x, levels[i], upsampling, f"dec{i}")
        x = layers.Concatenate(axis=-1, name=f"dec{i}_concat")([skips[i], x])
        x = _conv_block(x, levels[i], norm, f"dec{i}")
    x = layers.Conv2D(num_classes, 1, activation=None, name="logits")(x)
    if output == "softmax":
        x = ChannelSoftmax(name="softmax")(x)
    net = keras.Model(inputs, x, name="unet")
    log.debug("built U-Net levels=%s params=%d output=%s", levels, net.count_params(), output)
    return net
