"""Segmentation losses on sparse integer labels, written with ``keras.ops`` only.

All losses take ``y_true`` of shape (B, H, W) (a trailing axis of size 1 is
accepted) holding class indices, and ``y_pred`` of shape (B, H, W, C): logits
when ``from_logits=True`` (the default, paired with the U-Net's linear
``"logits"`` layer) or probabilities when ``from_logits=False``.

* :class:`WeightedCrossEntropy` -- per-pixel weight = class weight of the
  pixel's true class; the loss is ``sum(w * nll) / sum(w)`` so its scale does
  not depend on the weights (a uniform prediction scores ``ln C``).
* :class:`SoftDice` -- 1 - mean soft Dice over the foreground classes
  (1..C-1), computed over the whole batch (nnU-Net's "batch Dice"),
  ``smooth = 1e-5`` in numerator and denominator.
* :class:`DiceCE` -- the sum of both (nnU-Net's default).

Each class is registered with ``keras.saving.register_keras_serializable``
so a saved ``.keras`` model reloads with its loss.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
from keras import ops

from cmrprep.plan import ConfigError

__all__ = ["WeightedCrossEntropy", "SoftDice", "DiceCE", "make_loss", "LOSSES"]

LOSSES = ("dice_ce", "ce", "dice")
_EPS = 1e-7


def _sparse_labels(y_true, num_classes: int):
    """Integer labels of shape (B, H, W) and their one-hot (B, H, W, C) float32."""
    if len(y_true.shape) == 4 and y_true.shape[-1] == 1:
        y_true = ops.squeeze(y_true, axis=-1)
    labels = ops.cast(y_true, "int32")
    return labels, ops.one_hot(labels, num_classes, dtype="float32")


def _log_probs(y_pred, from_logits: bool):
    y_pred = ops.cast(y_pred, "float32")
    if from_logits:
        return ops.log_softmax(y_pred, axis=-1)
    return ops.log(ops.clip(y_pred, _EPS, 1.0))


def _probs(y_pred, from_logits: bool):
    y_pred = ops.cast(y_pred, "float32")
    if from_logits:
        return ops.softmax(y_pred, axis=-1)
    return y_pred


def _check_weights(class_weights: Sequence[float] | None, num_classes: int) -> list[float] | None:
    if class_weights is None:
        return None
    weights = [float(w) for w in class_weights]
    if len(weights) != num_classes or min(weights) < 0 or not sum(weights) > 0:
        raise ConfigError(f"class_weights must be {num_classes} non-negative numbers with a "
                          f"positive sum, got {weights}")
    return weights


class _SparseLoss(keras.losses.Loss):
    """Common configuration of the sparse segmentation losses."""

    #: Takes integer class maps (B, H, W), not one-hot labels (read by model.doctor.loss_info).
    sparse = True

    def __init__(self, num_classes: int = 4, from_logits: bool = True, name: str | None = None,
                 reduction: str = "sum_over_batch_size", dtype: Any = None) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.num_classes = int(num_classes)
        self.from_logits = bool(from_logits)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(num_classes=self.num_classes, from_logits=self.from_logits)
        return config


@keras.saving.register_keras_serializable(package="cmrprep")
class WeightedCrossEntropy(_SparseLoss):
    """Cross-entropy with per-pixel weights gathered from ``class_weights``.

    Parameters
    ----------
    class_weights : sequence of float, optional
        One weight per class; ``None`` means unweighted.
    num_classes, from_logits, name
        See the module docstring.
    """

    def __init__(self, class_weights: Sequence[float] | None = None, num_classes: int = 4,
                 from_logits: bool = True, name: str = "weighted_ce", **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, from_logits=from_logits, name=name, **kwargs)
        self.class_weights = _check_weights(class_weights, self.num_classes)

    def call(self, y_true, y_pred):
        labels, onehot = _sparse_labels(y_true, self.num_classes)
        nll = -ops.sum(onehot * _log_probs(y_pred, self.from_logits), axis=-1)
        if self.class_weights is None:
            return ops.mean(nll)
        weights = ops.take(ops.convert_to_tensor(self.class_weights, "float32"), labels)
        return ops.sum(weights * nll) / ops.maximum(ops.sum(weights), _EPS)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["class_weights"] = self.class_weights
        return config


@keras.saving.register_keras_serializable(package="cmrprep")
class SoftDice(_SparseLoss):
    """1 - mean batch soft Dice over the foreground classes 1..C-1.

    Parameters
    ----------
    smooth : float
        Added to numerator and denominator (nnU-Net uses 1e-5).
    num_classes, from_logits, name
        See the module docstring.
    """

    def __init__(self, smooth: float = 1e-5, num_classes: int = 4, from_logits: bool = True,
                 name: str = "soft_dice", **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, from_logits=from_logits, name=name, **kwargs)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        _, onehot = _sparse_labels(y_true, self.num_classes)
        probs = _probs(y_pred, self.from_logits)[..., 1:]
        onehot = onehot[..., 1:]
        axes = tuple(range(len(probs.shape) - 1))
        intersection = ops.sum(probs * onehot, axis=axes)
        denominator = ops.sum(probs, axis=axes) + ops.sum(onehot, axis=axes)
        dice = (2.0 * intersection + self.smooth) / (denominator + self.smooth)
        return 1.0 - ops.mean(dice)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["smooth"] = self.smooth
        return config


@keras.saving.register_keras_serializable(package="cmrprep")
class DiceCE(_SparseLoss):
    """``ce_weight * WeightedCrossEntropy + dice_weight * SoftDice`` (nnU-Net default)."""

    def __init__(self, class_weights: Sequence[float] | None = None, ce_weight: float = 1.0,
                 dice_weight: float = 1.0, smooth: float = 1e-5, num_classes: int = 4,
                 from_logits: bool = True, name: str = "dice_ce", **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, from_logits=from_logits, name=name, **kwargs)
        self.ce_weight, self.dice_weight = float(ce_weight), float(dice_weight)
        self.ce = WeightedCrossEntropy(class_weights, num_classes, from_logits)
        self.dice = SoftDice(smooth, num_classes, from_logits)
        self.class_weights, self.smooth = self.ce.class_weights, self.dice.smooth

    def call(self, y_true, y_pred):
        return (self.ce_weight * self.ce.call(y_true, y_pred)
                + self.dice_weight * self.dice.call(y_true, y_pred))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(class_weights=self.class_weights, ce_weight=self.ce_weight,
                      dice_weight=self.dice_weight, smooth=self.smooth)
        return config


def make_loss(name: str = "dice_ce", class_weights: Sequence[float] | None = None,
              from_logits: bool = True, num_classes: int = 4) -> keras.losses.Loss:
    """Build a loss by name.

    Parameters
    ----------
    name : {"dice_ce", "ce", "dice"}
        Loss kind.
    class_weights : sequence of float, optional
        Per-class weights of the cross-entropy term (ignored by ``"dice"``).
    from_logits : bool
        ``True`` for the linear ``"logits"`` output, ``False`` for softmax output.
    num_classes : int
        Number of classes including background.

    Examples
    --------
    >>> make_loss("ce", [0.1, 1, 1, 1]).class_weights
    [0.1, 1.0, 1.0, 1.0]
    """
    if name == "dice_ce":
        return DiceCE(class_weights, num_classes=num_classes, from_logits=from_logits)
    if name == "ce":
        return WeightedCrossEntropy(class_weights, num_classes=num_classes, from_logits=from_logits)
    if name == "dice":
        return SoftDice(num_classes=num_classes, from_logits=from_logits)
    raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
