"""Train the U-Net on a slice store: the Python API behind ``python -m pipelines.train``.

A run directory receives::

    train_config.json   arguments, classes, versions, split (case and patient ids)
    training_fingerprint.json  acquisition ranges of the training data (dataset-shift reference)
    plan.json           copy of the store's plan (to reproduce preprocessing)
    history.csv         one row per epoch: loss, val_dice_{rv,myo,lv,mean}, ...
    curves.png          loss and validation Dice curves
    best.keras          best model by validation mean foreground Dice
    last.keras          model after the last epoch (for --resume)
    result.json         stopped_reason (completed | max_minutes | collapse), best epoch, Dice
    diagnosis.txt       only when the collapse guard stopped the run

Defaults follow the fixes for "predicts only background": linear logits +
``from_logits=True``, Dice + CE (unweighted for the instance-normalized U-Net, with the
store's class weights for a batch-normalized or your own network,
:func:`default_class_weights`), instance normalization, Adam 2e-3 decayed
polynomially over the budget (:class:`PolyDecay`; 3e-3 with batches over 8, 1e-3
for a batch-normalized or your own network, :func:`default_lr`), batches of 8 slices (16 for those,
:func:`default_batch_size`), slices drawn by the store's sampling
weights, per-class validation Dice (not pixel accuracy).  The seed-style setup of the benchmark is
``use_sampling=False, loss="ce", class_weights=None, output="softmax",
optimizer="sgd", lr=1e-4, lr_schedule="constant"``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import keras

from cmrprep.plan import ConfigError
from model.augment import AugmentConfig, Augmenter
from model.checks import CollapseGuard, check_wiring, output_is_softmax
from model.data import ShardStore, SliceDataset, ValidationDataset, split_by_patient
from model.reader import split_patients
from model.reader import DEFAULT_MEMORY_BUDGET, DEFAULT_POOL_SHARDS
from model.losses import make_loss
from model.metrics import ValidationDice
from model.unet import build_unet, resolve_norm

__all__ = ["train", "TrainResult", "TimeLimit", "read_history", "plot_curves", "default_lr",
           "default_batch_size"]

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd", "rmsprop")


@dataclass
class TrainResult:
    """Outcome of :func:`train` (also written to ``RUN_DIR/result.json``)."""

    run_dir: str
    stopped_reason: str
    epochs_completed: int
    best_epoch: int | None
    best_dice: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    diagnosis: str | None = None

    @property
    def collapsed(self) -> bool:
        """True when the collapse guard stopped the run."""
        return self.stopped_reason == "collapse"


class TimeLimit(keras.callbacks.Callback):
    """Stop at the first batch boundary after ``deadline`` (``time.monotonic()`` seconds)."""

    def __init__(self, deadline: float | None) -> None:
        super().__init__()
        self.deadline, self.triggered = deadline, False

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            if not self.triggered:
                log.warning("time limit reached after batch %d: stopping after this epoch's "
                            "validation", batch + 1)
            self.triggered = True
            self.model.stop_training = True


class PolyDecay(keras.callbacks.Callback):
    """Polynomial learning-rate decay ``lr * (1 - progress) ** power`` over the training budget.

    ``progress`` is the larger of the share of ``epochs`` done and the share of the
    time budget used (``start`` to ``deadline``, ``time.monotonic()`` seconds), so a
    run bounded by ``max_minutes`` anneals toward its deadline (nnU-Net's "poly"
    schedule, there over a fixed number of epochs).  The rate is set before every
    batch; it never drops below ``lr * floor``.

    Examples
    --------
    >>> PolyDecay(1e-3, epochs=10, steps=100).rate(epoch=5, batch=0, now=0.0)
    0.000535...
    """

    def __init__(self, lr: float, *, epochs: int, steps: int, start: float | None = None,
                 deadline: float | None = None, power: float = 0.9, floor: float = 0.01) -> None:
        super().__init__()
        self.lr, self.epochs, self.steps = float(lr), max(int(epochs), 1), max(int(steps), 1)
        self.start, self.deadline, self.power, self.floor = start, deadline, power, floor
        self._epoch = 0

    def rate(self, epoch: int, batch: int, now: float) -> float:
        """Learning rate at ``batch`` of ``epoch`` (0-based) at time ``now``."""
        progress = (epoch + batch / self.steps) / self.epochs
        if self.deadline is not None and self.start is not None and self.deadline > self.start:
            progress = max(progress, (now - self.start) / (self.deadline - self.start))
        return self.lr * max((1.0 - min(progress, 1.0)) ** self.power, self.floor)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.model.optimizer.learning_rate = self.rate(self._epoch, batch, time.monotonic())

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        log.debug("epoch %d: learning rate %.3g", epoch + 1,
                  float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


class _EpochSync(keras.callbacks.Callback):
    """Tell the training dataset which epoch is running (deterministic, resumable batches)."""

    def __init__(self, dataset: SliceDataset) -> None:
        super().__init__()
        self.dataset = dataset

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.dataset.set_epoch(epoch)


class _SaveLast(keras.callbacks.Callback):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.model.save(self.path)


def read_history(run_dir: str | Path) -> list[dict[str, float]]:
    """Rows of ``RUN_DIR/history.csv`` as floats (empty list when absent)."""
    path = Path(run_dir) / "history.csv"
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _number(value: str | None) -> float:
    """A ``history.csv`` cell as a float; empty and ``NA`` (Keras' missing value) are NaN."""
    try:
        return float(value) if value not in ("", None) else math.nan
    except ValueError:
        return math.nan


def plot_curves(run_dir: str | Path) -> Path | None:
    """Write ``curves.png`` (loss; validation Dice per class) from ``history.csv``."""
    rows = read_history(run_dir)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["loss"] for r in rows], label="train loss")
    ax_loss.set_xlabel("epoch"), ax_loss.set_title("loss"), ax_loss.legend()
    for key in ("rv", "myo", "lv", "mean"):
        if f"val_dice_{key}" in rows[0]:
            ax_dice.plot(epochs, [r[f"val_dice_{key}"] for r in rows], label=key.upper())
    ax_dice.set_ylim(0, 1), ax_dice.set_xlabel("epoch"), ax_dice.set_title("validation Dice")
    ax_dice.legend()
    out = Path(run_dir) / "curves.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


#: Learning-rate schedules of :func:`train`.
LR_SCHEDULES = ("poly", "constant")


def default_lr(norm: str = "instance", own_model: bool = False,
               batch_size: int | None = None) -> float:
    """The trainer's initial learning rate for cmrprep's U-Net with ``norm``, or for your own network.

    Adam at 2e-3 for the instance-normalized U-Net at its default batch of 8
    (:func:`default_batch_size`), 3e-3 when it trains with larger batches.
    Instance normalization starts slower than batch normalization; on the
    20-minute site-shift benchmark (Dec 7, 2 cores, 9-10 epochs) batch 16 at
    3e-3 gave site A 0.949 and site B 0.844 (worst frame 0.610) against 0.945 and
    0.809 (0.520) at 1e-3 and 0.943 and 0.819 (0.574) at 5e-3; batch 8, twice the
    updates, at 2e-3 gave site A 0.958 / 0.957 and site B 0.857 / 0.850 (two
    runs) against 0.950 / 0.954 / 0.955 and 0.849 / 0.838 / 0.850 at 3e-3 (three).
    1e-3 for a batch-normalized or unnormalized U-Net and for a network of your
    own (the rate those were measured at).

    Parameters
    ----------
    norm : {"instance", "batch", "none"}
        Normalization of cmrprep's U-Net.
    own_model : bool
        True for a network of your own (``norm`` is then ignored).
    batch_size : int, optional
        Slices per step; default :func:`default_batch_size` for ``norm``.

    >>> default_lr(), default_lr(batch_size=16), default_lr("batch"), default_lr(own_model=True)
    (0.002, 0.003, 0.001, 0.001)
    """
    if norm != "instance" or own_model:
        return 1e-3
    if batch_size is None:
        batch_size = default_batch_size(norm, own_model)
    return 2e-3 if batch_size <= 8 else 3e-3


def default_batch_size(norm: str = "instance", own_model: bool = False) -> int:
    """The trainer's slices per step for cmrprep's U-Net with ``norm``, or for your own network.

    8 for the instance-normalized U-Net: instance normalization computes its
    statistics per slice, not per batch, so a smaller batch costs it nothing in
    normalization and gives twice the updates for the same slices.  On the
    20-minute site-shift benchmark (Dec 7, 2 cores; three runs with 8, one with
    16) batch 8 gave validation Dice 0.951 / 0.953 / 0.955 and site A
    0.950 / 0.954 / 0.955 against 0.945 and 0.949 with 16; site B stayed inside
    its run-to-run spread (0.849 / 0.838 / 0.850 against 0.844).  16 for a batch-normalized or unnormalized U-Net (batch
    statistics need the larger batch; the demo's 4-minute run is measured
    with it) and for a network of your own.

    >>> default_batch_size(), default_batch_size("batch"), default_batch_size(own_model=True)
    (8, 16, 16)
    """
    return 8 if norm == "instance" and not own_model else 16


def default_class_weights(norm: str = "instance", own_model: bool = False) -> str | None:
    """The trainer's cross-entropy class weights for cmrprep's U-Net with ``norm``, or for your own network.

    ``None`` (unweighted cross-entropy beside the Dice term, as nnU-Net) for
    the instance-normalized U-Net: the Dice term already gives every class the
    same say, and the store's weights (median frequency: background ~0.07,
    each heart class ~1.2-1.4) pull every uncertain pixel toward the heart.
    On the 20-minute site-shift benchmark (Dec 7, 2 cores, two runs each) it
    gave validation Dice 0.962 / 0.963 and site A 0.964 / 0.967 against
    0.953 / 0.956 and 0.958 / 0.957 with the store's weights, site B
    0.846 / 0.855 (worst frame 0.653 / 0.673) against 0.857 / 0.850
    (0.661 / 0.610), inside its run-to-run spread, and it learns faster at
    first (validation Dice 0.82 / 0.86 after the first epoch against ~0.5).  ``"store"`` (the store's
    ``class_weights`` attribute) for a batch-normalized or unnormalized U-Net
    (the demo's 4-minute run is measured with it) and for a network of your
    own, whose loss may have no Dice term.  The store measures and keeps its
    class weights either way (``class_weights_all``).

    >>> default_class_weights(), default_class_weights("batch"), default_class_weights(own_model=True)
    (None, 'store', 'store')
    """
    return None if norm == "instance" and not own_model else "store"


def default_augment(norm: str = "instance", own_model: bool = False) -> AugmentConfig:
    """The trainer's default augmentation for cmrprep's U-Net with ``norm``, or for your own network.

    For the instance-normalized U-Net with unweighted cross-entropy (the
    defaults) the poor-acquisition bundle also flattens the tissue contrast
    (``p_flatten=1``, :func:`model.augment.flatten_contrast`): on the 20-minute
    site-shift benchmark (Dec 7, 2 cores, two runs each) site B 0.872 / 0.864
    (worst frame 0.728 / 0.725) against 0.846 / 0.855 (0.653 / 0.673) without it,
    site A 0.961 / 0.964 against 0.964 / 0.967.  Elsewhere (batch or no
    normalization, the demo's 4-minute run, a network of your own) the
    plain defaults of :class:`~model.augment.AugmentConfig`.

    >>> default_augment().p_flatten, default_augment("batch").p_flatten, default_augment(own_model=True).p_flatten
    (1.0, 0.0, 0.0)
    """
    return AugmentConfig(p_flatten=1.0) if norm == "instance" and not own_model else AugmentConfig()


def _make_optimizer(name: str, lr: float) -> keras.optimizers.Optimizer:
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def _class_weights(spec: Any, store: ShardStore) -> list[float] | None:
    if isinstance(spec, str) and spec == "store":
        return [float(w) for w in store.attrs.get("class_weights") or []] or None
    return None if spec is None else [float(w) for w in spec]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _write_metadata(run_dir: Path, config: dict, store: ShardStore, train_idx: np.ndarray,
                    val_idx: np.ndarray) -> None:
    ids = store.case_ids()

    def names(idx: np.ndarray) -> list[str]:
        return [ids[c] if c < len(ids) else str(c) for c in np.unique(store.case_index[idx])]
    patients = split_patients(store, train_idx, val_idx)
    split = {"train_cases": names(train_idx), "val_cases": names(val_idx),
             "train_patients": patients["train"], "val_patients": patients["val"],
             "train_slices": int(train_idx.size), "val_slices": int(val_idx.size)}
    config = {**config, "classes": list(store.classes)}
    versions = {"keras": keras.__version__, "backend": keras.backend.backend()}
    _write_json(run_dir / "train_config.json", {**config, "split": split, "versions": versions})
    plan = store.attrs.get("plan")
    if isinstance(plan, str):
        plan = json.loads(plan)
    if plan is not None:
        _write_json(run_dir / "plan.json", plan)
    else:
        log.warning("store has no `plan` attribute: plan.json not written")
    reference = _shift_reference(store)
    if reference is not None:  # what predict compares new inputs with (cmrprep.shift)
        _write_json(run_dir / "training_fingerprint.json", reference)


def _shift_reference(store: ShardStore) -> dict | None:
    """``shift_reference`` of the build's ``fingerprint.json`` next to the store, if there is one."""
    path = store.link.parent / "fingerprint.json"
    try:
        return json.loads(path.read_text()).get("shift_reference")
    except (OSError, ValueError, AttributeError):
        return None


def _user_model(model: Any, store: ShardStore) -> keras.Model:
    """A user's network (object or saved file), checked against the store's slices."""
    from model.saving import load_model_file

    net = load_model_file(model) if isinstance(model, (str, Path)) else model
    if not isinstance(net, keras.Model):
        raise ConfigError(f"model must be a keras.Model or a .keras file, got {type(model).__name__}")
    shape = tuple(net.input_shape)
    want = (*store.slice_shape, 1)
    if len(shape) != 4 or any(a is not None and a != b for a, b in zip(shape[1:], want)):
        raise ConfigError(f"the model's input shape {shape[1:]} does not take the store's slices {want} "
                          "(height, width, 1 channel); build it with keras.Input(shape=(None, None, 1)) "
                          f"or {want}.")
    return net


def _model_and_epoch(run_dir: Path, resume: bool, build: dict, loss, optimizer,
                     user_net: keras.Model | None = None) -> tuple:
    """A fresh compiled model at epoch 0, or last.keras and the epoch count from history.csv."""
    if resume:
        last = run_dir / "last.keras"
        if not last.exists():
            raise ConfigError(f"cannot resume: {last} does not exist; train without --resume")
        from model.saving import load_model_file

        net = load_model_file(last, compile=True)
        rows = read_history(run_dir)
        best = max((r.get("val_dice_mean", -math.inf) for r in rows), default=None)
        log.info("resuming from %s at epoch %d", last, len(rows))
        return net, len(rows), best
    net = user_net if user_net is not None else build_unet(**build)
    net.compile(optimizer=optimizer, loss=loss)
    return net, 0, None


def _callbacks(run_dir: Path, train_ds: SliceDataset, val_ds: ValidationDataset, from_logits: bool,
               deadline: float | None, best: float | None, resume: bool, patience: int,
               min_dice: float, schedule: PolyDecay | None = None) -> list:
    guard = CollapseGuard(patience=patience, min_dice=min_dice, run_dir=run_dir,
                          fg_pixel_share=train_ds.foreground_pixel_share(),
                          classes=train_ds.store.classes)
    checkpoint = keras.callbacks.ModelCheckpoint(
        run_dir / "best.keras", monitor="val_dice_mean", mode="max", save_best_only=True,
        initial_value_threshold=best if best is not None and math.isfinite(best) else None)
    classes = train_ds.store.classes
    return [_EpochSync(train_ds), TimeLimit(deadline), ValidationDice(val_ds, from_logits, classes=classes),
            checkpoint, _SaveLast(run_dir / "last.keras"),
            keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resume), guard,
            *([schedule] if schedule is not None else [])]


def _finish(run_dir: Path, net: keras.Model, callbacks: list, start: float,
            epochs_done: int) -> TrainResult:
    """Save last/best, curves and ``result.json``; return the :class:`TrainResult`."""
    net.save(run_dir / "last.keras")
    if not (run_dir / "best.keras").exists():
        log.warning("no validation Dice to select a best model: best.keras = last.keras")
        net.save(run_dir / "best.keras")
    plot_curves(run_dir)
    guard = next(c for c in callbacks if isinstance(c, CollapseGuard))
    timer = next(c for c in callbacks if isinstance(c, TimeLimit))
    reason = "collapse" if guard.collapsed else "max_minutes" if timer.triggered else "completed"
    rows = read_history(run_dir)
    scored = [r for r in rows if math.isfinite(r.get("val_dice_mean", math.nan))]
    best_row = max(scored, key=lambda r: r["val_dice_mean"]) if scored else None
    best = ({k[len("val_dice_"):]: r for k, r in best_row.items() if k.startswith("val_dice_")}
            if best_row else {})
    result = TrainResult(str(run_dir), reason, len(rows) or epochs_done,
                         int(best_row["epoch"]) + 1 if best_row else None, best,
                         round(time.monotonic() - start, 2), guard.diagnosis)
    _write_json(run_dir / "result.json", asdict(result))
    log.info("training %s after %d epoch(s); best epoch %s Dice %s", reason,
             result.epochs_completed, result.best_epoch, best)
    return result


def _augmenter(augment: bool | AugmentConfig) -> Augmenter | None:
    if isinstance(augment, AugmentConfig):
        return Augmenter(augment)
    return Augmenter() if augment else None


def train(store_path: str | Path, run_dir: str | Path, *, epochs: int = 50,
          max_minutes: float | None = None, batch_size: int | None = None, loss: str = "dice_ce",
          lr: float | None = None, lr_schedule: str = "poly", seed: int = 0, val_fraction: float = 0.2,
          steps_per_epoch: int | None = None, filters: Sequence[int] = (16, 32, 64, 128, 256),
          norm: str = "instance", batch_norm: bool | None = None,
          augment: bool | AugmentConfig = True, optimizer: str = "adam",
          resume: bool = False, collapse_patience: int = 5, collapse_min_dice: float = 0.02,
          use_sampling: bool = True,
          class_weights: Any = "default", output: str = "logits", from_logits: bool | None = None,
          memory_budget: int = DEFAULT_MEMORY_BUDGET, pool_shards: int | None = DEFAULT_POOL_SHARDS,
          workers: int = 1, verbose: int | None = None, model: Any = None,
          ) -> TrainResult:
    """Train a U-Net on ``store_path`` and write the run directory (see module docstring).

    Parameters
    ----------
    store_path : path
        Build output folder containing ``store.zarr``, or the store itself.
    run_dir : path
        Output folder (created); with ``resume=True`` an existing run.
    epochs, seed, steps_per_epoch
        Usual meaning; ``steps_per_epoch`` defaults to one pass over the
        training slices.  ``epochs`` counts the resumed ones.
    batch_size : int, optional
        Slices per step; default :func:`default_batch_size` (8 for the
        instance-normalized U-Net, 16 otherwise).
    lr : float, optional
        Initial learning rate; default :func:`default_lr` (2e-3 for the
        instance-normalized U-Net at batch 8, 3e-3 at larger batches, 1e-3
        otherwise).
    max_minutes : float, optional
        Wall-clock budget; stops at a batch boundary (``stopped_reason``
        ``"max_minutes"``), keeping the best checkpoint.
    lr_schedule : {"poly", "constant"}
        ``"poly"`` (default): ``lr`` decays as ``(1 - progress) ** 0.9`` toward the end of
        the budget, ``epochs`` or ``max_minutes`` whichever comes first
        (:class:`PolyDecay`); ``"constant"``: ``lr`` throughout.
    loss : {"dice_ce", "ce", "dice"}
        See :func:`model.losses.make_loss`.
    val_fraction : float
        Share of patients held out (split by patient, never by slice or frame).
    filters, norm, batch_norm, output
        U-Net options (:func:`model.unet.build_unet`; ``norm="instance"`` by
        default, ``batch_norm`` the older switch for ``"batch"`` / ``"none"``).
    augment : bool or AugmentConfig
        Augmentation: ``True`` for the defaults (:func:`default_augment`: the
        poor-acquisition bundle flattens tissue contrast for the
        instance-normalized U-Net), an :class:`~model.augment.AugmentConfig`
        for others (either is recorded in ``train_config.json``), ``False``
        for none.
    use_sampling : bool
        Weighted slice sampling (else uniform shuffling).
    optimizer : {"adam", "sgd", "rmsprop"}
        SGD is plain (momentum 0), as in the seed-style setup.
    resume : bool
        Continue from ``last.keras`` and the epoch count of ``history.csv``.
    collapse_patience, collapse_min_dice
        Stop after this many epochs of validation mean foreground Dice below
        ``collapse_min_dice`` (or no foreground predicted); patience 0 disables.
    class_weights : "default", "store", None or sequence
        CE class weights: :func:`default_class_weights` (none for the
        instance-normalized U-Net, the store's otherwise), the store's default
        scheme, none, or explicit.
    from_logits : bool, optional
        Defaults to ``output == "logits"``; a mismatch is refused.
    memory_budget, pool_shards
        Bytes of images + labels (stored dtypes) held in memory; a larger
        store is streamed through a pool of ``pool_shards`` shards
        (:class:`model.reader.ShardPool`).
    workers, verbose
        PyDataset workers; Keras verbosity (default 1 on a terminal, else 2).
    model : keras.Model, path or None
        Your own network (built, or a saved ``.keras`` file) instead of
        cmrprep's U-Net: input ``(H, W, 1)`` matching the store's slices (or
        ``None`` sizes), one output channel per class.  It is compiled here
        with cmrprep's loss (``loss``, the store's class weights) and
        optimizer; ``from_logits`` follows its last activation (softmax:
        probabilities, anything else: logits) unless given, and the wiring
        checks, sampling, collapse guard and run folder apply as to the U-Net.
        ``filters``, ``batch_norm``, ``norm`` and ``output`` are then unused.

    Returns
    -------
    TrainResult
    """
    start = time.monotonic()
    if lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    norm = resolve_norm(norm, batch_norm)
    if batch_size is None:
        batch_size = default_batch_size(norm, model is not None)
    if lr is None:
        lr = default_lr(norm, model is not None, batch_size)
    if isinstance(class_weights, str) and class_weights == "default":
        class_weights = default_class_weights(norm, model is not None)
    if augment is True:
        augment = default_augment(norm, model is not None)
    config = {k: v for k, v in locals().items() if k != "start"}  # norm, lr and batch size as resolved
    if isinstance(augment, AugmentConfig):
        config["augment"] = asdict(augment)
    if model is not None and not isinstance(model, (str, Path)):  # JSON: describe, don't embed
        config["model"] = f"keras.Model {getattr(model, 'name', type(model).__name__)!r} (user-built)"
    elif model is not None:
        config["model"] = str(model)
    keras.utils.set_random_seed(seed)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    store = ShardStore(store_path, memory_budget=memory_budget)
    train_idx, val_idx = split_by_patient(store, val_fraction, seed)
    user_net = _user_model(model, store) if model is not None and not resume else None
    if from_logits is None:
        from_logits = (not output_is_softmax(user_net)) if user_net is not None else output == "logits"
    config["from_logits"] = from_logits  # as resolved (recorded in train_config.json)
    loss_fn = make_loss(loss, _class_weights(class_weights, store), from_logits=from_logits,
                        num_classes=store.num_classes)
    build = dict(input_shape=(*store.slice_shape, 1), num_classes=store.num_classes,
                 filters=tuple(filters), norm=norm, output=output)
    net, initial_epoch, best = _model_and_epoch(run_dir, resume, build,
                                                loss_fn, _make_optimizer(optimizer, lr), user_net)
    train_ds = SliceDataset(store, train_idx, batch_size, seed=seed,
                            augment=_augmenter(augment), use_sampling=use_sampling,
                            steps_per_epoch=steps_per_epoch, pool_shards=pool_shards,
                            workers=workers)
    check_wiring(net, net.loss if resume else loss_fn, train_ds[0][1], store.check_attrs())
    train_ds.set_epoch(initial_epoch)
    val_ds = ValidationDataset(store, val_idx, batch_size)
    _write_metadata(run_dir, {**config, "store_path": str(store.path)}, store, train_idx, val_idx)
    deadline = start + 60.0 * max_minutes if max_minutes is not None else None
    schedule = (PolyDecay(lr, epochs=epochs, steps=len(train_ds), start=start, deadline=deadline)
                if lr_schedule == "poly" else None)
    callbacks = _callbacks(run_dir, train_ds, val_ds, from_logits, deadline, best, resume,
                           collapse_patience, collapse_min_dice, schedule)
    if initial_epoch < epochs:
        net.fit(train_ds, epochs=epochs, initial_epoch=initial_epoch, callbacks=callbacks,
                verbose=verbose if verbose is not None else (1 if sys.stdout.isatty() else 2))
    return _finish(run_dir, net, callbacks, start, initial_epoch)
