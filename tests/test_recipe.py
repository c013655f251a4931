"""The training recipe (osmseg/recipe.py and train.py's flags): schedule, losses, background
weight, colour jitter, batch-norm momentum, repeat-factor sampling and the time budget."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from test_train import CLASSES, NAMES, ROOT, TINY, _read_csv, _run, _state_arrays, make_cache

import model
from osmseg import cache, recipe, training

# --- Schedule -------------------------------------------------------------------------


def test_warmup_cosine_at_known_steps():
    schedule = recipe.warmup_cosine(0.01, warmup_steps=4, total_steps=14)
    value = lambda step: float(np.asarray(schedule(step)))  # noqa: E731
    assert value(0) == pytest.approx(0.0025)  # (0 + 1) / 4 of the peak: never 0
    assert value(2) == pytest.approx(0.0075)
    assert value(3) == pytest.approx(0.01)
    assert value(4) == pytest.approx(0.01)  # the cosine starts at the peak
    assert value(9) == pytest.approx((0.01 + 0.0001) / 2)  # half-way down
    assert value(14) == pytest.approx(0.0001)  # the floor, FLOOR of the peak
    assert value(40) == pytest.approx(0.0001)
    # Re-planned (as the time budget does): the same step is now earlier in the decay.
    schedule.total_steps.assign(24.0)
    assert value(14) == pytest.approx((0.01 + 0.0001) / 2)
    assert schedule.get_config()["total_steps"] == 24


def test_warmup_cosine_serialises_and_drives_both_optimizers():
    import keras

    schedule = recipe.warmup_cosine(0.02, warmup_steps=3, total_steps=10)
    schedule.total_steps.assign(12.0)
    copy = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert type(copy) is type(schedule) and copy.get_config() == schedule.get_config()
    for step in (0, 2, 3, 7, 12):
        assert float(np.asarray(copy(step))) == pytest.approx(float(np.asarray(schedule(step))))
    for optimizer in (keras.optimizers.SGD(schedule, momentum=0.9), keras.optimizers.Adam(schedule)):
        variable = keras.Variable(np.ones(2, np.float32))
        optimizer.build([variable])
        for _ in range(3):
            optimizer.apply_gradients([(np.ones(2, np.float32), variable)])
        # The log reads optimizer.learning_rate: the schedule's value at the iterations done.
        assert float(np.asarray(optimizer.learning_rate)) == pytest.approx(0.02)
        rebuilt = type(optimizer).from_config(optimizer.get_config())
        assert float(np.asarray(rebuilt.learning_rate)) == pytest.approx(0.02 / 3)  # step 0 of the warm-up


def test_constant_schedule_is_the_seeds_learning_rate():
    assert recipe.learning_rate("constant", 0.003, 27, 20, 1) == 0.003
    schedule = recipe.learning_rate("cosine", 0.003, 27, 20, 1)
    assert schedule.warmup_steps == 27 and float(np.asarray(schedule.total_steps)) == 540


# --- Losses ---------------------------------------------------------------------------

# Two classes, four counted pixels (truth 1, 1, 0, 0) and a fifth pixel labelled 255 (weight 0).
TRUTH = np.array([[[1, 1, 0, 0, 0]]], np.int32)
P1 = np.array([0.9, 0.4, 0.3, 0.0, 0.8], np.float32)
PREDICTED = np.stack([1 - P1, P1], axis=-1)[None, None]
WEIGHTS = np.array([[[1, 1, 1, 1, 0]]], np.float32)


def _value(loss, truth=TRUTH, predicted=PREDICTED, weights=WEIGHTS):
    return float(np.asarray(loss(truth, predicted, weights)))


def test_lovasz_softmax_on_a_hand_worked_case():
    # Class 1: errors 0.1, 0.6, 0.3, 0.0; in decreasing order (fg, bg, fg, bg) the Jaccard loss
    # of the first k mispredicted is 1/2, 2/3, 3/3, 4/4: gradient .5, 1/6, 1/3, 0
    # -> 0.6·.5 + 0.3/6 + 0.1/3 = 0.38333. Class 0 (truth 0, 0, 1, 1; same errors, order
    # bg, fg, bg, fg): 1/3, 2/3, 3/4, 1 -> 0.6/3 + 0.3/3 + 0.1/12 = 0.308333.
    expected = (0.383333 + 0.308333) / 2
    assert _value(lambda *a: recipe.lovasz_softmax(*a, num_classes=2)) == pytest.approx(expected, abs=1e-5)


def _lovasz_reference(truth, probabilities, weights):
    """Berman et al.'s Lovász-softmax, written from the paper with a sort: (value, gradient
    with respect to the probabilities)."""
    counted = weights.reshape(-1) > 0
    truth = truth.reshape(-1)[counted]
    probabilities = probabilities.reshape(-1, probabilities.shape[-1])[counted].astype(np.float64)
    values, gradient = [], np.zeros_like(probabilities)
    for c in range(probabilities.shape[1]):
        foreground = (truth == c).astype(np.float64)
        if not foreground.any():
            continue
        errors = np.abs(foreground - probabilities[:, c])
        order = np.argsort(-errors, kind="stable")
        size = foreground.sum()
        jaccard = 1 - (size - np.cumsum(foreground[order])) / (size + np.cumsum(1 - foreground[order]))
        increments = np.diff(jaccard, prepend=0.0)
        values.append(errors[order] @ increments)
        # d error / d p is -1 for foreground pixels, +1 for the others.
        gradient[order, c] = increments * np.where(foreground[order] > 0, -1.0, 1.0)
    full = np.zeros((counted.size, gradient.shape[1]))
    full[counted] = gradient / len(values)
    return float(np.mean(values)), full


def test_lovasz_softmax_matches_the_sorted_definition():
    import tensorflow as tf

    rng = np.random.default_rng(5)
    truth = rng.integers(0, 3, (2, 8, 8)).astype(np.int32)
    probabilities = rng.dirichlet(np.ones(3), (2, 8, 8)).astype(np.float32)
    weights = (rng.random((2, 8, 8)) > 0.25).astype(np.float32)
    variable = tf.Variable(probabilities)
    with tf.GradientTape() as tape:
        value = recipe.lovasz_softmax(truth, variable, weights, num_classes=3)
    gradient = tape.gradient(value, variable).numpy().reshape(-1, 3)
    expected_value, expected_gradient = _lovasz_reference(truth, probabilities, weights)
    # Binned into 1/4096 steps of the error: equal to the sorted definition but for pixels
    # whose errors share a bin, which share their increments (the largest is about 0.013).
    assert float(value) == pytest.approx(expected_value, abs=1e-5)
    np.testing.assert_allclose(gradient, expected_gradient, atol=5e-4)
    assert np.mean(np.abs(gradient - expected_gradient) < 1e-6) > 0.9
    assert (gradient[weights.reshape(-1) == 0] == 0).all()


def test_cross_entropy_is_keras_sparse_categorical_crossentropy():
    """Value and gradient, sample weights (zeros included) as Keras counts them."""
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(7)
    truth = rng.integers(0, 4, (2, 6, 6)).astype(np.int32)
    probabilities = rng.dirichlet(np.ones(4) * 0.5, (2, 6, 6)).astype(np.float32)
    probabilities[0, 0, 0] = [1.0, 0.0, 0.0, 0.0]  # a certain pixel: the clipping decides
    truth[0, 0, 0] = 3
    weights = np.where(rng.random((2, 6, 6)) < 0.3, 0.0, rng.choice([0.5, 2.0], (2, 6, 6))).astype(np.float32)
    results = []
    for loss in (recipe.cross_entropy, lambda *a: keras.losses.SparseCategoricalCrossentropy()(*a)):
        variable = tf.Variable(probabilities)
        with tf.GradientTape() as tape:
            value = loss(truth, variable, weights)
        results.append((float(value), tape.gradient(value, variable).numpy()))
    (ours, our_gradient), (theirs, their_gradient) = results
    assert ours == pytest.approx(theirs, rel=1e-5)
    # Keras's gradient adds the same constant to every class of a pixel (from the log-sum
    # it takes), which the softmax before it cancels; compare what is left.
    centred = [g - g.mean(axis=-1, keepdims=True) for g in (our_gradient, their_gradient)]
    np.testing.assert_allclose(centred[0], centred[1], rtol=1e-4, atol=1e-6)
    assert _value(recipe.segmentation_loss("ce", 2)) == pytest.approx(_value(keras.losses.SparseCategoricalCrossentropy()), rel=1e-5)


def test_soft_dice_on_a_hand_worked_case():
    # Class 1: 1 - 2·1.3 / (1.6 + 2); class 0: 1 - 2·1.7 / (2.4 + 2).
    expected = ((1 - 2.6 / 3.6) + (1 - 3.4 / 4.4)) / 2
    assert _value(lambda *a: recipe.soft_dice(*a, num_classes=2)) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("name", recipe.LOSSES)
def test_every_loss_ignores_pixels_of_weight_0(name):
    loss = recipe.segmentation_loss(name, 2)
    changed = PREDICTED.copy()
    changed[..., 4, :] = [0.99, 0.01]  # the ignored pixel, predicted otherwise
    truth = TRUTH.copy()
    truth[..., 4] = 0
    assert _value(loss) == pytest.approx(_value(loss, truth, changed), abs=1e-6)


@pytest.mark.parametrize("name", ["dice", "lovasz"])
def test_iou_losses_vanish_for_a_certain_right_answer(name):
    loss = recipe.segmentation_loss(name, 2)
    perfect = np.eye(2, dtype=np.float32)[TRUTH]
    assert _value(loss, predicted=perfect) == pytest.approx(0.0, abs=1e-6)
    assert _value(loss) > 0.1


def test_combined_loss_is_the_sum_of_its_terms():
    import keras

    ce = _value(keras.losses.SparseCategoricalCrossentropy())
    lovasz = _value(lambda *a: recipe.lovasz_softmax(*a, num_classes=2))
    assert _value(recipe.segmentation_loss("ce+lovasz", 2)) == pytest.approx(ce + lovasz, rel=1e-5)
    with pytest.raises(ValueError, match="choose one of"):
        recipe.segmentation_loss("focal", 2)


@pytest.mark.parametrize("name", ["ce+dice", "lovasz"])
def test_iou_terms_count_once_over_replicas(name):
    """Under tf.distribute every term is a replica's share: the replicas' losses sum to the
    average of the halves' losses, as Keras's cross-entropy does, not to R times a term."""
    script = textwrap.dedent(
        f"""
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from osmseg import recipe
        rng = np.random.default_rng(0)
        truth = rng.integers(0, 3, (2, 4, 4)).astype(np.int32)
        predicted = rng.dirichlet(np.ones(3), (2, 4, 4)).astype(np.float32)
        weights = (rng.random((2, 4, 4)) > 0.2).astype(np.float32)
        loss = recipe.segmentation_loss({name!r}, 3)
        alone = [float(loss(truth[i : i + 1], predicted[i : i + 1], weights[i : i + 1])) for i in range(2)]
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        halves = strategy.experimental_distribute_values_from_function(
            lambda context: tuple(tf.constant(a[context.replica_id_in_sync_group : context.replica_id_in_sync_group + 1])
                                  for a in (truth, predicted, weights)))
        summed = strategy.reduce("SUM", strategy.run(lambda t, p, w: loss(t, p, w), args=halves), axis=None)
        print(float(summed), sum(alone) / 2)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summed, expected = map(float, result.stdout.split()[-2:])
    assert summed == pytest.approx(expected, rel=1e-5)


# --- Background weight and jitter ------------------------------------------------------


def test_background_weight_scales_background_pixels_only(tmp_path):
    path, labels = make_cache(tmp_path / "training.hdf5", n=4)
    weights = recipe.background_weights([0.5, 2.0, 3.0], 3, 0.25)
    np.testing.assert_allclose(weights, [0.125, 2.0, 3.0])
    np.testing.assert_allclose(recipe.background_weights(None, 3, 0.5), [0.5, 1, 1])
    assert recipe.background_weights(None, 3, 1.0) is None  # 1: today's weights, untouched
    reader = cache.BatchReader(path, np.arange(4), 4, shuffle=False, class_weights=weights)
    _, _, sample_weight = reader[0]
    np.testing.assert_allclose(sample_weight[labels == 0], 0.125)
    np.testing.assert_allclose(sample_weight[labels == 1], 2.0)
    assert (sample_weight[labels == 255] == 0).all()


def test_colour_jitter_changes_images_only_and_reproducibly(tmp_path):
    path, _ = make_cache(tmp_path / "training.hdf5", n=6)
    plain = cache.BatchReader(path, np.arange(6), 3, augment=True, seed=3)
    jittered = cache.BatchReader(path, np.arange(6), 3, augment=True, seed=3, jitter=0.2)
    again = cache.BatchReader(path, np.arange(6), 3, augment=True, seed=3, jitter=0.2)
    for batch in range(2):
        (x0, y0, w0), (x1, y1, w1), (x2, _, _) = plain[batch], jittered[batch], again[batch]
        np.testing.assert_array_equal(y0, y1)  # the same turns and flips, labels untouched
        np.testing.assert_array_equal(w0, w1)
        np.testing.assert_array_equal(x1, x2)  # drawn from (seed, epoch, batch)
        assert not np.array_equal(x0, x1)
        assert x1.min() >= 0 and x1.max() <= 255
        # Per tile: mean brightness moves by at most about jitter × (1 + jitter / 2).
        ratio = x1.mean(axis=(1, 2, 3)) / x0.mean(axis=(1, 2, 3))
        assert (np.abs(ratio - 1) < 0.35).all()
    with pytest.raises(Exception, match="colour jitter"):
        cache.BatchReader(path, np.arange(6), 3, jitter=1.5)


def test_colour_jitter_is_contrast_about_the_mean_then_gains():
    from osmseg.cache.batches import jitter_colours

    rng = np.random.default_rng(2)
    image = rng.uniform(0, 255, (16, 24, 3)).astype(np.float32)
    draws = np.array([0.5, -0.8, 0.3, -1.0, 0.9])
    amount = 0.4
    brightness, contrast = 1 + amount * draws[0], 1 + amount * draws[1]
    gains = (1 + 0.5 * amount * draws[2:5]) * brightness
    mean = image.astype(np.float64).mean(axis=(0, 1))
    expected = np.clip(((image - mean) * contrast + mean) * gains, 0, 255)
    out = jitter_colours(image.copy(), draws, amount)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out, expected, atol=2e-3)
    assert (expected == 255).any()  # the case exercises the clipping


# --- Batch-norm momentum ---------------------------------------------------------------


def test_bn_momentum_reaches_every_batch_norm_and_survives_saving(tmp_path):
    import keras

    net = model.build("segnet-basic", 3, input_size=32, width=0.0625, bn_momentum=0.9)
    norms = [layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(layer.momentum == pytest.approx(0.9) for layer in norms)
    default = model.build("segnet-basic", 3, input_size=32, width=0.0625)
    assert {layer.momentum for layer in default.layers if isinstance(layer, keras.layers.BatchNormalization)} == {
        model.BN_MOMENTUM
    }
    config = {"name": "segnet-basic", "width": 0.0625, "input_size": 32, "num_classes": 3, "bn_momentum": 0.9,
              "classes": CLASSES.to_json(), "mixed_precision": False}  # fmt: skip
    model.save(net, tmp_path / "weights.hdf5", config)
    loaded, _ = model.load(tmp_path / "weights.hdf5")
    assert {layer.momentum for layer in loaded.layers if isinstance(layer, keras.layers.BatchNormalization)} == {0.9}


# --- Repeat-factor sampling ------------------------------------------------------------


def test_repeat_factors_on_a_hand_worked_case():
    # 4 tiles; class 0 in all, class 1 in half, class 2 in one, class 3 in none.
    presence = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]], bool)
    tiles, classes = recipe.repeat_factors(presence, 0.5)
    # r_c = max(1, sqrt(0.5 / f_c)): f = 1, 0.5, 0.25 -> 1, 1, sqrt(2); a class in no tile: 1.
    np.testing.assert_allclose(classes, [1, 1, np.sqrt(2), 1])
    np.testing.assert_allclose(tiles, [1, 1, np.sqrt(2), 1])  # a tile takes its rarest class's
    tiles, _ = recipe.repeat_factors(presence, 0.9)
    np.testing.assert_allclose(tiles, [np.sqrt(1.8), np.sqrt(1.8), np.sqrt(3.6), 1])
    with pytest.raises(ValueError, match="threshold"):
        recipe.repeat_factors(presence, 0)


def test_weighted_draw_gives_each_tile_its_share_within_one():
    weights = np.array([1.0, 2.5, 1.0, 0.5, 3.0])
    for offset in (0.0, 0.3, 0.999):
        drawn = cache.batches.weighted_draw(weights, 16, offset)
        assert len(drawn) == 16 and (np.diff(drawn) >= 0).all()
        counts = np.bincount(drawn, minlength=len(weights))
        expected = 16 * weights / weights.sum()  # 2.0, 5.0, 2.0, 1.0, 6.0
        assert (np.abs(counts - expected) < 1).all(), (offset, counts)
    # Equal weights: every tile exactly once, whatever the offset.
    np.testing.assert_array_equal(cache.batches.weighted_draw(np.ones(7), 7, 0.77), np.arange(7))


def test_tile_weights_draw_epochs_in_proportion_reproducibly(tmp_path):
    path, labels = make_cache(tmp_path / "training.hdf5", n=12)
    indices = np.array([11, 3, 5, 0, 7, 2, 9, 1])
    presence = training.tile_class_presence(path, indices, 3)
    # In the order given (the labels are read sorted), and blind to 255.
    for row, index in enumerate(indices):
        tile = labels[index]
        np.testing.assert_array_equal(presence[row], [(tile == c).any() for c in range(3)])
    weights = np.array([3.0, 1, 1, 1, 1, 1, 1, 1])
    reader = cache.BatchReader(path, indices, 4, seed=2, tile_weights=weights)
    again = cache.BatchReader(path, indices, 4, seed=2, tile_weights=weights)
    assert len(reader) == 2  # an epoch still reads as many tiles as there are
    seen = []
    for epoch in range(3):
        reader.set_epoch(epoch)
        again.set_epoch(epoch)
        order = reader.order()
        np.testing.assert_array_equal(order, again.order())  # from (seed, epoch) alone
        assert len(order) == 8 and set(order) <= set(indices)
        counts = {int(i): int((order == i).sum()) for i in indices}
        assert counts[11] in (2, 3)  # 8 × 3/10 = 2.4 draws
        assert all(counts[int(i)] <= 1 for i in indices[1:])  # 0.8 each
        seen.append(order)
    assert not np.array_equal(seen[0], seen[1])
    with pytest.raises(Exception, match="tile weights"):
        cache.BatchReader(path, indices, 4, tile_weights=[1.0, 2.0])
    with pytest.raises(Exception, match="shuffle"):
        cache.BatchReader(path, indices, 4, shuffle=False, tile_weights=weights)


def test_repeat_threshold_trains_and_is_a_setting_only_when_on(tmp_path, recipe_cache, capsys):
    weights, log = tmp_path / "weights.hdf5", tmp_path / "log.csv"
    flags = ["--data", recipe_cache, *TINY, "--epochs", "1", "--weights", weights, "--log", log]
    assert _run([*flags, "--repeat-threshold", "0.99"]) == 0
    assert "repeat-factor sampling (--repeat-threshold 0.99):" in capsys.readouterr().out
    assert training.read_state(training.state_path(weights)).settings["repeat_threshold"] == 0.99
    # A run that does not sample by repeat factors keeps the settings it had before the flag.
    plain = tmp_path / "plain.hdf5"
    assert _run([*flags[:-4], "--weights", plain, "--log", tmp_path / "plain.csv"]) == 0
    assert "repeat_threshold" not in training.read_state(training.state_path(plain)).settings
    # And resuming with another threshold is refused.
    assert _run([*flags, "--epochs", "2", "--resume", "--repeat-threshold", "0.5"]) == 2
    assert "repeat_threshold" in capsys.readouterr().err


# --- Training with the recipe ----------------------------------------------------------


@pytest.fixture(scope="module")
def recipe_cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("recipe") / "training.hdf5")[0]


class FakeClock:
    """30 s per reading; raises KeyboardInterrupt at reading number `interrupt` (1-based)."""

    def __init__(self, interrupt=None):
        self.readings = itertools.count(1)
        self.interrupt = interrupt

    def __call__(self):
        reading = next(self.readings)
        if reading == self.interrupt:
            raise KeyboardInterrupt
        return 30.0 * reading


BUDGETED = [*TINY, "--epochs", "6", "--time-budget", "1.5", "--loss", "ce+dice", "--background-weight", "0.5"]


def test_time_budget_plans_stops_and_resumes_to_the_same_result(tmp_path, recipe_cache, monkeypatch, capsys):
    # Epoch 1 "takes" 30 s of a 90 s budget: 3 epochs of the 6 allowed.
    monkeypatch.setattr(recipe, "CLOCK", FakeClock())
    straight = tmp_path / "straight" / "weights.hdf5"
    straight_log = tmp_path / "straight" / "log.csv"
    straight.parent.mkdir()
    assert _run(["--data", recipe_cache, *BUDGETED, "--weights", straight, "--log", straight_log]) == 0
    assert "so the run trains 3 epochs" in capsys.readouterr().out
    rows = _read_csv(straight_log)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    # The cosine was re-planned to end with epoch 3: its last rate is the floor.
    assert float(rows[-1]["learning_rate"]) == pytest.approx(0.01 * recipe.FLOOR, rel=1e-3)
    assert float(rows[0]["learning_rate"]) == pytest.approx(0.01, rel=1e-3)  # after the warm-up epoch
    assert training.read_state(training.state_path(straight)).planned_epochs == 3

    # Killed at the start of epoch 3 (the clock's 4th reading), then resumed with a clock
    # that would plan otherwise: the recorded plan holds, and so does the result.
    split = tmp_path / "split" / "weights.hdf5"
    split_log = tmp_path / "split" / "log.csv"
    split.parent.mkdir()
    monkeypatch.setattr(recipe, "CLOCK", FakeClock(interrupt=4))
    with pytest.raises(KeyboardInterrupt):
        import train

        train.main([str(a) for a in ["--data", recipe_cache, *BUDGETED, "--weights", split, "--log", split_log]])
    assert len(_read_csv(split_log)) == 2
    monkeypatch.setattr(recipe, "CLOCK", lambda: 0.0)
    assert _run(["--data", recipe_cache, *BUDGETED, "--weights", split, "--log", split_log, "--resume"]) == 0
    a, b = _state_arrays(training.state_path(straight)), _state_arrays(training.state_path(split))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # Done by the plan: a further --resume trains nothing.
    assert _run(["--data", recipe_cache, *BUDGETED, "--weights", split, "--log", split_log, "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(_read_csv(split_log)) == 3


def test_the_seeds_recipe_stays_reachable(tmp_path, recipe_cache):
    weights, log = tmp_path / "weights.hdf5", tmp_path / "log.csv"
    seed_flags = ["--schedule", "constant", "--loss", "ce", "--no-augment", "--bn-momentum", "0.99"]
    assert _run(["--data", recipe_cache, *TINY, "--epochs", "2", *seed_flags, "--weights", weights, "--log", log]) == 0
    assert all(float(row["learning_rate"]) == pytest.approx(0.01) for row in _read_csv(log))
    with h5py.File(training.state_path(weights), "r") as file:
        settings = file.attrs["settings"]
    assert '"schedule": "constant"' in settings and '"augment": false' in settings and '"jitter": 0.0' in settings
    assert '"bn_momentum": 0.99' in settings and NAMES[0] == "background"


def test_lovasz_and_sgd_train_through_fit_on_the_cosine(tmp_path, recipe_cache):
    """The IoU term trains inside model.fit with SGD, and the log's learning rate is the
    schedule's at each epoch's end: the peak after the warm-up epoch, half-way, the floor."""
    weights, log = tmp_path / "weights.hdf5", tmp_path / "log.csv"
    flags = [*TINY, "--optimizer", "sgd", "--learning-rate", "0.05", "--epochs", "3", "--loss", "ce+lovasz"]
    assert _run(["--data", recipe_cache, *flags, "--weights", weights, "--log", log]) == 0
    rows = _read_csv(log)
    rates = [float(row["learning_rate"]) for row in rows]
    peak, low = 0.05, 0.05 * recipe.FLOOR
    assert rates == pytest.approx([peak, (peak + low) / 2, low], rel=1e-4)
    assert all(np.isfinite(float(row["loss"])) for row in rows)
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
