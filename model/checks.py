"""Refuse mis-wired training setups, and stop (with a diagnosis) a run that collapsed.

:func:`check_wiring` runs before the first step and raises
:class:`WiringError` (a :class:`cmrprep.plan.ConfigError`) for the wiring
bugs that make a U-Net "predict only background" (see
shared/notes/cmr-data-and-keras.md §5):

* one-hot labels (trailing axis == number of classes) fed to a sparse loss;
* a softmax output with ``from_logits=True`` (double softmax; loss floor
  0.744) or a linear output with ``from_logits=False`` (log of logits);
* labels outside ``0..C-1`` or not integers; model/loss class count mismatch;
* a store without sampling ``weights`` or ``class_weights``.

:class:`CollapseGuard` watches the validation metrics written by
:class:`model.metrics.ValidationDice`; when the foreground Dice stays below
``min_dice`` (or nothing but background is predicted) for ``patience``
epochs it stops training and writes a diagnosis to ``RUN_DIR/diagnosis.txt``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import keras

from cmrprep.plan import ConfigError

__all__ = ["WiringError", "check_wiring", "output_is_softmax", "diagnose", "CollapseGuard"]

log = logging.getLogger(__name__)

def double_softmax_floor(num_classes: int) -> float:
    """Lowest cross-entropy a double softmax can reach with ``num_classes`` classes.

    >>> round(double_softmax_floor(4), 3)
    0.744
    """
    return -math.log(math.e / (math.e + num_classes - 1.0))


class WiringError(ConfigError):
    """The model, loss, labels or store are wired so that training cannot work."""


def output_is_softmax(net: keras.Model) -> bool:
    """True when the model's last layer applies a softmax."""
    last = net.layers[-1]
    if isinstance(last, keras.layers.Softmax) or type(last).__name__ == "ChannelSoftmax":
        return True
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


def _check_pairing(net: keras.Model, loss: Any) -> int:
    """Output activation vs ``from_logits`` and class counts; returns the class count."""
    from model.doctor import loss_info

    num_classes = int(net.output_shape[-1])
    from_logits = loss_info(loss).from_logits  # a string loss takes probabilities (False)
    softmax = output_is_softmax(net)
    if softmax and from_logits:
        raise WiringError("the model ends in a softmax but the loss has from_logits=True: this is a "
                          "double softmax (loss cannot fall below 0.744); use output='logits' or "
                          "from_logits=False")
    if from_logits is False and not softmax:
        raise WiringError("the model outputs linear logits but the loss has from_logits=False; "
                          "use from_logits=True (recommended) or output='softmax'")
    loss_classes = getattr(loss, "num_classes", num_classes)
    if loss_classes != num_classes:
        raise WiringError(f"the model has {num_classes} output channels but the loss expects "
                          f"{loss_classes} classes")
    return num_classes


def _check_labels(labels: np.ndarray, num_classes: int, sparse: bool | None = True) -> None:
    labels = np.asarray(labels)
    if sparse is False:  # a categorical loss: one-hot labels (B, H, W, C) are the right encoding
        if labels.ndim != 4 or labels.shape[-1] != num_classes:
            raise WiringError(f"the loss takes one-hot labels of shape (B, H, W, {num_classes}), got "
                              f"{labels.shape}; one-hot them or use a sparse loss")
        return
    if labels.ndim == 4 and labels.shape[-1] == num_classes and num_classes > 1:
        raise WiringError(f"labels have shape {labels.shape}: one-hot labels fed to a sparse "
                          "loss; pass integer class indices of shape (B, H, W)")
    if labels.ndim == 4 and labels.shape[-1] != 1 or labels.ndim not in (3, 4):
        raise WiringError(f"labels must have shape (B, H, W) (or (B, H, W, 1)), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise WiringError(f"labels must be integers, got dtype {labels.dtype}; interpolated "
                          "masks? resample labels with nearest/one-hot and argmax")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise WiringError(f"labels span {lo}..{hi}, outside 0..{num_classes - 1}; check the label "
                          "encoding (0/255 masks? M&Ms 1..3 not remapped?)")


def _check_store(store_attrs: Mapping[str, Any], num_classes: int) -> None:
    arrays = store_attrs.get("arrays")
    if arrays is not None and "weights" not in arrays:
        raise WiringError("the store has no `weights` array (per-slice sampling weights); "
                          "rebuild it with `python -m pipelines.build`")
    weights = store_attrs.get("class_weights")
    if weights is None:
        raise WiringError("the store has no `class_weights` attribute; rebuild it with "
                          "`python -m pipelines.build`")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (num_classes,) or not np.all(np.isfinite(w)) or (w < 0).any():
        raise WiringError(f"store `class_weights` {weights} must be {num_classes} finite values >= 0")


def check_wiring(net: keras.Model, loss: Any, labels_sample: np.ndarray,
                 store_attrs: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`WiringError` if the training setup is mis-wired.

    Parameters
    ----------
    net : keras.Model
        The model to train (output ``(B, H, W, C)``).
    loss : keras.losses.Loss or str
        Any Keras loss (object or name; a name takes probabilities), e.g. from
        :func:`model.losses.make_loss`.
    labels_sample : ndarray
        Labels of a real training batch, exactly as fed to ``fit``.
    store_attrs : mapping, optional
        Store attributes, with ``arrays`` listing the store's arrays
        (:meth:`model.data.ShardStore.check_attrs`); ``None``: data not from a store.
    """
    from model.doctor import loss_info

    num_classes = _check_pairing(net, loss)
    _check_labels(labels_sample, num_classes, loss_info(loss).sparse)
    if store_attrs is not None:
        _check_store(store_attrs, num_classes)
    log.info("wiring checks passed (%d classes, %s output, from_logits=%s)", num_classes,
             "softmax" if output_is_softmax(net) else "linear", getattr(loss, "from_logits", None))


def diagnose(losses: list[float], val_ce: float | None, pred_fg: float | None,
             fg_pixel_share: float | None, lr: float | None,
             classes: tuple[str, ...] = ("background", "RV", "MYO", "LV")) -> str:
    """Explain a collapse (model predicts background) from the run's numbers."""
    lines = ["Training collapsed: the model predicts (almost) only background on validation."]
    ce = val_ce if val_ce is not None and math.isfinite(val_ce) else None
    c = len(classes)
    floor = double_softmax_floor(c)
    if ce is not None and abs(ce - math.log(c)) < 0.15:
        lines.append(f"- validation cross-entropy {ce:.3f} ~ ln {c} = {math.log(c):.3f}: not learning even the "
                     "class prior. Check the loss/activation pairing (logits + from_logits=True), "
                     f"the learning rate (now {lr}) and the optimizer (SGD without momentum at "
                     "1e-4 barely moves).")
    elif ce is not None and ce > floor:
        lines.append(f"- validation cross-entropy floor {ce:.3f} > {floor:.3f}: signature of a double "
                     "softmax (softmax output with from_logits=True).")
    if losses:
        lines.append(f"- training loss: first {losses[0]:.4f}, last {losses[-1]:.4f}.")
    if pred_fg is not None:
        lines.append(f"- predicted foreground pixel share on validation: {pred_fg:.4f}.")
    if fg_pixel_share is not None and math.isfinite(fg_pixel_share):
        hint = (" Too little foreground in batches: enable weighted sampling (use_sampling=True)"
                " and a Dice term (loss='dice_ce')." if fg_pixel_share < 0.05 else "")
        lines.append(f"- expected foreground pixel share in training batches: "
                     f"{fg_pixel_share:.3f}.{hint}")
    encoding = ", ".join(f"{i} {name}" for i, name in enumerate(classes))
    lines.append(f"- check the label encoding: integer labels {encoding} of shape "
                 "(B, H, W), aligned with the images (not swapped, not interpolated).")
    return "\n".join(lines)


class CollapseGuard(keras.callbacks.Callback):
    """Stop training when validation foreground Dice stays near zero.

    Parameters
    ----------
    patience : int
        Consecutive collapsed epochs before stopping.
    min_dice : float
        ``val_dice_mean`` below this counts as collapsed.
    run_dir : path, optional
        Where ``diagnosis.txt`` is written.
    fg_pixel_share : float, optional
        Expected foreground pixel share of training batches (for the diagnosis).
    classes : tuple of str
        Class names, background first (ln C and the label encoding in the diagnosis).
    """

    def __init__(self, patience: int = 5, min_dice: float = 0.02, run_dir: str | Path | None = None,
                 fg_pixel_share: float | None = None,
                 classes: tuple[str, ...] = ("background", "RV", "MYO", "LV")) -> None:
        super().__init__()
        self.classes = tuple(classes)
        self.patience, self.min_dice = int(patience), float(min_dice)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.fg_pixel_share = fg_pixel_share
        self.wait, self.losses = 0, []
        self.collapsed, self.diagnosis = False, None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.losses.append(float(logs["loss"]))
        if "val_dice_mean" not in logs or self.patience <= 0:
            return
        # collapsed: no foreground Dice, background everywhere, or a validation cross-entropy
        # still near ln C (ln 4 = 1.386: not even the class prior learned) with little Dice
        not_learning = (logs.get("val_ce", 0.0) > 0.9 * math.log(len(self.classes))
                        and logs["val_dice_mean"] < max(0.1, self.min_dice))
        collapsed = (logs["val_dice_mean"] < self.min_dice or logs.get("val_pred_fg", 1.0) == 0.0
                     or not_learning)
        self.wait = self.wait + 1 if collapsed else 0
        if self.wait >= self.patience:
            self._stop(logs)

    def _stop(self, logs: Mapping[str, Any]) -> None:
        lr = None
        if self.model is not None and getattr(self.model, "optimizer", None) is not None:
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.diagnosis = diagnose(self.losses, logs.get("val_ce"), logs.get("val_pred_fg"),
                                  self.fg_pixel_share, lr, self.classes)
        self.collapsed = True
        log.error("%s", self.diagnosis)
        if self.run_dir is not None:
            (self.run_dir / "diagnosis.txt").write_text(self.diagnosis + "\n")
        if self.model is not None:
            self.model.stop_training = True
