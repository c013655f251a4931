"""Tests for osmseg.osm: QA tiles (both generations), file and Overpass sources, download-osm."""

from __future__ import annotations

import gzip
import http.server
import json
import re
import sqlite3
import threading
from pathlib import Path

import mapbox_vector_tile
import mercantile
import pytest
import shapely
from shapely.geometry import LineString, Point, Polygon, box

import prepare
from osmseg import datafiles, osm, tiles
from osmseg.classes import load_classes
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
    connection.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
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


@pytest.fixture(scope="module")
def monaco_source():
    """One Monaco source for the read-only tests below (decoding its dense tile once)."""
    from conftest import FIXTURES

    path = FIXTURES / "osm-qa-monaco" / "monaco.mbtiles"
    if not path.exists():
        pytest.skip(f"real fixture {path} is absent")
    return osm.open_source("qa-tiles", path)


def test_monaco_features_have_tags_and_lie_in_monaco(monaco_source):
    source = monaco_source
    assert source.name == "monaco" and source.zoom == 12
    tile = mercantile.Tile(2132, 1493, 12)
    features = source.features(mercantile.xy_bounds(tile))
    assert len(features) > 1000
    west, south, east, north = shapely.total_bounds([f.geometry for f in features if "building" in f.tags])
    (west, south), (east, north) = mercantile.lnglat(west, south), mercantile.lnglat(east, north)
    assert 7.40 < west < east < 7.45 and 43.71 < south < north < 43.76
    assert all(isinstance(k, str) and isinstance(v, str) for f in features for k, v in f.tags.items())
    assert any(f.tags.get("highway") == "residential" for f in features)


def test_monaco_closed_building_linestrings_come_back_as_polygons(monaco_source):
    source = monaco_source
    features = source.features(mercantile.xy_bounds(mercantile.Tile(2132, 1493, 12)))
    ways = [f for f in features if "building" in f.tags and f.tags.get("@type") == "way"]
    polygons = [f for f in ways if f.geometry.geom_type in ("Polygon", "MultiPolygon")]
    assert len(polygons) >= 0.98 * len(ways) and len(polygons) > 900
    # Coastlines and cliffs stay lines even where closed.
    assert all(f.geometry.geom_type.endswith("LineString") for f in features if f.tags.get("natural") == "coastline")


def test_monaco_z17_queries_stay_inside_their_bounds(monaco_source):
    source = monaco_source
    # 68240/47792 holds a building that GEOS's rectangle clip cannot cut (a degenerate ring).
    tiles = [mercantile.Tile(68240, 47792, 17)] + list(mercantile.tiles(7.415, 43.725, 7.43, 43.74, zooms=[17]))
    for tile in tiles:
        bounds = mercantile.xy_bounds(tile)
        area = shapely.box(*bounds).buffer(1e-6)
        for feature in source.features(bounds):
            assert area.covers(feature.geometry)


def test_monaco_source_tiles_and_z17_queries(monaco_source):
    source = monaco_source
    assert len(source.all_tiles()) == 7
    assert source.source_tiles(mercantile.LngLatBbox(7.40, 43.72, 7.44, 43.75)) == [mercantile.Tile(2132, 1493, 12)]
    assert source.source_tiles(mercantile.LngLatBbox(0.0, 0.0, 1.0, 1.0)) == []
    z17 = mercantile.tile(7.4246, 43.7384, 17)  # the Monaco port, dense with buildings
    bounds = mercantile.xy_bounds(z17)
    features = source.features(bounds)
    assert features
    wide = shapely.box(*tiles.grow(bounds, 0.125))
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
    for bounds in (mercantile.xy_bounds(on_border), mercantile.xy_bounds(inside_left), tiles.grow(left_bounds, 1)):
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


def _grid(center: mercantile.Tile):
    return [mercantile.Tile(center.x + dx, center.y + dy, center.z) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]


def test_2015_area_around_a_whole_tile_is_found_inside_it(tmp_path):
    # A forest whose outline runs through the 8 neighbours of CENTER: CENTER itself holds no
    # piece of it, as in 2015 QA tiles, yet a query inside CENTER must find it.
    center = mercantile.Tile(2132, 1494, 12)
    left, bottom, right, top = mercantile.xy_bounds(center)
    size = right - left
    forest = box(left - size / 2, bottom - size / 2, right + size / 2, top + size / 2)
    ring = LineString(forest.exterior.coords)
    properties = {"@id": 3, "@type": "way", "landuse": "forest"}
    path = write_mbtiles(tmp_path / "forest.mbtiles", {t: [(ring, properties)] for t in _grid(center)})
    source = osm.open_source("qa-tiles", path)
    assert source.areas_as_lines
    inside = mercantile.tile(*mercantile.lnglat(left + size / 2, bottom + size / 2), 17)
    (feature,) = source.features(mercantile.xy_bounds(inside))
    assert feature.geometry.equals(shapely.box(*mercantile.xy_bounds(inside)))
    # And in a neighbour, near the outline, it is the filled forest clipped to the query.
    corner = mercantile.xy_bounds(mercantile.tile(*mercantile.lnglat(left - size / 4, top + size / 4), 15))
    (feature,) = source.features(corner)
    unit = size / 4096
    assert feature.geometry.symmetric_difference(forest.intersection(shapely.box(*corner))).area < 4 * unit * size


def test_2015_area_way_that_is_not_closed_stays_a_line(tmp_path):
    left_bounds = mercantile.xy_bounds(LEFT)
    y = (left_bounds.top + left_bounds.bottom) / 2
    # landuse=grass drawn as an open way crossing into RIGHT and ending inside it.
    way = LineString([(left_bounds.right - 500, y), (left_bounds.right + 500, y), (left_bounds.right + 500, y + 400)])
    properties = {"@id": 4, "@type": "way", "landuse": "grass"}
    closed = LineString(box(left_bounds.left + 100, y, left_bounds.left + 300, y + 200).exterior.coords)
    features = {
        LEFT: [(way, properties), (closed, {"@id": 6, "@type": "way", "building": "yes"})],
        RIGHT: [(way, properties)],
    }
    source = osm.open_source("qa-tiles", write_mbtiles(tmp_path / "open.mbtiles", features))
    found = {f.tags["@id"]: f.geometry for f in source.features(tiles.grow(left_bounds, 1))}
    assert found["4"].geom_type == "LineString" and found["4"].length == pytest.approx(way.length, rel=0.01)
    assert found["6"].geom_type == "Polygon"


def test_2015_area_leaving_the_file_is_closed_along_the_cut(tmp_path):
    square = _border_square()
    ring = LineString(square.exterior.coords)
    # Only LEFT is in the file: the building's other half is missing.
    properties = {"@id": 8, "@type": "way", "building": "yes"}
    source = osm.open_source("qa-tiles", write_mbtiles(tmp_path / "cut.mbtiles", {LEFT: [(ring, properties)]}))
    (feature,) = source.features(mercantile.xy_bounds(LEFT))
    left_half = square.intersection(shapely.box(*mercantile.xy_bounds(LEFT)))
    assert feature.geometry.geom_type == "Polygon"
    assert feature.geometry.symmetric_difference(left_half).area < 0.02 * left_half.area


def test_line_split_across_border_is_merged(tmp_path):
    left_bounds = mercantile.xy_bounds(LEFT)
    y = (left_bounds.top + left_bounds.bottom) / 2
    road = LineString([(left_bounds.right - 500, y), (left_bounds.right + 500, y + 100)])
    properties = {"@id": 9, "@type": "way", "highway": "primary"}
    path = write_mbtiles(tmp_path / "road.mbtiles", {LEFT: [(road, properties)], RIGHT: [(road, properties)]})
    source = osm.open_source("qa-tiles", path)
    features = source.features(tiles.grow(left_bounds, 1), margin=0)
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
            (
                shapely.affinity.translate(ring, 1200),
                {"@id": 4, "@type": "way", "highway": "pedestrian", "area": "yes"},
            ),
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


def test_mbtiles_of_other_vector_layers(tmp_path):
    layers = [
        {"name": name, "features": [{"geometry": "POINT (5 5)", "properties": {}}]} for name in ("water", "roads")
    ]
    data = gzip.compress(mapbox_vector_tile.encode(layers))
    path = write_mbtiles(tmp_path / "openmaptiles.mbtiles", {}, raw={LEFT: data})
    with pytest.raises(SourceError, match="has no layer 'osm' \\(it has roads, water\\); pass OSM QA tiles"):
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


# ---- file sources ------------------------------------------------------------------------------

OSM_XML = """<?xml version="1.0" encoding="UTF-8"?>
<osm version="0.6" generator="osmseg tests">
 <node id="1" lat="43.730" lon="7.420" version="1"/>
 <node id="2" lat="43.730" lon="7.425" version="1"/>
 <node id="3" lat="43.735" lon="7.425" version="1"/>
 <node id="4" lat="43.735" lon="7.420" version="1"/>
 <node id="5" lat="43.731" lon="7.421" version="1"/>
 <node id="6" lat="43.731" lon="7.422" version="1"/>
 <node id="7" lat="43.732" lon="7.422" version="1"/>
 <node id="8" lat="43.732" lon="7.421" version="1"/>
 <node id="9" lat="43.7335" lon="7.4235" version="1"><tag k="natural" v="tree"/></node>
 <way id="10" version="1"><nd ref="1"/><nd ref="2"/><nd ref="3"/><nd ref="4"/><nd ref="1"/></way>
 <way id="11" version="1"><nd ref="5"/><nd ref="6"/><nd ref="7"/><nd ref="8"/><nd ref="5"/></way>
 <way id="12" version="1"><nd ref="5"/><nd ref="6"/><nd ref="7"/><nd ref="8"/><nd ref="5"/>
  <tag k="building" v="yes"/></way>
 <way id="13" version="1"><nd ref="1"/><nd ref="3"/><tag k="highway" v="residential"/></way>
 <way id="14" version="1"><nd ref="2"/><nd ref="3"/><nd ref="4"/><nd ref="2"/><tag k="highway" v="residential"/></way>
 <relation id="20" version="1">
  <member type="way" ref="10" role="outer"/><member type="way" ref="11" role="inner"/>
  <tag k="type" v="multipolygon"/><tag k="landuse" v="forest"/>
 </relation>
</osm>
"""


def _check_small_osm(source, highways: bool = True):
    by_id = {f.tags["@id"]: f for f in source.features(mercantile.xy_bounds(mercantile.Tile(2132, 1493, 12)))}
    assert set(by_id) == {"9", "12", "20"} | ({"13", "14"} if highways else set())
    forest = by_id["20"]
    assert forest.tags == {"landuse": "forest", "@id": "20", "@type": "relation"}
    assert forest.geometry.geom_type == "Polygon" and len(forest.geometry.interiors) == 1  # the hole
    hole = shapely.Polygon(forest.geometry.interiors[0])
    assert hole.equals_exact(by_id["12"].geometry, 1e-3) or hole.symmetric_difference(by_id["12"].geometry).area < 1
    assert by_id["12"].geometry.geom_type == "Polygon"  # a closed building way is an area
    if highways:
        assert by_id["14"].geometry.geom_type == "LineString"  # a closed highway stays a line
    assert by_id["9"].geometry.geom_type == "Point"
    x, y = by_id["9"].geometry.x, by_id["9"].geometry.y
    assert mercantile.lnglat(x, y) == pytest.approx((7.4235, 43.7335), abs=1e-7)
    assert source.source_tiles(mercantile.LngLatBbox(7.3, 43.5, 7.6, 43.8)) == [mercantile.Tile(2132, 1493, 12)]
    assert source.source_tiles(mercantile.LngLatBbox(0, 0, 1, 1)) == []
    # Queries return only what lies near the bounds.
    far = mercantile.xy_bounds(mercantile.tile(7.5, 43.6, 17))
    assert source.features(far) == []


def test_osm_xml_file(tmp_path):
    path = tmp_path / "small.osm"
    path.write_text(OSM_XML)
    source = osm.open_source("file", path)
    assert source.name == "small"
    _check_small_osm(source)


def test_osm_pbf_file(tmp_path):
    import osmium

    xml = tmp_path / "small.osm"
    xml.write_text(OSM_XML)
    pbf = tmp_path / "small.osm.pbf"
    with osmium.SimpleWriter(str(pbf)) as writer:
        for obj in osmium.FileProcessor(str(xml)):
            writer.add(obj)
    _check_small_osm(osm.open_source("file", pbf))


def test_osm_file_keeps_only_the_classes_keys(tmp_path, classes_file):
    path = tmp_path / "small.osm"
    path.write_text(OSM_XML)
    source = osm.open_source("file", path, classes=str(classes_file))
    features = source.features(mercantile.xy_bounds(mercantile.Tile(2132, 1493, 12)))
    assert sorted(f.tags["@id"] for f in features) == ["12", "20", "9"]  # no highways
    assert len(osm.open_source("file", path, keys=["highway"])) == 2


def test_unreadable_osm_file(tmp_path):
    path = tmp_path / "broken.osm.pbf"
    path.write_bytes(b"\x00\x01 not a pbf" * 10)
    with pytest.raises(SourceError, match="broken.osm.pbf: cannot read the OSM file"):
        osm.open_source("file", path)
    with pytest.raises(SourceError, match="no such OSM file"):
        osm.open_source("file", tmp_path / "absent.osm")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="unknown OSM file type"):
        osm.open_source("file", tmp_path / "notes.txt")
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(SourceError, match="bad.geojson: cannot read the GeoJSON"):
        osm.open_source("file", tmp_path / "bad.geojson")


def test_portugal_geojson(portugal_dir):
    source = osm.open_source("file", portugal_dir / "labels.geojson")
    raw = json.loads((portugal_dir / "labels.geojson").read_text())["features"]
    ids = {f["properties"]["@id"] for f in raw}
    assert len(source) == len(ids) < len(raw)  # pieces of one object merged into one feature
    features = source.features(mercantile.xy_bounds(mercantile.Tile(62093, 50163, 17)))
    assert features and all(v is not None and isinstance(v, str) for f in features for v in f.tags.values())
    beach = [
        f
        for f in source.features(mercantile.xy_bounds(mercantile.Tile(62093, 50163, 17)), margin=8)
        if f.tags.get("natural") == "beach"
    ]
    assert beach and all(f.geometry.geom_type.endswith("Polygon") for f in beach)
    west, south, east, north = _lnglat_bounds(features)
    assert -9.50 < west < east < -9.40 and 38.82 < south < north < 38.90
    assert source.source_tiles(mercantile.LngLatBbox(-9.5, 38.8, -9.4, 38.9)) == [mercantile.Tile(1940, 1567, 12)]


# ---- loopback HTTP servers ------------------------------------------------------------------------


class _Server:
    """A tiny HTTP server on 127.0.0.1 answering from a dict of path -> (status, bytes)."""

    def __init__(self, routes: dict):
        self.routes = routes
        self.requests: list[tuple[str, str, dict, bytes]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                owner.requests.append((self.command, self.path, dict(self.headers), body))
                status, data = owner.routes.get(self.path.split("?")[0], (404, b"not found"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    servers = []

    def start(routes):
        servers.append(_Server(routes))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


# ---- overpass ------------------------------------------------------------------------------------


def test_filter_keys(classes_file):
    assert osm.filter_keys(load_classes(classes_file)) == ["building", "landuse", "natural", "surface"]


def test_overpass_queries_once_and_reads_the_answer(server, tmp_path, classes_file):
    fake = server({"/api/interpreter": (200, OSM_XML.encode())})
    bbox = mercantile.LngLatBbox(7.41, 43.72, 7.43, 43.74)
    options = {
        "bbox": bbox,
        "classes": load_classes(classes_file),
        "endpoint": fake.url + "/api/interpreter",
        "timeout": 25,
    }
    source = osm.open_source("overpass", tmp_path / "osm", **options)
    _check_small_osm(source, highways=False)  # only the classes' keys are kept
    ((method, _, headers, body),) = fake.requests
    assert method == "POST" and "osmseg" in headers["User-Agent"]
    from urllib.parse import parse_qs

    query = parse_qs(body.decode())["data"][0]
    assert "[timeout:25]" in query and "[bbox:43.72,7.41,43.74,7.43]" in query
    for key in ("building", "landuse", "natural", "surface"):
        assert f'nwr["{key}"]' in query
    saved = list((tmp_path / "osm").glob("overpass-*.osm"))
    assert len(saved) == 1 and saved[0].read_text() == OSM_XML
    # A second open (as the labels stage does, with text options) reads the saved answer.
    again = dict(options, bbox="7.41,43.72,7.43,43.74", classes=str(classes_file))
    assert len(osm.open_source("overpass", tmp_path / "osm", **again)) == len(source)
    assert len(fake.requests) == 1
    with pytest.raises(SourceError, match="no saved Overpass answer"):
        osm.open_source("overpass", tmp_path / "osm")


def test_overpass_saves_to_a_named_file_that_later_stages_read(server, tmp_path, classes_file):
    fake = server({"/api/interpreter": (200, OSM_XML.encode())})
    path = tmp_path / "osm" / "overpass.osm"
    options = {"classes": str(classes_file), "endpoint": fake.url + "/api/interpreter"}
    first = osm.open_source("overpass", path, bbox="7.41,43.72,7.43,43.74", **options)
    assert (
        path.read_text() == OSM_XML
        and "[bbox:43.72,7.41,43.74,7.43]" in (tmp_path / "osm" / "overpass.osm.query").read_text()
    )
    # The labels stage opens it without bbox and classes: it reads the saved answer.
    later = osm.open_source("overpass", path)
    assert later.name == first.name == "overpass" and len(fake.requests) == 1
    # Same query: no new request; another box: asked again.
    osm.open_source("overpass", path, bbox="7.41,43.72,7.43,43.74", **options)
    assert len(fake.requests) == 1
    osm.open_source("overpass", path, bbox="7.40,43.72,7.43,43.74", **options)
    assert (
        len(fake.requests) == 2
        and "[bbox:43.72,7.4,43.74,7.43]" in (tmp_path / "osm" / "overpass.osm.query").read_text()
    )


@pytest.mark.parametrize(
    "status, body, message",
    [
        (429, b"rate limited", "HTTP 429.*retry.*smaller bounding box"),
        (504, b"gateway timeout", "HTTP 504.*retry later.*smaller bounding box"),
        (400, b"bad query", "HTTP 400"),
        (200, b"<html>oops</html>", "not OSM XML"),
        (200, b'<osm version="0.6"><remark> runtime error: Query timed out </remark></osm>', "runtime error"),
    ],
)
def test_overpass_errors_save_nothing(server, tmp_path, classes_file, status, body, message):
    fake = server({"/api/interpreter": (status, body)})
    with pytest.raises(SourceError, match=message):
        osm.open_source(
            "overpass",
            tmp_path,
            bbox=mercantile.LngLatBbox(7.41, 43.72, 7.43, 43.74),
            classes=load_classes(classes_file),
            endpoint=fake.url + "/api/interpreter",
        )
    assert list(tmp_path.iterdir()) == []


def test_overpass_unreachable(tmp_path, classes_file):
    with pytest.raises(SourceError, match="cannot connect"):
        osm.open_source(
            "overpass",
            tmp_path,
            bbox=mercantile.LngLatBbox(7.41, 43.72, 7.43, 43.74),
            classes=load_classes(classes_file),
            endpoint="http://127.0.0.1:9/api/interpreter",
        )


def test_all_tiles_from_overpass(server, tmp_path, classes_file, capsys):
    fake = server({"/api/interpreter": (200, OSM_XML.encode())})
    out = tmp_path / "all_tiles.txt"
    status = prepare.cli.run(
        prepare.main,
        [
            "all-tiles",
            "--osm-source",
            "overpass",
            "--osm",
            str(tmp_path / "osm"),
            "--bbox",
            "7.41,43.72,7.43,43.74",
            "--classes",
            str(classes_file),
            "--overpass-url",
            fake.url + "/api/interpreter",
            "--out",
            str(out),
        ],
    )
    assert status == 0, capsys.readouterr().err
    listed = datafiles.read_tile_list(out)
    assert listed.entries == [("overpass", mercantile.Tile(2132, 1493, 12))]
    assert listed.made_by["osm_source"] == "overpass" and listed.made_by["overpass_url"].startswith("http://127.0.0.1")


# ---- download-osm --------------------------------------------------------------------------------


def _small_qa_tiles(tmp_path, tile: mercantile.Tile = LEFT) -> bytes:
    square = _border_square()
    made = tmp_path / f"made-{tile.x}.mbtiles"
    path = write_mbtiles(made, {tile: [(square, {"@id": 1, "@type": "way", "building": "yes"})]})
    return gzip.compress(path.read_bytes())


class _FileServer:
    """Serves one file at every path as S3 does: an ETag, Range with If-Range, 416 past the end.

    Knobs: `cut` sends only that many bytes of the next body, whose Content-Length promises
    all of them, then closes the connection, as a dropped network does; `ranges = False`
    ignores Range as some servers do; `if_range = False` honours Range but not If-Range;
    `content_length = False` leaves Content-Length out (the body ends when the connection
    closes). `answers` lists (status, request headers).
    """

    def __init__(self, data: bytes, etag: str = '"v1"'):
        self.data, self.etag = data, etag
        self.cut: int | None = None
        self.ranges = self.if_range = self.content_length = True
        self.answers: list[tuple[int, dict]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                data, first = owner.data, 0
                wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                same = not owner.if_range or self.headers.get("If-Range", owner.etag) == owner.etag
                if wanted and owner.ranges and same:
                    first = int(wanted.group(1))
                    status = 206 if first < len(data) else 416
                else:
                    status = 200
                owner.answers.append((status, dict(self.headers)))
                self.send_response(status)
                self.send_header("ETag", owner.etag)
                if status == 416:
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if status == 206:
                    self.send_header("Content-Range", f"bytes {first}-{len(data) - 1}/{len(data)}")
                if owner.content_length:
                    self.send_header("Content-Length", str(len(data) - first))
                self.end_headers()
                body = data[first:]
                if owner.cut is not None:
                    body, owner.cut = body[: owner.cut], None
                self.wfile.write(body)  # HTTP/1.0: the connection closes after each answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def file_server():
    servers = []

    def start(data):
        servers.append(_FileServer(data))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _broken_off(fake, out_dir) -> Path:
    """Download from fake with the connection dropped half way; return the kept .gz.partial."""
    fake.cut = len(fake.data) // 2
    with pytest.raises(SourceError, match="is kept: run the command again to resume"):
        osm.download_qa_tiles("monaco", out_dir, fake.url)
    kept = out_dir / "monaco.mbtiles.gz.partial"
    assert kept.read_bytes() == fake.data[: len(fake.data) // 2]
    assert not (out_dir / "monaco.mbtiles").exists()
    return kept


def test_download_osm_streams_and_gunzips(server, tmp_path, capsys):
    data = _small_qa_tiles(tmp_path)
    fake = server({"/latest.country/monaco.mbtiles.gz": (200, data)})
    out_dir = tmp_path / "osm"
    argv = ["download-osm", "--name", "monaco", "--base-url", fake.url + "/latest.country/", "--out-dir", str(out_dir)]
    assert prepare.cli.run(prepare.main, argv) == 0
    path = out_dir / "monaco.mbtiles"
    assert path.read_bytes() == gzip.decompress(data)
    assert [p.name for p in out_dir.iterdir()] == ["monaco.mbtiles"]  # no partial left
    assert osm.open_source("qa-tiles", path).all_tiles() == [LEFT]
    # A file already there is used as it is: nothing is downloaded, and a download a run
    # stopped before cleaning up after is removed.
    (out_dir / "monaco.mbtiles.gz.partial").write_bytes(data)
    assert prepare.cli.run(prepare.main, argv) == 0
    assert [p.name for p in out_dir.iterdir()] == ["monaco.mbtiles"]
    assert len(fake.requests) == 1 and "using it as it is" in capsys.readouterr().err


def test_download_osm_resumes_where_it_broke_off(file_server, tmp_path, capsys):
    data = _small_qa_tiles(tmp_path)
    fake = file_server(data)
    out_dir = tmp_path / "osm"
    argv = ["download-osm", "--name", "monaco", "--base-url", fake.url, "--out-dir", str(out_dir)]
    fake.cut = len(data) // 2
    assert prepare.cli.run(prepare.main, argv) == 2
    assert "monaco.mbtiles.gz.partial is kept: run the command again to resume" in capsys.readouterr().err
    kept = out_dir / "monaco.mbtiles.gz.partial"
    assert kept.read_bytes() == data[: len(data) // 2] and not (out_dir / "monaco.mbtiles").exists()
    record = json.loads((out_dir / "monaco.mbtiles.gz.partial.json").read_text())
    assert record["etag"] == fake.etag and record["size"] == len(data) and record["url"].startswith(fake.url)

    assert prepare.cli.run(prepare.main, argv) == 0
    status, headers = fake.answers[-1]
    assert status == 206 and headers["Range"] == f"bytes={len(data) // 2}-" and headers["If-Range"] == fake.etag
    assert (out_dir / "monaco.mbtiles").read_bytes() == gzip.decompress(data)
    assert [p.name for p in out_dir.iterdir()] == ["monaco.mbtiles"]
    assert f"resuming at {len(data) // 2} bytes of {len(data)} bytes" in capsys.readouterr().err


def test_download_osm_starts_over_when_the_server_ignores_range(file_server, tmp_path, capsys):
    data = _small_qa_tiles(tmp_path)
    fake = file_server(data)
    _broken_off(fake, tmp_path)
    fake.ranges = False
    path = osm.download_qa_tiles("monaco", tmp_path, fake.url)
    status, headers = fake.answers[-1]
    assert status == 200 and headers["Range"] == f"bytes={len(data) // 2}-"
    assert path.read_bytes() == gzip.decompress(data)
    assert "does not resume downloads); starting over" in capsys.readouterr().err


@pytest.mark.parametrize("if_range", [True, False], ids=["if-range", "range-only"])
def test_download_osm_starts_over_when_the_file_changed(file_server, tmp_path, capsys, if_range):
    fake = file_server(_small_qa_tiles(tmp_path, LEFT))
    _broken_off(fake, tmp_path / "osm")
    fake.data, fake.etag, fake.if_range = _small_qa_tiles(tmp_path, RIGHT), '"v2"', if_range
    path = osm.download_qa_tiles("monaco", tmp_path / "osm", fake.url)
    # A server that checks If-Range answers 200 at once; one that does not answers 206 with the
    # new ETag, and the download asks again without Range.
    assert fake.answers[1][1]["If-Range"] == '"v1"'
    if if_range:
        assert [status for status, _ in fake.answers] == [200, 200]
    else:
        assert [status for status, _ in fake.answers] == [200, 206, 200] and "Range" not in fake.answers[2][1]
    assert path.read_bytes() == gzip.decompress(fake.data)
    assert osm.open_source("qa-tiles", path).all_tiles() == [RIGHT]
    assert "the server's file changed; starting over" in capsys.readouterr().err


def test_download_osm_interrupted_while_unpacking_does_not_download_again(file_server, tmp_path, monkeypatch, capsys):
    data = _small_qa_tiles(tmp_path)
    fake = file_server(data)
    out_dir = tmp_path / "osm"

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(osm, "QaTilesSource", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            osm.download_qa_tiles("monaco", out_dir, fake.url)
    assert (out_dir / "monaco.mbtiles.gz.partial").read_bytes() == data
    assert sorted(p.name for p in out_dir.iterdir()) == ["monaco.mbtiles.gz.partial", "monaco.mbtiles.gz.partial.json"]
    path = osm.download_qa_tiles("monaco", out_dir, fake.url)
    assert [status for status, _ in fake.answers] == [200, 416]
    assert fake.answers[-1][1]["Range"] == f"bytes={len(data)}-"
    assert path.read_bytes() == gzip.decompress(data)
    assert [p.name for p in out_dir.iterdir()] == ["monaco.mbtiles"]
    assert "the download was already complete" in capsys.readouterr().err


def test_download_osm_notices_an_early_end_without_content_length(file_server, tmp_path):
    # Without Content-Length nothing below us can tell a dropped connection from the end of
    # the body; Content-Range's size still can.
    data = _small_qa_tiles(tmp_path)
    fake = file_server(data)
    kept = _broken_off(fake, tmp_path)
    fake.content_length, fake.cut = False, len(data) // 4
    with pytest.raises(SourceError, match="ended early at .* is kept: run the command again to resume"):
        osm.download_qa_tiles("monaco", tmp_path, fake.url)
    assert fake.answers[-1][0] == 206 and kept.read_bytes() == data[: len(data) // 2 + len(data) // 4]
    path = osm.download_qa_tiles("monaco", tmp_path, fake.url)
    assert path.read_bytes() == gzip.decompress(data)


def test_download_osm_without_its_record_starts_over(file_server, tmp_path, capsys):
    data = _small_qa_tiles(tmp_path)
    fake = file_server(data)
    _broken_off(fake, tmp_path).with_name("monaco.mbtiles.gz.partial.json").unlink()
    path = osm.download_qa_tiles("monaco", tmp_path, fake.url)
    assert "Range" not in fake.answers[-1][1] and path.read_bytes() == gzip.decompress(data)
    assert "cannot resume (monaco.mbtiles.gz.partial.json does not say it came from" in capsys.readouterr().err


def test_download_osm_keeps_gzip_labelled_as_content_encoding(tmp_path):
    # Some hosts serve .gz files with Content-Encoding: gzip; the file must still be gunzipped once.
    data = _small_qa_tiles(tmp_path)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        path = osm.download_qa_tiles("monaco", tmp_path / "osm", f"http://127.0.0.1:{httpd.server_address[1]}/")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert path.read_bytes() == gzip.decompress(data)


def test_download_osm_unknown_name(server, tmp_path, capsys):
    fake = server({})
    argv = ["download-osm", "--name", "atlantis", "--base-url", fake.url + "/", "--out-dir", str(tmp_path)]
    assert prepare.cli.run(prepare.main, argv) == 2
    err = capsys.readouterr().err
    assert "no QA tiles named 'atlantis' (HTTP 404)" in err and "lower case with underscores" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "broken, message",
    [
        ("not gzip", "not a gzip file"),
        ("cut short", "ended early"),
        ("a flipped byte", "broken or not a gzip file"),
        ("not QA tiles", "not OSM QA tiles"),
    ],
)
def test_download_osm_broken_file_leaves_nothing(server, tmp_path, capsys, broken, message):
    # Served whole, so resuming cannot mend them: the partial files are deleted.
    data = _small_qa_tiles(tmp_path)
    payload = {
        "not gzip": b"not gzip at all",
        "cut short": data[:-100],
        "a flipped byte": data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :],
        "not QA tiles": gzip.compress(b"<html>busy, try later</html>"),
    }[broken]
    fake = server({"/x/monaco.mbtiles.gz": (200, payload)})
    out_dir = tmp_path / "osm"
    with pytest.raises(SourceError, match=message) as raised:
        osm.download_qa_tiles("monaco", out_dir, fake.url + "/x/")
    assert "deleted" in str(raised.value)
    assert list(out_dir.iterdir()) == []


def test_download_osm_rejects_odd_names(tmp_path):
    with pytest.raises(SourceError, match="lower case with underscores"):
        osm.download_qa_tiles("United Kingdom", tmp_path, "http://127.0.0.1:9/")


def test_qa_tiles_urls():
    assert osm.qa_tiles_url("united_kingdom") == osm.QA_TILES_URL + "united_kingdom.mbtiles.gz"
    assert osm.qa_tiles_url("planet") == (
        "https://s3.amazonaws.com/mapbox/osm-qa-tiles-production/latest.planet.mbtiles.gz"
    )


# ---- the vector tile decoder ---------------------------------------------------------------------


def _reference_decode(data: bytes, tile: mercantile.Tile):
    """mapbox_vector_tile's own decoder, moved to metres: what decode_tile must agree with."""
    layer = mapbox_vector_tile.decode(data, default_options={"y_coord_down": True})["osm"]
    left, bottom, right, top = mercantile.xy_bounds(tile)
    scale = ((right - left) / layer["extent"], -(top - bottom) / layer["extent"])
    decoded = []
    for feature in layer["features"]:
        try:
            geometry = shapely.geometry.shape(feature["geometry"])
        except (ValueError, IndexError):
            continue
        decoded.append((shapely.transform(geometry, lambda xy: xy * scale + (left, top)), feature["properties"]))
    return decoded


def _assert_same_decoding(data: bytes, tile: mercantile.Tile):
    geometries, properties = osm.decode_tile(data, tile)
    reference = _reference_decode(data, tile)
    assert properties == [p for _, p in reference]
    for mine, (theirs, _) in zip(geometries, reference):
        assert mine.geom_type == theirs.geom_type
        assert mine.equals_exact(theirs, 1e-6) or mine.symmetric_difference(theirs).area < 1e-6


def test_decoder_matches_mapbox_vector_tile_on_monaco(monaco_mbtiles):
    connection = sqlite3.connect(monaco_mbtiles)
    for z, x, row, data in connection.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles"):
        _assert_same_decoding(gzip.decompress(data), mercantile.Tile(x, (1 << z) - 1 - row, z))


def test_decoder_matches_mapbox_vector_tile_on_every_geometry_type():
    left, _, _, top = mercantile.xy_bounds(LEFT)
    cx, cy = left + 3000, top - 3000
    shell = box(cx, cy, cx + 900, cy + 900)
    holed = shell.difference(box(cx + 300, cy + 300, cx + 600, cy + 600))
    features = [
        (holed, {"landuse": "forest", "@id": 1}),
        (
            shapely.MultiPolygon(
                [box(cx, cy - 2000, cx + 100, cy - 1900), box(cx + 500, cy - 2000, cx + 600, cy - 1900)]
            ),
            {"building": "yes", "levels": 3.5, "flag": True},
        ),
        (
            shapely.MultiLineString([[(cx, cy), (cx + 50, cy + 70)], [(cx - 90, cy), (cx - 20, cy - 30)]]),
            {"highway": "path"},
        ),
        (LineString([(cx, cy), (cx + 1000, cy + 500), (cx + 1500, cy - 10)]), {"highway": "primary", "@id": -5}),
        (Point(cx + 10, cy + 10), {"natural": "tree"}),
        (shapely.MultiPoint([(cx, cy), (cx + 100, cy + 100)]), {"amenity": "bench"}),
    ]
    for extent in (4096, 1 << 20):
        encoded = [{"geometry": _to_local(g, LEFT, extent).wkt, "properties": p} for g, p in features]
        data = mapbox_vector_tile.encode(
            [{"name": "osm", "features": encoded}], default_options={"extents": extent, "y_coord_down": True}
        )
        _assert_same_decoding(data, LEFT)
        geometries, _ = osm.decode_tile(data, LEFT)
        assert [g.geom_type for g in geometries] == [
            "Polygon",
            "MultiPolygon",
            "MultiLineString",
            "LineString",
            "Point",
            "MultiPoint",
        ]
        assert len(geometries[0].interiors) == 1
