"""Tests for model.py: SegNet's architecture, pooling indices, and the weights file."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import ROOT

import model
from osmseg.classes import parse_classes
from osmseg.errors import WeightsError

CLASSES = parse_classes(
    json.dumps(
        [
            {"name": "building", "color": "#010101", "filter": "[building] = 'yes'"},
            {"name": "water", "color": "#020202", "filter": "[natural] = 'water'"},
        ]
    )
)


def tiny(name="segnet", size=32, **options):
    return model.build(name, CLASSES.num_classes, input_size=size, width=0.125, seed=1, **options)


def config_for(m, name="segnet", size=32, **extra):
    return {
        "name": name,
        "width": 0.125,
        "input_size": size,
        "num_classes": CLASSES.num_classes,
        "classes": CLASSES.to_json(),
        "mixed_precision": False,
        **extra,
    }


def images(n=2, size=32, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


# --- NumPy references -------------------------------------------------------------------


def reference_pool(x):
    """2×2 max pooling and the first-maximum mask, by plain loops over windows."""
    batch, height, width, depth = x.shape
    pooled = np.zeros((batch, height // 2, width // 2, depth), x.dtype)
    mask = np.zeros_like(x)
    for b in range(batch):
        for i in range(height // 2):
            for j in range(width // 2):
                for c in range(depth):
                    window = x[b, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, c].ravel()
                    first = int(np.argmax(window))  # numpy: first of equal maxima
                    pooled[b, i, j, c] = window[first]
                    mask[b, 2 * i + first // 2, 2 * j + first % 2, c] = 1
    return pooled, mask


def expected_parameters(blocks, num_classes):
    """Trainable parameters of a SegNet with these (filters, convs) blocks, counted by hand."""
    total, previous = 0, 3

    def conv(cin, cout, k=3):
        return k * k * cin * cout + cout + 2 * cout  # kernel, bias, BN gamma and beta

    for filters, convs in blocks:
        for _ in range(convs):
            total += conv(previous, filters)
            previous = filters
    for number in range(len(blocks), 0, -1):
        filters, convs = blocks[number - 1]
        narrowed = blocks[number - 2][0] if number > 1 else filters
        for index in range(convs):
            out = narrowed if index == convs - 1 else filters
            total += conv(previous, out)
            previous = out
    return total + previous * num_classes + num_classes


# --- Architecture -----------------------------------------------------------------------


@pytest.mark.parametrize("name", model.MODELS)
def test_output_is_a_float32_softmax_of_the_input_size(name):
    m = tiny(name)
    y = np.asarray(m(images(), training=False))
    assert y.shape == (2, 32, 32, CLASSES.num_classes)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", model.MODELS)
def test_parameter_count_matches_the_architecture_table(name):
    m = tiny(name)
    blocks = [(model.channels(f, 0.125), n) for f, n in model.ARCHITECTURES[name]]
    assert model.parameter_count(m) == expected_parameters(blocks, CLASSES.num_classes)
    convs = [layer for layer in m.layers if layer.__class__.__name__ == "Conv2D"]
    # 13 + 13 convolutions and the classifier for segnet, 4 + 4 + 1 for segnet-basic
    assert len(convs) == 2 * sum(n for _, n in model.ARCHITECTURES[name]) + 1


def test_segnet_at_width_one_has_the_papers_29_5_million_parameters(segnet_vgg):
    m, _ = segnet_vgg
    count = model.parameter_count(m)
    assert count == expected_parameters(model.VGG16_BLOCKS, CLASSES.num_classes)
    assert 29.3e6 < count < 29.7e6  # SegNet paper, table 6: 29.5 M


def test_flops_count_convolutions():
    m = model.build("segnet-basic", 2, input_size=16, width=0.125)
    # 8, 16, 32, 64 channels at 16, 8, 4, 2 pixels; decoder 32, 16, 8, 8; classifier 8 -> 2
    macs = 9 * (16 * 16 * 3 * 8 + 8 * 8 * 8 * 16 + 4 * 4 * 16 * 32 + 2 * 2 * 32 * 64)
    macs += 9 * (2 * 2 * 64 * 32 + 4 * 4 * 32 * 16 + 8 * 8 * 16 * 8 + 16 * 16 * 8 * 8)
    macs += 16 * 16 * 8 * 2
    assert model.flops_per_image(m) == 2 * macs


@pytest.mark.parametrize(
    "filters,width,expected", [(64, 1.0, 64), (64, 0.125, 8), (512, 0.1, 48), (64, 0.1, 6), (64, 0.001, 1)]
)
def test_width_multiplier_rounds_channels(filters, width, expected):
    assert model.channels(filters, width) == expected


@pytest.mark.parametrize("name,size,nearest", [("segnet", 48, "32 and 64"), ("segnet-basic", 40, "32 and 48")])
def test_input_size_must_divide_by_the_poolings(name, size, nearest):
    with pytest.raises(ValueError, match=f"input size {size}.*{nearest}"):
        model.build(name, 3, input_size=size, width=0.125)


def test_unknown_model_and_option_are_named():
    with pytest.raises(ValueError, match="'unet'.*segnet, segnet-basic"):
        model.build("unet", 3)
    with pytest.raises(ValueError, match="encoder_weight"):
        model.build("segnet", 3, encoder_weight="imagenet")


def test_a_seed_makes_the_initial_weights_reproducible():
    before = np.random.get_state()[1].copy()
    a, b = tiny("segnet-basic"), tiny("segnet-basic")
    # the seed goes to the initialisers: global random state (numpy's, here) is not reseeded
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    c = model.build("segnet-basic", CLASSES.num_classes, input_size=32, width=0.125, seed=2)
    assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])


def test_mixed_precision_falls_back_to_float32_without_bfloat16_instructions(monkeypatch):
    monkeypatch.setattr(model, "_has_gpu", lambda: False)
    monkeypatch.setattr(model, "_cpu_has_bfloat16", lambda: False)
    with pytest.warns(UserWarning, match="no bfloat16"):
        assert model.dtype_policy(True) == "float32"
    monkeypatch.setattr(model, "_cpu_has_bfloat16", lambda: True)
    assert model.dtype_policy(True) == "mixed_bfloat16"
    monkeypatch.setattr(model, "_has_gpu", lambda: True)
    assert model.dtype_policy(True) == "mixed_float16"
    assert model.dtype_policy(False) == "float32"
    with pytest.raises(ValueError, match="'half'"):
        model.dtype_policy("half")


def test_float16_training_gets_loss_scaling_and_bfloat16_does_not():
    import keras

    sgd = keras.optimizers.SGD()
    assert isinstance(model.training_optimizer(sgd, "mixed_float16"), keras.optimizers.LossScaleOptimizer)
    assert model.training_optimizer(sgd, "mixed_bfloat16") is sgd
    assert model.training_optimizer(sgd, False) is sgd


def test_model_config_round_trips_through_keras_serialisation():
    import keras

    m = tiny("segnet-basic")
    clone = keras.Model.from_config(m.get_config())
    clone.set_weights(m.get_weights())
    x = images()
    np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(m(x)))


# --- Pooling indices --------------------------------------------------------------------


def pool_layers():
    return model._layers()[:2]


def test_pooling_and_unpooling_match_a_numpy_reference():
    Pool, Unpool = pool_layers()
    # Small integers make ties common, as ReLU zeros do in a real network.
    x = np.random.RandomState(3).randint(0, 4, (2, 6, 8, 3)).astype("float32")
    pooled, mask = Pool()(x)
    want_pooled, want_mask = reference_pool(x)
    np.testing.assert_array_equal(np.asarray(pooled), want_pooled)
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    values = np.random.RandomState(4).randn(*want_pooled.shape).astype("float32")
    unpooled = np.asarray(Unpool()([values, mask]))
    want = np.repeat(np.repeat(values, 2, axis=1), 2, axis=2) * want_mask
    np.testing.assert_array_equal(unpooled, want)


def test_ties_go_to_exactly_one_position_the_first():
    Pool, _ = pool_layers()
    x = np.zeros((1, 4, 4, 2), "float32")
    x[0, 2:, 2:, 1] = 5.0  # a window whose four values tie at 5
    _, mask = Pool()(x)
    mask = np.asarray(mask)
    windows = mask.reshape(1, 2, 2, 2, 2, 2).sum(axis=(2, 4))
    np.testing.assert_array_equal(windows, np.ones((1, 2, 2, 2)))
    assert mask[0, 0, 0, 0] == mask[0, 2, 2, 1] == 1


def test_pooling_keeps_negative_maxima_and_bfloat16():
    import keras

    Pool, _ = pool_layers()
    x = -np.arange(1, 1 + 2 * 4 * 4 * 3, dtype="float32").reshape(2, 4, 4, 3)
    pooled, mask = Pool(dtype="mixed_bfloat16")(x)
    want_pooled, want_mask = reference_pool(x.astype("float32"))
    assert keras.backend.standardize_dtype(pooled.dtype) == "bfloat16"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.ops.cast(mask, "float32")), want_mask)
    pooled = keras.ops.convert_to_numpy(keras.ops.cast(pooled, "float32"))
    np.testing.assert_allclose(pooled, want_pooled, rtol=1e-2)


def test_gradients_flow_through_pooling_to_the_maxima_only():
    import tensorflow as tf

    Pool, Unpool = pool_layers()
    pool, unpool = Pool(), Unpool()
    rng = np.random.RandomState(5)
    x = tf.constant(rng.permutation(2 * 4 * 6 * 3).reshape(2, 4, 6, 3).astype("float32"))  # no ties
    r = tf.constant(rng.randn(2, 4, 6, 3).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        pooled, mask = pool(x)
        y = unpool([pooled * 2.0, mask])
        loss = tf.reduce_sum(y * r)
    gradient = tape.gradient(loss, x).numpy()
    _, want_mask = reference_pool(x.numpy())
    # y = 2·x at the maxima and 0 elsewhere, so dloss/dx = 2·r there and 0 elsewhere.
    np.testing.assert_allclose(gradient, 2.0 * r.numpy() * want_mask, rtol=1e-6)


def test_gradients_reach_the_input_and_every_trainable_variable():
    import tensorflow as tf

    m = tiny("segnet")
    x = tf.constant(images())
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(m(x, training=True)[..., 1])
    gradients = tape.gradient(loss, [x] + m.trainable_variables)
    assert float(tf.reduce_max(tf.abs(gradients[0]))) > 0
    dead = [v.path for v, g in zip(m.trainable_variables, gradients[1:]) if g is None]
    assert dead == []


def test_fused_batch_norm_matches_keras_batch_norm():
    import keras

    BatchNormalization = model._layers()[2]
    x = np.random.RandomState(6).randn(4, 6, 6, 5).astype("float32") * 3 + 1
    ours, theirs = BatchNormalization(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
    ours.build(x.shape)
    theirs.build(x.shape)
    for training in (False, True):  # inference first, while both hold the initial statistics
        np.testing.assert_allclose(np.asarray(ours(x, training=training)), np.asarray(theirs(x, training=training)), atol=1e-4)
    np.testing.assert_allclose(ours.moving_mean.numpy(), theirs.moving_mean.numpy(), rtol=1e-5)
    # TensorFlow updates the moving variance with the unbiased batch variance: n / (n - 1)
    n = 4 * 6 * 6
    batch_variance = x.reshape(-1, 5).var(axis=0)
    np.testing.assert_allclose(ours.moving_variance.numpy(), 0.9 + 0.1 * batch_variance * n / (n - 1), rtol=1e-4)


# --- Training and precision -------------------------------------------------------------


def test_one_training_step_on_cpu_gives_a_finite_loss_and_moves_the_weights():
    import keras

    m = tiny("segnet-basic")
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    before = [np.array(w) for w in m.get_weights()]
    x = images(4)
    y = np.random.RandomState(1).randint(0, CLASSES.num_classes, (4, 32, 32)).astype("int32")
    weight = np.ones((4, 32, 32), "float32")
    history = m.fit(x, y, sample_weight=weight, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(a, b) for a, b in zip(before, m.get_weights()))


def test_mixed_precision_computes_in_bfloat16_and_outputs_float32():
    import keras

    m = tiny("segnet-basic", mixed_precision="mixed_bfloat16")  # explicit: any CPU can run it
    assert m.get_layer("encoder1_conv1").compute_dtype == "bfloat16"
    assert m.get_layer("encoder1_conv1").kernel.dtype == "float32"
    y = m(images())
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left alone


# --- weights.hdf5 -----------------------------------------------------------------------


def test_save_then_load_predicts_bit_exactly(tmp_path):
    m = tiny("segnet")
    # Move every variable, batch-norm statistics included, off its initial value.
    rng = np.random.RandomState(2)
    for variable in m.weights:
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    path = tmp_path / "weights.hdf5"
    model.save(m, path, config_for(m, epochs=3))
    loaded, config = model.load(path)
    x = images(3, seed=9)
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), np.asarray(m(x, training=False)))
    assert config["epochs"] == 3 and config["name"] == "segnet"
    assert model.read_config(path) == config
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_weights_file_layout_is_documented_names(tmp_path):
    m = tiny("segnet-basic")
    path = tmp_path / "weights.hdf5"
    model.save(m, path, config_for(m, "segnet-basic"))
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "osmseg-weights"
        assert f["encoder1_conv1/kernel"].shape == (3, 3, 3, 8)
        assert f["decoder1_bn1/moving_variance"].shape == (8,)
        assert f["classifier/kernel"].shape == (1, 1, 8, CLASSES.num_classes)
        assert len(json.loads(f.attrs["variables"])) == len(m.weights)


def test_load_at_another_input_size(tmp_path):
    m = tiny("segnet")
    path = tmp_path / "weights.hdf5"
    model.save(m, path, config_for(m))
    bigger, config = model.load(path, input_size=64)
    assert bigger.input_shape == (None, 64, 64, 3) and config["input_size"] == 32
    assert bigger(images(1, 64)).shape == (1, 64, 64, CLASSES.num_classes)
    for a, b in zip(bigger.get_weights(), m.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_missing_corrupt_and_foreign_files_say_which(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        model.load(tmp_path / "absent.hdf5")
    garbage = tmp_path / "garbage.hdf5"
    garbage.write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(WeightsError, match="not a readable HDF5 file"):
        model.load(garbage)
    foreign = tmp_path / "keras.weights.h5"
    with h5py.File(foreign, "w") as f:
        f["layers/conv2d/vars/0"] = np.zeros((3, 3, 3, 8), "float32")
    with pytest.raises(WeightsError, match="not an osmseg weights file"):
        model.read_config(foreign)


def test_truncated_file_is_reported_as_corrupt(tmp_path):
    m = tiny("segnet-basic")
    path = tmp_path / "weights.hdf5"
    model.save(m, path, config_for(m, "segnet-basic"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt"):
        model.load(path)


def test_edited_variable_shape_is_named(tmp_path):
    m = tiny("segnet-basic")
    path = tmp_path / "weights.hdf5"
    model.save(m, path, config_for(m, "segnet-basic"))
    with h5py.File(path, "a") as f:
        del f["decoder2_conv1/kernel"]
        f["decoder2_conv1/kernel"] = np.zeros((3, 3, 16, 9), "float32")
    with pytest.raises(WeightsError, match="decoder2_conv1/kernel has shape"):
        model.load(path)


def test_other_architecture_or_classes_are_named(tmp_path):
    m = tiny("segnet-basic")
    path = tmp_path / "weights.hdf5"
    model.save(m, path, config_for(m, "segnet-basic"))
    with pytest.raises(WeightsError, match="architecture 'segnet-basic', expected 'segnet'"):
        model.load(path, expect={"name": "segnet"})
    with pytest.raises(WeightsError, match="number of classes 3, expected 7"):
        model.load(path, expect={"num_classes": 7})
    other = parse_classes(json.dumps([{"name": "road", "color": "#010101", "filter": "[highway]"}]))
    with pytest.raises(WeightsError, match=r"trained for classes \['background', 'building', 'water'\]"):
        model.check_compatible(model.read_config(path), {"classes": other}, str(path))
    model.check_compatible(model.read_config(path), {"classes": CLASSES, "num_classes": 3})


def test_save_refuses_an_incomplete_or_inconsistent_config(tmp_path):
    m = tiny("segnet-basic")
    config = config_for(m, "segnet-basic")
    del config["classes"]
    with pytest.raises(ValueError, match="lacks classes"):
        model.save(m, tmp_path / "weights.hdf5", config)
    one_class = json.dumps([{"name": "road", "color": "#010101"}])
    with pytest.raises(ValueError, match="outputs"):
        model.save(m, tmp_path / "weights.hdf5", {**config_for(m), "num_classes": 2, "classes": one_class})
    assert not list(tmp_path.iterdir())


# --- Encoder initialisation -------------------------------------------------------------


def write_keras_vgg16_file(path, seed=0):
    """A file in the layout of Keras's downloaded VGG16 notop weights, with random values."""
    rng = np.random.RandomState(seed)
    layer_names, previous = [], 3
    with h5py.File(path, "w") as f:
        for block, (filters, convs) in enumerate(model.VGG16_BLOCKS, start=1):
            for index in range(1, convs + 1):
                name = f"block{block}_conv{index}"
                group = f.create_group(name)
                names = [f"{name}/kernel:0", f"{name}/bias:0"]
                group[names[0]] = rng.standard_normal((3, 3, previous, filters)).astype("float32")
                group[names[1]] = rng.standard_normal(filters).astype("float32")
                group.attrs["weight_names"] = [n.encode() for n in names]
                layer_names.append(name)
                previous = filters
            pool = f"block{block}_pool"
            f.create_group(pool).attrs["weight_names"] = []
            layer_names.append(pool)
        f.attrs["layer_names"] = [n.encode() for n in layer_names]


@pytest.fixture(scope="module")
def segnet_vgg(tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_keras_vgg16_file(path)
    return model.build("segnet", CLASSES.num_classes, input_size=32, encoder_weights=str(path)), path


def test_encoder_weights_from_a_keras_vgg16_file(segnet_vgg):
    m, path = segnet_vgg
    with h5py.File(path, "r") as f:
        first = f["block1_conv1/block1_conv1/kernel:0"][()]
        last = f["block5_conv3/block5_conv3/bias:0"][()]
    # VGG16 saw blue-green-red: the first kernel's input channels are reversed for RGB.
    np.testing.assert_array_equal(m.get_layer("encoder1_conv1").kernel.numpy(), first[:, :, ::-1, :])
    np.testing.assert_array_equal(m.get_layer("encoder5_conv3").bias.numpy(), last)


def test_encoder_weights_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        model.build("segnet", 3, input_size=32, encoder_weights=str(tmp_path / "absent.h5"))
    with pytest.raises(ValueError, match="width 1"):
        model.build("segnet", 3, input_size=32, width=0.5, encoder_weights="imagenet")
    short = tmp_path / "short.h5"
    with h5py.File(short, "w") as f:
        f.create_group("block1_conv1").attrs["weight_names"] = [b"k", b"b"]
        f["block1_conv1/k"] = np.zeros((3, 3, 3, 64), "float32")
        f["block1_conv1/b"] = np.zeros(64, "float32")
        f.attrs["layer_names"] = [b"block1_conv1"]
    with pytest.raises(WeightsError, match="found 1 convolutions"):
        model.build("segnet", 3, input_size=32, encoder_weights=str(short))


def test_imagenet_weights_are_read_from_keras_cache_without_a_download(tmp_path, monkeypatch):
    # Keras 3's save_weights writes only .weights.h5; save_weights_to_hdf5_group writes the
    # Keras 2 layout that keras.applications publishes its VGG16 files in (layer_names, weight_names).
    import keras
    from keras.src.applications import vgg16
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    assert vgg16.WEIGHTS_PATH_NO_TOP == model.VGG16_NOTOP_URL  # the file Keras's get_file caches
    vgg = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    for layer in vgg.layers:  # biases start at zero: make them tell the layers apart too
        if isinstance(layer, keras.layers.Conv2D):
            layer.bias.assign(np.random.default_rng(len(layer.name)).normal(size=layer.bias.shape))
    (tmp_path / "models").mkdir()
    with h5py.File(tmp_path / "models" / model.VGG16_NOTOP, "w") as f:
        save_weights_to_hdf5_group(f, vgg)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download though the cache holds the file")

    monkeypatch.setattr(keras.utils, "get_file", no_download)
    m = model.build("segnet", 3, input_size=32, encoder_weights="imagenet")
    sources = [layer for layer in vgg.layers if isinstance(layer, keras.layers.Conv2D)]
    blocks = enumerate(model.VGG16_BLOCKS, start=1)
    targets = [m.get_layer(f"encoder{block}_conv{index}") for block, (_, convs) in blocks for index in range(1, convs + 1)]
    assert len(sources) == len(targets) == 13
    for number, (source, target) in enumerate(zip(sources, targets)):
        kernel = source.kernel.numpy()
        # VGG16 saw blue-green-red: the first kernel's input channels are reversed for RGB.
        np.testing.assert_array_equal(target.kernel.numpy(), kernel[:, :, ::-1] if number == 0 else kernel)
        np.testing.assert_array_equal(target.bias.numpy(), source.bias.numpy())


def test_imagenet_offline_says_it_needs_network_and_how_to_avoid_it(tmp_path, monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/vgg16.h5: None -- offline")  # noqa: TRY002

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(keras.utils, "get_file", offline)
    expected = re.escape(f"{tmp_path / 'models' / model.VGG16_NOTOP} is missing") + ".*needs network access.*PATH"
    with pytest.raises(WeightsError, match=expected):
        model.build("segnet", 3, input_size=32, encoder_weights="imagenet")


# --- Other backends ---------------------------------------------------------------------


BACKEND_CHECK = """
import numpy as np, keras, model
from keras import ops
m = model.build("segnet", 3, input_size=32, width=0.125, seed=0)
x = np.random.RandomState(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
y = np.asarray(m.predict(x, verbose=0))
assert y.shape == (2, 32, 32, 3) and abs(y.sum(-1) - 1).max() < 1e-4, y.shape

def loss(y_true, y_pred):  # flattened: Keras's loss on (B, H, W, C) fails backward on torch 2.13
    return keras.losses.sparse_categorical_crossentropy(ops.reshape(y_true, (-1,)), ops.reshape(y_pred, (-1, 3)))

m.compile(optimizer="adam", loss=loss)
history = m.fit(x, np.zeros((2, 32, 32), "int32"), verbose=0).history
assert np.isfinite(history["loss"][0]), history
Pool, Unpool, _ = model._layers()
tied = np.random.RandomState(3).randint(0, 4, (2, 6, 8, 3)).astype("float32")
_, mask = Pool()(tied)
per_window = ops.convert_to_numpy(mask).reshape(2, 3, 2, 4, 2, 3).sum(axis=(2, 4))
assert (per_window == 1).all(), per_window
print("ok", keras.backend.backend())
"""


def backend_python(package: str) -> str | None:
    """An interpreter with Keras and `package`: this one, or the bench venv (bench/requirements.txt)."""
    if importlib.util.find_spec(package) is not None:
        return sys.executable
    bench = ROOT / "bench" / ".venv" / "bin" / "python"
    if bench.exists():
        env = {**os.environ, "KERAS_BACKEND": package}
        probe = subprocess.run([str(bench), "-c", f"import keras, {package}"], env=env, capture_output=True, timeout=120, check=False)
        if probe.returncode == 0:
            return str(bench)
    return None


@pytest.mark.parametrize("backend,package", [("jax", "jax"), ("torch", "torch")])
def test_builds_trains_and_pools_on_another_keras_backend(backend, package):
    python = backend_python(package)
    if python is None:
        pytest.skip(f"no Python here has keras and {package} (neither .venv nor bench/.venv)")
    env = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run(
        [python, "-c", BACKEND_CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"ok {backend}" in result.stdout
