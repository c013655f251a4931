"""osmseg.osm.mvt: the vector tile decoder, checked against mapbox_vector_tile."""

from __future__ import annotations

import gzip
import sqlite3

import mapbox_vector_tile
import mercantile
import shapely
from osm_fakes import LEFT, to_local
from shapely.geometry import LineString, Point, box

from osmseg.osm import mvt

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
    geometries, properties = mvt.decode_tile(data, tile)
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
        encoded = [{"geometry": to_local(g, LEFT, extent).wkt, "properties": p} for g, p in features]
        data = mapbox_vector_tile.encode(
            [{"name": "osm", "features": encoded}], default_options={"extents": extent, "y_coord_down": True}
        )
        _assert_same_decoding(data, LEFT)
        geometries, _ = mvt.decode_tile(data, LEFT)
        assert [g.geom_type for g in geometries] == [
            "Polygon",
            "MultiPolygon",
            "MultiLineString",
            "LineString",
            "Point",
            "MultiPoint",
        ]
        assert len(geometries[0].interiors) == 1
