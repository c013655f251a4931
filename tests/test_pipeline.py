"""One end-to-end run of every stage on a tiny corner of the demo world, in-process.

The same code paths as `make demo` (demo QA tiles → sample → mapnik labels → filter →
imagery over HTTP from the loopback server → HDF5 caches → train → validate →
feed_forward), with a handful of tiles and a tiny model so that it takes well under two
minutes on a 2-core CPU.
"""

import json

import cv2
import h5py
import numpy as np
import pytest

import feed_forward
import prepare
import train
import validate
from osmseg import cli, datafiles
from osmseg.classes import load_classes

# A corner of the demo world that straddles the z12 tile border at 0°E, 0°N.
BBOX = "-0.004,-0.004,0.004,0.004"
TILES = 8


def _ok(main, argv):
    assert cli.run(main, [str(a) for a in argv]) == 0, f"{main.__module__} {argv} failed"


@pytest.mark.slow
def test_whole_pipeline_on_a_tiny_demo_world(tmp_path, classes_file):
    d = tmp_path / "data"
    osm = d / "osm" / "demo.mbtiles"
    _ok(prepare.main, ["demo-world", "--out", osm])
    _ok(prepare.main, ["all-tiles", "--osm-source", "qa-tiles", "--osm", osm, f"--bbox={BBOX}",
                       "--out", d / "all_tiles.txt"])
    # Later stages take the OSM source, box, zoom and seed from the lists' #made-by records.
    _ok(prepare.main, ["sample", "--all-tiles", d / "all_tiles.txt", "--zoom", 17, "--count", TILES,
                       "--seed", 0, "--out", d / "sample.txt"])
    _ok(prepare.main, ["labels", "--sample", d / "sample.txt", "--classes", classes_file,
                       "--out", d / "labels" / "color", "--workers", 1])
    _ok(prepare.main, ["filter", "--sample", d / "sample.txt", "--labels", d / "labels" / "color",
                       "--classes", classes_file, "--out", d / "sample-filtered.txt",
                       "--stats", d / "labels" / "label-stats.csv"])
    _ok(prepare.main, ["images", "--sample", d / "sample-filtered.txt", "--image-tiles", "demo",
                       "--out", d / "images", "--labels", d / "labels" / "color"])
    _ok(prepare.main, ["cache", "--sample", d / "sample-filtered.txt", "--images", d / "images",
                       "--labels", d / "labels" / "color", "--test-size", 2,
                       "--test-list", d / "test-sample-filtered.txt",
                       "--out", d / "training.hdf5", "--test-out", d / "testing.hdf5"])
    made_by = datafiles.read_tile_list(d / "sample-filtered.txt").made_by
    assert made_by["command"] == "filter" and made_by["osm"] == str(osm) and made_by["bbox"] == BBOX
    assert (made_by["zoom"], made_by["seed"], made_by["count"]) == (17, 0, TILES)

    # Every sampled tile has a label of exactly class colours, and an image.
    classes = load_classes(classes_file)
    lines = [l.split() for l in (d / "sample-filtered.txt").read_text().splitlines()]
    assert lines[0][0] == "#source" and lines[0][4:] == classes.names[1:] + ["Background"]
    assert lines[1][0] == "#made-by" and len(lines) == TILES + 2
    for source, z, x, y, *counts in lines[2:]:
        label = cv2.imread(str(d / "labels" / "color" / f"{z}-{x}-{y}.png"))[..., ::-1]
        colours = {tuple(c) for c in label.reshape(-1, 3)}
        assert colours <= {tuple(c) for c in classes.palette}
        assert sum(map(int, counts)) == 256 * 256
        assert list((d / "images").glob(f"{z}-{x}-{y}.*"))

    with h5py.File(d / "training.hdf5") as training, h5py.File(d / "testing.hdf5") as testing:
        assert training["images"].shape == (TILES - 2, 256, 256, 3)
        assert testing["labels"].shape == (2, 256, 256)
        train_tiles = {tuple(t) for t in training["tiles"][:]}
        assert not train_tiles & {tuple(t) for t in testing["tiles"][:]}

    weights = tmp_path / "weights.hdf5"
    log = tmp_path / "training_log.csv"
    _ok(train.main, ["--data", d / "training.hdf5", "--weights", weights, "--log", log,
                     "--model", "segnet-basic", "--width", 0.125, "--epochs", 1, "--batch-size", 2,
                     "--validation", 0.34, "--optimizer", "adam"])
    assert weights.exists() and len(log.read_text().splitlines()) == 2

    out = tmp_path / "eval"
    _ok(validate.main, ["--weights", weights, "--data", d / "testing.hdf5", "--out-dir", out])
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["pixel_accuracy"] <= 1 and set(metrics["per_class"]) == set(classes.names)
    with h5py.File(out / "predictions.hdf5") as predictions:
        probabilities = predictions["probabilities"]
        assert probabilities.shape == (2, 256, 256, classes.num_classes)
        np.testing.assert_allclose(probabilities[0].astype(np.float32).sum(-1), 1, atol=0.02)

    image = sorted((d / "images").iterdir())[0]
    segmented = tmp_path / "segmented"
    _ok(feed_forward.main, [weights, image, segmented])
    counts = json.loads((segmented / "counts.json").read_text())
    assert set(counts["counts"]) == set(classes.names)
    assert sum(counts["counts"].values()) == counts["pixels"] == 256 * 256
    for name in ("segments.png", "mask.png"):
        assert cv2.imread(str(segmented / name)).shape[:2] == (256, 256)
