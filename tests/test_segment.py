"""Sliding-window segmentation, blending and scene outputs, with fake (Keras-free) models."""

from __future__ import annotations

import json
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from osmseg import rasters, scene, segment, visualise
from osmseg.classes import parse_classes
from osmseg.errors import UserError

CLASSES = parse_classes(
    json.dumps([{"name": n, "color": f"#0{i}0{i}0{i}"} for i, n in enumerate(["water", "field", "roof"], 1)]),
    require_filters=False,
)
NUM_CLASSES = CLASSES.num_classes  # 4


def local_predict(batch: np.ndarray) -> np.ndarray:
    """A model whose output at a pixel depends only on that pixel: the brightest channel
    decides the class (red 1, green 2, blue 3), dark pixels are background."""
    brightest = batch.argmax(axis=3) + 1
    classes = np.where(batch.max(axis=3) < 64, 0, brightest)
    probabilities = np.full(batch.shape[:3] + (NUM_CLASSES,), 0.1 / (NUM_CLASSES - 1), dtype=np.float32)
    np.put_along_axis(probabilities, classes[..., None], 0.9, axis=3)
    return probabilities


def edge_predict(batch: np.ndarray) -> np.ndarray:
    """A model with a border effect, as zero padding gives real ones: within 6 pixels of a
    window's edge it leans towards class 1, whatever the image."""
    size = batch.shape[1]
    distance = np.minimum(np.arange(size), np.arange(size)[::-1])
    near_edge = (np.minimum.outer(distance, distance) < 6).astype(np.float32)
    probabilities = np.empty(batch.shape[:3] + (NUM_CLASSES,), dtype=np.float32)
    probabilities[..., 1] = 0.2 + 0.6 * near_edge
    probabilities[..., 0] = 1 - probabilities[..., 1]
    probabilities[..., 2:] = 0
    return probabilities


def mosaic(tile_size: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """An RGB image made of tiles, each with a random pattern of pure colours."""
    rng = np.random.default_rng(seed)
    colours = np.array([(0, 0, 0), (200, 10, 10), (10, 200, 10), (10, 10, 200)], dtype=np.uint8)
    cells = rng.integers(0, 4, size=(rows * tile_size // 8, cols * tile_size // 8))
    return np.repeat(np.repeat(colours[cells], 8, axis=0), 8, axis=1)


# --- Window maths ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(1, 700),
    window=st.integers(8, 96),
    overlap=st.floats(0, 0.9),
    floor=st.floats(0.01, 0.5),
)
def test_window_weights_sum_to_one_at_every_pixel(length, window, overlap, floor):
    stride = segment.window_stride(window, overlap)
    positions = segment.window_positions(length, window, stride)
    padded = max(length, window)
    weights = segment.axis_weights(padded, window, positions, floor)
    total = np.zeros(padded)
    for start, row in zip(positions, weights):
        total[start : start + window] += row
    np.testing.assert_allclose(total, 1, rtol=1e-5)
    # Windows cover the axis, start at 0, end at the end, and never step past the stride.
    assert positions[0] == 0 and positions[-1] + window == padded
    assert np.all(np.diff(positions) <= stride) and np.all(np.diff(positions) > 0)
    # Weights fall off towards a window's edges (that is what hides seams).
    profile = segment.window_profile(window, floor)
    assert profile[window // 2] > profile[0] >= floor * 0.999


def test_bad_overlap_is_rejected():
    with pytest.raises(ValueError, match="overlap"):
        segment.window_stride(64, 1.0)


# --- Blending ------------------------------------------------------------------------------


def test_scene_of_known_tiles_gives_each_tiles_classes():
    tile = 64
    image = mosaic(tile, rows=3, cols=4)
    expected = np.stack(
        [
            local_predict(image[r : r + tile, c : c + tile][None].astype(np.float32))[0].argmax(axis=2)
            for r in range(0, 3 * tile, tile)
            for c in range(0, 4 * tile, tile)
        ]
    )
    for window, overlap in ((64, 0.5), (96, 0.25), (48, 0.0)):
        labels = segment.segment_array(image, local_predict, NUM_CLASSES, segment.Windows(window, overlap)).argmax(axis=2)
        tiles = [labels[r : r + tile, c : c + tile] for r in range(0, 3 * tile, tile) for c in range(0, 4 * tile, tile)]
        np.testing.assert_array_equal(np.stack(tiles), expected, err_msg=f"window {window}")


def test_constant_image_gives_constant_output():
    image = np.full((150, 230, 3), (180, 30, 20), dtype=np.uint8)
    probabilities = segment.segment_array(image, local_predict, NUM_CLASSES, segment.Windows(64, 0.5))
    assert probabilities.shape == (150, 230, NUM_CLASSES)
    np.testing.assert_allclose(probabilities, np.broadcast_to(probabilities[0, 0], probabilities.shape), atol=1e-6)


def test_blending_hides_a_models_border_effect():
    image = np.full((192, 192, 3), 90, dtype=np.uint8)  # three windows of 64 a side

    def largest_jump(overlap):
        field = segment.segment_array(image, edge_predict, NUM_CLASSES, segment.Windows(64, overlap))[..., 1]
        field = field[8:-8, 8:-8]  # the image's own border is every window's border too
        return max(np.abs(np.diff(field, axis=0)).max(), np.abs(np.diff(field, axis=1)).max())

    # Cut into tiles, the border effect makes a step of 0.6 at every window border;
    # blended, the same model changes by a small fraction of that between neighbours.
    assert largest_jump(0.0) == pytest.approx(0.6, abs=1e-5)
    assert largest_jump(0.25) < 0.6 / 4
    assert largest_jump(0.5) < 0.6 / 8


def test_reused_blending_weights_change_nothing(monkeypatch):
    # 301 = 64 + 237: the windows' steps differ by a pixel, so they have several weight profiles.
    image = np.random.default_rng(6).integers(0, 255, size=(301, 301, 3), dtype=np.uint8)
    reused = segment.segment_array(image, edge_predict, NUM_CLASSES, segment.Windows(64, 0.3))
    monkeypatch.setattr(segment, "WEIGHT_CACHE_BYTES", 0)
    made_each_time = segment.segment_array(image, edge_predict, NUM_CLASSES, segment.Windows(64, 0.3))
    np.testing.assert_array_equal(reused, made_each_time)
    np.testing.assert_allclose(reused.sum(axis=2), 1, atol=1e-5)


@pytest.mark.parametrize("size", [(3, 5), (4100, 4100)])  # the second passes calcHist's float32 limit
def test_class_counts_match_bincount(size):
    labels = np.random.default_rng(7).integers(0, 6, size=size, dtype=np.uint8)
    expected = np.bincount(labels.ravel(), minlength=7)
    counts = segment.class_counts(labels, 7)
    assert counts.dtype == np.int64 and counts.tolist() == expected.tolist() and counts[6] == 0


@pytest.mark.parametrize("shape", [(1, 1), (5, 200), (37, 53), (64, 64), (65, 129)])
def test_small_and_odd_sizes_are_padded_and_cropped_back(shape):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, size=shape + (3,), dtype=np.uint8)
    probabilities = segment.segment_array(image, local_predict, NUM_CLASSES, segment.Windows(64, 0.25))
    assert probabilities.shape == shape + (NUM_CLASSES,)
    np.testing.assert_allclose(probabilities.sum(axis=2), 1, rtol=1e-5)
    expected = local_predict(image[None].astype(np.float32))[0]
    np.testing.assert_array_equal(probabilities.argmax(axis=2), expected.argmax(axis=2))


def test_strips_cover_every_row_once_and_stay_small():
    image = mosaic(32, rows=10, cols=3)
    calls = []

    def predict(batch):
        calls.append(len(batch))
        return local_predict(batch)

    reader = rasters.ArrayReader(image)
    strips = list(segment.segment_strips(reader, predict, NUM_CLASSES, segment.Windows(64, 0.5, batch_size=3)))
    tops = [strip.top for strip in strips]
    heights = [len(strip.probabilities) for strip in strips]
    assert tops[0] == 0 and np.all(np.diff(tops) == heights[:-1]) and tops[-1] + heights[-1] == 320
    assert max(heights) <= 64  # never more than one window's rows at a time
    assert max(calls) <= 3 and sum(calls) == segment.Windows(64, 0.5).count(320, 96)
    assert all(strip.image.shape == (len(strip.probabilities), 96, 3) for strip in strips)


def test_wrong_model_output_shape_is_caught():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="predict returned shape"):
        segment.segment_array(image, lambda batch: local_predict(batch)[..., :2], NUM_CLASSES, segment.Windows(64))


# --- Reading and converting images ---------------------------------------------------------


def test_conversions_to_rgb8():
    grey16 = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    rgb = rasters.to_rgb8(grey16)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], [[0, 64], [128, 255]])
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 7
    np.testing.assert_array_equal(rasters.to_rgb8(rgba)[0, 0], [200, 0, 0])
    grey_alpha = np.dstack([np.full((2, 2), 50, np.uint8), np.full((2, 2), 255, np.uint8)])
    np.testing.assert_array_equal(rasters.to_rgb8(grey_alpha)[1, 1], [50, 50, 50])


def test_open_image_reads_true_colours_and_notes_conversions(tmp_path):
    red = np.zeros((8, 9, 3), dtype=np.uint8)
    red[..., 0] = 250
    cv2.imwrite(str(tmp_path / "red.png"), red[..., ::-1])  # OpenCV writes BGR
    reader = rasters.open_image(tmp_path / "red.png")
    assert (reader.height, reader.width) == (8, 9)
    np.testing.assert_array_equal(reader.read(0, 8)[0, 0], [250, 0, 0])
    assert reader.notes == []

    bgra = np.zeros((4, 4, 4), dtype=np.uint8)
    bgra[..., 2], bgra[..., 3] = 240, 128  # red, half transparent
    cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    reader = rasters.open_image(tmp_path / "rgba.png")
    np.testing.assert_array_equal(reader.read(0, 1)[0, 0], [240, 0, 0])
    assert any("alpha" in note for note in reader.notes)

    cv2.imwrite(str(tmp_path / "grey16.png"), np.full((4, 4), 3000, dtype=np.uint16))
    reader = rasters.open_image(tmp_path / "grey16.png")
    np.testing.assert_array_equal(reader.read(0, 1)[0, 0], [255, 255, 255])
    assert any("greyscale" in note for note in reader.notes) and any("uint16" in n for n in reader.notes)


def test_open_image_rejects_missing_and_undecodable_files(tmp_path):
    with pytest.raises(UserError, match="no such image"):
        rasters.open_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match="junk.png: not an image"):
        rasters.open_image(tmp_path / "junk.png")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(UserError, match="junk.tif: not an image"):
        rasters.open_image(tmp_path / "junk.tif")


def _streamed(monkeypatch):
    """Make open_image stream every image from disk, as it does large ones."""
    monkeypatch.setattr(rasters, "STREAM_PIXELS", 0)


@pytest.mark.parametrize(
    "name, pixels",
    [
        ("rgb.png", np.random.default_rng(8).integers(0, 255, (70, 45, 3), dtype=np.uint8)),
        ("rgba.png", np.random.default_rng(9).integers(0, 255, (70, 45, 4), dtype=np.uint8)),
        ("grey.png", np.random.default_rng(10).integers(0, 255, (70, 45), dtype=np.uint8)),
        ("deep.png", np.random.default_rng(11).integers(0, 60000, (70, 45, 3), dtype=np.uint16)),
        ("photo.jpg", cv2.resize(np.random.default_rng(12).integers(0, 255, (7, 5, 3), dtype=np.uint8), (45, 70))),
    ],
)
def test_streamed_images_read_as_decoded_whole(tmp_path, monkeypatch, name, pixels):
    cv2.imwrite(str(tmp_path / name), pixels)
    whole = rasters.open_image(tmp_path / name)
    assert isinstance(whole, rasters.ArrayReader)
    _streamed(monkeypatch)
    streamed = rasters.open_image(tmp_path / name)
    assert isinstance(streamed, rasters.RasterReader) and streamed.georeference is None
    rows = np.concatenate([streamed.read(top, min(top + 16, 70)) for top in range(0, 70, 16)])
    np.testing.assert_array_equal(rows, streamed.read(0, 70))
    if name.endswith(".jpg"):  # two JPEG decoders may round colours differently
        assert np.abs(rows.astype(int) - whole.read(0, 70)).mean() < 2
    else:
        np.testing.assert_array_equal(rows, whole.read(0, 70))
    assert streamed.notes == whole.notes
    streamed.close()


def test_palette_images_are_looked_up(tmp_path, monkeypatch):
    from PIL import Image

    indices = np.random.default_rng(13).integers(0, 3, (20, 30), dtype=np.uint8)
    picture = Image.fromarray(indices, mode="P")
    picture.putpalette([250, 0, 0, 0, 240, 0, 0, 0, 230])
    picture.save(tmp_path / "palette.png")
    colours = np.array([[250, 0, 0], [0, 240, 0], [0, 0, 230]], dtype=np.uint8)[indices]
    np.testing.assert_array_equal(rasters.open_image(tmp_path / "palette.png").read(0, 20), colours)
    _streamed(monkeypatch)
    reader = rasters.open_image(tmp_path / "palette.png")
    np.testing.assert_array_equal(reader.read(0, 20), colours)
    assert any("palette" in note for note in reader.notes)


@pytest.mark.parametrize("streamed", [True, False])
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_image_fails_clearly(tmp_path, monkeypatch, damage, streamed):
    pixels = np.random.default_rng(14).integers(0, 255, (300, 200, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "scene.png"), pixels)
    data = bytearray((tmp_path / "scene.png").read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # the structure intact, the compressed pixels (and their checksum) wrong
        data[len(data) // 2 : len(data) // 2 + 20] = bytes(20)
    (tmp_path / "scene.png").write_bytes(bytes(data))
    if streamed:
        _streamed(monkeypatch)
    # OpenCV refuses a small one whole; GDAL opens it and fails on the damaged rows.
    reader = rasters.open_image(tmp_path / "scene.png")
    # A whole read too: GDAL's whole-image path for PNG returns zeros without a word.
    with pytest.raises(UserError, match="scene.png: cannot read rows .* truncated or corrupt"):
        reader.read(0, 300)
    with pytest.raises(UserError, match="scene.png: cannot read rows"):
        list(segment.segment_strips(rasters.open_image(tmp_path / "scene.png"), local_predict, NUM_CLASSES, segment.Windows(64)))


def test_each_row_is_read_once_in_order():
    class Recording(rasters.ArrayReader):
        def read(self, top, bottom):
            reads.append((top, bottom))
            return super().read(top, bottom)

    reads = []
    image = mosaic(8, 25, 9)  # 200 × 72
    strips = segment.segment_strips(Recording(image), local_predict, NUM_CLASSES, segment.Windows(64, 0.4))
    together = np.concatenate([strip.probabilities.copy() for strip in strips])
    assert reads[0][0] == 0 and reads[-1][1] == 200 and len(reads) > 3
    assert all(previous[1] == following[0] for previous, following in zip(reads, reads[1:]))
    np.testing.assert_array_equal(together, segment.segment_array(image, local_predict, NUM_CLASSES, segment.Windows(64, 0.4)))


# --- Pictures ------------------------------------------------------------------------------


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_png_writer_round_trips_in_strips(tmp_path, monkeypatch, deflate):
    if deflate == "zlib":  # the fallback where python-isal is not installed
        monkeypatch.setattr(visualise, "_deflate", zlib)
    rng = np.random.default_rng(2)
    picture = rng.integers(0, 255, size=(37, 23, 3), dtype=np.uint8)
    with visualise.PngWriter(tmp_path / "p.png", 23, 37) as writer:
        for top in range(0, 37, 10):
            writer.write(picture[top : top + 10])
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "p.png"))[..., ::-1], picture)
    with pytest.raises(ValueError, match="rows written"), visualise.PngWriter(tmp_path / "short.png", 23, 37) as writer:
        writer.write(picture[:5])


def test_heatmap_takes_certainty_and_has_a_scale():
    probabilities = np.array([[0.0, 0.5], [1.0, 1.0]], dtype=np.float32)  # 1.0 broke the seed
    picture = visualise.heatmap(probabilities, title="roof", min_height=64)
    lut = visualise.colormap_lut()
    assert picture.shape[0] > 64 and picture.shape[1] > 64 + 16  # enlarged map + scale bar
    banner = picture.shape[0] - 64
    np.testing.assert_array_equal(picture[banner + 63, 0], lut[255])
    np.testing.assert_array_equal(picture[banner, 0], lut[0])


def test_overlay_keeps_background_and_tints_classes():
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    labels = np.array([[0, 1], [2, 0]], dtype=np.uint8)
    palette = visualise.display_palette(3)
    out = visualise.overlay(image, labels, palette)
    np.testing.assert_array_equal(out[0, 0], image[0, 0])
    expected = np.rint(100 * (1 - visualise.OVERLAY_ALPHA) + palette[1] * visualise.OVERLAY_ALPHA)
    np.testing.assert_array_equal(out[0, 1], expected)
    assert len({tuple(c) for c in visualise.display_palette(25)}) == 25


# --- Scenes --------------------------------------------------------------------------------


def test_write_scene_outputs(tmp_path):
    image = mosaic(32, rows=3, cols=5)[:90, :150]
    image[:, :8] = (10, 200, 10)  # makes sure at least one class is present, one absent
    out = tmp_path / "out"
    result = scene.write_scene(
        rasters.ArrayReader(image, "scene.png"), local_predict, CLASSES, out, segment.Windows(64, 0.25),
        geojson=True, min_area=0, heatmap_size=40,
    )  # fmt: skip
    expected = local_predict(image[None].astype(np.float32))[0].argmax(axis=2)
    # Counts: every class, zeros included, summing to the pixel count.
    assert list(result.counts) == CLASSES.names
    assert sum(result.counts.values()) == 90 * 150
    assert result.counts == {n: int((expected == i).sum()) for i, n in enumerate(CLASSES.names)}
    record = json.loads((out / "counts.json").read_text())
    assert record["counts"] == result.counts and record["pixels"] == 90 * 150
    # mask.png in the classes file's colours, comparable pixel for pixel with labels.
    mask = cv2.imread(str(out / "mask.png"))[..., ::-1]
    labels, ignored = CLASSES.colors_to_labels(mask)
    assert ignored == 0
    np.testing.assert_array_equal(labels, expected)
    # segments.png: the image's true colours where the background is.
    segments = cv2.imread(str(out / "segments.png"))[..., ::-1]
    np.testing.assert_array_equal(segments[expected == 0], image[expected == 0])
    assert not np.array_equal(segments[expected == 2], image[expected == 2])
    # One heatmap per class, downscaled (the longest side was asked to be <= 40).
    for name in CLASSES.names:
        assert cv2.imread(str(out / f"heatmap-{name}.png")) is not None
    polygons = json.loads((out / "segments.geojson").read_text())
    assert {f["properties"]["class"] for f in polygons["features"]} == {
        n for i, n in enumerate(CLASSES.names) if i and (expected == i).any()
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in result.files)


def test_heatmap_downscaling_is_an_area_mean():
    rng = np.random.default_rng(3)
    probabilities = rng.random((50, 70, 2)).astype(np.float32)
    accumulator = scene.AreaMean(50, 70, 2, size=20)  # factor 4
    for top, bottom in ((0, 13), (13, 14), (14, 50)):
        accumulator.add(top, probabilities[top:bottom])
    means = accumulator.means()
    assert means.shape == (13, 18, 2)
    np.testing.assert_allclose(means[1, 2], probabilities[4:8, 8:12].mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(means[12, 17], probabilities[48:50, 68:70].mean(axis=(0, 1)), rtol=1e-6)


def test_failed_scene_leaves_nothing_behind(tmp_path):
    image = mosaic(32, rows=6, cols=2)
    calls = []

    def failing(batch):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("model fell over")
        return local_predict(batch)

    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        scene.write_scene(rasters.ArrayReader(image), failing, CLASSES, out, segment.Windows(32, 0, batch_size=2))
    assert list(out.iterdir()) == []


def test_polygons_in_pixels_with_minimum_area():
    labels = np.zeros((40, 40), dtype=np.uint8)
    labels[5:15, 10:30] = 2  # 200 pixels
    labels[30:32, 30:32] = 3  # 4 pixels, below the minimum
    collection = scene.polygons(labels, CLASSES.names, simplify=1, min_area=16)
    assert [f["properties"]["class"] for f in collection["features"]] == ["field"]
    feature = collection["features"][0]
    assert feature["properties"]["area"] == pytest.approx(200)
    xs, ys = zip(*feature["geometry"]["coordinates"][0])
    assert (min(xs), max(xs), min(ys), max(ys)) == (10, 30, 5, 15)
    assert "crs" not in collection


def test_model_predict_pads_short_batches_to_powers_of_two():
    seen = []

    class Model:
        def predict_on_batch(self, batch):
            seen.append(len(batch))
            return local_predict(batch)

    predict = segment.model_predict(Model().predict_on_batch, batch_size=8)
    rng = np.random.default_rng(4)
    for count in (8, 5, 3, 1):
        batch = rng.uniform(0, 255, size=(count, 16, 16, 3)).astype(np.float32)
        np.testing.assert_array_equal(predict(batch), local_predict(batch))
    assert seen == [8, 8, 4, 1]


def test_sixteen_bit_geotiff_is_read_in_windows_and_scaled(tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    values = np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 3  # max 3597
    with rasterio.open(
        tmp_path / "deep.tif", "w", driver="GTiff", height=40, width=30, count=1, dtype="uint16",
        crs="EPSG:32629", transform=from_origin(500000, 4300000, 10, 10),
    ) as dst:  # fmt: skip
        dst.write(values, 1)
    reader = rasters.open_image(tmp_path / "deep.tif")
    try:
        assert reader.georeference.crs.to_epsg() == 32629
        rows = reader.read(10, 20)
        assert rows.shape == (10, 30, 3) and rows.dtype == np.uint8
        np.testing.assert_array_equal(rows[..., 0], np.rint(values[10:20].astype(float) * 255 / 3597).astype(np.uint8))
        assert any("uint16" in note for note in reader.notes) and any("greyscale" in n for n in reader.notes)
    finally:
        reader.close()


# --- Test-time augmentation ---------------------------------------------------------------


def _pixelwise_softmax(seed=0):
    """A fake model that looks at each pixel alone: it commutes with every turn and mirror."""
    weights = np.random.default_rng(seed).normal(size=(3, 4)).astype(np.float32) / 50

    def predict(batch):
        z = batch @ weights
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    return predict


def _position_aware(batch):
    """A fake model that is not equivariant: its output depends on where a pixel is."""
    height, width = batch.shape[1:3]
    ramp = np.linspace(0, 1, height * width, dtype=np.float32).reshape(1, height, width, 1)
    first = np.clip(batch[..., :1] / 255 * ramp, 0, 1)
    return np.concatenate([first, 1 - first], axis=-1)


@pytest.mark.parametrize("count", segment.TTA_CHOICES)
def test_tta_equals_the_plain_prediction_for_an_equivariant_model(count):
    predict = _pixelwise_softmax()
    batch = np.random.default_rng(1).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(segment.tta_predict(predict, count)(batch), predict(batch), atol=1e-6)


def _blurred_softmax(batch):
    """A fake model mixing each pixel with its neighbours through a 3 × 3 box (same under every
    turn and mirror of the square), so it sees context as a convolution does."""
    padded = np.pad(batch, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    height, width = batch.shape[1:3]
    blurred = sum(padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)) / 9
    return _pixelwise_softmax()(blurred)


def test_tta_equals_the_plain_prediction_on_a_symmetric_input():
    # An input the same under every turn and mirror: every copy the model sees is the input.
    grid = np.random.default_rng(2).uniform(0, 255, (8, 8)).astype(np.float32)
    grid = np.maximum(grid, grid.T)
    grid = np.maximum.reduce([np.rot90(grid, turns) for turns in range(4)])
    symmetric = np.repeat(grid[None, :, :, None], 3, axis=-1) * np.float32([1.0, 0.5, 0.2])
    plain = _blurred_softmax(symmetric)
    for count in segment.TTA_CHOICES:
        np.testing.assert_allclose(segment.tta_predict(_blurred_softmax, count)(symmetric), plain, atol=1e-6)


@pytest.mark.parametrize("turns,mirrored", [(1, False), (2, False), (0, True), (3, True)])
def test_tta8_output_turns_and_mirrors_with_its_input(turns, mirrored):
    batch = np.random.default_rng(3).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    tta = segment.tta_predict(_position_aware, 8)

    def move(x):
        x = np.rot90(x, turns, axes=(1, 2))
        return x[:, :, ::-1] if mirrored else x

    # Exactly: the copies of a pixel are the same numbers in another order, summed sorted.
    np.testing.assert_array_equal(tta(np.ascontiguousarray(move(batch))), move(tta(batch)))
    # Without TTA this model is not equivariant: the test above could fail.
    assert not np.allclose(_position_aware(np.ascontiguousarray(move(batch))), move(_position_aware(batch)))


@pytest.mark.parametrize("count", segment.TTA_CHOICES)
def test_tta_calls_the_model_once_per_copy(count):
    calls = []

    def predict(batch):
        calls.append(batch.copy())
        return _pixelwise_softmax()(batch)

    batch = np.random.default_rng(4).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    segment.tta_predict(predict, count)(batch)
    assert len(calls) == count
    distinct = {c.tobytes() for c in calls}
    assert len(distinct) == count  # each copy is another view of the batch


@pytest.mark.parametrize("count,moves", [(2, [(0, True)]), (4, [(1, False), (2, False), (3, False)])])
def test_fewer_copies_are_exact_under_their_own_symmetries(count, moves):
    batch = np.random.default_rng(5).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    tta = segment.tta_predict(_position_aware, count)
    for turns, mirrored in moves:
        moved = np.rot90(batch, turns, axes=(1, 2))
        moved = moved[:, :, ::-1] if mirrored else moved
        expected = np.rot90(tta(batch), turns, axes=(1, 2))
        expected = expected[:, :, ::-1] if mirrored else expected
        np.testing.assert_array_equal(tta(np.ascontiguousarray(moved)), expected)


def test_tta_wraps_the_sliding_windows():
    # feed_forward.py and prepare.py map pass the wrapped predict to segment_strips: on a
    # scene larger than a window, TTA 8 of the whole scene still mirrors with it exactly.
    image = np.random.default_rng(6).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    windows = segment.Windows(16, overlap=0.25, batch_size=4)
    tta = segment.tta_predict(segment.model_predict(_position_aware, 4), 8)
    plain = segment.segment_array(image, tta, 2, windows)
    mirrored = segment.segment_array(np.ascontiguousarray(image[:, ::-1]), tta, 2, windows)
    # Windows lie on the same grid either way (40 = 16 + 2 × 12), so each window's mirror is a window.
    np.testing.assert_allclose(mirrored, plain[:, ::-1], atol=1e-6)


def test_tta_refuses_other_counts():
    with pytest.raises(ValueError, match="choose one of 1, 2, 4, 8"):
        segment.tta_predict(_pixelwise_softmax(), 3)
