"""Small OSM fakes for tests: QA-style MBTiles written from shapes, and loopback HTTP servers."""

from __future__ import annotations

import gzip
import http.server
import re
import sqlite3
import threading
from pathlib import Path

import mapbox_vector_tile
import mercantile
import pytest
import shapely
from shapely.geometry import Polygon, box

# Two z12 tiles side by side near Monaco; the border between them is x = LEFT.right.
LEFT = mercantile.Tile(2132, 1493, 12)
RIGHT = mercantile.Tile(2133, 1493, 12)


def to_local(geometry, tile: mercantile.Tile, extent: int):
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
            encoded.append({"geometry": to_local(piece, tile, extent).wkt, "properties": properties})
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


def border_square() -> Polygon:
    """A 600 m square building straddling the LEFT/RIGHT border."""
    border = mercantile.xy_bounds(LEFT).right
    middle = (mercantile.xy_bounds(LEFT).top + mercantile.xy_bounds(LEFT).bottom) / 2
    return box(border - 300, middle - 300, border + 300, middle + 300)



# ---- loopback HTTP servers ------------------------------------------------------------------------


class RouteServer:
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



class FileServer:
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


def check_small_osm(source, highways: bool = True):
    """Assert that a source read from OSM_XML holds its features, as areas, lines and points."""
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
