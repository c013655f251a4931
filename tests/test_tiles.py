"""Tests for osmseg.tiles: bounding boxes, zooms, tile lists and the random sample stream."""

from __future__ import annotations

import itertools
import time

import mercantile
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prepare
from osmseg import datafiles, tiles

UK = "-8.65,49.86,1.77,60.86"
MONACO = mercantile.LngLatBbox(7.40, 43.72, 7.44, 43.75)


@st.composite
def boxes(draw, max_size: float = 2.0):
    """Small WGS84 boxes anywhere in Web Mercator's range."""
    west = draw(st.floats(-180, 180 - 1e-3))
    south = draw(st.floats(-85, 85 - 1e-3))
    width = draw(st.floats(1e-3, max_size))
    height = draw(st.floats(1e-3, max_size))
    return mercantile.LngLatBbox(west, south, min(west + width, 180), min(south + height, 85))


# ---- bounding boxes ---------------------------------------------------------------------------


def test_parse_bbox_reads_the_seed_default():
    assert tiles.parse_bbox("-3.3843,51.2437,-2.3923,51.848") == mercantile.LngLatBbox(
        -3.3843, 51.2437, -2.3923, 51.848
    )
    assert tiles.parse_bbox(" 1, 2 ,3,4 ") == (1, 2, 3, 4)


@given(boxes())
def test_parse_bbox_round_trips(bbox):
    assert tiles.parse_bbox(",".join(repr(v) for v in bbox)) == bbox


@pytest.mark.parametrize(
    "text, message",
    [
        ("1,2,3", "expected 4 comma-separated numbers"),
        ("1,2,3,4,5", "expected 4 comma-separated numbers"),
        ("a,2,3,4", "not all numbers"),
        ("", "expected 4"),
        ("nan,0,1,1", "finite"),
        ("3,2,1,4", "inverted"),
        ("1,4,3,2", "inverted"),
        ("-181,0,1,1", "west -181.0 is outside"),
        ("0,0,181,1", "east 181.0 is outside"),
        ("0,-86,1,1", "south -86.0 is outside"),
        ("0,0,1,85.06", "north 85.06 is outside"),
        ("1,2,1,4", "empty"),
        ("1,2,3,2", "empty"),
    ],
)
def test_bad_bbox(text, message):
    with pytest.raises(tiles.BBoxError, match=message) as error:
        tiles.parse_bbox(text)
    assert "-lon,-lat,+lon,+lat" in str(error.value)  # says how to write it


@pytest.mark.parametrize("zoom", [0, 12, 17, 22, "17"])
def test_good_zoom(zoom):
    assert tiles.check_zoom(zoom) == int(zoom)


@pytest.mark.parametrize("zoom", [-1, 23, 17.5, "x", None, True])
def test_bad_zoom(zoom):
    with pytest.raises(tiles.ZoomError, match="0-22"):
        tiles.check_zoom(zoom)


@given(boxes(), st.integers(0, 18))
def test_tile_range_is_exactly_the_tiles_overlapping_the_box(bbox, zoom):
    x0, y0, x1, y1 = tiles.tile_range(bbox, zoom)
    assert x0 <= x1 and y0 <= y1
    eps = 1e-6  # degrees: tiles that only touch an edge may fall either way
    first, last = mercantile.bounds(mercantile.Tile(x0, y0, zoom)), mercantile.bounds(mercantile.Tile(x1, y1, zoom))
    # The corner tiles overlap the box ...
    assert first.west < bbox.west + eps and first.north > bbox.north - eps
    assert last.east > bbox.east - eps and last.south < bbox.south + eps
    # ... and the next tiles out do not.
    if x0 > 0:
        assert mercantile.bounds(mercantile.Tile(x0 - 1, y0, zoom)).east <= bbox.west + eps
    if x1 < (1 << zoom) - 1:
        assert mercantile.bounds(mercantile.Tile(x1 + 1, y1, zoom)).west >= bbox.east - eps
    if y0 > 0:
        assert mercantile.bounds(mercantile.Tile(x0, y0 - 1, zoom)).south >= bbox.north - eps
    if y1 < (1 << zoom) - 1:
        assert mercantile.bounds(mercantile.Tile(x1, y1 + 1, zoom)).north <= bbox.south + eps


# ---- the sample stream ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(boxes(max_size=0.05), st.integers(10, 16), st.integers(0, 2**32))
def test_sample_lies_in_the_box_distinct_and_reproducible(bbox, zoom, seed):
    first = list(itertools.islice(tiles.sample_stream(bbox, zoom, seed), 300))
    again = list(itertools.islice(tiles.sample_stream(bbox, zoom, seed), 300))
    assert first == again
    assert len(set(first)) == len(first)
    for tile in first:
        assert tile.z == zoom
        bounds = mercantile.bounds(tile)
        # The tile overlaps the box: its bounds contain part of it.
        assert bounds.west < bbox.east and bounds.east > bbox.west
        assert bounds.south < bbox.north and bounds.north > bbox.south


@settings(max_examples=30, deadline=None)
@given(boxes(max_size=0.3), st.integers(11, 14), st.integers(0, 1000))
def test_stream_is_a_permutation_of_the_candidates(bbox, zoom, seed):
    stream = tiles.sample_stream(bbox, zoom, seed)
    drawn = list(stream)
    x0, y0, x1, y1 = tiles.tile_range(bbox, zoom)
    expected = {mercantile.Tile(x, y, zoom) for x in range(x0, x1 + 1) for y in range(y0, y1 + 1)}
    assert len(drawn) == len(expected) == len(stream)
    assert set(drawn) == expected


def test_seeds_draw_different_samples():
    a = list(itertools.islice(tiles.sample_stream(MONACO, 17, 0), 50))
    b = list(itertools.islice(tiles.sample_stream(MONACO, 17, 1), 50))
    assert a != b and set(a) != set(b)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=6), st.integers(0, 99))
def test_sample_stays_inside_the_source_tiles(offsets, seed):
    origin = mercantile.tile(7.0, 44.0, 12)
    within = [mercantile.Tile(origin.x + dx, origin.y + dy, 12) for dx, dy in offsets]
    bbox = mercantile.LngLatBbox(6.9, 43.5, 7.5, 44.2)
    stream = tiles.sample_stream(bbox, 15, seed, within=within)
    drawn = list(stream)
    assert len(set(drawn)) == len(drawn) == len(stream) == 64 * len(set(within))
    assert all(mercantile.parent(tile, zoom=12) in within for tile in drawn)


def test_a_country_at_z17_samples_10000_tiles_in_seconds():
    bbox = tiles.parse_bbox(UK)
    within = tiles.source_tiles(bbox, 12)
    start = time.perf_counter()
    stream = tiles.sample_stream(bbox, 17, 0, within=within)
    drawn = list(itertools.islice(stream, 10000))
    elapsed = time.perf_counter() - start
    assert len(stream) > 20_000_000  # every z17 tile of the UK box
    assert len(set(drawn)) == 10000
    assert elapsed < 5, elapsed
    # Spread over the whole box, not clustered in one corner.
    xs = sorted(t.x for t in drawn)
    x0, _, x1, _ = tiles.tile_range(bbox, 17)
    assert xs[500] - x0 < 0.1 * (x1 - x0) and x1 - xs[-500] < 0.1 * (x1 - x0)


def test_sample_entries_name_the_source():
    entries = [("a", mercantile.Tile(2132, 1493, 12)), ("b", mercantile.Tile(2133, 1493, 12))]
    bbox = mercantile.LngLatBbox(7.0, 43.0, 8.0, 44.0)
    named = list(tiles.sample_entries(bbox, 14, 5, entries))
    # Given entries, the stream yields entries; given bare tiles, the same tiles in the same order.
    assert named == list(tiles.sample_stream(bbox, 14, 5, within=entries))
    assert [tile for _, tile in named] == list(tiles.sample_stream(bbox, 14, 5, within=[t for _, t in entries]))
    assert len(named) == 2 * 16
    for source, tile in named:
        assert {t: s for s, t in entries}[mercantile.parent(tile, zoom=12)] == source


# ---- tile lists -------------------------------------------------------------------------------


# ---- prepare.py all-tiles and sample ----------------------------------------------------------


def _prepare(argv, capsys):
    status = prepare.cli.run(prepare.main, argv)
    return status, capsys.readouterr().err


def test_all_tiles_and_sample_on_monaco(monaco_mbtiles, tmp_path, capsys):
    all_tiles, sample = tmp_path / "all_tiles.txt", tmp_path / "sample.txt"
    bbox = "7.3,43.5,7.6,43.8"
    status, _ = _prepare(["all-tiles", "--osm", str(monaco_mbtiles), "--bbox", bbox, "--out", str(all_tiles)], capsys)
    assert status == 0
    entries = datafiles.read_tile_list(all_tiles).entries
    assert len(entries) == 7 and {s for s, _ in entries} == {"monaco"}
    status, _ = _prepare(
        [
            "sample",
            "--all-tiles",
            str(all_tiles),
            "--bbox",
            bbox,
            "--count",
            "100",
            "--seed",
            "3",
            "--out",
            str(sample),
        ],
        capsys,
    )
    assert status == 0
    drawn = datafiles.read_tile_list(sample).entries
    assert len(drawn) == 100 and len(set(drawn)) == 100
    # The file is the stream's first 100 tiles.
    stream = tiles.sample_entries(tiles.parse_bbox(bbox), 17, 3, entries)
    assert drawn == list(itertools.islice(stream, 100))


def test_sample_keeps_all_when_the_box_is_small(tmp_path, capsys):
    all_tiles, sample = tmp_path / "all_tiles.txt", tmp_path / "sample.txt"
    datafiles.write_tile_list(all_tiles, [("demo", mercantile.Tile(2132, 1493, 12))])
    bbox = "7.4200,43.7300,7.4250,43.7330"
    status, err = _prepare(
        ["sample", "--all-tiles", str(all_tiles), "--bbox", bbox, "--count", "1000", "--out", str(sample)], capsys
    )
    assert status == 0
    drawn = datafiles.read_tile_list(sample).entries
    assert 1 <= len(drawn) < 20 and f"holds only {len(drawn)} tiles" in err and "keeping them all" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--count", "0"], "--count (TRAIN_SIZE) 0 must be positive"),
        (["--zoom", "23"], "outside 0-22"),
        (["--bbox", "3,2,1,4"], "inverted"),
    ],
)
def test_sample_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, message):
    all_tiles, sample = tmp_path / "all_tiles.txt", tmp_path / "sample.txt"
    datafiles.write_tile_list(all_tiles, [("demo", mercantile.Tile(2132, 1493, 12))])
    status, err = _prepare(["sample", "--all-tiles", str(all_tiles), "--out", str(sample)] + argv, capsys)
    assert status == 2 and message in err and not sample.exists()


def test_all_tiles_outside_the_data_exits_2(monaco_mbtiles, tmp_path, capsys):
    out = tmp_path / "all_tiles.txt"
    status, err = _prepare(["all-tiles", "--osm", str(monaco_mbtiles), "--bbox", "0,0,1,1", "--out", str(out)], capsys)
    assert status == 2 and "no OSM data inside" in err and not out.exists()


def test_all_tiles_from_a_geojson_file(portugal_dir, tmp_path, capsys):
    out = tmp_path / "all_tiles.txt"
    # --bbox=...: argparse would take a separate "-9.5,..." for an option.
    geojson = str(portugal_dir / "labels.geojson")
    argv = ["all-tiles", "--osm-source", "file", "--osm", geojson, "--bbox=-9.5,38.8,-9.4,38.9", "--out", str(out)]
    status, _ = _prepare(argv, capsys)
    assert status == 0 and datafiles.read_tile_list(out).entries == [("labels", mercantile.Tile(1940, 1567, 12))]


def test_all_tiles_missing_mbtiles_exits_2(tmp_path, capsys):
    out = tmp_path / "all_tiles.txt"
    status, err = _prepare(["all-tiles", "--osm", str(tmp_path / "absent.mbtiles"), "--out", str(out)], capsys)
    assert status == 2 and "no such MBTiles file" in err and not out.exists()


@settings(max_examples=50, deadline=None)
@given(st.integers(14, 20), st.integers(0, 2**14 - 1), st.integers(0, 2**14 - 1), st.floats(0, 100))
def test_tiles_bounds_hold_every_tile_with_its_margin(zoom, x, y, margin):
    tile = mercantile.Tile(x % 2**zoom, y % 2**zoom, zoom)
    group = [tile, mercantile.Tile(tile.x, min(tile.y + 1, 2**zoom - 1), zoom)]
    bounds = tiles.tiles_bounds(group, margin)
    for t in group:
        b = mercantile.xy_bounds(t)
        assert bounds.left <= b.left - margin + 1e-6 and bounds.right >= b.right + margin - 1e-6
        assert bounds.bottom <= b.bottom - margin + 1e-6 and bounds.top >= b.top + margin - 1e-6


def test_lnglat_to_xy_agrees_with_mercantile():
    lng = np.array([-180.0, -3.3843, 0.0, 7.42, 179.9])
    lat = np.array([-85.0511, 51.2437, 0.0, 43.73, 89.0])  # 89 is clamped to the projection's edge
    x, y = tiles.lnglat_to_xy(lng, lat)
    expected = [mercantile.xy(a, min(b, tiles.MAX_LATITUDE)) for a, b in zip(lng, lat)]
    assert np.allclose(np.column_stack([x, y]), expected, atol=1e-6)
    assert np.isclose(y[-1], tiles.WEB_MERCATOR_HALF)


def test_metres_per_pixel_and_tile_edges():
    assert np.isclose(tiles.metres_per_pixel(17, 256), 2 * tiles.WEB_MERCATOR_HALF / 2**17 / 256)
    assert np.isclose(tiles.metres_per_pixel(17, 256), 1.1943, atol=1e-4)  # about 1 m a pixel at z17
    left, bottom, right, top = mercantile.xy_bounds(mercantile.Tile(2132, 1493, 12))
    assert tiles.on_tile_edge(left, (top + bottom) / 2, 12, 0.01)
    assert tiles.on_tile_edge((left + right) / 2, top + 0.005, 12, 0.01)
    assert not tiles.on_tile_edge((left + right) / 2, (top + bottom) / 2, 12, 0.01)
    inner = mercantile.Bbox(left + 1, bottom + 1, right - 1, top - 1)
    assert tiles.tiles_touching(mercantile.Bbox(left, bottom, right, top), 12) == [mercantile.Tile(2132, 1493, 12)]
    assert tiles.xy_to_bbox(tiles.bbox_to_xy(mercantile.bounds(2132, 1493, 12))) == pytest.approx(
        tuple(mercantile.bounds(2132, 1493, 12))
    )
    assert tiles.grow(inner, 0.5).left == pytest.approx(inner.left - (inner.right - inner.left) / 2)
    assert tiles.ancestor(mercantile.Tile(65536, 65536, 17), 12) == mercantile.Tile(2048, 2048, 12)
    assert tiles.ancestor(mercantile.Tile(1, 1, 3), 12) == mercantile.Tile(1, 1, 3)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 20), st.integers(0, 2**20 - 1), st.integers(0, 2**20 - 1), st.integers(1, 3), st.integers(1, 3))
def test_pixel_transform_maps_corners_to_the_tiles_bounds(zoom, x, y, across, down):
    across, down = min(across, 2**zoom), min(down, 2**zoom)
    x0, y0 = x % (2**zoom - across + 1), y % (2**zoom - down + 1)
    block = [mercantile.Tile(x0 + i, y0 + j, zoom) for i in range(across) for j in range(down)]
    width, height = 256 * across, 256 * down
    a, b, c, d, e, f = tiles.pixel_transform(block, width, height)
    bounds = tiles.tiles_bounds(block)
    assert b == d == 0 and e < 0
    # Metres, to a micrometre: values near the equator or the meridian are near 0, where a
    # relative tolerance alone asks for more than float64 sums give.
    assert (c, f) == pytest.approx((bounds.left, bounds.top), abs=1e-6)
    assert (a * width + c, e * height + f) == pytest.approx((bounds.right, bounds.bottom), abs=1e-6)
    # Tile i, j starts at pixel (256 i, 256 j): the mosaic's seams fall on tile edges.
    first = mercantile.xy_bounds(block[-1])
    corner = (a * 256 * (block[-1].x - x0) + c, e * 256 * (block[-1].y - y0) + f)
    assert corner == pytest.approx((first.left, first.top), abs=1e-6)
