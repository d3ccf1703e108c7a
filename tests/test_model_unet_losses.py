"""U-Net construction, sparse losses and numpy Dice metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

import keras

from cmrprep.plan import ConfigError
from model.losses import DiceCE, SoftDice, WeightedCrossEntropy, make_loss
from model.metrics import DiceAccumulator, confusion_counts, dice_from_confusion, mean_dice
from model.unet import build_unet, channels_last


def _labels(shape=(2, 8, 8), seed=0):
    return np.random.default_rng(seed).integers(0, 4, size=shape).astype(np.int32)


def test_unet_shapes_and_logits_layer():
    net = build_unet((32, 32, 1), filters=(8, 16, 32))
    assert net.output_shape == (None, 32, 32, 4)
    assert net.get_layer("logits").activation.__name__ == "linear"
    # the tests run on PyTorch: channels-first inside, channels-last at both ends
    assert net.get_layer("enc0_conv1").data_format == "channels_first"
    assert [layer.name for layer in net.layers[-2:]] == ["logits", "to_channels_last"]
    plain = build_unet((32, 32, 1), filters=(8, 16, 32), data_format="channels_last")
    assert plain.layers[-1].name == "logits" and "to_channels_first" not in [l.name for l in plain.layers]
    with pytest.raises(ConfigError, match="data_format"):
        build_unet((32, 32, 1), filters=(8, 16), data_format="NCHW")
    deep = build_unet((32, 32, 1), filters=(8, 16, 32, 64), filter_scale=0.5, depth=3,
                      upsampling="transpose", batch_norm=True)
    assert deep.get_layer("bottleneck_conv1").filters == 16


def test_unet_input_norm_makes_the_output_independent_of_the_slice_scale(tmp_path):
    """A site whose volume statistics put the heart at another z-level gets the same answer."""
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 1)).astype(np.float32)
    net = build_unet((32, 32, 1), filters=(8, 16, 32))
    ref = np.asarray(net.predict(x, verbose=0))
    np.testing.assert_allclose(np.asarray(net.predict(0.5 * x - 1.2, verbose=0)), ref, atol=1e-3)
    path = tmp_path / "net.keras"
    net.save(path)  # the normalisation travels with the saved model
    np.testing.assert_allclose(np.asarray(keras.saving.load_model(path).predict(4 * x + 2, verbose=0)),
                               ref, atol=1e-3)
    plain = build_unet((32, 32, 1), filters=(8, 16, 32), input_norm=False)
    assert "input_norm" not in [layer.name for layer in plain.layers]
    assert not np.allclose(np.asarray(plain.predict(0.3 * x - 1.2, verbose=0)),
                           np.asarray(plain.predict(x, verbose=0)), atol=1e-3)


def _norm_layers(net) -> set[str]:
    return {type(layer).__name__ for layer in net.layers if layer.name != "input_norm"
            and "Normalization" in type(layer).__name__}


def test_unet_norm_choices_build_their_layers():
    assert _norm_layers(build_unet((32, 32, 1), filters=(8, 16, 32))) == {"GroupNormalization"}  # default
    assert _norm_layers(build_unet((32, 32, 1), filters=(8, 16, 32), norm="batch")) == {"BatchNormalization"}
    assert _norm_layers(build_unet((32, 32, 1), filters=(8, 16, 32), batch_norm=True)) == {"BatchNormalization"}
    assert _norm_layers(build_unet((32, 32, 1), filters=(8, 16, 32), norm="none")) == set()
    assert _norm_layers(build_unet((32, 32, 1), filters=(8, 16, 32), batch_norm=False)) == set()
    # the convolutions carry a bias only where no normalisation follows them
    assert build_unet((32, 32, 1), filters=(8, 16), norm="none").get_layer("enc0_conv1").use_bias
    assert not build_unet((32, 32, 1), filters=(8, 16), norm="instance").get_layer("enc0_conv1").use_bias


def test_instance_norm_answers_each_slice_alone_and_as_in_training(tmp_path):
    """#12: a slice's answer depends on nothing but the slice: not on the batch, not on the mode."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 32, 32, 1)).astype(np.float32)
    x[2:] = 5.0 * x[2:] + 3.0  # two slices from "another site"
    net = build_unet((32, 32, 1), filters=(8, 16, 32), norm="instance")
    alone = np.concatenate([np.asarray(net.predict(x[i:i + 1], verbose=0)) for i in range(4)])
    np.testing.assert_allclose(np.asarray(net.predict(x, verbose=0)), alone, atol=1e-4)
    trained_mode = keras.ops.convert_to_numpy(net(x, training=True))
    np.testing.assert_allclose(trained_mode, alone, atol=1e-4)
    path = tmp_path / "in.keras"
    net.save(path)
    np.testing.assert_allclose(np.asarray(keras.saving.load_model(path).predict(x, verbose=0)), alone,
                               atol=1e-4)
    # batch normalisation does not have that property: training mode uses the batch's statistics
    bn = build_unet((32, 32, 1), filters=(8, 16, 32), norm="batch")
    assert not np.allclose(keras.ops.convert_to_numpy(bn(x, training=True)),
                           np.asarray(bn.predict(x, verbose=0)), atol=1e-3)


def test_unet_softmax_output_sums_to_one():
    net = build_unet((16, 16, 1), filters=(4, 8), output="softmax")
    out = net.predict_on_batch(np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype("float32"))
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"input_shape": (30, 30, 1)}, "divisible"),
    ({"output": "sigmoid"}, "output"),
    ({"depth": 9}, "depth"),
    ({"norm": "layer"}, "norm"),
])
def test_unet_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_unet(**{"input_shape": (32, 32, 1), "filters": (8, 16, 32), **kwargs})


def test_ce_of_uniform_prediction_is_ln4_whatever_the_weights():
    y = _labels()
    logits = np.zeros((2, 8, 8, 4), np.float32)
    for w in (None, [0.1, 1, 2, 3]):
        value = float(WeightedCrossEntropy(w)(y, logits))
        assert value == pytest.approx(math.log(4), rel=1e-5)
    probs = np.full((2, 8, 8, 4), 0.25, np.float32)
    assert float(WeightedCrossEntropy(from_logits=False)(y, probs)) == pytest.approx(math.log(4))


def test_weighted_ce_uses_pixel_class_weights():
    y = np.array([[[0, 1]]], np.int32)
    logits = np.zeros((1, 1, 2, 4), np.float32)
    logits[0, 0, 0, 0] = 10.0  # background pixel right, RV pixel uniform
    nll_rv = math.log(4)
    unweighted = float(WeightedCrossEntropy()(y, logits))
    weighted = float(WeightedCrossEntropy([0.0, 1, 1, 1])(y, logits))
    assert unweighted == pytest.approx(nll_rv / 2, rel=1e-3)
    assert weighted == pytest.approx(nll_rv, rel=1e-4)


def test_soft_dice_perfect_and_wrong():
    y = _labels((2, 8, 8, 1))  # a trailing 1 is accepted
    perfect = np.eye(4, dtype=np.float32)[y[..., 0]] * 20.0
    assert float(SoftDice()(y, perfect)) == pytest.approx(0.0, abs=1e-3)
    wrong = np.eye(4, dtype=np.float32)[(y[..., 0] + 1) % 4] * 20.0
    assert float(SoftDice()(y, wrong)) == pytest.approx(1.0, abs=1e-3)
    assert float(DiceCE()(y, perfect)) < 0.01


def test_make_loss_names_and_serialization():
    assert isinstance(make_loss("dice_ce", [0.1, 1, 1, 1]), DiceCE)
    assert make_loss("ce", None, from_logits=False).from_logits is False
    with pytest.raises(ConfigError, match="unknown loss"):
        make_loss("focal")
    with pytest.raises(ConfigError, match="class_weights"):
        make_loss("ce", [1, 1])
    loss = make_loss("dice_ce", [0.1, 1, 1, 1])
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(again, DiceCE) and again.class_weights == [0.1, 1.0, 1.0, 1.0]


def test_dice_from_confusion_handles_empty_classes():
    y = np.array([0, 1, 1, 2, 0])
    p = np.array([0, 1, 0, 2, 2])
    cm = confusion_counts(y, p, 4)
    d = dice_from_confusion(cm)
    assert d[0] == pytest.approx(2 / 3) and d[1] == pytest.approx(2 / 3) and np.isnan(d[2])
    assert mean_dice(d) == pytest.approx(2 / 3)
    assert np.isnan(mean_dice(np.array([np.nan])))


def test_accumulator_pred_fg_and_ce():
    acc = DiceAccumulator()
    y = np.zeros((1, 4, 4), np.int32)
    acc.update(y, np.zeros((1, 4, 4, 4)), from_logits=True)
    r = acc.result()
    assert r["pred_fg"] == 0.0 and r["ce"] == pytest.approx(math.log(4))
    assert all(np.isnan(r[k]) for k in ("dice_rv", "dice_myo", "dice_lv"))


@pytest.mark.parametrize("norm,upsampling,output", [("instance", "upsample", "logits"),
                                                    ("batch", "transpose", "softmax"),
                                                    ("none", "upsample", "softmax")])
def test_unet_layouts_compute_the_same_network(norm, upsampling, output):
    """Channels-first inside (PyTorch's native layout) changes speed, not the function."""
    x = np.random.default_rng(4).normal(size=(2, 32, 32, 1)).astype(np.float32)
    first = build_unet((32, 32, 1), filters=(8, 16, 32), norm=norm, upsampling=upsampling,
                       output=output, data_format="channels_first")
    last = build_unet((32, 32, 1), filters=(8, 16, 32), norm=norm, upsampling=upsampling,
                      output=output, data_format="channels_last")
    last.set_weights(first.get_weights())  # the same shapes in either layout
    ref = np.asarray(first.predict(x, verbose=0))
    np.testing.assert_allclose(np.asarray(last.predict(x, verbose=0)), ref, atol=1e-5)
    converted = channels_last(first)
    assert converted.get_layer("dec0_conv2").data_format == "channels_last"
    np.testing.assert_allclose(np.asarray(converted.predict(x, verbose=0)), ref, atol=1e-5)
    assert channels_last(last) is last  # nothing to convert


def test_channels_last_leaves_a_users_channels_first_model_alone():
    """Only build_unet's own layout layers mark a network it may rewrite."""
    inp = keras.Input((4, 16, 16))
    out = keras.layers.Conv2D(2, 3, padding="same", data_format="channels_first")(inp)
    net = keras.Model(inp, out)
    assert channels_last(net) is net
