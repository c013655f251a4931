"""Tests for osmseg.labels: mapnik rendering of OSM features into label tiles, and counting."""

from __future__ import annotations

import gzip
import json
import sqlite3
from pathlib import Path

import mercantile
import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import LineString, Point, box

from osmseg import cli, datafiles, labels, tiles
from osmseg.classes import parse_classes
from osmseg.errors import ClassesError, UserError
from osmseg.osm import Feature

# A z17 tile near 0°N 0°E (the demo world's corner of the map) and its pixel size in metres.
TILE = mercantile.Tile(65536, 65535, 17)
SIZE = 64  # small labels keep the tests fast; the maths is the same at 256
PIXEL = tiles.metres_per_pixel(TILE.z, SIZE)


def classes_of(*entries) -> labels.Classes:
    """Classes from (name, colour, stroke width, filter) tuples."""
    return parse_classes(
        json.dumps([{"name": n, "color": c, "stroke-width": str(w), "filter": f} for n, c, w, f in entries])
    )


CLASSES = classes_of(
    ("water", "#010101", 1, "[natural] = 'water'"),
    ("road", "#020202", 3, "[highway] = 'primary'"),
    ("tree", "#030303", 3, "[natural] = 'tree'"),
    ("building", "#040404", 1, "[building].match('.+')"),
)


class ListSource:
    """A stand-in OSM source holding features in memory (same interface as osmseg.osm's)."""

    name = "test"
    zoom = 12

    def __init__(self, features):
        self._features = list(features)
        self.queries = []

    def features(self, bounds):
        self.queries.append(bounds)
        area = box(*bounds)
        return [f for f in self._features if f.geometry.intersects(area)]


def pixel_box(tile, col0, row0, col1, row1):
    """The EPSG:3857 box covering pixel columns col0..col1-1 and rows row0..row1-1 of tile."""
    left, _, _, top = mercantile.xy_bounds(tile)
    return box(left + col0 * PIXEL, top - row1 * PIXEL, left + col1 * PIXEL, top - row0 * PIXEL)


def pixel_point(tile, col, row):
    """The EPSG:3857 point at the given (fractional) pixel position of tile."""
    left, _, _, top = mercantile.xy_bounds(tile)
    return left + col * PIXEL, top - row * PIXEL


def render_one(features, classes=CLASSES, tile=TILE):
    renderer = labels.LabelRenderer(classes, SIZE)
    [(rendered, rgb)] = list(labels.render_tiles(ListSource(features), renderer, [tile]))
    assert rendered == tile
    assert rgb.shape == (SIZE, SIZE, 3) and rgb.dtype == np.uint8
    return rgb


def assert_only_class_colours(rgb, classes=CLASSES):
    _, unknown = classes.colors_to_labels(rgb)
    assert unknown == 0, f"{unknown} pixels are antialiased or of no class"


def test_polygon_is_filled_exactly_with_its_colour():
    rgb = render_one([Feature(pixel_box(TILE, 10, 20, 30, 25), {"building": "yes"})])
    expected = np.zeros((SIZE, SIZE), bool)
    expected[20:25, 10:30] = True
    assert (rgb[expected] == (4, 4, 4)).all()
    assert (rgb[~expected] == 0).all()


def test_line_is_stroke_width_pixels_wide():
    y = pixel_point(TILE, 0, 32.5)[1]
    left, _, right, _ = mercantile.xy_bounds(TILE)
    rgb = render_one([Feature(LineString([(left - 100, y), (right + 100, y)]), {"highway": "primary"})])
    painted = (rgb == (2, 2, 2)).all(axis=2)
    # stroke-width 3 centred on row 32's centre covers rows 31, 32 and 33 exactly.
    assert (painted.sum(axis=0) == 3).all()
    assert painted[31:34].all()
    assert_only_class_colours(rgb)


def test_point_is_a_square_stroke_width_pixels_wide():
    rgb = render_one([Feature(Point(pixel_point(TILE, 40.5, 12.5)), {"natural": "tree"})])
    painted = (rgb == (3, 3, 3)).all(axis=2)
    assert painted.sum() == 9
    assert painted[11:14, 39:42].all()


def test_filter_selects_features_by_tags():
    rgb = render_one(
        [
            Feature(pixel_box(TILE, 0, 0, 10, 10), {"building": "house"}),
            Feature(pixel_box(TILE, 20, 20, 30, 30), {"building": ""}),  # match('.+') fails
            Feature(pixel_box(TILE, 40, 40, 50, 50), {"landuse": "forest"}),  # no class
        ]
    )
    assert (rgb[:10, :10] == 4).all()
    assert (rgb[10:] == 0).all() and (rgb[:, 10:] == 0).all()


def test_no_antialiasing_on_slanted_and_round_shapes():
    centre = Point(pixel_point(TILE, 31.3, 29.7))
    left, bottom, right, top = mercantile.xy_bounds(TILE)
    rgb = render_one(
        [
            Feature(centre.buffer(17.3 * PIXEL), {"natural": "water"}),
            Feature(LineString([(left, bottom), (right, top)]), {"highway": "primary"}),
            Feature(Point(pixel_point(TILE, 5.2, 50.9)), {"natural": "tree"}),
            Feature(shapely.affinity.rotate(pixel_box(TILE, 35, 5, 60, 20), 23), {"building": "yes"}),
        ]
    )
    assert_only_class_colours(rgb)
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) == 5  # four classes and the background


@pytest.mark.parametrize("building_last", [True, False])
def test_later_classes_paint_over_earlier_ones(building_last):
    water = ("water", "#010101", 1, "[natural] = 'water'")
    building = ("building", "#040404", 1, "[building].match('.+')")
    classes = classes_of(water, building) if building_last else classes_of(building, water)
    both = pixel_box(TILE, 10, 10, 40, 40)
    rgb = render_one([Feature(both, {"building": "yes"}), Feature(both, {"natural": "water"})], classes)
    on_top = (4, 4, 4) if building_last else (1, 1, 1)
    assert (rgb[10:40, 10:40] == on_top).all()


def test_bad_filters_are_named():
    for bad in ("[landuse] = ", "landuse is forest", "[a] = 'b' and"):
        classes = classes_of(("water", "#010101", 1, "[natural] = 'water'"), ("forest", "#020202", 1, bad))
        with pytest.raises(ClassesError) as error:
            labels.LabelRenderer(classes, SIZE, origin="my.json")
        assert "my.json" in str(error.value) and "'forest'" in str(error.value) and bad in str(error.value)


def test_count_labels_sums_to_pixels_and_orders_background_last():
    rgb = render_one(
        [
            Feature(pixel_box(TILE, 0, 0, 8, 4), {"natural": "water"}),
            Feature(pixel_box(TILE, 8, 0, 9, 1), {"building": "y"}),
        ]
    )
    counts = labels.count_labels(rgb, CLASSES)
    assert counts.dtype == np.int64
    assert counts.tolist() == [32, 0, 0, 1, SIZE * SIZE - 33]


def test_count_labels_rejects_unknown_colours():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = (9, 9, 9)
    with pytest.raises(ValueError, match="1 pixels"):
        labels.count_labels(rgb, CLASSES)


def test_one_features_query_per_source_tile_and_margin_reaches_neighbours():
    tiles = [TILE, mercantile.Tile(TILE.x + 1, TILE.y, 17), mercantile.Tile(TILE.x, TILE.y + 200, 17)]
    source = ListSource([])
    renderer = labels.LabelRenderer(CLASSES, SIZE)
    rendered = [tile for tile, _ in labels.render_tiles(source, renderer, tiles)]
    assert sorted(rendered) == sorted(tiles)
    assert len(source.queries) == 2  # the third tile lies in another z12 tile
    first = source.queries[0]
    assert first.left < mercantile.xy_bounds(TILE).left - 3 * PIXEL


# --- Real vector tiles: a polygon crossing a z12 border ------------------------------------


def write_qa_tiles(path: Path, features, areas_as_lines: bool = False) -> None:
    """Write a tiny QA-tiles-style MBTiles: z12, TMS rows, gzipped MVT, layer `osm`, no buffer.

    areas_as_lines: store polygons as their outlines (LineStrings), as the 2015 generation does.
    """
    import mapbox_vector_tile

    db = sqlite3.connect(path)
    db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
    db.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
    geometries = [geometry for geometry, _ in features]
    west, south, east, north = shapely.total_bounds(np.array(geometries))
    lon0, lat0 = mercantile.lnglat(west, south)
    lon1, lat1 = mercantile.lnglat(east, north)
    db.executemany(
        "INSERT INTO metadata VALUES (?, ?)",
        [
            ("name", "test"),
            ("format", "pbf"),
            ("minzoom", "12"),
            ("maxzoom", "12"),
            ("bounds", f"{lon0},{lat0},{lon1},{lat1}"),
        ],
    )
    tiles = set()
    for geometry in geometries:
        a, b, c, d = geometry.bounds
        tiles.update(mercantile.tiles(*mercantile.lnglat(a, b), *mercantile.lnglat(c, d), zooms=[12]))
    for tile in tiles:
        left, bottom, right, top = mercantile.xy_bounds(tile)
        unit = np.array([(right - left) / 4096, -(top - bottom) / 4096])
        encoded = []
        for number, (geometry, tags) in enumerate(features):
            if areas_as_lines and geometry.geom_type == "Polygon":
                geometry = geometry.exterior
            piece = geometry.intersection(box(left, bottom, right, top))
            if piece.is_empty:
                continue
            # Into tile units, y down from the top-left corner (MVT), extent 4096.
            piece = shapely.transform(piece, lambda xy, origin=(left, top), unit=unit: (xy - origin) / unit)
            encoded.append({"geometry": piece.wkt, "properties": {**tags, "@id": number + 1, "@type": "way"}})
        data = mapbox_vector_tile.encode([{"name": "osm", "features": encoded}], default_options={"y_coord_down": True})
        row = (1 << tile.z) - 1 - tile.y
        db.execute("INSERT INTO tiles VALUES (?, ?, ?, ?)", (tile.z, tile.x, row, gzip.compress(data)))
    db.commit()
    db.close()


@pytest.mark.parametrize("areas_as_lines", [False, True], ids=["polygons", "2015-lines"])
def test_polygon_crossing_a_z12_border_renders_seamlessly(tmp_path, areas_as_lines):
    from osmseg import osm

    z12 = mercantile.parent(TILE, zoom=12)
    border_x = mercantile.xy_bounds(z12).right
    # The z17 tiles on either side of the z12 tile's east border, in the middle row.
    west_tile = mercantile.Tile((z12.x + 1) * 32 - 1, z12.y * 32 + 16, 17)
    east_tile = mercantile.Tile((z12.x + 1) * 32, z12.y * 32 + 16, 17)
    _, bottom, _, top = mercantile.xy_bounds(west_tile)
    polygon = box(
        border_x - 5 * PIXEL * 4, bottom + 0.3 * (top - bottom), border_x + 7 * PIXEL * 4, top - 0.3 * (top - bottom)
    )
    path = tmp_path / "border.mbtiles"
    write_qa_tiles(path, [(polygon, {"building": "yes"})], areas_as_lines)
    source = osm.open_source("qa-tiles", path)
    renderer = labels.LabelRenderer(CLASSES, SIZE)
    rendered = dict(labels.render_tiles(source, renderer, [west_tile, east_tile]))
    west = (rendered[west_tile] == (4, 4, 4)).all(axis=2)
    east = (rendered[east_tile] == (4, 4, 4)).all(axis=2)
    rows = west[:, -1]
    assert rows.sum() > SIZE // 4
    # The border columns on both sides are filled in the same rows: no seam, no gap.
    assert (rows == east[:, 0]).all()
    assert west[rows][:, -5:].all() and east[rows][:, :7].all()
    assert_only_class_colours(rendered[west_tile])


# --- Writing labels: atomic, resumable -----------------------------------------------------


def test_render_labels_writes_pngs_and_resume_skips_existing(tmp_path):
    path = tmp_path / "osm.mbtiles"
    write_qa_tiles(path, [(pixel_box(TILE, 0, 0, 32, 32), {"building": "yes"})])
    from osmseg import osm

    source = osm.open_source("qa-tiles", path)
    tiles = [TILE, mercantile.Tile(TILE.x + 1, TILE.y, 17)]
    out = tmp_path / "color"
    first = labels.render_labels(tiles, source, CLASSES, out, SIZE, workers=1, progress=False)
    assert first == {"rendered": 2, "skipped": 0}
    label = labels.read_label(out / f"17-{TILE.x}-{TILE.y}.png")
    assert label.shape == (SIZE, SIZE, 3)
    assert (label[:32, :32] == 4).all() and (label[32:] == 0).all()
    assert (labels.read_label(out / f"17-{TILE.x + 1}-{TILE.y}.png") == 0).all()  # nothing there: all background
    assert sorted(p.name for p in out.iterdir()) == sorted(f"17-{t.x}-{t.y}.png" for t in tiles)
    # A label that is already there is kept as it is, even if it differs.
    kept = out / f"17-{TILE.x}-{TILE.y}.png"
    kept.write_bytes(b"not touched")
    (out / f"17-{TILE.x + 1}-{TILE.y}.png").unlink()
    second = labels.render_labels(tiles, source, CLASSES, out, SIZE, workers=1, progress=False)
    assert second == {"rendered": 1, "skipped": 1}
    assert kept.read_bytes() == b"not touched"


def test_render_labels_over_worker_processes_matches_one_process(tmp_path):
    path = tmp_path / "osm.mbtiles"
    features = [
        (pixel_box(TILE, 3, 5, 60, 9), {"building": "yes"}),
        (Point(pixel_point(TILE, 70.5, 5.5)).buffer(400), {"natural": "water"}),
    ]
    write_qa_tiles(path, features)
    from osmseg import osm

    source = osm.open_source("qa-tiles", path)
    # Tiles in two z12 groups so that the pool gets two tasks.
    tiles = [TILE, mercantile.Tile(TILE.x + 1, TILE.y, 17), mercantile.Tile(TILE.x - 1, TILE.y, 17)]
    one = labels.render_labels(tiles, source, CLASSES, tmp_path / "one", SIZE, workers=1, progress=False)
    two = labels.render_labels(tiles, source, CLASSES, tmp_path / "two", SIZE, workers=2, progress=False)
    assert one == two == {"rendered": 3, "skipped": 0}
    for tile in tiles:
        name = f"17-{tile.x}-{tile.y}.png"
        assert (labels.read_label(tmp_path / "one" / name) == labels.read_label(tmp_path / "two" / name)).all()


# --- Real OSM QA tiles ---------------------------------------------------------------------


def test_monaco_labels_show_buildings_where_the_data_has_them(monaco_mbtiles, classes_file):
    import cv2

    from osmseg import osm
    from osmseg.classes import load_classes

    classes = load_classes(classes_file)
    source = osm.open_source("qa-tiles", monaco_mbtiles)
    # A z17 tile in Monaco-Ville, the old town on the rock, which is full of mapped buildings.
    tile = mercantile.tile(7.4235, 43.7310, 17)
    renderer = labels.LabelRenderer(classes, 256)
    [(_, rgb)] = list(labels.render_tiles(source, renderer, [tile]))
    assert_only_class_colours(rgb, classes)
    building = (rgb == (5, 5, 5)).all(axis=2)
    assert building.sum() > 2000
    # Rasterise the same building polygons independently; the two must agree.
    left, bottom, right, top = mercantile.xy_bounds(tile)
    reference = np.zeros((256, 256), np.uint8)
    for feature in source.features(mercantile.xy_bounds(tile)):
        if "building" in feature.tags and feature.tags["building"] and feature.geometry.geom_type.endswith("Polygon"):
            for polygon in getattr(feature.geometry, "geoms", [feature.geometry]):
                rings = [polygon.exterior, *polygon.interiors]
                points = [
                    ((np.asarray(r.coords) - (left, top)) / ((right - left) / 256, -(top - bottom) / 256))
                    for r in rings
                ]
                cv2.fillPoly(reference, [np.round(p - 0.5).astype(np.int32) for p in points], 1)
    reference = reference.astype(bool)
    iou = (building & reference).sum() / (building | reference).sum()
    assert iou > 0.85
    assert labels.count_labels(rgb, classes).sum() == 256 * 256


# --- prepare.py labels --------------------------------------------------------------------


def test_prepare_labels_bad_filter_exits_2_naming_it(tmp_path, capsys):
    import prepare

    classes_path = tmp_path / "bad.json"
    classes_path.write_text(json.dumps([{"name": "forest", "color": "#010101", "filter": "[landuse] = "}]))
    (tmp_path / "sample.txt").write_text(f"test 17 {TILE.x} {TILE.y}\n")
    out = tmp_path / "color"
    status = cli.run(
        prepare.main,
        [
            "labels",
            "--sample",
            str(tmp_path / "sample.txt"),
            "--classes",
            str(classes_path),
            "--osm",
            str(tmp_path / "x.mbtiles"),
            "--out",
            str(out),
        ],
    )
    assert status == 2
    message = capsys.readouterr().err
    assert "forest" in message and "[landuse] = " in message
    assert not out.exists()


def test_read_label_names_a_missing_file(tmp_path):
    with pytest.raises(UserError, match="make data/labels/color"):
        labels.read_label(tmp_path / "17-1-2.png")


# --- Filtering: labelled share, exact count, counts and stats --------------------------------


def test_filter_tiles_keeps_the_first_passing_ones_in_order():
    tiles = [mercantile.Tile(i, 0, 17) for i in range(6)]
    shares = {0: 0, 1: 10, 2: 0, 3: 50, 4: 99, 5: 5}
    counts = lambda tile: np.array([shares[tile.x], 0, 100 - shares[tile.x]])
    entries = [("s", t) for t in tiles]
    kept, considered = labels.filter_tiles(entries, counts, 0.0, 2, more=iter(()))
    assert [t.x for _, t, _ in kept] == [1, 3] and considered == 4
    kept, _ = labels.filter_tiles(entries, counts, 0.07, 10, more=iter(()))
    assert [t.x for _, t, _ in kept] == [1, 3, 4]


def test_filter_tiles_draws_more_until_the_count_passes():
    counts = lambda tile: np.array([tile.x % 3 == 0, 0, 1])
    entries = [("s", mercantile.Tile(i, 0, 17)) for i in range(1, 4)]  # one passes (x=3)
    more = (("s", mercantile.Tile(i, 0, 17)) for i in range(4, 1000))
    rendered = []
    kept, _ = labels.filter_tiles(entries, counts, 0.0, 7, more=more, render=rendered.extend)
    assert [t.x for _, t, _ in kept] == [3, 6, 9, 12, 15, 18, 21]
    # Only drawn tiles were rendered, each once, and not far past what was needed.
    assert len(rendered) == len(set(rendered)) and rendered[0].x == 4 and len(rendered) < 100


def test_stats_and_count_columns():
    classes = classes_of(("water", "#010101", 1, "[a] = 'b'"), ("road", "#020202", 1, "[a] = 'c'"))
    counts = [np.array([3, 0, 13]), np.array([1, 2, 13])]
    assert labels.count_columns(classes) == ["water", "road", "Background"]
    rows = labels.label_stats(counts, classes)
    assert rows == [("water", 4 / 32, 2), ("road", 2 / 32, 1), ("Background", 26 / 32, 2)]
    assert labels.stats_csv(rows).splitlines()[0] == "class,pixel_frequency,tile_count"


@pytest.fixture
def little_world(tmp_path):
    """A z12 source holding buildings in exactly 6 of the 16 z17 tiles of a 4x4 box."""

    corner = mercantile.Tile(TILE.x, TILE.y - 3, 17)
    box_tiles = [mercantile.Tile(corner.x + i, corner.y + j, 17) for i in range(4) for j in range(4)]
    with_buildings = box_tiles[1::2][:6]
    west, _, _, north = mercantile.bounds(corner)
    _, south, east, _ = mercantile.bounds(box_tiles[-1])
    shrink = 1e-7  # keep the box inside the 4x4 tiles, off their outer edges
    bbox = f"{west + shrink},{south + shrink},{east - shrink},{north - shrink}"
    path = tmp_path / "little.mbtiles"
    write_qa_tiles(path, [(pixel_box(t, 10, 10, 20, 20), {"building": "yes"}) for t in with_buildings])
    classes_path = tmp_path / "classes.json"
    classes_path.write_text(CLASSES.to_json())
    all_tiles = tmp_path / "all_tiles.txt"
    datafiles.write_tile_list(all_tiles, [("little", mercantile.parent(TILE, zoom=12))])
    return {
        "path": path,
        "bbox": bbox,
        "with_buildings": set(with_buildings),
        "box": box_tiles,
        "classes": classes_path,
        "all_tiles": all_tiles,
        "dir": tmp_path,
    }


def run_stage(world, stage, sample_count, count, capsys):
    """Draw a sample of `sample_count` like prepare.py sample does, label it, then filter for `count`."""
    import prepare
    d = world["dir"]
    bbox = tiles.parse_bbox(world["bbox"])
    stream = tiles.sample_entries(bbox, 17, 0, datafiles.read_tile_list(world["all_tiles"]).entries)
    sample = [entry for _, entry in zip(range(sample_count), stream)]
    datafiles.write_tile_list(d / "sample.txt", sample)
    common = [
        "--classes",
        str(world["classes"]),
        "--osm",
        str(world["path"]),
        "--tile-size",
        str(SIZE),
        "--workers",
        "1",
    ]
    assert cli.run(prepare.main, ["labels", "--sample", str(d / "sample.txt"), "--out", str(d / "color"), *common]) == 0
    status = cli.run(
        prepare.main,
        [
            "filter",
            "--sample",
            str(d / "sample.txt"),
            "--labels",
            str(d / "color"),
            "--count",
            str(count),
            f"--bbox={world['bbox']}",
            "--zoom",
            "17",
            "--seed",
            "0",
            "--all-tiles",
            str(world["all_tiles"]),
            "--out",
            str(d / "sample-filtered.txt"),
            "--stats",
            str(d / "label-stats.csv"),
            *common,
        ],
    )
    return status, sample, capsys.readouterr().err


def read_filtered(path):
    listed = datafiles.read_tile_list(path)
    header = path.read_text().splitlines()[0]
    return header, [(tile, counts.tolist()) for tile, counts in zip(listed.tiles, listed.counts)]


def test_filter_keeps_exactly_count_tiles_drawing_past_the_sample(little_world, capsys):
    status, sample, _ = run_stage(little_world, "filter", 4, 5, capsys)
    assert status == 0
    head, rows = read_filtered(little_world["dir"] / "sample-filtered.txt")
    assert head == "#source z x y water road tree building Background"
    assert len(rows) == 5
    assert {tile for tile, _ in rows} <= little_world["with_buildings"]
    for tile, counts in rows:
        assert sum(counts) == SIZE * SIZE and counts[3] == 100  # a 10x10 building
    # Some kept tiles were not in the sample: they were drawn from the same stream and labelled.
    assert {tile for tile, _ in rows} - {tile for _, tile in sample}
    stats = (little_world["dir"] / "label-stats.csv").read_text().splitlines()
    assert stats[0] == "class,pixel_frequency,tile_count"
    assert stats[4].startswith("building,") and stats[4].endswith(",5")


def test_filter_says_so_when_the_box_has_fewer(little_world, capsys):
    status, _, err = run_stage(little_world, "filter", 4, 10, capsys)
    assert status == 0
    _, rows = read_filtered(little_world["dir"] / "sample-filtered.txt")
    assert {tile for tile, _ in rows} == little_world["with_buildings"]
    assert "only 6 tiles" in err and "keeping all 6" in err
    # Every tile of the box got a label on the way.
    assert len(list((little_world["dir"] / "color").glob("*.png"))) == 16


def test_filter_bad_input_exits_2(little_world, capsys, tmp_path):
    import prepare

    for args, words in [
        (["--count", "0"], "--count"),
        (["--label-ratio", "1.5"], "--label-ratio"),
        (["--sample", str(tmp_path / "none.txt")], "make data/sample.txt"),
    ]:
        status = cli.run(prepare.main, ["filter", "--bbox=0,0,1,1", "--classes", str(little_world["classes"]), *args])
        assert status == 2
        assert words in capsys.readouterr().err


def test_filter_takes_the_stream_from_the_sample_and_refuses_another(little_world, capsys):
    import prepare

    d = little_world["dir"]
    common = ["--classes", str(little_world["classes"]), "--tile-size", str(SIZE), "--workers", "1"]
    little_world["all_tiles"].write_text(
        little_world["all_tiles"].read_text().replace("#source z x y\n", "#source z x y\n#made-by "
        + json.dumps({"command": "all-tiles", "osm_source": "qa-tiles", "osm": str(little_world["path"]),
                      "bbox": little_world["bbox"]}) + "\n")
    )
    sample = ["sample", "--all-tiles", str(little_world["all_tiles"]), "--zoom", "17", "--count", "3"]
    assert cli.run(prepare.main, [*sample, "--seed", "0", "--out", str(d / "sample.txt")]) == 0
    made_by = datafiles.read_tile_list(d / "sample.txt").made_by
    assert made_by["bbox"] == little_world["bbox"] and made_by["seed"] == 0 and made_by["osm"] == str(little_world["path"])
    # No --osm, --bbox, --seed or --count: all come from the sample's record.
    assert cli.run(prepare.main, ["labels", "--sample", str(d / "sample.txt"), "--out", str(d / "color"), *common]) == 0
    filtered = ["filter", "--sample", str(d / "sample.txt"), "--labels", str(d / "color"), "--label-ratio", "0.001",
                "--out", str(d / "kept.txt"), "--stats", str(d / "stats.csv"), *common]
    assert cli.run(prepare.main, filtered) == 0
    kept = datafiles.read_tile_list(d / "kept.txt")
    assert set(kept.tiles) <= little_world["with_buildings"] and len(kept) == 3  # drew past the sample
    assert kept.made_by["command"] == "filter" and kept.made_by["label_ratio"] == 0.001
    capsys.readouterr()
    assert cli.run(prepare.main, [*filtered, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "--seed 1: " in err and "was made with --seed 0" in err


def test_portugal_labels_agree_between_qa_tiles_and_geojson(portugal_dir, classes_file):
    from osmseg import osm
    from osmseg.classes import load_classes

    classes = load_classes(classes_file)
    renderer = labels.LabelRenderer(classes, 256)
    # The tiles that have satellite images in the fixture (file names are x-y-z).
    tiles = [mercantile.Tile(*map(int, p.stem.split("-"))) for p in sorted((portugal_dir / "tiles").glob("*.jpg"))]
    from_mbtiles = dict(
        labels.render_tiles(osm.open_source("qa-tiles", portugal_dir / "portugal-z17.mbtiles"), renderer, tiles)
    )
    from_geojson = dict(labels.render_tiles(osm.open_source("file", portugal_dir / "labels.geojson"), renderer, tiles))
    same = np.mean([(from_mbtiles[t] == from_geojson[t]).all(axis=2).mean() for t in tiles])
    assert same > 0.999
    buildings = sum(int(labels.count_labels(from_mbtiles[t], classes)[4]) for t in tiles)
    assert buildings > 100


def test_prepare_labels_refuses_a_sample_of_another_source(tmp_path, capsys):
    import prepare

    path = tmp_path / "mine.mbtiles"
    write_qa_tiles(path, [(pixel_box(TILE, 0, 0, 8, 8), {"building": "yes"})])
    (tmp_path / "sample.txt").write_text(f"united_kingdom 17 {TILE.x} {TILE.y}\n")
    status = cli.run(
        prepare.main,
        ["labels", "--sample", str(tmp_path / "sample.txt"), "--osm", str(path), "--out", str(tmp_path / "color")],
    )
    assert status == 2
    assert "'united_kingdom'" in capsys.readouterr().err and not (tmp_path / "color").exists()


def test_points_take_the_width_of_their_own_class():
    classes = classes_of(
        ("tree", "#010101", 1, "[natural] = 'tree'"),
        ("tower", "#020202", 5, "[man_made] = 'tower'"),
        ("both", "#030303", 3, "[natural] = 'rock'"),
    )
    rgb = render_one(
        [
            Feature(Point(pixel_point(TILE, 10.5, 10.5)), {"natural": "tree"}),
            Feature(Point(pixel_point(TILE, 30.5, 30.5)), {"man_made": "tower"}),
            Feature(
                shapely.MultiPoint([pixel_point(TILE, 50.5, 50.5), pixel_point(TILE, 50.5, 10.5)]), {"natural": "rock"}
            ),
            Feature(pixel_box(TILE, 0, 40, 8, 48), {"natural": "rock"}),  # a real polygon of a width-3 class
        ],
        classes,
    )
    assert_only_class_colours(rgb, classes)
    assert (rgb == (1, 1, 1)).all(axis=2).sum() == 1
    assert (rgb == (2, 2, 2)).all(axis=2).sum() == 25 and (rgb[28:33, 28:33] == 2).all()
    assert (rgb == (3, 3, 3)).all(axis=2).sum() == 2 * 9 + 64


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=200))
def test_count_labels_matches_the_label_indices(values):
    indices = np.array(values, dtype=np.uint8).reshape(1, -1)
    counts = labels.count_labels(CLASSES.labels_to_colors(indices), CLASSES)
    assert counts.sum() == len(values)
    for index in range(1, CLASSES.num_classes):
        assert counts[index - 1] == values.count(index)
    assert counts[-1] == values.count(0)


def test_filters_on_qa_metadata_and_odd_keys_still_work():
    classes = classes_of(
        ("mine", "#010101", 1, "[@user] = 'me' and [addr:street] = 'Rue'"),
        ("relations", "#020202", 1, "[@type] = 'relation'"),
    )
    assert classes.filter_attributes() == {"@user", "addr:street", "@type"}
    rgb = render_one(
        [
            Feature(pixel_box(TILE, 0, 0, 4, 4), {"@user": "me", "addr:street": "Rue", "@id": "1"}),
            Feature(pixel_box(TILE, 4, 0, 8, 4), {"@user": "you", "addr:street": "Rue"}),
            Feature(pixel_box(TILE, 8, 0, 12, 4), {"@type": "relation", "building": "yes"}),
        ],
        classes,
    )
    assert (rgb[:4, :4] == 1).all() and (rgb[:4, 4:8] == 0).all() and (rgb[:4, 8:12] == 2).all()


def test_a_worker_initialised_from_a_pickled_source_renders_the_same(tmp_path):
    import pickle

    from osmseg import osm

    path = tmp_path / "osm.mbtiles"
    write_qa_tiles(path, [(pixel_box(TILE, 3, 5, 60, 9), {"building": "yes"})])
    source = osm.open_source("qa-tiles", path)
    labels._worker_init(pickle.dumps(source), CLASSES.to_json(), SIZE, str(tmp_path / "w"))
    assert labels._worker_render([TILE]) == 1
    [(_, expected)] = list(labels.render_tiles(source, labels.LabelRenderer(CLASSES, SIZE), [TILE]))
    assert (labels.read_label(tmp_path / "w" / f"17-{TILE.x}-{TILE.y}.png") == expected).all()
    labels._worker.clear()


def test_geometry_collections_and_empty_geometries():
    collection = shapely.GeometryCollection(
        [pixel_box(TILE, 0, 0, 10, 10), LineString([pixel_point(TILE, 0, 40.5), pixel_point(TILE, 64, 40.5)])]
    )
    rgb = render_one(
        [
            Feature(collection, {"building": "yes"}),
            Feature(shapely.Polygon(), {"building": "yes"}),
            Feature(shapely.GeometryCollection(), {"natural": "water"}),
        ]
    )
    assert (rgb[:10, :10] == 4).all() and (rgb[40] == 4).all()
    assert (rgb == 4).all(axis=2).sum() == 100 + SIZE


def test_line_crossing_a_z12_border_renders_seamlessly(tmp_path):
    from osmseg import osm

    z12 = mercantile.parent(TILE, zoom=12)
    west_tile = mercantile.Tile((z12.x + 1) * 32 - 1, z12.y * 32 + 16, 17)
    east_tile = mercantile.Tile((z12.x + 1) * 32, z12.y * 32 + 16, 17)
    # A slanted road from the middle of the west tile to the middle of the east one.
    start, end = pixel_point(west_tile, 20.5, 10.5), pixel_point(east_tile, 40.5, 50.5)
    path = tmp_path / "road.mbtiles"
    write_qa_tiles(path, [(LineString([start, end]), {"highway": "primary"})])
    renderer = labels.LabelRenderer(CLASSES, SIZE)
    rendered = dict(labels.render_tiles(osm.open_source("qa-tiles", path), renderer, [west_tile, east_tile]))
    west = (rendered[west_tile] == (2, 2, 2)).all(axis=2)
    east = (rendered[east_tile] == (2, 2, 2)).all(axis=2)
    # The road leaves the west tile through its east edge and enters the east tile at the
    # same rows, 3 pixels wide on both sides.
    left_rows, right_rows = np.flatnonzero(west[:, -1]), np.flatnonzero(east[:, 0])
    assert 2 <= len(left_rows) <= 5 and 2 <= len(right_rows) <= 5
    assert abs(left_rows.mean() - right_rows.mean()) <= 1
    assert west.sum() > 3 * 40 and east.sum() > 3 * 40
