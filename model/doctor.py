"""Inspect a user's own Keras set-up (model, loss, optimizer, data) for the ways it cannot learn.

Every check returns :class:`Finding` records with a stable ``code``, a
``severity`` (``"error"``: it cannot learn as wired; ``"warning"``: it will
likely train poorly), a message naming the value and the fix.  Nothing here
trains unless :func:`probe_fit` is called.  The checks are pure functions of
the model, the loss description and a label/image sample, so they work for a
``.npz`` of ``x``/``y`` as much as for a cmrprep store.

Examples
--------
>>> import numpy as np
>>> y = np.eye(4, dtype=np.float32)[np.zeros((2, 8, 8), int)]  # one-hot, all background
>>> [f.code for f in check_label_encoding(y, LossInfo("sparse_categorical_crossentropy", False, True), 4)]
['onehot_with_sparse_loss']
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Finding", "LossInfo", "loss_info", "output_activation", "check_pairing", "check_backend",
           "check_label_encoding", "check_class_balance", "check_optimizer", "check_inputs",
           "labels_as_classes", "probe_fit", "diagnose"]


@dataclass(frozen=True)
class Finding:
    """One problem found: ``code`` (stable), ``severity``, ``message`` (names the value), ``fix``."""

    code: str
    severity: str
    message: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class LossInfo:
    """What matters about a loss: its kind, ``from_logits``, and whether it takes integer labels."""

    name: str
    from_logits: bool | None
    sparse: bool | None


_SPARSE = ("sparse_categorical_crossentropy", "sparsecategoricalcrossentropy", "sparse_categorical_focal")
_DENSE = ("categorical_crossentropy", "categoricalcrossentropy", "categorical_focal_crossentropy",
          "categoricalfocalcrossentropy", "binary_crossentropy", "binarycrossentropy", "dice")


def loss_info(loss: Any) -> LossInfo:
    """Describe a Keras loss given as a string, a ``keras.losses.Loss`` or a function.

    >>> loss_info("sparse_categorical_crossentropy")
    LossInfo(name='sparse_categorical_crossentropy', from_logits=False, sparse=True)
    """
    if loss is None:
        return LossInfo("none", None, None)
    if isinstance(loss, str):
        name = loss
        from_logits: bool | None = False  # Keras' string losses take probabilities
    else:
        cfg = {}
        try:
            cfg = loss.get_config() if hasattr(loss, "get_config") else {}
        except Exception:  # noqa: BLE001 - a custom loss without a config
            cfg = {}
        name = cfg.get("name") or getattr(loss, "name", None) or getattr(loss, "__name__", type(loss).__name__)
        from_logits = getattr(loss, "from_logits", cfg.get("from_logits"))
        if hasattr(loss, "fn") and name in ("", None):
            name = getattr(loss.fn, "__name__", "loss")
    key = str(name).lower()
    sparse = getattr(loss, "sparse", None) if not isinstance(loss, str) else None  # cmrprep's losses say
    if sparse is None:
        sparse = True if any(k in key for k in _SPARSE) else (False if any(k in key for k in _DENSE) else None)
    return LossInfo(str(name), None if from_logits is None else bool(from_logits), sparse)


def output_activation(net: Any) -> str:
    """``"softmax"``, ``"sigmoid"`` or ``"linear"`` (anything else) of the model's last layer."""
    last = net.layers[-1]
    if type(last).__name__ in ("Softmax", "ChannelSoftmax"):
        return "softmax"
    name = getattr(getattr(last, "activation", None), "__name__", "linear")
    return name if name in ("softmax", "sigmoid") else "linear"


def check_pairing(activation: str, loss: LossInfo) -> list[Finding]:
    """Output activation vs the loss' ``from_logits``."""
    if loss.from_logits is None:
        return []
    if activation in ("softmax", "sigmoid") and loss.from_logits:
        return [Finding("softmax_with_from_logits", "error",
                        f"the model ends in a {activation} but the loss {loss.name!r} has from_logits=True: "
                        "the loss applies a second softmax and cannot reach its minimum (gradients "
                        "vanish; masks come out empty).",
                        "remove the output activation (linear logits) and keep from_logits=True, or "
                        "use from_logits=False; cmrprep's U-Net: output='logits' (the default).")]
    if activation == "linear" and not loss.from_logits:
        return [Finding("logits_without_from_logits", "error",
                        f"the model outputs linear logits but the loss {loss.name!r} expects "
                        "probabilities (from_logits=False; a string loss name always does).",
                        "use keras.losses.SparseCategoricalCrossentropy(from_logits=True) (or "
                        "CategoricalCrossentropy(from_logits=True) for one-hot labels), or end the "
                        "model in a softmax.")]
    return []


def check_backend(activation: str, loss: LossInfo, output_rank: int, backend: str) -> list[Finding]:
    """Pairings a Keras backend cannot train (measured, Keras 3.15 on PyTorch 2.13)."""
    if backend == "torch" and loss.sparse and loss.from_logits is False and output_rank == 4:
        return [Finding("torch_sparse_probabilities", "error",
                        f"on the torch backend, Keras' sparse cross-entropy on probabilities "
                        f"({loss.name!r}, from_logits=False, {activation} output) fails in the backward "
                        "pass for (B, H, W, C) outputs (RuntimeError: grad_input must be contiguous).",
                        "end the model in linear logits and use "
                        "keras.losses.SparseCategoricalCrossentropy(from_logits=True) (numerically "
                        "better anyway), or one-hot labels with CategoricalCrossentropy.")]
    return []


def labels_as_classes(y: np.ndarray, num_classes: int) -> tuple[np.ndarray | None, str]:
    """Integer class map of ``y`` and its encoding: ``"onehot"``, ``"integer"``, ``"rgb"`` or ``"other"``."""
    y = np.asarray(y)
    if y.ndim >= 3 and y.shape[-1] == num_classes and num_classes > 1:
        vals = np.unique(y[: min(len(y), 8)])
        if np.isin(vals, (0, 1)).all():
            return np.argmax(y, axis=-1), "onehot"
    if y.ndim >= 3 and y.shape[-1] == 3 and num_classes != 3:
        return None, "rgb"
    if y.ndim >= 3 and y.shape[-1] == 1:
        y = y[..., 0]
    return y, "integer"


def check_label_encoding(y: np.ndarray, loss: LossInfo, num_classes: int) -> list[Finding]:
    """Encoding (one-hot vs integer) vs the loss, values vs the head's classes, RGB and float masks."""
    classes, enc = labels_as_classes(y, num_classes)
    out: list[Finding] = []
    if enc == "rgb":
        return [Finding("rgb_masks", "error",
                        f"labels have shape {tuple(np.shape(y))}: 3 channels while the model has "
                        f"{num_classes} classes (RGB-coloured masks?).",
                        "convert each colour to its class index (e.g. a lookup from colour to 0..C-1) "
                        "and store masks as uint8 class maps.")]
    if enc == "onehot" and loss.sparse:
        out.append(Finding("onehot_with_sparse_loss", "error",
                           f"labels are one-hot, shape {tuple(np.shape(y))}, but the loss {loss.name!r} "
                           "is sparse (takes integer class indices): Keras reads each one-hot channel as "
                           "a label and the loss is meaningless.",
                           "drop to_categorical and feed integer masks of shape (B, H, W), or use "
                           "keras.losses.CategoricalCrossentropy with the one-hot labels."))
    if enc == "integer" and loss.sparse is False and "binary" not in loss.name.lower():
        out.append(Finding("integer_with_categorical_loss", "error",
                           f"labels are integer class maps, shape {tuple(np.shape(y))}, but the loss "
                           f"{loss.name!r} expects one-hot labels.",
                           "use keras.losses.SparseCategoricalCrossentropy, or one-hot the labels "
                           "(keras.utils.to_categorical(y, C))."))
    arr = np.asarray(classes)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            out.append(Finding("nonfinite_labels", "error", "labels hold NaN or Inf values.",
                               "fix the masks (NaN usually comes from resampling or division)."))
            return out
        frac = arr[arr != np.round(arr)]
        if frac.size:
            out.append(Finding("float_masks", "error",
                               f"labels hold non-integral values (e.g. {float(frac.flat[0]):g}): masks "
                               "resampled with linear interpolation or normalised like images?",
                               "resample masks with nearest neighbour (or cmrprep's one-hot + argmax) "
                               "and store them as uint8 class indices."))
            return out
    vals = np.unique(arr.astype(np.int64)) if arr.size else np.zeros(0, np.int64)
    beyond = vals[(vals < 0) | (vals >= num_classes)]
    if beyond.size:
        scaled = set(vals.tolist()) <= {0, 255} or (vals.max() == 255 and len(vals) <= num_classes)
        hint = (" (0/255-style masks: divide by 255, or map 0/85/170/255 -> 0..3)" if scaled else "")
        out.append(Finding("label_values_beyond_classes", "error",
                           f"label values {vals.tolist()[:10]} include {beyond.tolist()[:10]}, outside "
                           f"the head's classes 0..{num_classes - 1}{hint}.",
                           "map the values to 0..C-1 (cmrprep build: --label-map "
                           "'0=background,85=RV,170=MYO,255=LV'), or widen the output layer."))
    return out


def check_class_balance(classes: np.ndarray, num_classes: int) -> tuple[list[Finding], dict[str, Any]]:
    """Class shares, empty-slice share and the prior entropy against ln C."""
    arr = np.asarray(classes).astype(np.int64)
    arr = arr[(arr >= 0) & (arr < num_classes)] if arr.ndim == 1 else arr
    counts = np.bincount(np.clip(arr, 0, num_classes - 1).ravel(), minlength=num_classes)[:num_classes]
    shares = counts / max(int(counts.sum()), 1)
    nz = shares[shares > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    empty = float(np.mean([not (s > 0).any() for s in arr.reshape(len(arr), -1)])) if arr.ndim >= 2 else 0.0
    stats = {"class_shares": [round(float(s), 5) for s in shares], "empty_slice_share": round(empty, 4),
             "prior_entropy": round(entropy, 4), "ln_c": round(math.log(num_classes), 4)}
    out: list[Finding] = []
    fg = 1.0 - float(shares[0])
    if fg < 0.05 or (shares[1:] < 0.01).any():
        out.append(Finding("class_imbalance", "warning",
                           f"foreground is {100 * fg:.1f} % of pixels (class shares "
                           f"{[round(100 * float(s), 2) for s in shares]} %); the prior entropy is "
                           f"{entropy:.3f} against ln C = {math.log(num_classes):.3f}. A model that predicts "
                           "background everywhere already scores a low loss, so training can stall there.",
                           "crop around the heart and oversample foreground (python -m pipelines.build), "
                           "use class weights (SliceDataset(..., class_weights='store') gives sample "
                           "weights) and a Dice + cross-entropy loss (model.losses.make_loss('dice_ce'))."))
    if empty > 0.5:
        out.append(Finding("empty_slices", "warning",
                           f"{100 * empty:.0f} % of slices hold no foreground at all.",
                           "sample slices by weight so that at least a third hold foreground "
                           "(cmrprep's store does: --foreground-share)."))
    return out, stats


#: Layers after which small SGD steps still train (batch, instance / group, layer normalisation).
_NORM_LAYERS = ("BatchNormalization", "GroupNormalization", "LayerNormalization")


def check_optimizer(optimizer: Any, normalised: bool) -> list[Finding]:
    """Plain or low-rate SGD on a segmentation network (``normalised``: it has batch or instance norm)."""
    if optimizer is None:
        return []
    name = type(optimizer).__name__.lower()
    try:
        lr = float(np.asarray(optimizer.learning_rate))
    except Exception:  # noqa: BLE001 - a schedule: no single value
        return []
    if name == "sgd" and lr < 1e-2:
        momentum = float(getattr(optimizer, "momentum", 0.0) or 0.0)
        return [Finding("slow_optimizer", "warning",
                        f"SGD at learning rate {lr:g} (momentum {momentum:g})"
                        f"{'' if normalised else ' on a network without batch normalisation'}: steps this "
                        "small rarely leave the background-only prior within a practical budget.",
                        "use Adam at 1e-3 (cmrprep's default for a network of your own: python -m pipelines.train --optimizer adam "
                        "--lr 1e-3), or SGD with lr >= 1e-2 and batch normalisation.")]
    return []


def check_inputs(x: np.ndarray) -> list[Finding]:
    """Input scaling: raw scanner intensities or 0..255 images."""
    x = np.asarray(x, dtype=np.float64)
    if not x.size:
        return []
    if not np.isfinite(x).all():
        return [Finding("nonfinite_inputs", "error", "images hold NaN or Inf values.",
                        "fix or mask the corrupt voxels before training.")]
    mean, std, hi = float(x.mean()), float(x.std()), float(np.abs(x).max())
    if abs(mean) > 5 or std > 10 or hi > 50:
        return [Finding("unnormalised_inputs", "warning",
                        f"images are not normalised (mean {mean:.3g}, std {std:.3g}, max |x| {hi:.3g}); "
                        "a network initialised for unit-scale inputs learns slowly or diverges, and a "
                        "new scanner's intensity scale shifts every prediction.",
                        "z-score each volume after clipping to its 0.5-99.5 percentiles (what "
                        "python -m pipelines.build does).")]
    return []


def probe_fit(net: Any, x: np.ndarray, y: np.ndarray, steps: int, prior_entropy: float,
              num_classes: int, batch_size: int = 8, seed: int = 0) -> tuple[list[Finding], dict[str, Any]]:
    """Fit ``steps`` batches as wired and say whether the loss leaves ln C and the prior entropy."""
    import keras

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(x), size=min(batch_size, len(x)))
        out = net.train_on_batch(x[idx], y[idx])
        losses.append(float(np.asarray(out if np.ndim(out) == 0 else np.ravel(out)[0])))
    ln_c = math.log(num_classes)
    stats = {"probe_losses": [round(v, 4) for v in losses]}
    if not np.isfinite(losses).all():
        return [Finding("probe_diverged", "error", f"the loss became {losses[-1]} within {steps} steps.",
                        "lower the learning rate, normalise the inputs, check the labels.")], stats
    tail = float(np.mean(losses[-max(1, steps // 4):]))
    if tail >= prior_entropy - 0.01:
        return [Finding("probe_stuck", "warning",
                        f"after {steps} steps the loss is {tail:.3f}, not below the prior entropy "
                        f"{prior_entropy:.3f} (ln C = {ln_c:.3f}): the model has learned at most the class "
                        "frequencies, i.e. empty masks.",
                        "fix the errors above first; then Adam 1e-3, Dice + CE with class weights, and "
                        "foreground-oversampled crops (cmrprep's trainer does all of these).")], stats
    return [], stats


def diagnose(net: Any, x: np.ndarray, y: np.ndarray, loss: Any = None, optimizer: Any = None,
             probe_steps: int = 0) -> tuple[list[Finding], dict[str, Any]]:
    """Every check on one set-up; returns the findings (errors first) and the measured numbers."""
    info = loss_info(loss)
    num_classes = int(net.output_shape[-1])
    activation = output_activation(net)
    import keras

    findings = check_pairing(activation, info) + check_label_encoding(y, info, num_classes)
    findings += check_backend(activation, info, len(net.output_shape), keras.config.backend())
    classes, _ = labels_as_classes(y, num_classes)
    stats: dict[str, Any] = {"num_classes": num_classes, "activation": activation, "loss": info.name,
                             "from_logits": info.from_logits}
    if classes is not None and np.issubdtype(np.asarray(classes).dtype, np.number):
        balance, numbers = check_class_balance(np.asarray(classes), num_classes)
        findings += balance
        stats.update(numbers)
    normalised = any(type(layer).__name__ in _NORM_LAYERS and layer.name != "input_norm"
                     for layer in net.layers)  # cmrprep's parameter-free input z-score does not count
    findings += check_optimizer(optimizer, normalised) + check_inputs(x)
    if probe_steps > 0 and loss is not None and not any(f.severity == "error" for f in findings):
        probe, numbers = probe_fit(net, x, y, probe_steps, stats.get("prior_entropy", math.log(num_classes)),
                                   num_classes)
        findings += probe
        stats.update(numbers)
    findings.sort(key=lambda f: f.severity != "error")
    return findings, stats
