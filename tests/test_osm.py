"""osmseg.osm: QA tiles (both generations) and file sources behind one interface."""

from __future__ import annotations

import gzip
import json

import mapbox_vector_tile
import mercantile
import pytest
import shapely
from osm_fakes import LEFT, OSM_XML, RIGHT, border_square, check_small_osm, write_mbtiles
from shapely.geometry import LineString, Point, box

from osmseg import osm, tiles
from osmseg.errors import SourceError
from osmseg.osm.areas import is_area

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
    square = border_square()
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
    square = border_square()
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
    assert is_area(tags) is area


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

def test_osm_xml_file(tmp_path):
    path = tmp_path / "small.osm"
    path.write_text(OSM_XML)
    source = osm.open_source("file", path)
    assert source.name == "small"
    check_small_osm(source)


def test_osm_pbf_file(tmp_path):
    import osmium

    xml = tmp_path / "small.osm"
    xml.write_text(OSM_XML)
    pbf = tmp_path / "small.osm.pbf"
    with osmium.SimpleWriter(str(pbf)) as writer:
        for obj in osmium.FileProcessor(str(xml)):
            writer.add(obj)
    check_small_osm(osm.open_source("file", pbf))


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


