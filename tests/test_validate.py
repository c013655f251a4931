"""Tests for validate.py: its scores against an independent computation, its files, bad input."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest

import validate
from osmseg import cache
from osmseg.classes import parse_classes
from osmseg.cli import run
from osmseg.metrics import confusion_matrix, scores

CLASSES = parse_classes(
    json.dumps([{"name": "building", "color": "#010101"}, {"name": "vegetation", "color": "#020202"}]),
    require_filters=False,
)
NAMES = CLASSES.names
SIZE = 32


def make_cache(path, n=5, size=SIZE, seed=0, classes=CLASSES):
    """A small cache in prepare.py cache's schema, with some ignore (255) pixels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (n, size, size)).astype(np.uint8)
    labels[:, :4, :4] = 255
    images = rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)
    with h5py.File(path, "w") as file:
        file.create_dataset("images", data=images, chunks=(1, size, size, 3), compression="gzip")
        file.create_dataset("labels", data=labels, chunks=(1, size, size), compression="gzip")
        tiles = np.stack([np.full(n, 17), 100 + np.arange(n), 200 + np.arange(n)], axis=1).astype(np.int32)
        file.create_dataset("tiles", data=tiles)
        file.create_dataset("sources", data=np.array(["demo"] * n, dtype=object), dtype=h5py.string_dtype())
        file.attrs["classes"] = classes.to_json()
        file.attrs["tile_size"] = size
        file.attrs["schema_version"] = cache.SCHEMA_VERSION
    return path, images, labels, tiles


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Untrained but seeded tiny weights: validate.py's arithmetic does not care how good they are."""
    import keras

    import model

    keras.utils.set_random_seed(0)
    net = model.build("segnet-basic", 3, input_size=SIZE, width=0.0625)
    path = tmp_path_factory.mktemp("weights") / "weights.hdf5"
    model.save(
        net,
        path,
        {
            "name": "segnet-basic",
            "width": 0.0625,
            "input_size": SIZE,
            "num_classes": 3,
            "classes": CLASSES.to_json(),
            "mixed_precision": False,
        },
    )
    return path, net


def test_validate_scores_and_files(tmp_path, weights, capsys):
    weights_path, net = weights
    data, images, labels, tiles = make_cache(tmp_path / "testing.hdf5")
    out = tmp_path / "out"
    assert (
        run(
            validate.main,
            ["--weights", str(weights_path), "--data", str(data), "--batch-size", "2", "--out-dir", str(out)],
        )
        == 0
    )
    printed = capsys.readouterr().out

    # The reference: the same model's predictions on all tiles at once, scored with numpy.
    probabilities = np.asarray(net.predict_on_batch(images.astype(np.float32)))
    confusion = confusion_matrix(labels, probabilities.argmax(-1), 3)
    expected = scores(confusion, NAMES)
    counted = labels != 255
    truth = np.where(counted, labels, 0)
    chosen = np.take_along_axis(probabilities, truth[..., None].astype(np.int64), -1)[..., 0][counted]
    expected_loss = float(-np.log(np.clip(chosen, 1e-7, 1)).mean())

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["confusion"] == confusion.tolist()
    assert metrics["pixels"] == int(counted.sum()) and metrics["tiles"] == 5
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-4)
    for key in ("pixel_accuracy", "mean_iou", "frequency_weighted_iou"):
        assert metrics[key] == pytest.approx(expected[key])
    for name in NAMES:
        assert metrics["per_class"][name]["support"] == int((labels == NAMES.index(name)).sum())
        assert metrics["per_class"][name]["f1"] == pytest.approx(expected["per_class"][name]["f1"])
    assert f"{expected['mean_iou']:.4f}" in printed and "precision" in printed and "vegetation" in printed

    with open(out / "confusion.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["truth\\predicted", *NAMES]
    assert [[int(v) for v in row[1:]] for row in rows[1:]] == confusion.tolist()
    assert (out / "confusion.png").stat().st_size > 5_000

    with h5py.File(out / "predictions.hdf5", "r") as file:
        stored = file["probabilities"]
        assert stored.dtype == np.float16 and stored.shape == (5, SIZE, SIZE, 3)
        assert stored.chunks == (1, SIZE, SIZE, 3)
        np.testing.assert_allclose(stored[()], probabilities, atol=2e-3)
        np.testing.assert_array_equal(file["tiles"][()], tiles)
        assert parse_classes(file.attrs["classes"], require_filters=False).names == NAMES
    assert not list(out.glob(".*partial*"))


def test_without_predictions(tmp_path, weights):
    data, *_ = make_cache(tmp_path / "testing.hdf5", n=2)
    out = tmp_path / "out"
    assert (
        run(
            validate.main,
            ["--weights", str(weights[0]), "--data", str(data), "--out-dir", str(out), "--no-predictions"],
        )
        == 0
    )
    assert (out / "metrics.json").exists() and not (out / "predictions.hdf5").exists()


def test_tta_averages_the_turned_and_mirrored_predictions(tmp_path, weights):
    weights_path, net = weights
    data, images, labels, _ = make_cache(tmp_path / "testing.hdf5", n=3)
    out = tmp_path / "out"
    argv = ["--weights", str(weights_path), "--data", str(data), "--out-dir", str(out), "--tta", "8"]
    assert run(validate.main, argv) == 0
    with h5py.File(out / "predictions.hdf5", "r") as file:
        stored = file["probabilities"][()].astype(np.float32)
        assert file.attrs["tta"] == 8
    # The reference: the eight copies through the model at once, turned back by hand.
    inputs = images.astype(np.float32)
    copies = []
    for mirrored in (False, True):
        for turns in range(4):
            view = np.rot90(inputs, turns, axes=(1, 2))
            view = view[:, :, ::-1] if mirrored else view
            predicted = np.asarray(net.predict_on_batch(np.ascontiguousarray(view)))
            predicted = predicted[:, :, ::-1] if mirrored else predicted
            copies.append(np.rot90(predicted, -turns, axes=(1, 2)))
    np.testing.assert_allclose(stored, np.mean(copies, axis=0), atol=2e-3)
    assert json.loads((out / "metrics.json").read_text())["tta"] == 8


def test_tta_takes_only_the_square_symmetries(tmp_path, weights, capsys):
    data, *_ = make_cache(tmp_path / "testing.hdf5", n=1)
    with pytest.raises(SystemExit) as stopped:
        validate.main(["--weights", str(weights[0]), "--data", str(data), "--tta", "3"])
    assert stopped.value.code == 2
    assert "--tta" in capsys.readouterr().err


def test_classes_differing_from_the_weights(tmp_path, weights, capsys):
    other = parse_classes(
        json.dumps([{"name": "road", "color": "#010101"}, {"name": "water", "color": "#020202"}]), require_filters=False
    )
    data, *_ = make_cache(tmp_path / "testing.hdf5", n=2, classes=other)
    assert run(validate.main, ["--weights", str(weights[0]), "--data", str(data), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "building" in err and "road" in err
    assert not (tmp_path / "metrics.json").exists()


def test_missing_cache_names_the_make_target(tmp_path, weights, capsys):
    assert run(validate.main, ["--weights", str(weights[0]), "--data", str(tmp_path / "data" / "testing.hdf5")]) == 2
    assert "make data/testing.hdf5" in capsys.readouterr().err


def test_weights_that_are_not_ours(tmp_path, capsys):
    data, *_ = make_cache(tmp_path / "testing.hdf5", n=2)
    foreign = tmp_path / "other.hdf5"
    with h5py.File(foreign, "w") as file:
        file.create_dataset("dense/kernel", data=np.zeros((3, 3)))
    for path in (foreign, tmp_path / "missing.hdf5"):
        assert run(validate.main, ["--weights", str(path), "--data", str(data), "--out-dir", str(tmp_path)]) == 2
        assert str(path) in capsys.readouterr().err


def test_corrupt_cache_and_bad_batch_size(tmp_path, weights, capsys):
    corrupt = tmp_path / "testing.hdf5"
    corrupt.write_bytes(b"\x89HDF garbage" * 20)
    assert run(validate.main, ["--weights", str(weights[0]), "--data", str(corrupt)]) == 2
    assert "testing.hdf5" in capsys.readouterr().err
    assert run(validate.main, ["--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err
