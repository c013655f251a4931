"""Tests for train.py and osmseg.training: a tiny fit, its log, resume, NaN, class weights,
the streaming metrics, two logical devices, and bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import train
from osmseg import cache, training
from osmseg.classes import parse_classes
from osmseg.cli import run
from osmseg.metrics import confusion_matrix, median_frequency_weights, scores

ROOT = Path(__file__).resolve().parent.parent
CLASSES = parse_classes(
    json.dumps([{"name": "building", "color": "#010101"}, {"name": "vegetation", "color": "#020202"}]),
    require_filters=False,
)
NAMES = CLASSES.names
SIZE = 32  # segnet-basic pools four times: 32 px leaves 2x2 at the bottom
TINY = [
    "--model",
    "segnet-basic",
    "--width",
    "0.0625",
    "--batch-size",
    "4",
    "--optimizer",
    "adam",
    "--learning-rate",
    "0.01",
]


def make_cache(path, n=12, size=SIZE, seed=0):
    """A cache in prepare.py cache's schema: rectangles of two classes on a background, a
    corner of ignore (255) in every tile, and images whose colour follows the label."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        for _ in range(3):
            y, x = rng.integers(0, size - 8, 2)
            h, w = rng.integers(4, 12, 2)
            labels[i, y : y + h, x : x + w] = rng.integers(1, 3)
        labels[i, :3, :3] = 255
    palette = np.array([[40, 40, 40], [200, 60, 60], [60, 180, 60]], np.float32)
    images = (palette[np.where(labels == 255, 0, labels)] + rng.normal(0, 20, labels.shape + (3,))).clip(0, 255)
    with h5py.File(path, "w") as file:
        chunked = {"compression": "gzip"} if n else {}  # HDF5 cannot chunk an empty dataset
        file.create_dataset("images", data=images.astype(np.uint8), **chunked)
        file.create_dataset("labels", data=labels, **chunked)
        tiles = np.stack([np.full(n, 17), np.arange(n), np.arange(n)], axis=1).astype(np.int32)
        file.create_dataset("tiles", data=tiles)
        file.create_dataset("sources", data=np.array(["demo"] * n, dtype=object), dtype=h5py.string_dtype())
        file.attrs["classes"] = CLASSES.to_json()
        file.attrs["tile_size"] = size
        file.attrs["schema_version"] = cache.SCHEMA_VERSION
    return path, labels


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache") / "training.hdf5")


def _run(argv):
    return run(train.main, [str(a) for a in argv])


def _read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _state_arrays(path):
    with h5py.File(path, "r") as file:
        return {f"{group}/{key}": file[group][key][()] for group in ("model", "optimizer") for key in file[group]}


# --- Pure parts -----------------------------------------------------------------------


def test_class_pixel_statistics_count_pixels_and_tiles_where_present(tmp_path, tiny_cache):
    path, labels = tiny_cache
    indices = np.array([0, 3, 5, 7])
    histogram, present = training.class_pixel_statistics(path, indices, 3)
    chosen = labels[indices]
    expected = [(chosen == c).sum() for c in range(3)]
    np.testing.assert_array_equal(histogram, expected)
    np.testing.assert_array_equal(histogram, cache.label_histogram(path, indices))
    labelled = [(tile != 255).sum() for tile in chosen]
    expected_present = [sum(n for tile, n in zip(chosen, labelled) if (tile == c).any()) for c in range(3)]
    np.testing.assert_array_equal(present, expected_present)
    weights = training.resolve_class_weights("median-frequency", path, indices, NAMES)
    np.testing.assert_allclose(weights, median_frequency_weights(expected, expected_present))
    assert training.resolve_class_weights("none", path, indices, NAMES) is None


@pytest.mark.parametrize(
    "text, suffix",
    [
        ("[0.5, 2, 3]", ".json"),
        ('{"vegetation": 3, "background": 0.5, "building": 2}', ".json"),
        ("class,weight\nbackground,0.5\nbuilding,2\nvegetation,3\n", ".csv"),
        ("0.5\n2\n3\n", ".csv"),
    ],
)
def test_class_weights_files(tmp_path, text, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_text(text)
    np.testing.assert_allclose(training.load_class_weights(path, NAMES), [0.5, 2, 3])


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "2 weights for 3 classes"),
        ('{"building": 1}', "missing"),
        ("[1, -2, 3]", "non-negative"),
        ('[1, "x", 3]', "must be a number"),
        ("a,b,c\n", "expected a JSON list"),
    ],
)
def test_bad_class_weights_files(tmp_path, text, message):
    path = tmp_path / "weights.json"
    path.write_text(text)
    with pytest.raises(training.UserError, match=message):
        training.load_class_weights(path, NAMES)


def test_streaming_metrics_match_numpy_and_skip_zero_weights():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, (2, 8, 8))
    probabilities = rng.random((2, 8, 8, 3)).astype(np.float32)
    weight = np.where(rng.random((2, 8, 8)) < 0.2, 0.0, rng.choice([0.5, 3.0], (2, 8, 8))).astype(np.float32)
    metrics = training.streaming_metrics(NAMES)
    mean_iou, views = metrics[0], metrics[1:]
    # Two updates: the matrix accumulates across batches.
    for batch in range(2):
        mean_iou.update_state(truth[batch], probabilities[batch], weight[batch])
    expected = scores(confusion_matrix(np.where(weight == 0, 255, truth), probabilities.argmax(-1), 3), NAMES)
    results = {metric.name: float(metric.result()) for metric in metrics}
    assert results["mean_iou"] == pytest.approx(expected["mean_iou"], abs=1e-6)
    assert results["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-6)
    for name in NAMES:
        assert results[f"iou_{name}"] == pytest.approx(expected["per_class"][name]["iou"], abs=1e-6)
    mean_iou.reset_state()
    assert np.isnan(float(views[0].result()))


def test_curves_are_drawn_every_so_often_and_at_the_end(tmp_path, monkeypatch):
    """The PNG is drawn after the first epoch, then once plot_every seconds have passed, and
    at the end of training if epochs were left undrawn; the CSV and state after every epoch."""
    import types

    import keras

    import osmseg.plots

    now = [0.0]
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    drawn = []
    monkeypatch.setattr(osmseg.plots, "training_curves", lambda rows, names, path: drawn.append(len(rows)))
    net = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    net.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    net.optimizer.build(net.trainable_variables)
    state = training.TrainState(settings={})
    log = tmp_path / "training_log.csv"
    callback = training.checkpoint_callback(
        state, names=NAMES, save_weights=lambda *a: None, state_file=tmp_path / "w.state.h5",
        log_file=log, plot_file=tmp_path / "training_log.png", plot_every=30,
    )  # fmt: skip
    callback.set_model(net)
    for epoch in range(5):  # epochs end at 10, 20, 30, 40, 50 s
        callback.on_epoch_begin(epoch)
        now[0] += 10
        callback.on_epoch_end(epoch, {"loss": 1.0, "val_mean_iou": 0.5})
        assert len(_read_csv(log)) == epoch + 1
    assert drawn == [1, 4]
    callback.on_train_end()
    assert drawn == [1, 4, 5]
    callback.on_train_end()  # nothing new: not drawn again
    assert drawn == [1, 4, 5]


def test_log_csv_text_has_named_columns():
    row = training.log_row(1, {"loss": 0.5, "val_iou_building": float("nan")}, NAMES, 1.25, 0.01)
    text = training.log_csv_text([row], NAMES)
    header, line = text.splitlines()
    assert header.split(",") == training.log_columns(NAMES)
    values = dict(zip(header.split(","), line.split(",")))
    assert values["loss"] == "0.5" and values["val_iou_building"] == "nan" and values["val_loss"] == ""


# --- Training runs --------------------------------------------------------------------


COMMON = ["--epochs", "2", *TINY, "--augment", "--class-weights", "median-frequency", "--seed", "3"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_cache):
    """Two epochs in one go; the reference that a resumed run must reproduce."""
    path, _ = tiny_cache
    weights = tmp_path_factory.mktemp("straight") / "weights.hdf5"
    status = _run(["--data", path, *COMMON, "--weights", weights, "--log", weights.with_name("training_log.csv")])
    return status, weights, weights.with_name("training_log.csv")


def _recomputed_scores(weights, cache_path, labels, validation=0.2, seed=3):
    """Scores of saved weights on the held-back tiles, computed with numpy."""
    import model

    net, _ = model.load(weights)
    _, held_back = cache.split_indices(len(labels), validation, seed)
    with h5py.File(cache_path, "r") as file:
        images = file["images"][np.sort(held_back)].astype(np.float32)
    predicted = np.asarray(net.predict_on_batch(images)).argmax(-1)
    return scores(confusion_matrix(labels[np.sort(held_back)], predicted, 3), NAMES)


def test_tiny_fit_writes_weights_log_curves_and_state(straight_run, tiny_cache):
    status, weights, log = straight_run
    assert status == 0
    rows = _read_csv(log)
    assert list(rows[0]) == [
        "epoch",
        "loss",
        "pixel_accuracy",
        "mean_iou",
        "val_loss",
        "val_pixel_accuracy",
        "val_mean_iou",
        "val_iou_background",
        "val_iou_building",
        "val_iou_vegetation",
        "learning_rate",
        "seconds",
    ]
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert all(np.isfinite(float(row["val_mean_iou"])) for row in rows)
    assert log.with_suffix(".png").stat().st_size > 10_000
    state = training.read_state(training.state_path(weights))
    assert state.epoch == 2 and len(state.rows) == 2

    import model

    config = model.read_config(weights)
    assert config["name"] == "segnet-basic" and config["num_classes"] == 3
    assert parse_classes(config["classes"], require_filters=False).names == NAMES
    best = max(range(2), key=lambda i: float(rows[i]["val_mean_iou"]))
    assert config["epoch"] == best + 1
    # The streaming validation scores are those of the saved weights on the held-back tiles,
    # ignore pixels excluded.
    path, labels = tiny_cache
    recomputed = _recomputed_scores(weights, path, labels)
    assert float(rows[best]["val_mean_iou"]) == pytest.approx(recomputed["mean_iou"], abs=2e-3)
    assert float(rows[best]["val_pixel_accuracy"]) == pytest.approx(recomputed["pixel_accuracy"], abs=2e-3)


def test_resume_gives_the_uninterrupted_result(tmp_path, tiny_cache, straight_run):
    path, _ = tiny_cache
    _, straight, straight_log = straight_run
    split = tmp_path / "weights.hdf5"
    log = tmp_path / "training_log.csv"
    interrupted = ["--epochs", "1", *COMMON[2:]]
    # --resume with nothing to resume starts from scratch (so `make train` may always pass it).
    assert _run(["--data", path, *interrupted, "--weights", split, "--log", log, "--resume"]) == 0
    assert len(_read_csv(log)) == 1
    assert _run(["--data", path, *COMMON, "--weights", split, "--log", log, "--resume"]) == 0
    a, b = _state_arrays(training.state_path(straight)), _state_arrays(training.state_path(split))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for row_a, row_b in zip(_read_csv(straight_log), _read_csv(log), strict=True):
        assert float(row_a["loss"]) == pytest.approx(float(row_b["loss"]), rel=1e-4)
        assert float(row_a["val_mean_iou"]) == pytest.approx(float(row_b["val_mean_iou"]), abs=1e-4)
    # Finished: a re-run with --resume has nothing left to do and writes nothing.
    before = split.stat().st_mtime_ns
    assert _run(["--data", path, *COMMON, "--weights", split, "--log", log, "--resume"]) == 0
    assert split.stat().st_mtime_ns == before


def test_split_seed_holds_the_same_tiles_back_whatever_the_training_seed(tmp_path, tiny_cache, monkeypatch):
    path, _ = tiny_cache
    seeds = []
    original = cache.split_indices

    def spy(n, fraction, seed, *args, **kwargs):
        seeds.append(seed)
        return original(n, fraction, seed, *args, **kwargs)

    monkeypatch.setattr(cache, "split_indices", spy)
    weights = tmp_path / "weights.hdf5"
    flags = ["--epochs", "1", *TINY, "--seed", "4", "--split-seed", "3"]
    assert _run(["--data", path, *flags, "--weights", weights, "--log", tmp_path / "log.csv"]) == 0
    assert seeds == [3]
    assert training.read_state(training.state_path(weights)).settings["split_seed"] == 3
    # Without it, or equal to --seed, the settings are those of runs from before the flag,
    # which therefore still resume.
    info = cache.open_cache(path)
    parse = train.build_parser().parse_args
    plain = train.run_settings(parse(["--data", str(path), "--seed", "3"]), info)
    assert "split_seed" not in plain
    assert train.run_settings(parse(["--data", str(path), "--seed", "3", "--split-seed", "3"]), info) == plain


def test_nan_loss_stops_and_keeps_the_last_good_epoch(tmp_path, tiny_cache, monkeypatch, capsys):
    path, _ = tiny_cache
    original = cache.BatchReader.__getitem__

    def poisoned(self, batch):
        images, targets, weights = original(self, batch)
        if self.shuffle and self.epoch >= 1:  # training batches from the second epoch on
            # NaN sample weights make the loss NaN whatever the model does with its inputs.
            weights = np.full_like(weights, np.nan)
        return images, targets, weights

    monkeypatch.setattr(cache.BatchReader, "__getitem__", poisoned)
    weights, log = tmp_path / "weights.hdf5", tmp_path / "log.csv"
    status = _run(["--data", path, "--weights", weights, "--log", log, "--epochs", "2", *TINY])
    assert status == 1
    assert "NaN in epoch 2" in capsys.readouterr().err
    import model

    assert model.read_config(weights)["epoch"] == 1
    assert training.read_state(training.state_path(weights)).epoch == 1
    assert len(_read_csv(log)) == 1


@pytest.mark.slow
def test_two_logical_cpu_devices(tmp_path, tiny_cache):
    """--distribute trains on two logical CPUs, and the metrics sum what both replicas saw."""
    path, _ = tiny_cache
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 3, (2, 6, 6))
    probabilities = rng.random((2, 6, 6, 3))
    weight = (rng.random((2, 6, 6)) > 0.3).astype(np.float32)
    np.save(tmp_path / "data.npy", np.concatenate([truth[..., None], probabilities, weight[..., None]], axis=-1))
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import train
        from osmseg import training
        from osmseg.cli import run
        status = run(train.main, sys.argv[2:])
        # One replica per half of the data; the results must count both halves.
        data = np.load(sys.argv[1])
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            metrics = training.streaming_metrics(["background", "building", "vegetation"])
        halves = strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(data[context.replica_id_in_sync_group], tf.float32))
        strategy.run(lambda d: metrics[0].update_state(tf.cast(d[..., 0], tf.int32), d[..., 1:4], d[..., 4]),
                     args=(halves,))
        print(json.dumps({metric.name: float(metric.result()) for metric in metrics}))
        sys.exit(status)
        """
    )
    weights = tmp_path / "weights.hdf5"
    argv = ["--data", path, "--weights", weights, "--log", tmp_path / "log.csv", "--epochs", "1", *TINY, "--distribute"]
    result = subprocess.run(
        [sys.executable, "-c", script, tmp_path / "data.npy", *map(str, argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 replicas (MirroredStrategy)" in result.stdout
    assert len(_read_csv(tmp_path / "log.csv")) == 1 and weights.exists()
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    expected = scores(confusion_matrix(np.where(weight == 0, 255, truth), probabilities.argmax(-1), 3), NAMES)
    assert measured["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-6)
    assert measured["mean_iou"] == pytest.approx(expected["mean_iou"], abs=1e-6)


# --- Bad input ------------------------------------------------------------------------


def test_missing_cache_names_the_make_target(tmp_path, capsys):
    assert _run(["--data", tmp_path / "data" / "training.hdf5", "--weights", tmp_path / "w.hdf5"]) == 2
    assert "make data/training.hdf5" in capsys.readouterr().err


def test_corrupt_and_empty_caches(tmp_path, capsys):
    corrupt = tmp_path / "training.hdf5"
    corrupt.write_bytes(b"not hdf5 at all" * 10)
    assert _run(["--data", corrupt, "--weights", tmp_path / "w.hdf5"]) == 2
    assert "training.hdf5" in capsys.readouterr().err
    empty, _ = make_cache(tmp_path / "empty.hdf5", n=0)
    assert _run(["--data", empty, "--weights", tmp_path / "w.hdf5"]) == 2
    assert "no tiles" in capsys.readouterr().err
    assert not (tmp_path / "w.hdf5").exists()


def test_batch_size_larger_than_the_data(tmp_path, tiny_cache, capsys):
    path, _ = tiny_cache
    assert _run(["--data", path, "--weights", tmp_path / "w.hdf5", "--batch-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 64 is larger than the 10 training tiles" in err and "--batch-size 10 or less" in err


def test_resume_refuses_other_settings(tmp_path, tiny_cache, capsys):
    path, _ = tiny_cache
    weights = tmp_path / "weights.hdf5"
    with pytest.raises(training.TrainingError, match="no resume state"):
        training.read_state(training.state_path(weights))
    state = training.TrainState(settings={"model": "segnet", "seed": 0})
    with h5py.File(training.state_path(weights), "w") as file:
        file.attrs.update(
            {
                "format": training.STATE_FORMAT,
                "version": training.STATE_VERSION,
                "epoch": 1,
                "best": 0.5,
                "best_epoch": 1,
                "monitor": "val_mean_iou",
                "settings": json.dumps(state.settings),
                "log": "[]",
            }
        )
    assert _run(["--data", path, "--weights", weights, "--resume", *TINY]) == 2
    assert "model: 'segnet' then, 'segnet-basic' now" in capsys.readouterr().err
    with h5py.File(training.state_path(weights), "w") as file:
        file.attrs["format"] = "something else"
    assert _run(["--data", path, "--weights", weights, "--resume", *TINY]) == 2
    assert "not an osmseg training state" in capsys.readouterr().err


def test_bad_flags_exit_2(tmp_path, tiny_cache, capsys):
    path, _ = tiny_cache
    for flags in (["--validation", "1.5"], ["--epochs", "0"], ["--learning-rate", "-1"], ["--model", "unet"]):
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--data", str(path), *flags])
        assert exit_info.value.code == 2
    assert (
        _run(["--data", path, "--weights", tmp_path / "w.hdf5", *TINY, "--class-weights", tmp_path / "none.json"]) == 2
    )
    assert "cannot read it" in capsys.readouterr().err
