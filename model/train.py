"""Train the U-Net on a slice store: the Python API behind ``python -m pipelines.train``.

A run directory receives::

    train_config.json   arguments, versions, split (case ids)
    plan.json           copy of the store's plan (to reproduce preprocessing)
    history.csv         one row per epoch: loss, val_dice_{rv,myo,lv,mean}, ...
    curves.png          loss and validation Dice curves
    best.keras          best model by validation mean foreground Dice
    last.keras          model after the last epoch (for --resume)
    result.json         stopped_reason (completed | max_minutes | collapse), best epoch, Dice
    diagnosis.txt       only when the collapse guard stopped the run

Defaults follow the fixes for "predicts only background": linear logits +
``from_logits=True``, Dice + CE, Adam 1e-3, slices drawn by the store's
sampling weights, per-class validation Dice (not pixel accuracy).  The
seed-style setup of the benchmark is ``use_sampling=False, loss="ce",
class_weights=None, output="softmax", optimizer="sgd", lr=1e-4``.
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

import model  # noqa: F401  (sets KERAS_BACKEND before keras is imported)
import keras

from cmrprep.plan import ConfigError
from model.augment import Augmenter
from model.checks import CollapseGuard, check_wiring
from model.data import ShardStore, SliceDataset, ValidationDataset, split_by_patient
from model.losses import make_loss
from model.metrics import ValidationDice
from model.unet import build_unet

__all__ = ["train", "TrainResult", "TimeLimit", "read_history", "plot_curves"]

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
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                for row in csv.DictReader(fh)]


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
    cases = store.attrs.get("cases") or []
    ids = [c.get("case_id", str(i)) if isinstance(c, dict) else str(c) for i, c in enumerate(cases)]
    def names(idx: np.ndarray) -> list[str]:
        return [ids[c] if c < len(ids) else str(c) for c in np.unique(store.case_index[idx])]
    split = {"train_cases": names(train_idx), "val_cases": names(val_idx),
             "train_slices": int(train_idx.size), "val_slices": int(val_idx.size)}
    versions = {"keras": keras.__version__, "backend": keras.backend.backend()}
    _write_json(run_dir / "train_config.json", {**config, "split": split, "versions": versions})
    plan = store.attrs.get("plan")
    if isinstance(plan, str):
        plan = json.loads(plan)
    if plan is not None:
        _write_json(run_dir / "plan.json", plan)
    else:
        log.warning("store has no `plan` attribute: plan.json not written")


def _model_and_epoch(run_dir: Path, resume: bool, build: dict, loss, optimizer) -> tuple:
    """A fresh compiled model at epoch 0, or last.keras and the epoch count from history.csv."""
    if resume:
        last = run_dir / "last.keras"
        if not last.exists():
            raise ConfigError(f"cannot resume: {last} does not exist; train without --resume")
        net = keras.saving.load_model(last)
        rows = read_history(run_dir)
        best = max((r.get("val_dice_mean", -math.inf) for r in rows), default=None)
        log.info("resuming from %s at epoch %d", last, len(rows))
        return net, len(rows), best
    net = build_unet(**build)
    net.compile(optimizer=optimizer, loss=loss)
    return net, 0, None


def _callbacks(run_dir: Path, train_ds: SliceDataset, val_ds: ValidationDataset, from_logits: bool,
               deadline: float | None, best: float | None, resume: bool, patience: int) -> list:
    guard = CollapseGuard(patience=patience, run_dir=run_dir,
                          fg_pixel_share=train_ds.foreground_pixel_share())
    checkpoint = keras.callbacks.ModelCheckpoint(
        run_dir / "best.keras", monitor="val_dice_mean", mode="max", save_best_only=True,
        initial_value_threshold=best if best is not None and math.isfinite(best) else None)
    return [_EpochSync(train_ds), TimeLimit(deadline), ValidationDice(val_ds, from_logits),
            checkpoint, _SaveLast(run_dir / "last.keras"),
            keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resume), guard]
