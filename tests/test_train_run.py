"""End-to-end training on the tiny synthetic store (tiny U-Net, 32x32)."""

from __future__ import annotations

import json

import pytest

import keras

from model.train import read_history, train
from pipelines.train import main
from storefixture import write_store

# Keras' torch backend emits thousands of NumPy 2 "copy keyword" DeprecationWarnings.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The learning checks below run ~80 steps, where batch normalization learns faster than the
# default instance normalization (test_default_instance_norm_model_learns checks that one).
TINY = dict(filters=(8, 16, 32), batch_size=8, verbose=0, norm="batch")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_store(out)
    return out


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    return run, train(shards, run, epochs=8, steps_per_epoch=10, lr=3e-3, **TINY)


def test_tiny_model_learns(trained):
    run, result = trained
    assert result.stopped_reason == "completed" and result.epochs_completed == 8
    assert result.best_dice["mean"] > 0.5
    for name in ("best.keras", "last.keras", "history.csv", "curves.png", "train_config.json",
                 "plan.json", "result.json"):
        assert (run / name).exists(), name
    rows = read_history(run)
    assert {"val_dice_rv", "val_dice_myo", "val_dice_lv", "val_dice_mean"} <= set(rows[0])
    config = json.loads((run / "train_config.json").read_text())
    assert set(config["split"]["train_cases"]).isdisjoint(config["split"]["val_cases"])
    assert json.loads((run / "plan.json").read_text())["crop_shape"] == [32, 32]


def test_resume_continues_epoch_count(trained, shards):
    run, _ = trained
    result = train(shards, run, epochs=9, steps_per_epoch=2, lr=3e-3, resume=True, **TINY)
    assert result.epochs_completed == 9
    assert [int(r["epoch"]) for r in read_history(run)] == list(range(9))


def test_max_minutes_stops_cleanly(shards, tmp_path):
    result = train(shards, tmp_path, epochs=50, max_minutes=0.0001, **TINY)
    assert result.stopped_reason == "max_minutes" and result.epochs_completed == 1
    assert json.loads((tmp_path / "result.json").read_text())["stopped_reason"] == "max_minutes"
    net = keras.saving.load_model(tmp_path / "best.keras")
    assert net.output_shape == (None, 32, 32, 4)


def test_cli_exit_codes(shards, tmp_path):
    no_weights = tmp_path / "bad"
    write_store(no_weights, with_weights=False)
    assert main([str(no_weights), str(tmp_path / "r1"), "--epochs", "1"]) == 2
    assert main([str(shards / "store.zarr"), str(tmp_path / "r2"), "--epochs", "1",
                 "--steps-per-epoch", "1", "--filters", "8", "16", "--output", "softmax",
                 "--resume"]) == 2
    collapse = ["--epochs", "3", "--steps-per-epoch", "1", "--filters", "8", "16", "--lr", "0",
                "--optimizer", "sgd", "--collapse-patience", "1", "--collapse-min-dice", "1.01"]
    assert main([str(shards), str(tmp_path / "r3"), *collapse]) == 4
    assert (tmp_path / "r3" / "diagnosis.txt").exists()
    assert main([str(shards), str(tmp_path / "r4"), "--epochs", "1", "--steps-per-epoch", "1",
                 "--filters", "8", "16", "--no-augment"]) == 0
    assert main([str(shards), str(tmp_path / "r5"), "--epochs", "1", "--steps-per-epoch", "1",
                 "--filters", "8", "16", "--flatten-contrast", "1.5"]) == 2
    assert main([str(shards), str(tmp_path / "r6"), "--epochs", "1", "--steps-per-epoch", "1",
                 "--filters", "8", "16", "--flatten-contrast", "1"]) == 0
    config = json.loads((tmp_path / "r6" / "train_config.json").read_text())
    assert config["augment"]["p_flatten"] == 1.0 and config["augment"]["flatten"] == [0.15, 0.6]


def test_model_trained_from_a_streamed_store_learns_every_class(tmp_path):
    shards = tmp_path / "shards"
    write_store(shards, n_patients=8, shard_slices=16)
    # a constant rate: 80 steps are far from converged, where a decay only slows learning
    result = train(shards, tmp_path / "run", epochs=8, steps_per_epoch=10, lr=3e-3, lr_schedule="constant",
                   memory_budget=0, pool_shards=2, **TINY)
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert config["memory_budget"] == 0
    for name in ("rv", "myo", "lv"):
        assert result.best_dice[name] > 0.4, result.best_dice


def test_default_instance_norm_model_learns(shards, tmp_path):
    """The default network (instance normalization, Adam 2e-3 at batch 8, flattened contrast in the
    poor-acquisition bundle) learns every class in 80 steps."""
    tiny = {**TINY, "norm": "instance"}
    result = train(shards, tmp_path / "run", epochs=8, steps_per_epoch=10, **tiny)
    assert result.best_dice["mean"] > 0.3, result.best_dice
    for name in ("rv", "myo", "lv"):
        assert result.best_dice[name] > 0.4, result.best_dice


def test_training_without_validation_finishes(shards, tmp_path):
    """``--val-fraction 0`` trains on every case; nothing to validate must not crash (#14.10)."""
    assert main([str(shards), str(tmp_path / "run"), "--epochs", "2", "--steps-per-epoch", "2",
                 "--filters", "8", "16", "--val-fraction", "0", "--collapse-patience", "0"]) == 0
    rows = read_history(tmp_path / "run")
    assert len(rows) == 2 and (tmp_path / "run" / "best.keras").exists()
    # the defaults, as resolved, are on record: instance normalization at its learning rate and batch
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert config["norm"] == "instance" and config["lr"] == pytest.approx(2e-3)
    assert config["batch_size"] == 8 and config["class_weights"] is None  # unweighted CE + Dice
    assert config["augment"]["p_flatten"] == 1.0  # poor acquisitions get flattened contrast too
    net = keras.saving.load_model(tmp_path / "run" / "best.keras")
    assert any(type(layer).__name__ == "GroupNormalization" and layer.name.endswith("_in1") for layer in net.layers)


@pytest.mark.parametrize("flags, norm, lr, batch, weights, flatten", [
    (["--norm", "batch"], "batch", 1e-3, 16, "store", 0.0),
    (["--no-batch-norm"], "none", 1e-3, 16, "store", 0.0),
    (["--batch-size", "16", "--class-weights", "store"], "instance", 3e-3, 16, "store", 1.0),
    (["--lr", "5e-4", "--batch-size", "4", "--flatten-contrast", "0"], "instance", 5e-4, 4, None, 0.0),
    (["--norm", "batch", "--no-class-weights", "--flatten-contrast", "0.5"], "batch", 1e-3, 16, None, 0.5)])
def test_train_cli_norm_and_learning_rate(shards, tmp_path, flags, norm, lr, batch, weights, flatten):
    """--norm picks the normalization; learning rate, batch size, class weights and the flattened
    contrast follow it unless given."""
    assert main([str(shards), str(tmp_path / "run"), "--epochs", "1", "--steps-per-epoch", "1",
                 "--filters", "8", "16", *flags]) == 0
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    net = keras.saving.load_model(tmp_path / "run" / "last.keras")
    kinds = {type(layer).__name__ for layer in net.layers if layer.name != "input_norm"}
    assert config["norm"] == norm or config["batch_norm"] is False
    assert config["lr"] == pytest.approx(lr) and config["batch_size"] == batch
    assert config["class_weights"] == weights
    assert config["augment"]["p_flatten"] == flatten
    assert ("BatchNormalization" in kinds) == (norm == "batch")
    assert ("GroupNormalization" in kinds) == (norm == "instance")


def _users_own_net(h, w):
    """Not cmrprep's U-Net: a small encoder-decoder with a softmax head, as a user might bring."""
    import keras

    inp = keras.Input((None, None, 1))
    a = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
    b = keras.layers.MaxPooling2D()(a)
    b = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(b)
    b = keras.layers.UpSampling2D()(b)
    c = keras.layers.Concatenate()([a, b])
    c = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(c)
    return keras.Model(inp, keras.layers.Conv2D(4, 1, activation="softmax")(c), name="users_net")


def test_train_accepts_a_users_model_object_and_file(shards, tmp_path):
    """#13: train(model=...) with a user-built network (softmax head -> from_logits False)."""
    from pipelines.train import main as train_main

    net = _users_own_net(32, 32)
    result = train(shards, tmp_path / "run", epochs=8, steps_per_epoch=10, lr=3e-3, model=net,
                   batch_size=8, verbose=0)
    for name in ("rv", "myo", "lv"):
        assert result.best_dice[name] > 0.3, result.best_dice
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert "users_net" in config["model"] and config["from_logits"] is False
    saved = tmp_path / "mine.keras"
    _users_own_net(32, 32).save(saved)
    code = train_main([str(shards), str(tmp_path / "run2"), "--model", str(saved), "--epochs", "1",
                       "--steps-per-epoch", "2", "--batch-size", "4"])
    assert code == 0 and (tmp_path / "run2" / "best.keras").exists()
    import keras

    wrong = keras.Model(i := keras.Input((64, 64, 1)), keras.layers.Conv2D(4, 1)(i))
    with pytest.raises(Exception, match="input shape"):
        train(shards, tmp_path / "run3", epochs=1, steps_per_epoch=1, model=wrong, verbose=0)
    assert train_main([str(shards), str(tmp_path / "run4"), "--model", str(tmp_path / "nope.keras")]) == 2


def test_poly_decay_follows_epochs_or_the_clock_whichever_is_further():
    """The default schedule anneals toward the end of the budget, epochs or minutes."""
    from model.train import PolyDecay

    by_epochs = PolyDecay(1e-3, epochs=10, steps=4)
    assert by_epochs.rate(0, 0, now=0.0) == pytest.approx(1e-3)
    rates = [by_epochs.rate(e, b, now=0.0) for e in range(10) for b in range(4)]
    assert all(a > b for a, b in zip(rates, rates[1:]))  # strictly decreasing
    assert by_epochs.rate(10, 0, now=0.0) == pytest.approx(1e-5)  # the floor, never 0
    timed = PolyDecay(1e-3, epochs=1000, steps=4, start=100.0, deadline=200.0)
    assert timed.rate(1, 0, now=150.0) == pytest.approx(1e-3 * 0.5 ** 0.9)
    assert timed.rate(1, 0, now=250.0) == pytest.approx(1e-5)


def test_training_runs_with_the_schedule_off_and_rejects_an_unknown_one(shards, tmp_path):
    from cmrprep.plan import ConfigError

    with pytest.raises(ConfigError, match="lr_schedule"):
        train(shards, tmp_path / "bad", epochs=1, lr_schedule="cosine", **TINY)
    assert main([str(shards), str(tmp_path / "run"), "--epochs", "1", "--steps-per-epoch", "1",
                 "--filters", "8", "16", "--lr-schedule", "constant"]) == 0
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert config["lr_schedule"] == "constant"
