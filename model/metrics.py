"""Validation metrics: per-class Dice from pooled confusion counts.

The validation Dice of a class is computed from counts summed over the whole
validation set (not averaged per slice), so empty slices do not produce
0/0.  A class absent from both prediction and ground truth in the whole set
is NaN and is left out of the mean (as :func:`cmrprep.metrics.dice`).

:class:`ValidationDice` is the Keras callback that evaluates the model on
the validation slices after every epoch and writes ``val_dice_<class>`` per
foreground class (``val_dice_rv``, ``val_dice_myo``, ``val_dice_lv`` for the
default classes; :func:`class_keys`), ``val_dice_mean`` (foreground mean),
``val_pred_fg`` (predicted foreground pixel share) and ``val_ce``
(unweighted cross-entropy, for the collapse diagnosis) into the epoch logs,
where later callbacks (checkpointing, CSV logging, collapse guard) read them.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

import numpy as np

import keras

__all__ = ["confusion_counts", "dice_from_confusion", "mean_dice", "DiceAccumulator",
           "ValidationDice", "CLASS_KEYS", "class_keys"]

log = logging.getLogger(__name__)

#: Log-key suffixes of the foreground classes 1..3 (ACDC convention).
CLASS_KEYS = ("rv", "myo", "lv")


def class_keys(classes: Sequence[str] | int) -> tuple[str, ...]:
    """Log-key suffixes of the foreground classes: lower case, non-alphanumerics as ``_``.

    An integer ``C`` means the default names for 4 classes, else ``c1 .. c<C-1>``.

    >>> class_keys(("background", "RV", "MYO", "LV"))
    ('rv', 'myo', 'lv')
    >>> class_keys(("background", "LV", "scar tissue"))
    ('lv', 'scar_tissue')
    >>> class_keys(3)
    ('c1', 'c2')
    """
    import re

    if isinstance(classes, int):
        return CLASS_KEYS if classes == 4 else tuple(f"c{i}" for i in range(1, classes))
    return tuple(re.sub(r"[^0-9a-z]+", "_", str(c).lower()).strip("_") or f"c{i}"
                 for i, c in enumerate(classes) if i > 0)


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = 4) -> np.ndarray:
    """Confusion matrix ``cm[true, pred]`` of two integer label arrays.

    Examples
    --------
    >>> confusion_counts(np.array([0, 1, 1]), np.array([0, 1, 0]), 2).tolist()
    [[1, 0], [1, 1]]
    """
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in size: {t.size} vs {p.size}")
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat[: num_classes * num_classes].reshape(num_classes, num_classes)


def dice_from_confusion(cm: np.ndarray, classes: Sequence[int] = (1, 2, 3)) -> np.ndarray:
    """Dice per class ``2 TP / (2 TP + FP + FN)``; NaN where the class is absent in both.

    Examples
    --------
    >>> cm = np.array([[5, 1], [0, 2]])
    >>> dice_from_confusion(cm, classes=(1,)).round(3).tolist()
    [0.8]
    """
    cm = np.asarray(cm, dtype=np.float64)
    out = np.full(len(classes), np.nan)
    for k, c in enumerate(classes):
        tp = cm[c, c]
        denom = cm[c, :].sum() + cm[:, c].sum()
        if denom > 0:
            out[k] = 2.0 * tp / denom
    return out


def mean_dice(per_class: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN when all are NaN."""
    values = np.asarray(per_class, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


class DiceAccumulator:
    """Accumulate confusion counts and cross-entropy over batches."""

    def __init__(self, num_classes: int = 4, classes: Sequence[str] | None = None) -> None:
        self.num_classes = len(classes) if classes is not None else num_classes
        self.keys = class_keys(tuple(classes) if classes is not None else num_classes)
        self.cm = np.zeros((num_classes, num_classes), dtype=np.int64)
        self._nll_sum = 0.0
        self._pixels = 0

    def update(self, y_true: np.ndarray, scores: np.ndarray, from_logits: bool = True) -> None:
        """Add a batch: integer labels (B, H, W) and model output (B, H, W, C)."""
        scores = np.asarray(scores, dtype=np.float64)
        pred = scores.argmax(axis=-1)
        self.cm += confusion_counts(y_true, pred, self.num_classes)
        log_p = _log_softmax(scores) if from_logits else np.log(np.clip(scores, 1e-7, 1.0))
        labels = np.asarray(y_true, dtype=np.int64)[..., None]
        self._nll_sum += float(-np.take_along_axis(log_p, labels, axis=-1).sum())
        self._pixels += labels.size

    def result(self) -> dict[str, float]:
        """``dice_<class>``, ``dice_mean``, ``pred_fg`` and ``ce``."""
        per_class = dice_from_confusion(self.cm, range(1, self.num_classes))
        out = {f"dice_{k}": float(v) for k, v in zip(self.keys, per_class)}
        out["dice_mean"] = mean_dice(per_class)
        total = max(int(self.cm.sum()), 1)
        out["pred_fg"] = float(self.cm[:, 1:].sum() / total)
        out["ce"] = self._nll_sum / max(self._pixels, 1)
        return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def evaluate_dice(net: keras.Model, batches: Iterable, from_logits: bool = True,
                  num_classes: int = 4, classes: Sequence[str] | None = None) -> dict[str, float]:
    """Run ``net`` over ``(x, y)`` batches and return :meth:`DiceAccumulator.result`."""
    acc = DiceAccumulator(num_classes, classes)
    for x, y in batches:
        acc.update(y, net.predict_on_batch(x), from_logits)
    return acc.result()


class ValidationDice(keras.callbacks.Callback):
    """Per-class foreground Dice on the validation set after every epoch.

    Parameters
    ----------
    val_data : keras.utils.PyDataset
        Yields ``(x, y)`` batches in a fixed order, without augmentation.
    from_logits : bool
        Whether the model outputs logits (else probabilities).
    num_classes : int
        Number of classes including background.
    classes : sequence of str, optional
        Class names (background first); name the log keys (:func:`class_keys`).
    """

    def __init__(self, val_data, from_logits: bool = True, num_classes: int = 4,
                 classes: Sequence[str] | None = None) -> None:
        super().__init__()
        self.val_data = val_data
        self.from_logits = from_logits
        self.classes = tuple(classes) if classes is not None else None
        self.num_classes = len(self.classes) if self.classes else num_classes

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None or len(self.val_data) == 0:
            return
        batches = (self.val_data[i] for i in range(len(self.val_data)))
        result = evaluate_dice(self.model, batches, self.from_logits, self.num_classes, self.classes)
        # NaN would break "best model" comparisons; an all-empty set scores 0.
        result["dice_mean"] = 0.0 if math.isnan(result["dice_mean"]) else result["dice_mean"]
        logs.update({f"val_{k}": v for k, v in result.items()})
        names = self.classes[1:] if self.classes else class_keys(self.num_classes)
        keys = class_keys(self.classes if self.classes else self.num_classes)
        per_class = " ".join(f"{n} {result[f'dice_{k}']:.3f}" for n, k in zip(names, keys))
        log.info("epoch %d validation Dice %s mean %.3f (pred fg %.3f)",
                 epoch + 1, per_class, result["dice_mean"], result["pred_fg"])
