"""Mapping an area (prepare.py map): the tile mosaic, block-wise polygons, the OSM diff, the map's files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import mercantile
import numpy as np
import pytest

import prepare
from osmseg import areamap, cli, datafiles, polygonize, tiles
from osmseg.classes import load_classes, parse_classes
from osmseg.mosaic import MosaicReader
from osmseg.segment import Windows, segment_array

ROOT = Path(__file__).resolve().parent.parent
BLOCK = tiles.TileBlock(65535, 65535, 65536, 65536, 17)  # 2 × 2 tiles around lon 0, lat 0
WINDOW = 64


def smooth(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(height // 16, width // 16, 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def write_tiles(folder: Path, block: tiles.TileBlock, picture: np.ndarray, size: int = 256, skip=()) -> None:
    """Cut `picture` into the block's tiles, named as the pipeline names them (PNG: lossless)."""
    folder.mkdir(parents=True, exist_ok=True)
    for row in range(block.rows):
        for column, tile in enumerate(block.row(row)):
            if tile in skip:
                continue
            part = picture[row * size : (row + 1) * size, column * size : (column + 1) * size]
            cv2.imwrite(str(folder / f"{datafiles.tile_stem(tile)}.png"), part[..., ::-1])


# --- The tile block and the mosaic ---------------------------------------------------------


def test_tile_block_of_a_box_and_its_transform():
    block = tiles.TileBlock.of_bbox(mercantile.LngLatBbox(-0.001, -0.001, 0.001, 0.001), 17)
    assert block == BLOCK and len(block) == 4 and block.tiles()[0] == mercantile.Tile(65535, 65535, 17)
    a, _, c, _, e, f = block.transform(256)
    left, _, _, top = mercantile.xy_bounds(mercantile.Tile(65535, 65535, 17))
    _, bottom, right, _ = mercantile.xy_bounds(mercantile.Tile(65536, 65536, 17))
    assert (c, f) == pytest.approx((left, top)) and (c + 512 * a, f + 512 * e) == pytest.approx((right, bottom))
    assert tuple(block.bounds) == pytest.approx((left, bottom, right, top))


def test_mosaic_is_seamless_and_reads_each_row_once(tmp_path):
    picture = smooth(512, 512)
    write_tiles(tmp_path, BLOCK, picture)
    reader = MosaicReader(BLOCK, tmp_path)
    try:
        assert (reader.height, reader.width) == (512, 512)
        parts = [reader.read(0, 200), reader.read(200, 256), reader.read(256, 300), reader.read(300, 512)]
        np.testing.assert_array_equal(np.concatenate(parts), picture)
        assert reader.valid(0, 512).all() and reader.georeference.crs.to_epsg() == 3857
        with pytest.raises(ValueError, match="read the mosaic top to bottom"):
            reader.read(0, 10)
    finally:
        reader.close()


def test_a_missing_tile_reads_black_and_has_no_imagery(tmp_path):
    picture = smooth(512, 512)
    missing = mercantile.Tile(65536, 65535, 17)  # north-east
    write_tiles(tmp_path, BLOCK, picture, skip=[missing])
    reader = MosaicReader(BLOCK, tmp_path)
    try:
        top = reader.read(0, 256)
        assert not top[:, 256:].any() and np.array_equal(top[:, :256], picture[:256, :256])
        valid = reader.valid(0, 256)
        assert valid[:, :256].all() and not valid[:, 256:].any() and reader.missing == {missing}
    finally:
        reader.close()


# --- Polygons in blocks ---------------------------------------------------------------------


def test_polygons_read_in_blocks_come_back_whole():
    import shapely
    from affine import Affine

    labels = np.zeros((60, 50), dtype=np.uint8)
    labels[5:55, 10:20] = 3  # crosses every block border
    labels[20:30, 30:45] = 3  # another region of the same class, cut by one border
    labels[12:18, 25:28] = 5
    labels[40:41, 22:50] = 2  # a thin line, one row high
    labels[50:60, 40:50] = polygonize.NODATA  # never vectorised
    transform = Affine(2.0, 0, 1000.0, 0, -2.0, 5000.0)
    for rows in (7, 10, 25, 60):
        found = list(polygonize.raster_polygons(lambda top, bottom: labels[top:bottom], 60, transform, rows))
        assert sorted(value for value, _ in found) == [2, 3, 3, 5], rows
        by_value = {}
        for value, polygon in found:
            by_value.setdefault(value, []).append(polygon)
        areas = sorted(p.area for p in by_value[3])
        assert areas == pytest.approx(sorted([50 * 10 * 4.0, 10 * 15 * 4.0]))
        union = shapely.unary_union(by_value[3])
        assert union.bounds == pytest.approx((1000 + 20, 5000 - 110, 1000 + 90, 5000 - 10))


def test_wgs84_features_and_ground_areas():
    from shapely.geometry import box

    tile = mercantile.Tile(65536 + 20000, 40000, 17)  # about 44.6° N
    left, bottom, right, top = mercantile.xy_bounds(tile)
    square = box(left, bottom, right, top)
    _, latitude = mercantile.lnglat((left + right) / 2, (top + bottom) / 2)
    expected = ((right - left) * np.cos(np.radians(latitude))) ** 2
    assert polygonize.ground_area(square) == pytest.approx(expected, rel=1e-4)
    feature = polygonize.feature(square, {"class": "x"})
    ring = np.array(feature["geometry"]["coordinates"][0])
    west, south, east, north = mercantile.bounds(tile)
    assert ring[:, 0].min() == pytest.approx(west, abs=1e-6) and ring[:, 1].max() == pytest.approx(north, abs=1e-6)
    # RFC 7946: exterior rings counterclockwise (positive signed area).
    x, y = ring[:, 0], ring[:, 1]
    assert np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) > 0


def test_rounding_coordinates_never_leaves_a_polygon_invalid():
    import shapely
    from shapely.geometry import Polygon

    # In degrees: a hole whose lower edge lies 4e-8° above its exterior's. Plain rounding to
    # 7 decimals would put both edges on y = 0, rings sharing a segment: invalid.
    exterior = [(0, 0), (1e-4, 0), (1e-4, 1e-4), (0, 1e-4)]
    hole = [(0.3e-4, 0.4e-7), (0.7e-4, 0.4e-7), (0.5e-4, 0.5e-4)]

    def metres(ring):
        x, y = tiles.lnglat_to_xy(np.array([p[0] for p in ring]), np.array([p[1] for p in ring]))
        return list(zip(x, y))

    near = Polygon(metres(exterior), [metres(hole)])
    far = Polygon(metres(exterior))
    assert near.is_valid
    plain = shapely.transform(polygonize.to_lnglat(np.array([near]))[0], lambda xy: np.round(xy, 7))
    assert not plain.is_valid  # the case is real: plain rounding breaks it
    results = polygonize.to_lnglat(np.array([far, near]), 7)
    for result in results:
        assert result.is_valid and not result.is_empty
        assert np.allclose(shapely.get_coordinates(result), np.round(shapely.get_coordinates(result), 7))
    assert results[1].area == pytest.approx(plain.area, rel=1e-3)


# --- The OSM diff on a hand-made case -------------------------------------------------------


CLASSES = parse_classes(
    '[{"name": "residential", "color": "#010101", "filter": "[landuse] = \'residential\'"},'
    ' {"name": "building", "color": "#020202", "filter": "[building].match(\'.+\')"}]'
)


def red_is_building(batch: np.ndarray) -> np.ndarray:
    """A model that sees a building wherever the image is red, residential elsewhere."""
    red = (batch[..., 0] > 150) & (batch[..., 1] < 100)
    probabilities = np.zeros(batch.shape[:3] + (3,), dtype=np.float32)
    probabilities[..., 2] = np.where(red, 0.9, 0.05)
    probabilities[..., 1] = 1 - probabilities[..., 2] - 0.01
    probabilities[..., 0] = 0.01
    return probabilities


def test_the_diff_finds_what_osm_misses_and_what_the_model_does_not_see(tmp_path):
    picture = np.full((512, 512, 3), 90, dtype=np.uint8)
    picture[40:80, 300:360] = (220, 30, 30)  # a building OSM does not map: "missing in OSM"
    picture[300:340, 100:150] = (220, 30, 30)  # a building OSM maps too: agreement
    picture[200:203, 200:203] = (220, 30, 30)  # too small to report
    write_tiles(tmp_path / "tiles", BLOCK, picture)
    osm = np.ones((512, 512), dtype=np.uint8)  # residential everywhere...
    osm[300:340, 100:150] = 2  # ...the mapped building...
    osm[400:480, 380:480] = 2  # ...and one the imagery does not show: "check in OSM"

    reader = MosaicReader(BLOCK, tmp_path / "tiles")
    out = tmp_path / "map"
    options = areamap.MapOptions(
        Windows(WINDOW, 0.25, 4), osm_labels=lambda top, bottom: osm[top:bottom],
        diff=areamap.DiffOptions(min_area=30.0, min_confidence=0.5, max_agreement=0.25),
    )
    result = areamap.map_area(reader, red_is_building, CLASSES, out, options)
    reader.close()
    places = json.loads((out / "osm-diff.geojson").read_text())["features"]
    kinds = [(p["properties"]["kind"], p["properties"]["class"]) for p in places]
    assert sorted(kinds) == [("check in OSM", "building"), ("missing in OSM", "building")]
    transform = reader.georeference.transform
    for place in places:
        lng, lat = np.array(place["geometry"]["coordinates"][0]).T
        columns, rows = ~transform @ tiles.lnglat_to_xy(lng, lat)
        props = place["properties"]
        if props["kind"] == "missing in OSM":
            assert (columns.min(), columns.max(), rows.min(), rows.max()) == pytest.approx((300, 360, 40, 80), abs=1)
            assert props["confidence"] == pytest.approx(0.9, abs=0.02)
        else:
            assert (columns.min(), columns.max(), rows.min(), rows.max()) == pytest.approx((380, 480, 400, 480), abs=1)
            assert props["agreement"] == 0.0
    # The larger place ranks first; the score is area × confidence or area × (1 - agreement).
    assert [p["properties"]["rank"] for p in places] == [1, 2]
    assert places[0]["properties"]["kind"] == "check in OSM"
    building = result.agreement["building"]
    assert building["osm_pixels"] == 40 * 50 + 80 * 100 and building["model_pixels"] == 40 * 60 + 40 * 50 + 9
    assert building["iou"] == pytest.approx(40 * 50 / (40 * 60 + 40 * 50 + 9 + 80 * 100), abs=1e-4)
    record = json.loads((out / "counts.json").read_text())
    assert record["agreement"]["building"]["iou"] == building["iou"]
    assert sum(record["counts"].values()) + record["no_imagery_pixels"] == record["pixels"] == 512 * 512
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no working file stays behind


# --- prepare.py map, end to end, on the demo world -------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    import model

    classes = load_classes(ROOT / "classes" / "mine.json")
    network = model.build("segnet-basic", classes.num_classes, input_size=WINDOW, width=0.125, seed=0)
    path = tmp_path_factory.mktemp("weights") / "weights.hdf5"
    config = {"name": "segnet-basic", "width": 0.125, "input_size": WINDOW, "num_classes": classes.num_classes,
              "classes": classes.to_json(), "mixed_precision": False}  # fmt: skip
    model.save(network, path, config)
    return path


@pytest.fixture(scope="module")
def demo_osm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("osm") / "demo.mbtiles"
    assert cli.run(prepare.main, ["demo-world", "--out", str(out)]) == 0
    return out


BOX = "--bbox=-0.0021,-0.0012,0.0030,0.0012"  # 3 × 2 z17 tiles across lon 0, lat 0


@pytest.mark.slow
def test_map_of_the_demo_world(weights, demo_osm, tmp_path, capsys):
    import rasterio

    out, cache = tmp_path / "map", tmp_path / "tiles"
    argv = ["map", "--weights", str(weights), BOX, "--image-tiles", "demo:0", "--tiles", str(cache),
            "--osm", str(demo_osm), "--out", str(out), "--heatmap-size", "64"]  # fmt: skip
    assert cli.run(prepare.main, argv) == 0, capsys.readouterr().err
    block = tiles.TileBlock(65535, 65535, 65537, 65536, 17)
    assert sorted(p.stem for p in cache.glob("*.jpg")) == sorted(datafiles.tile_stem(t) for t in block.tiles())
    record = json.loads((out / "counts.json").read_text())
    assert (record["width"], record["height"]) == (768, 512) and record["tiles"]["count"] == 6
    assert sum(record["counts"].values()) + record["no_imagery_pixels"] == record["pixels"] == 768 * 512
    # Square metres: every pixel about (1.194 m × cos(0.001°))², the equator's.
    assert sum(record["square_metres"].values()) == pytest.approx(768 * 512 * tiles.metres_per_pixel(17) ** 2, rel=1e-4)
    assert set(record["agreement"]) == set(load_classes(ROOT / "classes" / "mine.json").names)
    with rasterio.open(out / "mask.tif") as mask, rasterio.open(out / "probabilities.tif") as probabilities:
        assert mask.crs.to_epsg() == 3857 and mask.nodata == 255
        assert tuple(mask.bounds) == pytest.approx(tuple(block.bounds))
        assert tuple(mask.transform)[:6] == pytest.approx(block.transform(256))
        assert mask.profile["tiled"] and mask.block_shapes[0] == (512, 512) and mask.overviews(1)
        assert probabilities.count == 7 and probabilities.overviews(1)
        labels = mask.read(1)
    # Seamless across tile borders: the same as segmenting the stitched image whole.
    from osmseg import cli as _cli

    _cli.import_keras()
    import model
    from osmseg import segment

    network, _ = model.load(weights)
    predict = segment.model_predict(model.inference(network), 8)
    stitched = MosaicReader(block, cache)
    image = stitched.read(0, 512)
    stitched.close()
    whole = segment_array(image, predict, 7, Windows(WINDOW, 0.25, 8)).argmax(axis=2)
    assert (whole == labels).mean() > 0.999  # float summation order may flip a near tie
    # GeoJSON: RFC 7946 lon/lat inside the block, with ground areas.
    west, south, east, north = tiles.xy_to_bbox(block.bounds)
    for name in ("segments.geojson", "osm-diff.geojson"):
        collection = json.loads((out / name).read_text())
        assert "crs" not in collection
        for item in collection["features"]:
            points = np.array([xy for ring in _rings(item["geometry"]) for xy in ring])
            assert west - 1e-7 <= points[:, 0].min() and points[:, 0].max() <= east + 1e-7
            assert south - 1e-7 <= points[:, 1].min() and points[:, 1].max() <= north + 1e-7
            assert item["properties"]["area_m2"] >= 20.0
    page = (out / "index.html").read_text()
    assert "http://" not in page and "https://" not in page and page.count("data:image/") == 2
    # A re-run with the same inputs does nothing; --force redoes it.
    stamp = (out / "mask.tif").stat().st_mtime_ns
    assert cli.run(prepare.main, argv) == 0
    assert "already mapped" in capsys.readouterr().err and (out / "mask.tif").stat().st_mtime_ns == stamp
    assert cli.run(prepare.main, argv + ["--force"]) == 0
    assert (out / "mask.tif").stat().st_mtime_ns != stamp
    # Test-time augmentation is one of the inputs: another --tta maps again, and says so.
    stamp = (out / "mask.tif").stat().st_mtime_ns
    assert cli.run(prepare.main, argv + ["--tta", "2"]) == 0
    assert (out / "mask.tif").stat().st_mtime_ns != stamp
    assert json.loads((out / "counts.json").read_text())["inputs"]["tta"] == 2
    with pytest.raises(SystemExit) as stopped:
        prepare.main(argv + ["--tta", "3"])
    assert stopped.value.code == 2 and "--tta: invalid choice: 3" in capsys.readouterr().err


def _rings(geometry: dict):
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    for polygon in polygons:
        yield from polygon


def test_tiles_that_fail_leave_nodata_and_the_map_is_redone_next_time(weights, tmp_path, capsys):
    from demo_faults import FaultyTileServer

    out = tmp_path / "map"
    with FaultyTileServer(seed=0, error_every=3) as server:  # every third request fails, retries off
        argv = ["map", "--weights", str(weights), BOX, "--image-tiles", server.tilejson_url, "--retries", "0",
                "--tiles", str(tmp_path / "t"), "--out", str(out), "--heatmap-size", "32"]  # fmt: skip
        assert cli.run(prepare.main, argv) == 0
        record = json.loads((out / "counts.json").read_text())
        assert record["failed_tiles"] >= 1 and record["no_imagery_pixels"] == record["failed_tiles"] * 256 * 256
        assert "run again to retry them" in capsys.readouterr().err
        server.set_faults(error_every=0)
        assert cli.run(prepare.main, argv) == 0  # not "already mapped": the holes are filled
    record = json.loads((out / "counts.json").read_text())
    assert "failed_tiles" not in record and record["no_imagery_pixels"] == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--bbox=1,2,1,4"], "empty"),
        (["--bbox=-10,40,10,60", "--zoom", "17"], "pass --yes"),
        (["--image-tiles", "http://127.0.0.1:9/{z}/{x}/{y}.jpg"], "127.0.0.1:9"),
        (["--weights", "nowhere.hdf5"], "no such weights file"),
    ],
)
def test_map_bad_input_exits_2_and_writes_nothing(weights, tmp_path, capsys, extra, message):
    out = tmp_path / "map"
    argv = ["map", "--weights", str(weights), BOX, "--image-tiles", "demo:0", "--tiles", str(tmp_path / "t"),
            "--out", str(out), "--timeout", "5", *extra]  # fmt: skip
    assert cli.run(prepare.main, argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


# --- The results page in a browser ----------------------------------------------------------


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium binary (apt-get install chromium)")


def screenshot(page: Path, fragment: str, tmp_path: Path) -> np.ndarray:
    shot = tmp_path / f"shot{len(list(tmp_path.glob('shot*')))}.png"
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
               "--hide-scrollbars", "--window-size=1200,900", "--virtual-time-budget=5000",
               f"--screenshot={shot}", page.as_uri() + fragment]  # fmt: skip
    subprocess.run(command, capture_output=True, timeout=60, check=False)
    if not shot.exists():
        pytest.skip("chromium ran but wrote no screenshot")
    return cv2.cvtColor(cv2.imread(str(shot)), cv2.COLOR_BGR2RGB)


@pytest.mark.slow
def test_results_page_layers_toggle_in_headless_chromium(tmp_path):
    from osmseg import mappage, visualise

    imagery = np.full((64, 96, 3), 90, dtype=np.uint8)
    probabilities = np.zeros((32, 48, 3), dtype=np.float32)
    probabilities[..., 1] = 1.0
    probabilities[8:24, 8:24] = (0, 0, 1)
    transform = tiles.TileBlock(65535, 65535, 65537, 65536, 17).transform(32)
    from affine import Affine
    from shapely.geometry import box

    affine = Affine(*transform)
    left, top = affine @ (10, 10)
    right, bottom = affine @ (60, 50)
    place = polygonize.feature(box(left, bottom, right, top), {"kind": "missing in OSM", "class": "building",
                               "class_index": 2, "area_m2": 100.0, "confidence": 0.9, "score": 90.0, "rank": 1})
    page = mappage.render(imagery=imagery, probabilities=probabilities, classes=CLASSES,
                          counts={"background": 0, "residential": 10, "building": 5},
                          square_metres={"background": 0.0, "residential": 10.0, "building": 5.0},
                          diff=[place], bounds=affine, shape=(64, 96), agreement=None, title="test map")  # fmt: skip
    path = tmp_path / "index.html"
    path.write_text(page)
    shown = visualise.display_palette(3)
    imagery_only = screenshot(path, "#layers=imagery", tmp_path)
    segments = screenshot(path, "#layers=imagery,segments&opacity=1", tmp_path)
    with_diff = screenshot(path, "#layers=imagery,diff", tmp_path)

    def count(image, colour) -> int:  # on the map, left of the 350-pixel side panel and its legend
        return int((np.abs(image[:, :800].astype(int) - np.array(colour)).max(axis=-1) <= 2).sum())

    assert count(imagery_only, (90, 90, 90)) > 100_000
    assert count(imagery_only, shown[1]) < 50 and count(segments, shown[1]) > 50_000
    assert count(segments, shown[2]) > 5_000  # the building square, in its display colour
    assert count(imagery_only, (255, 0, 255)) < 20 and count(with_diff, (255, 0, 255)) > 500


def test_regions_are_chosen_whole_by_their_statistics_across_blocks():
    values = np.zeros((40, 30), dtype=np.uint8)
    values[2:38, 2:6] = 1  # tall: crosses every block border
    values[10:14, 20:24] = 1  # small
    values[18:26, 10:16] = 2  # crosses one border
    values[30:40, 25:30] = polygonize.NODATA
    weight = np.zeros((40, 30))
    weight[2:20, 2:6] = 1.0  # half of the tall region
    weight[18:26, 10:16] = 1.0  # all of region 2
    for rows in (5, 9, 40):
        seen = {}

        def keep(region_values, counts, sums):
            for value, count, total in zip(region_values, counts, sums[0]):
                seen.setdefault(int(value), []).append((int(count), float(total)))
            return counts >= 20

        ids = np.full(values.shape, -1, dtype=np.int32)

        def write(top, block):
            ids[top : top + len(block)] = block

        regions = polygonize.select_regions(lambda t, b: values[t:b], [lambda t, b: weight[t:b]], 40, keep, write, rows)
        assert sorted(seen[1]) == [(16, 0.0), (36 * 4, 18 * 4.0)] and seen[2] == [(48, 48.0)], rows
        assert len(regions) == 2 and sorted(regions.values[1:].tolist()) == [1, 2]
        for number in (1, 2):  # each kept region has one id, its statistics in the table
            inside = ids == number
            assert regions.counts[number] == inside.sum() and set(values[inside].tolist()) == {regions.values[number]}
            assert regions.sums[0][number] == pytest.approx(weight[inside].sum())
        assert (ids[values == 0] == 0).all() and (ids[10:14, 20:24] == 0).all()  # the small one is left out
