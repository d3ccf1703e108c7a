"""Mis-wiring refusals and the collapse guard."""

from __future__ import annotations

import numpy as np
import pytest

from model.checks import CollapseGuard, WiringError, check_wiring, diagnose
from model.losses import make_loss
from model.unet import build_unet

# Keras' torch backend emits NumPy 2 "copy keyword" DeprecationWarnings.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ATTRS = {"arrays": ["images", "labels", "weights", "case_index"], "class_weights": [0.1, 1, 1, 1]}


@pytest.fixture(scope="module")
def nets():
    return {out: build_unet((16, 16, 1), filters=(4, 8), output=out) for out in ("logits", "softmax")}


def _labels(shape=(2, 16, 16)):
    return np.random.default_rng(0).integers(0, 4, size=shape).astype(np.int32)


def test_correct_wiring_passes(nets):
    check_wiring(nets["logits"], make_loss("dice_ce"), _labels(), ATTRS)
    check_wiring(nets["softmax"], make_loss("ce", from_logits=False), _labels((2, 16, 16, 1)), ATTRS)


def test_one_hot_labels_refused(nets):
    one_hot = np.eye(4, dtype=np.int32)[_labels()]
    with pytest.raises(WiringError, match="one-hot"):
        check_wiring(nets["logits"], make_loss("ce"), one_hot, ATTRS)


def test_double_softmax_refused(nets):
    with pytest.raises(WiringError, match="double softmax"):
        check_wiring(nets["softmax"], make_loss("dice_ce", from_logits=True), _labels(), ATTRS)
    with pytest.raises(WiringError, match="from_logits=False"):
        check_wiring(nets["logits"], make_loss("ce", from_logits=False), _labels(), ATTRS)


@pytest.mark.parametrize("labels, match", [
    (np.full((1, 16, 16), 255, np.uint8), "outside 0..3"),
    (np.full((1, 16, 16), -1, np.int32), "outside 0..3"),
    (np.zeros((1, 16, 16), np.float32), "integers"),
])
def test_bad_labels_refused(nets, labels, match):
    with pytest.raises(WiringError, match=match):
        check_wiring(nets["logits"], make_loss("ce"), labels, ATTRS)


def test_store_without_weights_refused(nets):
    with pytest.raises(WiringError, match="`weights`"):
        check_wiring(nets["logits"], make_loss("ce"), _labels(), {**ATTRS, "arrays": ["images"]})
    no_cw = {k: v for k, v in ATTRS.items() if k != "class_weights"}
    with pytest.raises(WiringError, match="class_weights"):
        check_wiring(nets["logits"], make_loss("ce"), _labels(), no_cw)


def test_collapse_guard_stops_with_diagnosis(tmp_path, nets):
    net = nets["logits"]
    net.compile(optimizer="sgd", loss=make_loss("ce"))
    guard = CollapseGuard(patience=2, run_dir=tmp_path, fg_pixel_share=0.01)
    guard.set_model(net)
    logs = {"loss": 1.39, "val_dice_mean": 0.0, "val_pred_fg": 0.0, "val_ce": 1.38}
    guard.on_epoch_end(0, dict(logs))
    assert not guard.collapsed
    guard.on_epoch_end(1, dict(logs))
    assert guard.collapsed and net.stop_training
    text = (tmp_path / "diagnosis.txt").read_text()
    assert "ln 4" in text and "use_sampling" in text


def test_diagnosis_double_softmax_and_recovery():
    assert "double softmax" in diagnose([0.9], 0.8, 0.0, 0.2, 1e-3)
    guard = CollapseGuard(patience=2)
    guard.on_epoch_end(0, {"val_dice_mean": 0.0})
    guard.on_epoch_end(1, {"val_dice_mean": 0.5})
    guard.on_epoch_end(2, {"val_dice_mean": 0.0})
    assert not guard.collapsed


def test_collapse_guard_catches_random_guessing_near_ln4():
    """The seed-style failure: random classes (Dice ~0.04), cross-entropy stuck near ln 4."""
    guard = CollapseGuard(patience=3)
    for epoch in range(3):
        guard.on_epoch_end(epoch, {"loss": 1.47, "val_dice_mean": 0.04, "val_pred_fg": 0.7,
                                   "val_ce": 1.47})
    assert guard.collapsed
    healthy = CollapseGuard(patience=3)
    for epoch in range(3):
        healthy.on_epoch_end(epoch, {"loss": 0.6, "val_dice_mean": 0.04, "val_pred_fg": 0.2,
                                     "val_ce": 0.45})
    assert not healthy.collapsed


def test_keras_losses_and_one_hot_pairings_without_a_store(nets):
    """#13: a valid CategoricalCrossentropy + one-hot pairing passes (no store needed); a linear
    output with the string loss 'sparse_categorical_crossentropy' (probabilities) is refused."""
    import keras

    one_hot = np.eye(4, dtype=np.float32)[_labels()]
    check_wiring(nets["softmax"], keras.losses.CategoricalCrossentropy(), one_hot)
    check_wiring(nets["logits"], keras.losses.SparseCategoricalCrossentropy(from_logits=True), _labels())
    with pytest.raises(WiringError, match="from_logits=False"):
        check_wiring(nets["logits"], "sparse_categorical_crossentropy", _labels())
    with pytest.raises(WiringError, match="one-hot"):
        check_wiring(nets["softmax"], keras.losses.CategoricalCrossentropy(), _labels())
