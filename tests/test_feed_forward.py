"""feed_forward.py end to end, in-process, with a tiny SegNet: outputs, GeoTIFFs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

import feed_forward
from osmseg import cli, rasters
from osmseg.classes import load_classes
from osmseg.scene import write_scene
from osmseg.segment import Windows

WINDOW = 32


@pytest.fixture(scope="module")
def weights(tmp_path_factory, classes_file) -> Path:
    import model

    classes = load_classes(classes_file)
    network = model.build("segnet-basic", classes.num_classes, input_size=WINDOW, width=0.125, seed=0)
    path = tmp_path_factory.mktemp("weights") / "weights.hdf5"
    config = {
        "name": "segnet-basic", "width": 0.125, "input_size": WINDOW, "num_classes": classes.num_classes,
        "classes": classes.to_json(), "mixed_precision": False,
    }  # fmt: skip
    model.save(network, path, config)
    return path


@pytest.fixture(scope="module")
def classes_file() -> Path:
    return Path(__file__).resolve().parent.parent / "classes" / "mine.json"


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)


def write_rgb(path: Path, rgb: np.ndarray) -> Path:
    cv2.imwrite(str(path), rgb[..., ::-1])
    return path


def printed_counts(text: str, names: list[str]) -> dict[str, int]:
    counts = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in names:
            counts[parts[0]] = int(parts[1])
    return counts


def test_segments_an_odd_sized_image(weights, classes_file, tmp_path, capsys):
    names = load_classes(classes_file).names
    image = write_rgb(tmp_path / "odd.png", scene(45, 70))
    out = tmp_path / "out"
    assert cli.run(feed_forward.main, [str(weights), str(image), str(out)]) == 0
    printed = printed_counts(capsys.readouterr().out, names)
    assert list(printed) == names  # every class, zeros included
    assert sum(printed.values()) == 45 * 70
    record = json.loads((out / "counts.json").read_text())
    assert record["counts"] == printed and (record["width"], record["height"]) == (70, 45)
    mask = cv2.imread(str(out / "mask.png"))
    assert mask.shape == (45, 70, 3)
    assert load_classes(classes_file).colors_to_labels(mask[..., ::-1])[1] == 0  # only class colours
    assert cv2.imread(str(out / "segments.png")).shape == (45, 70, 3)
    assert {p.name for p in out.glob("heatmap-*.png")} == {f"heatmap-{n}.png" for n in names}


def test_directory_of_images_and_resume(weights, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    write_rgb(images / "a.png", scene(32, 32, seed=1))
    write_rgb(images / "b.jpg", scene(40, 50, seed=2))
    (images / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "out"
    assert cli.run(feed_forward.main, [str(weights), str(images), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    stamp = (out / "b" / "mask.png").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.run(feed_forward.main, [str(weights), str(images), str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("already done") == 2
    assert "b.jpg: 50×40 = 2000 pixels" in captured.out  # counts are printed again
    assert (out / "b" / "mask.png").stat().st_mtime_ns == stamp
    # A missing output makes the image be redone, and so do other options.
    (out / "a" / "segments.png").unlink()
    assert cli.run(feed_forward.main, [str(weights), str(images), str(out)]) == 0
    assert (out / "a" / "segments.png").exists() and (out / "b" / "mask.png").stat().st_mtime_ns == stamp
    assert cli.run(feed_forward.main, [str(weights), str(images), str(out), "--overlap", "0.5"]) == 0
    assert (out / "b" / "mask.png").stat().st_mtime_ns != stamp


def test_geotiff_outputs_keep_the_georeference(weights, classes_file, tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    transform = from_origin(-1000.0, 2000.0, 0.6, 0.6)
    path = tmp_path / "scene.tif"
    pixels = np.moveaxis(scene(50, 75), -1, 0)
    profile = dict(driver="GTiff", height=50, width=75, count=3, dtype="uint8", crs="EPSG:3857", transform=transform)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    out = tmp_path / "out"
    # In the CLI's own process, as users run it (mapnik must not have broken rasterio's CRS look-ups).
    argv = [str(weights), str(path), str(out), "--geojson", "--min-area", "0", "--window", "64"]
    assert cli.run(feed_forward.main, argv) == 0
    names = load_classes(classes_file).names
    with rasterio.open(out / "mask.tif") as mask, rasterio.open(out / "probabilities.tif") as probabilities:
        assert mask.crs == rasterio.crs.CRS.from_epsg(3857) and mask.transform == transform
        assert probabilities.crs == mask.crs and probabilities.transform == transform
        assert probabilities.count == len(names) and list(probabilities.descriptions) == names
        labels = mask.read(1)
        assert mask.colormap(1)[1][:3] != (0, 0, 0)
        bands = probabilities.read().astype(int)
    assert labels.shape == (50, 75)
    # Bands are probabilities × 255 (rounding may move the sum by a few), argmax = mask.
    assert np.abs(bands.sum(axis=0) - 255).max() <= len(names)
    # The mask's class has the largest band (within rounding: near-ties are common untrained).
    chosen = np.take_along_axis(bands, labels[None].astype(int), axis=0)[0]
    assert np.all(chosen >= bands.max(axis=0) - 1)
    png_labels, _ = load_classes(classes_file).colors_to_labels(cv2.imread(str(out / "mask.png"))[..., ::-1])
    np.testing.assert_array_equal(png_labels, labels)
    collection = json.loads((out / "segments.geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "EPSG:3857"
    xs, ys = zip(*(xy for f in collection["features"] for ring in _rings(f["geometry"]) for xy in ring))
    assert -1000 <= min(xs) and max(xs) <= -1000 + 75 * 0.6 + 1e-6
    assert 2000 - 50 * 0.6 - 1e-6 <= min(ys) and max(ys) <= 2000


def test_a_tile_named_z_x_y_gets_its_place_and_keeps_its_name(weights, tmp_path):
    import mercantile
    import rasterio

    tile = mercantile.Tile(65540, 65530, 17)
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "17-65540-65530.jpg"), scene(256, 256))
    cv2.imwrite(str(images / "holiday.jpg"), scene(256, 256, seed=1))
    out = tmp_path / "out"
    assert cli.run(feed_forward.main, [str(weights), str(images), str(out), "--window", "64"]) == 0
    record = json.loads((out / "17-65540-65530" / "counts.json").read_text())
    assert record["tile"] == {"z": 17, "x": 65540, "y": 65530} and record["crs"] == "EPSG:3857"
    left, bottom, right, top = mercantile.xy_bounds(tile)
    with rasterio.open(out / "17-65540-65530" / "mask.tif") as mask:
        assert mask.crs == rasterio.crs.CRS.from_epsg(3857)
        assert mask.bounds == pytest.approx((left, bottom, right, top), abs=1e-6)
        assert mask.width == mask.height == 256
    # Any other name: no georeference is made up.
    plain = json.loads((out / "holiday" / "counts.json").read_text())
    assert "tile" not in plain and "crs" not in plain and not (out / "holiday" / "mask.tif").exists()


def _rings(geometry: dict):
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    for polygon in polygons:
        yield from polygon


def test_png_with_a_world_file_is_georeferenced(weights, tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    transform = from_origin(500.0, 900.0, 2.0, 2.0)
    path = tmp_path / "scene.png"  # GDAL writes scene.wld and scene.png.aux.xml (the CRS) beside it
    profile = dict(driver="PNG", height=40, width=30, count=3, dtype="uint8", crs="EPSG:3857", transform=transform)
    with rasterio.open(path, "w", WORLDFILE="YES", **profile) as dst:
        dst.write(np.moveaxis(scene(40, 30), -1, 0))
    assert cli.run(feed_forward.main, [str(weights), str(path), str(tmp_path / "out")]) == 0
    with rasterio.open(tmp_path / "out" / "mask.tif") as mask:
        assert mask.crs == rasterio.crs.CRS.from_epsg(3857) and mask.transform == transform
        assert mask.shape == (40, 30)


@pytest.mark.parametrize(
    "name, pixels, note",
    [
        ("rgba.png", np.dstack([scene(20, 20), np.full((20, 20), 99, np.uint8)]), "alpha"),
        ("grey.png", scene(20, 20)[..., 0], "greyscale"),
        ("deep.png", scene(20, 20).astype(np.uint16) * 200, "uint16"),
    ],
)
def test_conversions_are_noted(weights, tmp_path, capsys, name, pixels, note):
    cv2.imwrite(str(tmp_path / name), pixels)
    assert cli.run(feed_forward.main, [str(weights), str(tmp_path / name), str(tmp_path / "out")]) == 0
    assert f"note: {tmp_path / name}" in capsys.readouterr().err
    assert note in json.dumps(json.loads((tmp_path / "out" / "counts.json").read_text())["notes"])


def test_bad_input_fails_cleanly(weights, tmp_path, capsys):
    good = write_rgb(tmp_path / "good.png", scene(32, 32))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG but not really")
    corrupt = tmp_path / "corrupt.hdf5"
    corrupt.write_bytes(b"this is not HDF5")
    foreign = tmp_path / "foreign.hdf5"
    with h5py.File(foreign, "w") as f:
        f["something"] = np.zeros(3)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        ([weights, tmp_path / "missing.png"], "missing.png: no such image"),
        ([weights, junk], "junk.png: not an image"),
        ([tmp_path / "none.hdf5", good], "none.hdf5: no such weights file"),
        ([corrupt, good], "corrupt.hdf5: not a readable HDF5 file"),
        ([foreign, good], "foreign.hdf5: not an osmseg weights file"),
        ([weights, good, "--overlap", "1"], "--overlap 1.0"),
        ([weights, good, "--window", "33"], "--window 33"),
    ]
    for arguments, message in cases:
        out = tmp_path / "out"
        argv = [str(arguments[0]), str(arguments[1]), str(out)] + [str(a) for a in arguments[2:]]
        assert cli.run(feed_forward.main, argv) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
        assert not out.exists() or not any(out.iterdir()), f"{message}: left files behind"
    assert cli.run(feed_forward.main, [str(weights), str(good), str(a_file)]) == 2
    assert "a-file: exists and is not a directory" in capsys.readouterr().err
    assert a_file.read_text() == ""


def test_unreadable_image_in_a_directory_is_skipped_and_reported(weights, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    write_rgb(images / "fine.png", scene(32, 32))
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    assert cli.run(feed_forward.main, [str(weights), str(images), str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 images could not be read (broken.jpg)" in err
    assert (out / "fine" / "counts.json").exists() and not (out / "broken").exists()


def test_large_images_are_streamed_with_the_same_result(weights, tmp_path, monkeypatch, capsys):
    image = write_rgb(tmp_path / "scene.png", scene(90, 70))
    assert cli.run(feed_forward.main, [str(weights), str(image), str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(rasters, "STREAM_PIXELS", 0)  # as if it were over 4096 × 4096
    opened, close = [], rasters.RasterReader.close

    def recording_close(reader):
        opened.append(reader.path)
        close(reader)

    monkeypatch.setattr(rasters.RasterReader, "close", recording_close)
    assert cli.run(feed_forward.main, [str(weights), str(image), str(tmp_path / "streamed")]) == 0
    assert opened == [image]  # it went through the streaming reader
    for name in ("mask.png", "segments.png"):
        np.testing.assert_array_equal(cv2.imread(str(tmp_path / "streamed" / name)), cv2.imread(str(tmp_path / "whole" / name)))
    counts = [json.loads((tmp_path / d / "counts.json").read_text())["counts"] for d in ("whole", "streamed")]
    assert counts[0] == counts[1]


def test_damaged_large_image_in_a_directory_is_skipped(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rasters, "STREAM_PIXELS", 0)
    images = tmp_path / "images"
    images.mkdir()
    write_rgb(images / "fine.png", scene(40, 40))
    data = write_rgb(images / "cut.png", scene(200, 150, seed=3)).read_bytes()
    (images / "cut.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert cli.run(feed_forward.main, [str(weights), str(images), str(out)]) == 2
    err = capsys.readouterr().err
    assert "cut.png: cannot read rows" in err and "1 of 2 images could not be read (cut.png)" in err
    assert (out / "fine" / "counts.json").exists()
    assert not (out / "cut").exists() or not any((out / "cut").iterdir())
    assert cli.run(feed_forward.main, [str(weights), str(images / "cut.png"), str(tmp_path / "one")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_scene_of_known_tiles_with_a_pixelwise_keras_model(tmp_path):
    """A 1×1-convolution model sees one pixel at a time, so a mosaic of tiles segmented in
    blended windows must give each tile the classes it gets alone."""
    import keras

    from osmseg.classes import parse_classes

    classes = parse_classes(json.dumps([{"name": "a", "color": "#010101"}, {"name": "b", "color": "#020202"}]),
                            require_filters=False)  # fmt: skip
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Conv2D(3, 1, activation="softmax")(keras.layers.Rescaling(1 / 255)(inputs))
    network = keras.Model(inputs, outputs)
    network.layers[-1].set_weights([np.array([[[[0, 4, -4], [0, -4, 4], [0, 0, 0]]]], np.float32), np.zeros(3, np.float32)])
    tile = 32
    image = scene(3 * tile, 4 * tile, seed=5)
    alone = [
        network.predict_on_batch(image[r : r + tile, c : c + tile][None].astype(np.float32))[0].argmax(axis=2)
        for r in range(0, 3 * tile, tile) for c in range(0, 4 * tile, tile)
    ]  # fmt: skip
    result = write_scene(
        rasters.ArrayReader(image), network.predict_on_batch, classes, tmp_path, Windows(48, 0.5)
    )
    labels, _ = classes.colors_to_labels(cv2.imread(str(tmp_path / "mask.png"))[..., ::-1])
    together = [labels[r : r + tile, c : c + tile] for r in range(0, 3 * tile, tile) for c in range(0, 4 * tile, tile)]
    np.testing.assert_array_equal(np.stack(together), np.stack(alone))
    assert sum(result.counts.values()) == image.shape[0] * image.shape[1]


def test_tta_mirrors_with_the_image_and_is_a_recorded_option(weights, tmp_path, capsys):
    image = scene(WINDOW, WINDOW, seed=7)
    write_rgb(tmp_path / "plain.png", image)
    write_rgb(tmp_path / "mirrored.png", np.ascontiguousarray(image[:, ::-1]))
    for name in ("plain", "mirrored"):
        argv = [str(weights), str(tmp_path / f"{name}.png"), str(tmp_path / name), "--tta", "8"]
        assert cli.run(feed_forward.main, argv) == 0
    # The eight copies of a window are averaged exactly, so not one pixel's class differs.
    plain, mirrored = (cv2.imread(str(tmp_path / name / "mask.png")) for name in ("plain", "mirrored"))
    np.testing.assert_array_equal(mirrored, plain[:, ::-1])
    assert json.loads((tmp_path / "plain" / "counts.json").read_text())["inputs"]["tta"] == 8
    stamp = (tmp_path / "plain" / "mask.png").stat().st_mtime_ns
    capsys.readouterr()
    argv = [str(weights), str(tmp_path / "plain.png"), str(tmp_path / "plain")]
    assert cli.run(feed_forward.main, argv + ["--tta", "8"]) == 0
    assert "already done" in capsys.readouterr().err
    assert cli.run(feed_forward.main, argv) == 0  # --tta 1 is another result: redone
    assert (tmp_path / "plain" / "mask.png").stat().st_mtime_ns != stamp
    assert json.loads((tmp_path / "plain" / "counts.json").read_text())["inputs"]["tta"] == 1


def test_tta_takes_only_the_square_symmetries(weights, tmp_path, capsys):
    image = write_rgb(tmp_path / "image.png", scene(WINDOW, WINDOW))
    with pytest.raises(SystemExit) as stopped:
        feed_forward.main([str(weights), str(image), str(tmp_path / "out"), "--tta", "3"])
    assert stopped.value.code == 2
    assert "--tta: invalid choice: 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
