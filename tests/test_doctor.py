"""pipelines.doctor on real saved Keras models and data files (#13)."""

import json

import keras
import numpy as np
import pytest

from pipelines.doctor import main as doctor_main


def _seed_unet(activation="softmax", size=256):
    """The seed's U-Net, verbatim in spirit: conv blocks, pooling, up-convolutions, softmax head."""
    inp = keras.Input((size, size, 1))
    c1 = keras.layers.Conv2D(8, 3, activation="relu", padding="same")(inp)
    p1 = keras.layers.MaxPooling2D()(c1)
    c2 = keras.layers.Conv2D(16, 3, activation="relu", padding="same")(p1)
    u1 = keras.layers.Conv2DTranspose(8, 2, strides=2, padding="same")(c2)
    m = keras.layers.Concatenate()([u1, c1])
    c3 = keras.layers.Conv2D(8, 3, activation="relu", padding="same")(m)
    return keras.Model(inp, keras.layers.Conv2D(4, 1, activation=activation)(c3))


def _masks(n=8, size=256, seed=0):
    """~97 % background at 256²: a small heart (RV, ring of myocardium, LV) per slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    y = np.zeros((n, size, size), np.uint8)
    k = size / 256  # heart size in proportion to the field of view
    for i in range(n):
        cy, cx = rng.integers(int(0.4 * size), int(0.6 * size), 2)
        r = np.hypot(yy - cy, xx - cx)
        y[i][np.hypot(yy - cy, xx - cx + 24 * k) < 12 * k] = 1
        y[i][(r >= 10 * k) & (r < 16 * k)] = 2
        y[i][r < 10 * k] = 3
    x = (y * 200.0 + rng.normal(300, 50, y.shape)).astype(np.float32)[..., None]  # scanner units
    return x, y


def _run(tmp_path, net, loss, x, y, optimizer=None, extra=()):
    net.compile(optimizer=optimizer or keras.optimizers.Adam(1e-3), loss=loss)
    model_path, data_path, report = tmp_path / "m.keras", tmp_path / "d.npz", tmp_path / "r.json"
    net.save(model_path)
    np.savez(data_path, x=x, y=y)
    code = doctor_main([str(model_path), str(data_path), "--json", str(report), *extra])
    return code, json.loads(report.read_text()) if report.exists() else None


def test_the_seeds_own_setup(tmp_path):
    """Softmax U-Net + 'sparse_categorical_crossentropy' + SGD(1e-4, 0.9) + to_categorical masks."""
    x, y = _masks()
    onehot = keras.utils.to_categorical(y, 4)
    code, report = _run(tmp_path, _seed_unet(), "sparse_categorical_crossentropy", x, onehot,
                        keras.optimizers.SGD(1e-4, momentum=0.9))
    assert code == 3
    codes = {f["code"]: f for f in report["findings"]}
    assert codes["onehot_with_sparse_loss"]["severity"] == "error"
    assert codes["slow_optimizer"]["severity"] == "warning" and "0.0001" in codes["slow_optimizer"]["message"]
    assert codes["class_imbalance"]["severity"] == "warning"
    assert "unnormalised_inputs" in codes
    if keras.config.backend() == "torch":  # Keras' sparse CE on probabilities cannot backprop there
        assert codes["torch_sparse_probabilities"]["severity"] == "error"
    assert report["stats"]["class_shares"][0] > 0.95
    assert all(f["fix"] for f in report["findings"])


def test_softmax_with_from_logits_is_an_error(tmp_path):
    x, y = _masks(4, 64)
    code, report = _run(tmp_path, _seed_unet(size=64),
                        keras.losses.SparseCategoricalCrossentropy(from_logits=True), x / 500, y)
    assert code == 3
    assert [f["code"] for f in report["findings"] if f["severity"] == "error"] == ["softmax_with_from_logits"]


def test_linear_output_with_a_string_loss_is_an_error(tmp_path):
    x, y = _masks(4, 64)
    code, report = _run(tmp_path, _seed_unet(None, 64), "sparse_categorical_crossentropy", x / 500, y)
    assert code == 3 and "logits_without_from_logits" in [f["code"] for f in report["findings"]]


@pytest.mark.parametrize("pairing", ["softmax_categorical_onehot", "logits_sparse_integer"])
def test_valid_pairings_have_no_error(tmp_path, pairing):
    x, y = _masks(4, 64)
    x = (x - x.mean()) / x.std()
    if pairing == "softmax_categorical_onehot":
        net, loss, labels = _seed_unet("softmax", 64), keras.losses.CategoricalCrossentropy(), \
            keras.utils.to_categorical(y, 4)
    else:
        net, loss, labels = _seed_unet(None, 64), \
            keras.losses.SparseCategoricalCrossentropy(from_logits=True), y
    code, report = _run(tmp_path, net, loss, x, labels, extra=("--probe-steps", "3"))
    assert code == 0, report["findings"]
    assert not [f for f in report["findings"] if f["severity"] == "error"]
    assert len(report["stats"]["probe_losses"]) == 3


def test_0_255_masks_and_float_masks(tmp_path):
    x, y = _masks(4, 64)
    code, report = _run(tmp_path, _seed_unet(None, 64),
                        keras.losses.SparseCategoricalCrossentropy(from_logits=True), x / 500,
                        (y * 85).astype(np.uint8))
    bad = {f["code"]: f for f in report["findings"]}
    assert code == 3 and "label-map" in bad["label_values_beyond_classes"]["fix"]
    code, report = _run(tmp_path, _seed_unet(None, 64),
                        keras.losses.SparseCategoricalCrossentropy(from_logits=True), x / 500,
                        y.astype(np.float32) * 0.5)
    assert code == 3 and "float_masks" in [f["code"] for f in report["findings"]]


def test_unreadable_inputs_exit_2(tmp_path, caplog):
    x, y = _masks(2, 64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    assert doctor_main([str(tmp_path / "broken.keras"), str(tmp_path / "d.npz")]) == 2
    assert "broken.keras" in caplog.text
    net = _seed_unet(None, 64)
    net.compile("adam", "mse")
    net.save(tmp_path / "ok.keras")
    np.savez(tmp_path / "wrong.npz", images=x)
    assert doctor_main([str(tmp_path / "ok.keras"), str(tmp_path / "wrong.npz")]) == 2
    assert doctor_main([str(tmp_path / "ok.keras"), str(tmp_path / "missing.npz")]) == 2


def test_a_store_and_a_raw_dataset_as_data(tmp_path):
    from pipelines.build import BuildConfig, build
    from pipelines.synthesize import synthesize

    synthesize(tmp_path / "raw", 2, 4, layout="acdc")
    build(BuildConfig(tmp_path / "raw", tmp_path / "out", workers=0, progress=False, report=False))
    inp = keras.Input((None, None, 1))
    net = keras.Model(inp, keras.layers.Conv2D(4, 1)(inp))
    net.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    net.save(tmp_path / "m.keras")
    assert doctor_main([str(tmp_path / "m.keras"), str(tmp_path / "out"), "--json", str(tmp_path / "s.json")]) == 0
    store = json.loads((tmp_path / "s.json").read_text())
    assert store["data_kind"] == "store" and store["stats"]["class_shares"][0] < 0.9  # cropped, oversampled
    assert doctor_main([str(tmp_path / "m.keras"), str(tmp_path / "raw"), "--json", str(tmp_path / "r.json")]) == 0
    raw = json.loads((tmp_path / "r.json").read_text())
    assert raw["data_kind"] == "raw" and "class_imbalance" in [f["code"] for f in raw["findings"]]


def test_the_torch_sparse_probabilities_finding_is_true():
    """The doctor's torch_sparse_probabilities claim, checked against the installed Keras/torch."""
    if keras.config.backend() != "torch":
        pytest.skip("the finding is specific to the torch backend")
    x, y = _masks(2, 32)
    net = _seed_unet("softmax", 32)
    net.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(RuntimeError, match="contiguous"):
        net.fit(x / 500, y, epochs=1, verbose=0)
