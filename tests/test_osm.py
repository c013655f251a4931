"""Tests for osmseg.osm: QA tiles (both generations), file and Overpass sources, download-osm."""

from __future__ import annotations

import gzip
import json
import sqlite3
from pathlib import Path

import mapbox_vector_tile
import mercantile
import pytest
import shapely
from shapely.geometry import LineString, Point, Polygon, box

from osmseg import osm
from osmseg.errors import SourceError

# Two z12 tiles side by side near Monaco; the border between them is x = LEFT.right.
LEFT = mercantile.Tile(2132, 1493, 12)
RIGHT = mercantile.Tile(2133, 1493, 12)


def _to_local(geometry, tile: mercantile.Tile, extent: int):
    """EPSG:3857 metres -> integer MVT coordinates of `tile` (y down), as QA tiles store them."""
    left, bottom, right, top = mercantile.xy_bounds(tile)
    sx, sy = extent / (right - left), extent / (top - bottom)
    return shapely.transform(geometry, lambda xy: ((xy - (left, top)) * (sx, -sy)).round())


def write_mbtiles(path: Path, tiles: dict, extent: int = 4096, buffer: int = 0, raw: dict | None = None) -> Path:
    """Write a small QA-style MBTiles: {Tile: [(geometry in metres, properties)]}.

    Each geometry is clipped to its tile (plus `buffer` units) as tippecanoe cuts QA tiles.
    """
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
    connection.execute(
        "CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)"
    )
    connection.executemany("INSERT INTO metadata VALUES (?, ?)", [("name", path.stem), ("format", "pbf")])
    for tile, features in tiles.items():
        left, bottom, right, top = mercantile.xy_bounds(tile)
        pad = buffer * (right - left) / extent
        clip = box(left - pad, bottom - pad, right + pad, top + pad)
        encoded = []
        for geometry, properties in features:
            piece = geometry.intersection(clip) if geometry.geom_type != "Point" else geometry
            if piece.is_empty:
                continue
            encoded.append({"geometry": _to_local(piece, tile, extent).wkt, "properties": properties})
        data = mapbox_vector_tile.encode(
            [{"name": "osm", "features": encoded}],
            default_options={"extents": extent, "y_coord_down": True, "quantize_bounds": None},
        )
        connection.execute(
            "INSERT INTO tiles VALUES (?, ?, ?, ?)", (tile.z, tile.x, (1 << tile.z) - 1 - tile.y, gzip.compress(data))
        )
    for tile, data in (raw or {}).items():
        connection.execute("INSERT INTO tiles VALUES (?, ?, ?, ?)", (tile.z, tile.x, (1 << tile.z) - 1 - tile.y, data))
    connection.commit()
    connection.close()
    return path


def _border_square() -> Polygon:
    """A 600 m square building straddling the LEFT/RIGHT border."""
    border = mercantile.xy_bounds(LEFT).right
    middle = (mercantile.xy_bounds(LEFT).top + mercantile.xy_bounds(LEFT).bottom) / 2
    return box(border - 300, middle - 300, border + 300, middle + 300)


# ---- QA tiles: the real 2015 Monaco file ------------------------------------------------------


def test_monaco_features_have_tags_and_lie_in_monaco(monaco_mbtiles):
    source = osm.open_source("qa-tiles", monaco_mbtiles)
    assert source.name == "monaco" and source.zoom == 12
    tile = mercantile.Tile(2132, 1493, 12)
    features = source.features(mercantile.xy_bounds(tile))
    assert len(features) > 1000
    west, south, east, north = shapely.total_bounds([f.geometry for f in features if "building" in f.tags])
    (west, south), (east, north) = mercantile.lnglat(west, south), mercantile.lnglat(east, north)
    assert 7.40 < west < east < 7.45 and 43.71 < south < north < 43.76
    assert all(isinstance(k, str) and isinstance(v, str) for f in features for k, v in f.tags.items())
    assert any(f.tags.get("highway") == "residential" for f in features)


def test_monaco_closed_building_linestrings_come_back_as_polygons(monaco_mbtiles):
    source = osm.open_source("qa-tiles", monaco_mbtiles)
    features = source.features(mercantile.xy_bounds(mercantile.Tile(2132, 1493, 12)))
    ways = [f for f in features if "building" in f.tags and f.tags.get("@type") == "way"]
    polygons = [f for f in ways if f.geometry.geom_type in ("Polygon", "MultiPolygon")]
    assert len(polygons) >= 0.98 * len(ways) and len(polygons) > 900
    # Coastlines and cliffs stay lines even where closed.
    assert all(f.geometry.geom_type.endswith("LineString") for f in features if f.tags.get("natural") == "coastline")


def test_monaco_source_tiles_and_z17_queries(monaco_mbtiles):
    source = osm.open_source("qa-tiles", monaco_mbtiles)
    assert len(source.all_tiles()) == 7
    assert source.source_tiles(mercantile.LngLatBbox(7.40, 43.72, 7.44, 43.75)) == [mercantile.Tile(2132, 1493, 12)]
    assert source.source_tiles(mercantile.LngLatBbox(0.0, 0.0, 1.0, 1.0)) == []
    z17 = mercantile.tile(7.4246, 43.7384, 17)  # the Monaco port, dense with buildings
    bounds = mercantile.xy_bounds(z17)
    features = source.features(bounds)
    assert features
    wide = shapely.box(*osm._expand(bounds, 0.125))
    assert all(wide.covers(f.geometry) for f in features)


# ---- QA tiles: synthetic files across a z12 border ---------------------------------------------


@pytest.mark.parametrize(
    "extent, buffer, as_lines",
    [(4096, 0, True), (4096, 80, True), (1 << 20, 0, False), (1 << 20, 2048, False), (4096, 0, False)],
)
def test_area_split_across_z12_border_comes_back_whole(tmp_path, extent, buffer, as_lines):
    square = _border_square()
    stored = LineString(square.exterior.coords) if as_lines else square
    properties = {"@id": 7, "@type": "way", "building": "yes"}
    path = write_mbtiles(
        tmp_path / "split.mbtiles", {LEFT: [(stored, properties)], RIGHT: [(stored, properties)]}, extent, buffer
    )
    source = osm.open_source("qa-tiles", path)
    # A z17 tile on the border, one inside LEFT only, and the two z12 tiles together.
    left_bounds = mercantile.xy_bounds(LEFT)
    on_border = mercantile.tile(*mercantile.lnglat(left_bounds.right - 1, square.centroid.y), 17)
    inside_left = mercantile.tile(*mercantile.lnglat(left_bounds.right - 250, square.centroid.y), 17)
    for bounds in (mercantile.xy_bounds(on_border), mercantile.xy_bounds(inside_left), osm._expand(left_bounds, 1)):
        features = source.features(bounds, margin=0.0)
        assert len(features) == 1
        geometry = features[0].geometry
        assert geometry.geom_type == "Polygon"
        expected = square.intersection(shapely.box(*bounds))
        # Within a quantisation step (2.4 m at z12 / 4096) of the true shape, and no seam.
        unit = (left_bounds.right - left_bounds.left) / extent
        assert expected.symmetric_difference(geometry).area < 4 * unit * square.length
        assert geometry.contains(Point(left_bounds.right, square.centroid.y)) or not expected.contains(
            Point(left_bounds.right, square.centroid.y)
        )


def test_line_split_across_border_is_merged(tmp_path):
    left_bounds = mercantile.xy_bounds(LEFT)
    y = (left_bounds.top + left_bounds.bottom) / 2
    road = LineString([(left_bounds.right - 500, y), (left_bounds.right + 500, y + 100)])
    properties = {"@id": 9, "@type": "way", "highway": "primary"}
    path = write_mbtiles(tmp_path / "road.mbtiles", {LEFT: [(road, properties)], RIGHT: [(road, properties)]})
    source = osm.open_source("qa-tiles", path)
    features = source.features(osm._expand(left_bounds, 1), margin=0)
    assert len(features) == 1 and features[0].geometry.geom_type == "LineString"
    assert features[0].geometry.length == pytest.approx(road.length, rel=0.01)


def test_tags_decide_areas(tmp_path):
    left_bounds = mercantile.xy_bounds(LEFT)
    cx, cy = left_bounds.left + 2000, left_bounds.top - 2000
    ring = LineString(box(cx, cy, cx + 200, cy + 200).exterior.coords)
    features = {
        LEFT: [
            (ring, {"@id": 1, "@type": "way", "landuse": "forest"}),
            (shapely.affinity.translate(ring, 400), {"@id": 2, "@type": "way", "natural": "coastline"}),
            (shapely.affinity.translate(ring, 800), {"@id": 3, "@type": "way", "building": "yes", "area": "no"}),
            (shapely.affinity.translate(ring, 1200), {"@id": 4, "@type": "way", "highway": "pedestrian", "area": "yes"}),
            (Point(cx, cy - 500), {"@id": 5, "@type": "node", "natural": "tree"}),
        ]
    }
    source = osm.open_source("qa-tiles", write_mbtiles(tmp_path / "tags.mbtiles", features))
    found = {f.tags["@id"]: f.geometry.geom_type for f in source.features(left_bounds)}
    assert found == {"1": "Polygon", "2": "LineString", "3": "LineString", "4": "Polygon", "5": "Point"}


@pytest.mark.parametrize(
    "tags, area",
    [
        ({"building": "yes"}, True),
        ({"natural": "wood"}, True),
        ({"natural": "tree_row"}, False),
        ({"highway": "residential"}, False),
        ({"highway": "services"}, True),
        ({"leisure": "track"}, False),
        ({"landuse": "grass", "area": "no"}, False),
        ({"barrier": "fence", "area": "yes"}, True),
        ({"building": "no"}, False),
    ],
)
def test_is_area(tags, area):
    assert osm.is_area(tags) is area


# ---- QA tiles: bad files ----------------------------------------------------------------------


def test_missing_mbtiles(tmp_path):
    with pytest.raises(SourceError, match="no such MBTiles file.*download-osm"):
        osm.open_source("qa-tiles", tmp_path / "absent.mbtiles")


def test_corrupt_mbtiles(tmp_path):
    path = tmp_path / "corrupt.mbtiles"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(SourceError, match="corrupt.mbtiles: not a readable MBTiles"):
        osm.open_source("qa-tiles", path)


def test_raster_mbtiles(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    path = write_mbtiles(tmp_path / "raster.mbtiles", {}, raw={LEFT: png})
    with pytest.raises(SourceError, match="raster image tiles, not vector tiles"):
        osm.open_source("qa-tiles", path)


def test_garbage_tiles_mbtiles(tmp_path):
    path = write_mbtiles(tmp_path / "garbage.mbtiles", {}, raw={LEFT: gzip.compress(b"\xff\xfe garbage" * 9)})
    with pytest.raises(SourceError, match="not a Mapbox Vector Tile"):
        osm.open_source("qa-tiles", path)


def test_empty_mbtiles(tmp_path):
    path = write_mbtiles(tmp_path / "empty.mbtiles", {})
    with pytest.raises(SourceError, match="holds no tiles"):
        osm.open_source("qa-tiles", path)


def test_wrong_zoom(tmp_path):
    path = write_mbtiles(tmp_path / "z12.mbtiles", {LEFT: []})
    with pytest.raises(SourceError, match="no tiles at z14"):
        osm.open_source("qa-tiles", path, zoom=14)


def test_unknown_kind():
    with pytest.raises(SourceError, match="unknown OSM source kind 'shapefile'"):
        osm.open_source("shapefile", "x.shp")


def test_portugal_z17_mbtiles(portugal_dir):
    source = osm.open_source("qa-tiles", portugal_dir / "portugal-z17.mbtiles")
    assert source.zoom == 17 and len(source.all_tiles()) == 363
    tile = mercantile.Tile(62093, 50163, 17)
    features = source.features(mercantile.xy_bounds(tile))
    assert features
    west, south, east, north = _lnglat_bounds(features)
    assert -9.50 < west < east < -9.40 and 38.82 < south < north < 38.90


def _lnglat_bounds(features):
    west, south, east, north = shapely.total_bounds([f.geometry for f in features])
    (west, south), (east, north) = mercantile.lnglat(west, south), mercantile.lnglat(east, north)
    return west, south, east, north


def test_source_is_picklable(monaco_mbtiles):
    import pickle

    source = osm.open_source("qa-tiles", monaco_mbtiles)
    source.features(mercantile.xy_bounds(mercantile.Tile(2132, 1493, 12)))
    copy = pickle.loads(pickle.dumps(source))
    bounds = mercantile.xy_bounds(mercantile.tile(7.4246, 43.7384, 17))
    assert len(copy.features(bounds)) == len(source.features(bounds))


_ = json  # used by the file-source tests below
