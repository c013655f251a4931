"""OSM sources: "the OSM features in this area", from QA tiles, local extracts or Overpass.

Every source answers the same two questions (see OsmSource):

- ``source_tiles(bbox)``: the tiles the source is cut into (z12 for OSM QA tiles) that hold
  data inside a WGS84 bounding box; `prepare.py all-tiles` writes them to data/all_tiles.txt.
- ``features(bounds)``: the features inside EPSG:3857 bounds (metres), as Feature(geometry,
  tags) with shapely geometries in EPSG:3857 metres and OSM tags as str -> str. Closed ways
  whose tags make them areas come back as Polygons (see is_area); pieces of one OSM object
  cut apart by source-tile borders come back merged, so that rendering is seamless.

Kinds (open_source):

- ``qa-tiles``: an OSM QA tiles MBTiles file (SQLite; tiles at one zoom, z12 for QA tiles;
  TMS row order; gzipped Mapbox Vector Tiles with a layer ``osm``; tags as properties plus
  ``@id``, ``@type``...). Both generations are read: the 2015 one (extent 4096, closed ways
  stored as LineStrings) and the newer one (extent 2^20, areas stored as Polygons).
- ``file``: a ``.osm``/``.osm.pbf`` extract read with pyosmium (multipolygon relations are
  assembled by osmium's area handler), or a GeoJSON FeatureCollection whose properties are
  OSM tags.
- ``overpass``: one Overpass API query for the keys a classes file uses inside a bounding
  box; the response (OSM XML) is saved, atomically, at the given ``.osm`` path (e.g.
  ``data/osm/overpass.osm``, the query text beside it in ``overpass.osm.query``) or in the
  given folder as ``overpass-<hash of the query>.osm``, and read as a ``file`` source.

`prepare.py download-osm` fetches ``data/osm/<name>.mbtiles`` (OSM QA tiles for a country or
the planet). The ``.mbtiles.gz`` is downloaded into ``<name>.mbtiles.gz.partial``, with
``<name>.mbtiles.gz.partial.json`` beside it (JSON: the ``url``, ``etag``, ``last_modified``
and ``size`` in bytes of the response it came from); a re-run after an interruption asks for
the rest with an HTTP Range request, or starts over if the server's file changed. The whole
``.gz`` is gunzipped into ``<name>.mbtiles.partial``, renamed when it opens as QA tiles, and
then deleted.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import re
import sqlite3
import sys
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import mercantile

from osmseg import atomic, tiles
from osmseg.errors import SourceError

KINDS = ("qa-tiles", "file", "overpass")
QA_ZOOM = 12  # OSM QA tiles are cut at z12 (https://osmlab.github.io/osm-qa-tiles/)
LAYER = "osm"
OVERPASS_URL = "https://overpass-api.de/api/interpreter"
QA_TILES_URL = "https://s3.amazonaws.com/mapbox/osm-qa-tiles-production/latest.country/"
QA_TILES_LIST = "https://osmlab.github.io/osm-qa-tiles/country.html"
USER_AGENT = "osmseg/0.1 (segmentation training labels from OpenStreetMap; python-requests)"


class Feature(NamedTuple):
    """One OSM object: a shapely geometry in EPSG:3857 metres and its tags (str -> str)."""

    geometry: object
    tags: dict


# --------------------------------------------------------------------------------------
# Which closed ways are areas.
# A closed way is an area when one of these keys says so; area=yes/no overrides. The table
# follows the OSM wiki's "Key:area" page and iD's areaKeys (id-tagging-schema): for these
# keys every value is an area except the listed ones ...
_AREA_KEYS_EXCEPT = {
    "building": set(),
    "building:part": set(),
    "landuse": set(),
    "natural": {"coastline", "cliff", "ridge", "arete", "tree_row", "earth_bank", "valley"},
    "leisure": {"track", "slipway"},
    "amenity": {"bench", "waste_basket"},
    "shop": set(),
    "tourism": {"artwork"},
    "office": set(),
    "craft": set(),
    "historic": {"citywalls"},
    "military": {"trench"},
    "place": set(),
    "aeroway": {"taxiway", "runway", "parking_position", "jet_bridge"},
    "man_made": {"cutline", "embankment", "pipeline", "groyne", "breakwater", "dyke"},
    "water": set(),
    "wetland": set(),
    "golf": {"hole", "cartpath", "path"},
    "area:highway": set(),
    "indoor": set(),
    "public_transport": {"platform_edge"},
}
# ... and for these keys only the listed values are areas.
_AREA_KEYS_ONLY = {
    "highway": {"rest_area", "services", "platform"},
    "railway": {"platform", "station", "turntable", "roundhouse"},
    "waterway": {"riverbank", "dock", "boatyard", "dam", "fuel"},
    "power": {"plant", "substation", "generator", "transformer", "switchgear"},
    "barrier": {"city_wall_area"},
}


def is_area(tags: dict) -> bool:
    """Whether a closed way with these tags is an area (filled) rather than a closed line."""
    area = tags.get("area")
    if area == "no":
        return False
    if area == "yes":
        return True
    for key, exceptions in _AREA_KEYS_EXCEPT.items():
        value = tags.get(key)
        if value is not None and value != "no" and value not in exceptions:
            return True
    return any(tags.get(key) in values for key, values in _AREA_KEYS_ONLY.items())


def _tags(properties: dict) -> dict:
    """OSM tags as str -> str (QA tiles store @id and friends as numbers)."""
    return {str(k): str(v) for k, v in properties.items() if v is not None}


# --------------------------------------------------------------------------------------
class OsmSource:
    """The interface every OSM source implements (see the module docstring).

    Attributes:
        name: the source's name as written in tile lists (e.g. ``demo`` for demo.mbtiles).
        zoom: the zoom of its source tiles (12 for OSM QA tiles).
    """

    name: str
    zoom: int

    def source_tiles(self, bbox: mercantile.LngLatBbox) -> list[mercantile.Tile]:
        """The source tiles at self.zoom holding data inside bbox, sorted by (z, x, y)."""
        raise NotImplementedError

    def features(self, bounds: mercantile.Bbox, margin: float = 0.0) -> list[Feature]:
        """The features inside EPSG:3857 bounds (left, bottom, right, top), merged across
        source tiles and clipped to bounds grown by `margin` (a fraction of its size)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (sources reopen them on the next call)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_source(kind: str, location, **options) -> OsmSource:
    """Open an OSM source.

    Args:
        kind: one of KINDS: "qa-tiles", "file" or "overpass".
        location: the MBTiles path (qa-tiles), the .osm/.osm.pbf/.geojson path (file), or
            where to save the answer (overpass: a .osm path such as data/osm/overpass.osm,
            or a folder).
        options: per kind: qa-tiles takes name, zoom, cache_size, max_area_tiles; file
            takes name, zoom, keys, classes; overpass takes bbox and classes (needed unless
            a saved .osm answer is to be read), endpoint, timeout, name.

    Raises:
        SourceError: an unknown kind, or a source that cannot be read (naming it and the fix).
    """
    if kind == "qa-tiles":
        return QaTilesSource(location, **options)
    if kind == "file":
        return FileSource(location, **options)
    if kind == "overpass":
        return overpass_source(location, **options)
    raise SourceError(f"unknown OSM source kind {kind!r}; use one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------------------
# Geometry helpers shared by the sources.


def _join_lines(lines: list, tolerance: float) -> list:
    """Merge line pieces whose ends lie within tolerance of each other into longer lines.

    Tile clipping computes each cut point from a slightly different (quantised) segment in
    each tile, so the two pieces' ends rarely coincide exactly: snap ends that are within
    tolerance onto one point first, then let shapely's line_merge join them.
    """
    import shapely
    from shapely.geometry import LineString, MultiLineString

    pieces = [list(line.coords) for line in lines if len(line.coords) >= 2]
    if len(pieces) <= 1:
        return [LineString(p) for p in pieces]
    ends: list[tuple[float, float]] = []
    for piece in pieces:
        for index in (0, -1):
            point = piece[index]
            for known in ends:
                if abs(point[0] - known[0]) <= tolerance and abs(point[1] - known[1]) <= tolerance:
                    piece[index] = known
                    break
            else:
                ends.append(point)
    merged = shapely.line_merge(MultiLineString(pieces))
    return list(getattr(merged, "geoms", [merged]))


def _polygons_from_rings(lines: list, close_open: bool) -> tuple[list, list]:
    """Turn joined lines into polygons: closed ones always, open ones only if close_open.

    Returns:
        (polygons, lines left open)
    """
    import shapely
    from shapely.geometry import Polygon

    polygons, open_lines = [], []
    for line in lines:
        coords = list(line.coords)
        closed = coords[0] == coords[-1]
        if (closed and len(coords) >= 4) or (close_open and len(coords) >= 3):
            polygon = _polygonal(shapely.make_valid(Polygon(coords)))
            if polygon is not None:
                polygons.append(polygon)
        else:
            open_lines.append(line)
    return polygons, open_lines


def _polygonal(geometry):
    """The polygonal part of a geometry (make_valid can leave stray lines), or None."""
    from shapely.geometry import MultiPolygon

    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry if geometry.area > 0 else None
    parts = [g for g in getattr(geometry, "geoms", []) if g.geom_type == "Polygon" and g.area > 0]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def _clip(geometry, rectangle):
    """geometry cut to a shapely box: GEOS's fast rectangle clip, or a full intersection where
    that one fails (it can leave a degenerate ring behind on valid input)."""
    import shapely

    try:
        return shapely.clip_by_rect(geometry, *rectangle.bounds)
    except shapely.errors.GEOSException:
        return shapely.intersection(geometry, rectangle)


def _single(geometries: list):
    """One geometry from several of the same dimension (Multi* when needed)."""
    import shapely

    if len(geometries) == 1:
        return geometries[0]
    return (
        shapely.unary_union(geometries)
        if geometries[0].geom_type.endswith("Polygon")
        else shapely.union_all(geometries)
    )


# --------------------------------------------------------------------------------------
# OSM QA tiles (MBTiles).


class _Piece(NamedTuple):
    """A part of one OSM object found in one source tile, in EPSG:3857 metres."""

    key: tuple  # (@type, @id), or a unique key for objects without an @id
    tags: dict
    kind: str  # "point", "line", "polygon", or "whole" (an object reassembled from every tile)
    geometry: object
    tile: mercantile.Tile


class QaTilesSource(OsmSource):
    """An OSM QA tiles MBTiles file (both generations; see the module docstring).

    Args:
        path: the .mbtiles file.
        name: the name written in tile lists (default: the file's stem).
        zoom: the zoom of the tiles to read (default: 12 if the file has z12 tiles, else the
            deepest zoom it holds, for QA-style files cut at another zoom).
        cache_size: decoded source tiles kept in memory (labels read many z17 tiles from
            one z12 tile and its neighbours in a row; a dense city tile can take 100 MB).
        max_area_tiles: how many source tiles to visit when reassembling one area stored as
            LineString pieces (the 2015 generation) before closing it as it is.

    In the 2015 generation a tile lying wholly inside a large area holds nothing of it (the
    outline passes elsewhere), so each tile also looks for such areas in its 8 neighbours:
    areas whose outline stays more than one source tile away from a tile are missed there.
    Newer files store clipped polygons, which have no such gap.
    """

    def __init__(
        self, path, name: str | None = None, zoom: int | None = None, cache_size: int = 16, max_area_tiles: int = 256
    ):
        self.path = Path(path)
        self.name = name or self.path.name.split(".")[0]
        self.cache_size = cache_size
        self.max_area_tiles = max_area_tiles
        self._connection: sqlite3.Connection | None = None
        self._decoded: OrderedDict = OrderedDict()
        self._indexes: OrderedDict = OrderedDict()
        self._areas: OrderedDict = OrderedDict()
        if not self.path.is_file():
            raise SourceError(
                f"{self.path}: no such MBTiles file; run `make download-osm-tiles` (prepare.py download-osm) "
                "or pass --osm with an existing OSM QA tiles file"
            )
        self.zoom = self._pick_zoom(zoom)
        self.areas_as_lines = self._check_vector()

    # ---- file access ------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            try:
                self._connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            except sqlite3.Error as error:
                raise SourceError(f"{self.path}: cannot open the MBTiles file ({error})") from None
        return self._connection

    def _query(self, sql: str, params: tuple = ()) -> list:
        try:
            return self._db().execute(sql, params).fetchall()
        except sqlite3.DatabaseError as error:
            raise SourceError(
                f"{self.path}: not a readable MBTiles (SQLite) file ({error}); download it again "
                "(make download-osm-tiles) or pass an OSM QA tiles .mbtiles"
            ) from None

    def _has_zoom(self, zoom: int) -> bool:
        return bool(self._query("SELECT 1 FROM tiles WHERE zoom_level = ? LIMIT 1", (zoom,)))

    def _pick_zoom(self, zoom: int | None) -> int:
        """The zoom to read: the one asked for, else 12, else the deepest the file holds.

        Uses indexed look-ups only: a planet file holds tens of millions of tiles.
        """
        if zoom is None and self._has_zoom(QA_ZOOM):
            return QA_ZOOM
        if zoom is None:
            deepest = self._query("SELECT MAX(zoom_level) FROM tiles")[0][0]
            if deepest is None:
                raise SourceError(
                    f"{self.path}: the MBTiles file holds no tiles; download it again or pass another file"
                )
            return int(deepest)
        if not self._has_zoom(zoom):
            zooms = sorted(row[0] for row in self._query("SELECT DISTINCT zoom_level FROM tiles"))
            held = f"the file holds z{', z'.join(map(str, zooms))}" if zooms else "the file holds no tiles"
            raise SourceError(f"{self.path}: no tiles at z{zoom} ({held}); pass an OSM QA tiles file (cut at z12)")
        return zoom

    def _check_vector(self) -> bool:
        """Check that the file holds vector tiles; return whether it stores areas as lines.

        Looks at the largest of a few tiles: the 2015 generation has no polygons at all.
        """
        rows = self._query(
            "SELECT tile_column, tile_row, tile_data FROM tiles WHERE zoom_level = ? LIMIT 8", (self.zoom,)
        )
        x, row, data = max(rows, key=lambda r: len(r[2] or b""))
        data = data or b""
        data = _gunzip(data)
        if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff" or data[8:12] == b"WEBP":
            raise SourceError(
                f"{self.path}: holds raster image tiles, not vector tiles; pass OSM QA tiles "
                "(gzipped Mapbox Vector Tiles with a layer 'osm')"
            )
        tile = mercantile.Tile(x, (1 << self.zoom) - 1 - row, self.zoom)
        pieces = self._decode_bytes(data, tile)  # raises SourceError if not MVT
        return not any(p.kind == "polygon" for p in pieces) and any(
            p.kind == "line" and is_area(p.tags) for p in pieces
        )

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __getstate__(self):
        # Picklable for worker processes: each reopens the file and starts empty caches.
        state = dict(self.__dict__)
        state.update(_connection=None, _decoded=OrderedDict(), _indexes=OrderedDict(), _areas=OrderedDict())
        return state

    def has_tile(self, tile: mercantile.Tile) -> bool:
        row = (1 << tile.z) - 1 - tile.y  # MBTiles rows count from the south (TMS)
        found = self._query(
            "SELECT 1 FROM tiles WHERE zoom_level = ? AND tile_column = ? AND tile_row = ? LIMIT 1",
            (tile.z, tile.x, row),
        )
        return bool(found)

    def all_tiles(self) -> list[mercantile.Tile]:
        """Every tile the file holds at self.zoom, sorted by (x, y)."""
        rows = self._query("SELECT tile_column, tile_row FROM tiles WHERE zoom_level = ?", (self.zoom,))
        return sorted(mercantile.Tile(x, (1 << self.zoom) - 1 - row, self.zoom) for x, row in rows)

    def source_tiles(self, bbox: mercantile.LngLatBbox) -> list[mercantile.Tile]:
        x0, y0, x1, y1 = tiles.tile_range(bbox, self.zoom)
        top = (1 << self.zoom) - 1
        # One range query instead of one query per tile (a country box has thousands).
        rows = self._query(
            "SELECT tile_column, tile_row FROM tiles WHERE zoom_level = ? AND tile_column BETWEEN ? AND ? "
            "AND tile_row BETWEEN ? AND ?",
            (self.zoom, x0, x1, top - y1, top - y0),
        )
        return sorted(mercantile.Tile(x, top - row, self.zoom) for x, row in rows)

    # ---- decoding ---------------------------------------------------------------------
    def _raw(self, tile: mercantile.Tile) -> dict[tuple, list[_Piece]]:
        """The decoded pieces of one source tile by object key ({} when absent), LRU-cached."""
        if tile in self._decoded:
            self._decoded.move_to_end(tile)
            return self._decoded[tile]
        row = self._query(
            "SELECT tile_data FROM tiles WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?",
            (tile.z, tile.x, (1 << tile.z) - 1 - tile.y),
        )
        by_key: dict[tuple, list[_Piece]] = collections.defaultdict(list)
        for piece in self._decode_bytes(_gunzip(row[0][0] or b""), tile) if row else []:
            by_key[piece.key].append(piece)
        self._decoded[tile] = dict(by_key)
        while len(self._decoded) > self.cache_size:
            self._decoded.popitem(last=False)
        return self._decoded[tile]

    def _index(self, tile: mercantile.Tile):
        """What queries search in one source tile: (pieces, STRtree over their geometries).

        Areas stored as LineStrings (the 2015 generation) are indexed by their filled
        polygon, reassembled across tiles, so that a query well inside a large area (and far
        from its outline) still finds it. LRU-cached like the decoded tiles.
        """
        import shapely

        if tile in self._indexes:
            self._indexes.move_to_end(tile)
            return self._indexes[tile]
        pieces: list[_Piece] = []
        rings: list[_Piece] = []
        for key, parts in self._raw(tile).items():
            first = parts[0]
            if first.kind != "line" or not is_area(first.tags):
                pieces.extend(parts)
            elif (
                len(parts) == 1
                and first.geometry.geom_type == "LineString"
                and first.geometry.is_closed
                and len(first.geometry.coords) >= 4
            ):
                rings.append(first)  # the common case, a whole closed way: filled below in bulk
            else:
                area = self._area(key, tile)
                if area is not None:
                    pieces.append(_Piece(key, first.tags, "whole", area, tile))
        if self.areas_as_lines:
            pieces.extend(self._areas_from_neighbours(tile, {p.key for p in pieces} | {p.key for p in rings}))
        if rings:
            coordinates, owners = shapely.get_coordinates([p.geometry for p in rings], return_index=True)
            filled = shapely.polygons(shapely.linearrings(coordinates, indices=owners))
            for piece, polygon in zip(rings, filled):
                polygon = polygon if polygon.is_valid else _polygonal(shapely.make_valid(polygon))
                if polygon is not None and polygon.area > 0:
                    pieces.append(_Piece(piece.key, piece.tags, "whole", polygon, tile))
                else:
                    pieces.append(piece)  # a degenerate ring: drawn as the line it is
        index = (pieces, shapely.STRtree([p.geometry for p in pieces]))
        self._indexes[tile] = index
        while len(self._indexes) > self.cache_size:
            self._indexes.popitem(last=False)
        return index

    def _areas_from_neighbours(self, tile: mercantile.Tile, known: set) -> list[_Piece]:
        """Areas (2015 generation) from the 8 neighbours that reach into `tile` without an
        outline piece in it: typically `tile` lies wholly inside them."""
        import shapely

        tile_box = shapely.box(*mercantile.xy_bounds(tile))
        found = []
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                neighbour = mercantile.Tile(tile.x + dx, tile.y + dy, tile.z)
                if (dx, dy) == (0, 0) or not 0 <= neighbour.y < (1 << tile.z):
                    continue
                for key, parts in self._raw(neighbour).items():
                    first = parts[0]
                    if key in known or first.kind != "line" or not is_area(first.tags):
                        continue
                    if all(g.is_closed for p in parts for g in getattr(p.geometry, "geoms", [p.geometry])):
                        continue  # wholly inside the neighbour
                    known.add(key)
                    area = self._area(key, neighbour)
                    if area is not None and area.geom_type.endswith("Polygon") and area.intersects(tile_box):
                        found.append(_Piece(key, first.tags, "whole", area, tile))
        return found

    def _decode_bytes(self, data: bytes, tile: mercantile.Tile) -> list[_Piece]:
        import shapely
        from google.protobuf.message import DecodeError

        try:
            decoded = decode_tile(data, tile)
        except LayerError as error:
            raise SourceError(
                f"{self.path}: tile {tile.z}/{tile.x}/{tile.y} has {error}; pass OSM QA tiles (one layer 'osm' "
                "with OSM tags)"
            ) from None
        except (DecodeError, ValueError, IndexError) as error:
            raise SourceError(
                f"{self.path}: tile {tile.z}/{tile.x}/{tile.y} is not a Mapbox Vector Tile ({error}); "
                "pass OSM QA tiles (gzipped vector tiles)"
            ) from None
        geometries, properties = decoded
        if not len(geometries):
            return []
        kinds = _kinds(geometries)
        # Clip lines to the tile's own square: buffers overlap the neighbours', and each piece
        # must be drawn once for the ends to be joined (see _join_lines).
        tile_box = shapely.box(*mercantile.xy_bounds(tile))
        lines = (kinds == "line") & ~shapely.contains(tile_box, geometries)
        geometries[lines] = shapely.intersection(geometries[lines], tile_box)
        polygons = kinds == "polygon"
        invalid = polygons & ~shapely.is_valid(geometries)
        for index in invalid.nonzero()[0]:
            geometries[index] = _polygonal(shapely.make_valid(geometries[index]))
        pieces = []
        for number, (geometry, kind, props) in enumerate(zip(geometries, kinds, properties)):
            if geometry is None or geometry.is_empty:
                continue
            object_id = props.get("@id")
            key = (props.get("@type", ""), object_id) if object_id is not None else ("", tile, number)
            pieces.append(_Piece(key, _tags(props), str(kind), geometry, tile))
        return pieces

    # ---- features ---------------------------------------------------------------------
    def features(self, bounds: mercantile.Bbox, margin: float = 0.0) -> list[Feature]:
        """The features inside EPSG:3857 bounds, merged across source tiles and clipped to them.

        Args:
            bounds: (left, bottom, right, top) in metres.
            margin: grow bounds by this fraction of its size first (callers that render
                usually grow bounds themselves by a few pixels' strokes).
        """
        import shapely

        query = tiles.grow(bounds, margin)
        query_box = shapely.box(*query)
        groups: dict[tuple, list[_Piece]] = collections.defaultdict(list)
        for tile in tiles.tiles_touching(query, self.zoom):
            pieces, tree = self._index(tile)
            if not pieces:
                continue
            for index in tree.query(query_box, predicate="intersects"):
                piece = pieces[index]
                groups[piece.key].append(piece)
        features = []
        for pieces in groups.values():
            geometry = self._merge(pieces)
            if geometry is None:
                continue
            if not query_box.contains(geometry):
                geometry = _clip(geometry, query_box)
            if geometry.is_empty:
                continue
            features.append(Feature(geometry, pieces[0].tags))
        return features

    def _tolerance(self) -> float:
        # Two units of a 4096-extent tile: cut points of one edge computed in two tiles land
        # within one quantisation step of each other.
        return 2 * tiles.tile_metres(self.zoom) / 4096

    def _merge(self, pieces: list[_Piece]):
        """One geometry for one OSM object from its pieces in the queried tiles."""
        import shapely

        kinds = {p.kind for p in pieces}
        if kinds == {"point"} or "whole" in kinds:
            return pieces[0].geometry  # points repeat in buffers; reassembled areas are whole
        if "polygon" in kinds:
            polygons = [p.geometry for p in pieces if p.kind == "polygon"]
            # Pieces overlap in the tiles' buffers, or meet on the shared tile edge (both
            # sides compute it from the same mercantile bounds), so a union leaves no seam.
            return polygons[0] if len(polygons) == 1 else shapely.unary_union(polygons)
        lines = [part for p in pieces if p.kind == "line" for part in getattr(p.geometry, "geoms", [p.geometry])]
        joined = _join_lines(lines, self._tolerance())
        return _single(joined) if joined else None

    def _area(self, key: tuple, start: mercantile.Tile):
        """An area stored as LineString pieces (2015 generation), reassembled from every tile.

        Visits the neighbours across each border where a piece ends, until every end is
        matched or the file has no more tiles there. Rings that stay open because the object
        leaves the file are closed with a straight edge; a way whose ends lie inside the file
        (not closed in OSM) stays a line.
        """
        if key in self._areas:
            self._areas.move_to_end(key)
            return self._areas[key]
        tolerance = self._tolerance()
        visited: set[mercantile.Tile] = set()
        queue = [start]
        lines: list = []
        while queue and len(visited) < self.max_area_tiles:
            tile = queue.pop()
            if tile in visited:
                continue
            visited.add(tile)
            left, bottom, right, top = mercantile.xy_bounds(tile)
            for piece in self._raw(tile).get(key, ()):
                for line in getattr(piece.geometry, "geoms", [piece.geometry]):
                    lines.append(line)
                    if line.is_closed:
                        continue
                    for x, y in (line.coords[0], line.coords[-1]):
                        # An end on the tile's edge continues in the neighbour across it.
                        dx = -1 if abs(x - left) <= tolerance else 1 if abs(x - right) <= tolerance else 0
                        dy = -1 if abs(y - top) <= tolerance else 1 if abs(y - bottom) <= tolerance else 0
                        for nx, ny in {(dx, 0), (0, dy), (dx, dy)} - {(0, 0)}:
                            neighbour = mercantile.Tile(tile.x + nx, tile.y + ny, tile.z)
                            if neighbour not in visited and 0 <= neighbour.y < (1 << tile.z):
                                queue.append(neighbour)
        joined = _join_lines(lines, tolerance)
        polygons, open_lines = [], []
        for line in joined:
            ends = (line.coords[0], line.coords[-1])
            if not line.is_closed and not all(tiles.on_tile_edge(x, y, self.zoom, tolerance) for x, y in ends):
                open_lines.append(line)  # it ends inside a tile: not a closed way in OSM
            else:
                found, left_open = _polygons_from_rings([line], close_open=True)
                polygons.extend(found)
                open_lines.extend(left_open)
        geometry = _single(polygons) if polygons else (_single(open_lines) if open_lines else None)
        self._areas[key] = geometry
        while len(self._areas) > 4096:
            self._areas.popitem(last=False)
        return geometry


def _kinds(geometries):
    """ "point", "line" or "polygon" for each geometry of an array."""
    import numpy as np
    import shapely

    types = shapely.get_type_id(geometries)
    # shapely type ids: 0 Point, 1 LineString, 3 Polygon, 4 MultiPoint, 5 MultiLineString, 6 MultiPolygon
    return np.select([np.isin(types, (0, 4)), np.isin(types, (3, 6))], ["point", "polygon"], "line")


class LayerError(ValueError):
    """A vector tile without the layer asked for (e.g. OpenMapTiles instead of OSM QA tiles)."""


def _zigzag(values):
    # MVT spec 4.3.2: parameters are zigzag-encoded signed deltas.
    return (values >> 1).astype("int64") ^ -(values & 1).astype("int64")


def decode_tile(data: bytes, tile: mercantile.Tile, layer_name: str = LAYER):
    """Decode one Mapbox Vector Tile's layer into shapely geometries in EPSG:3857 metres.

    The protobuf is parsed by mapbox_vector_tile's generated message class (upb, in C);
    the geometry command streams (MVT spec 2.1, section 4.3) are decoded here with numpy and
    the geometries built in bulk, several times faster than decoding feature by feature.

    Args:
        data: the uncompressed tile.
        tile: where the tile lies (its coordinates are relative to it, y pointing down).
        layer_name: the layer to read (falls back to the tile's first layer).

    Returns:
        (numpy object array of geometries, list of property dicts), in the layer's order.
        Features without a usable geometry are left out.
    """
    import numpy as np
    import shapely
    from mapbox_vector_tile.Mapbox import vector_tile_pb2

    message = vector_tile_pb2.tile()
    message.ParseFromString(data)
    layers = {layer.name: layer for layer in message.layers}
    if not layers:
        return np.array([], dtype=object), []
    if layer_name not in layers and len(layers) > 1:
        raise LayerError(f"no layer {layer_name!r} (it has {', '.join(sorted(layers))})")
    layer = layers.get(layer_name) or message.layers[0]  # a QA-style file with its one layer named otherwise
    keys = list(layer.keys)
    values = []
    for value in layer.values:
        fields = value.ListFields()
        values.append(fields[0][1] if fields else None)
    extent = layer.extent or 4096
    left, bottom, right, top = mercantile.xy_bounds(tile)
    scale_x, scale_y = (right - left) / extent, (top - bottom) / extent

    # First pass, in Python over command headers only: where each part's parameters lie.
    params: list[int] = []  # every feature's parameters, concatenated
    feature_rows = []  # (geometry type, [(start pair, end pair, closed)], properties)
    for feature in layer.features:
        geometry = feature.geometry
        commands, parts, i, n = feature.type, [], 0, len(geometry)
        start = len(params) // 2
        part_start = None
        while i < n:
            header = geometry[i]
            command, count = header & 7, header >> 3
            i += 1
            if command == 1 or command == 2:  # MoveTo, LineTo
                if command == 1:
                    if part_start is not None:
                        parts.append([part_start, len(params) // 2, False])
                    part_start = len(params) // 2
                params.extend(geometry[i : i + 2 * count])
                i += 2 * count
            elif command == 7 and part_start is not None:  # ClosePath
                parts.append([part_start, len(params) // 2, True])
                part_start = None
            else:
                raise ValueError(f"unknown geometry command {command}")
        if part_start is not None:
            parts.append([part_start, len(params) // 2, False])
        tags = feature.tags
        properties = {keys[k]: values[v] for k, v in zip(tags[::2], tags[1::2])}
        feature_rows.append((commands, start, parts, properties))
    if len(params) % 2:
        raise ValueError("odd number of coordinate parameters")

    # Second pass, vectorised: deltas -> absolute tile coordinates -> metres. The cursor
    # carries over between the parts of one feature and restarts at 0 for each feature.
    deltas = _zigzag(np.asarray(params, dtype=np.uint32)).reshape(-1, 2)
    absolute = np.cumsum(deltas, axis=0)
    feature_starts = np.array([row[1] for row in feature_rows], dtype=np.int64)
    counts = np.diff(np.append(feature_starts, len(deltas)))
    before = np.zeros((len(feature_rows), 2), dtype=np.int64)
    nonzero = feature_starts > 0
    before[nonzero] = absolute[feature_starts[nonzero] - 1]
    absolute = absolute - np.repeat(before, counts, axis=0)
    metres = np.empty(absolute.shape, dtype=np.float64)
    metres[:, 0] = left + absolute[:, 0] * scale_x
    metres[:, 1] = top - absolute[:, 1] * scale_y

    points_index, lines_index, polygons_index = [], [], []
    point_offsets, line_parts, line_offsets = [0], [0], [0]
    ring_parts, ring_offsets, polygon_offsets = [0], [0], [0]
    point_rows, line_rows, polygon_rows = [], [], []
    # Signed ring areas (shoelace formula in tile coordinates, y down), all rings at once:
    # MVT spec 4.3.4.4: exterior rings have a positive area, interior rings a negative one.
    rings = [
        (start, end) for kind, _, parts, _ in feature_rows if kind == 3 for start, end, _ in parts if end - start >= 3
    ]
    if rings:
        starts, ends = np.array(rings, dtype=np.int64).T
        lengths = ends - starts
        ring_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        index = np.repeat(starts - ring_starts, lengths) + np.arange(lengths.sum())
        following = index + 1
        following[ring_starts + lengths - 1] = starts  # each ring's last vertex wraps to its first
        x, y = absolute[:, 0].astype(np.float64), absolute[:, 1].astype(np.float64)
        terms = x[index] * y[following] - x[following] * y[index]
        areas = iter(np.add.reduceat(terms, ring_starts).tolist())
    for row_number, (kind, _, parts, _) in enumerate(feature_rows):
        if kind == 1:  # POINT
            for start, end, _ in parts:
                points_index.extend(range(start, end))
            if len(points_index) > point_offsets[-1]:
                point_offsets.append(len(points_index))
                point_rows.append(row_number)
        elif kind == 2:  # LINESTRING
            count = 0
            for start, end, _ in parts:
                if end - start >= 2:
                    lines_index.extend(range(start, end))
                    line_parts.append(len(lines_index))
                    count += 1
            if count:
                line_offsets.append(len(line_parts) - 1)
                line_rows.append(row_number)
        elif kind == 3:  # POLYGON: rings, each exterior one (positive area) starts a polygon
            polygons = 0
            for start, end, _ in parts:
                if end - start < 3:
                    continue
                area = next(areas)
                if area == 0:
                    continue
                if area > 0 or polygons == 0:
                    if polygons:
                        polygon_offsets.append(len(ring_parts) - 1)
                    polygons += 1
                polygons_index.extend(range(start, end))
                polygons_index.append(start)  # close the ring
                ring_parts.append(len(polygons_index))
            if polygons:
                polygon_offsets.append(len(ring_parts) - 1)
                ring_offsets.append(len(polygon_offsets) - 1)
                polygon_rows.append(row_number)

    geometries = np.empty(len(feature_rows), dtype=object)
    keep = np.zeros(len(feature_rows), dtype=bool)
    GeometryType = shapely.GeometryType
    for rows, index, offsets, geometry_type in (
        (point_rows, points_index, (np.array(point_offsets),), GeometryType.MULTIPOINT),
        (line_rows, lines_index, (np.array(line_parts), np.array(line_offsets)), GeometryType.MULTILINESTRING),
        (
            polygon_rows,
            polygons_index,
            (np.array(ring_parts), np.array(polygon_offsets), np.array(ring_offsets)),
            GeometryType.MULTIPOLYGON,
        ),
    ):
        if not rows:
            continue
        built = shapely.from_ragged_array(geometry_type, metres[np.asarray(index, dtype=np.int64)], offsets)
        single = shapely.get_num_geometries(built) == 1
        built[single] = shapely.get_geometry(built[single], 0)
        geometries[rows] = built
        keep[rows] = True
    return geometries[keep], [row[3] for row, kept in zip(feature_rows, keep) if kept]


def _gunzip(data: bytes) -> bytes:
    """Tile bytes as stored: QA tiles gzip them, some MBTiles use zlib or nothing."""
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            return b""
    if data[:1] == b"\x78":
        try:
            return zlib.decompress(data)
        except zlib.error:
            return data
    return data


# --------------------------------------------------------------------------------------
# Local files: .osm / .osm.pbf (pyosmium) and GeoJSON.


def to_mercator(geometry):
    """A shapely geometry in WGS84 degrees -> EPSG:3857 metres (latitudes clamped to ±85.0511)."""
    import numpy as np
    import shapely

    def project(lonlat):
        return np.column_stack(tiles.lnglat_to_xy(lonlat[:, 0], lonlat[:, 1]))

    return shapely.transform(geometry, project)


class FileSource(OsmSource):
    """OSM features from a local file, indexed in memory.

    Args:
        path: a ``.osm``, ``.osm.pbf`` or ``.osm.bz2`` extract (read with pyosmium, which
            assembles multipolygon relations), or a ``.geojson``/``.json`` FeatureCollection
            whose properties are OSM tags.
        name: the name written in tile lists (default: the file name up to its first dot).
        zoom: the zoom of the source tiles source_tiles lists (default 12, like QA tiles).
        keys: keep only objects with at least one of these tag keys (saves memory on large
            extracts); None keeps every tagged object.
        classes: a Classes (or the path of a classes file) whose filters' keys to keep, as
            `keys` (see filter_keys).
    """

    def __init__(self, path, name: str | None = None, zoom: int = QA_ZOOM, keys=None, classes=None):
        import shapely

        if classes is not None:
            from osmseg.classes import load_classes

            classes = load_classes(classes) if isinstance(classes, (str, Path)) else classes
            keys = sorted(set(keys or ()) | set(filter_keys(classes)))
        self.keys = None if keys is None else frozenset(keys)
        self.path = Path(path)
        self.name = name or self.path.name.split(".")[0]
        self.zoom = zoom
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such OSM file; pass an existing .osm, .osm.pbf or .geojson file")
        suffixes = [s.lower() for s in self.path.suffixes]
        if suffixes and suffixes[-1] in (".geojson", ".json"):
            features = _read_geojson(self.path)
            if self.keys is not None:
                features = [f for f in features if not self.keys.isdisjoint(f.tags)]
        elif ".osm" in suffixes or ".pbf" in suffixes or ".o5m" in suffixes:
            features = _read_osm(self.path, self.keys)
        else:
            raise SourceError(
                f"{self.path}: unknown OSM file type; pass a .osm, .osm.pbf (OSM extract) or .geojson "
                "(features with OSM tags) file"
            )
        self._features = features
        self._tree = shapely.STRtree([f.geometry for f in features])

    def __len__(self) -> int:
        return len(self._features)

    def source_tiles(self, bbox: mercantile.LngLatBbox) -> list[mercantile.Tile]:
        import shapely

        x0, y0, x1, y1 = tiles.tile_range(bbox, self.zoom)
        candidates = [mercantile.Tile(x, y, self.zoom) for x in range(x0, x1 + 1) for y in range(y0, y1 + 1)]
        if not candidates or not self._features:
            return []
        area = shapely.box(*to_mercator(shapely.box(*bbox)).bounds)
        boxes = [shapely.box(*mercantile.xy_bounds(t)).intersection(area) for t in candidates]
        hits = self._tree.query(boxes, predicate="intersects")
        return sorted({candidates[i] for i in hits[0].tolist()})

    def features(self, bounds: mercantile.Bbox, margin: float = 0.0) -> list[Feature]:
        import shapely

        query = tiles.grow(bounds, margin)
        query_box = shapely.box(*query)
        found = []
        for index in sorted(self._tree.query(query_box, predicate="intersects").tolist()):
            feature = self._features[index]
            geometry = feature.geometry
            if not query_box.contains(geometry):
                geometry = _clip(geometry, query_box)
                if geometry.is_empty:
                    continue
            found.append(Feature(geometry, feature.tags))
        return found


def _merge_by_id(items: list[tuple[object, dict]]) -> list[Feature]:
    """Features from (geometry in metres, tags), with pieces of one OSM object merged.

    label-maker style GeoJSON repeats an object once per tile it was cut from; areas come
    back filled when their tags say so (see is_area).
    """
    import shapely
    from shapely.geometry import LineString

    groups: dict = collections.defaultdict(list)
    for number, (geometry, tags) in enumerate(items):
        key = (tags.get("@type", ""), tags["@id"]) if "@id" in tags else ("", number)
        groups[key].append((geometry, tags))
    features = []
    for members in groups.values():
        tags = members[0][1]
        geometries = [g for g, _ in members if g is not None and not g.is_empty]
        if not geometries:
            continue
        polygons = [_polygonal(shapely.make_valid(g)) for g in geometries if g.geom_type.endswith("Polygon")]
        lines = [part for g in geometries if g.geom_type.endswith("LineString") for part in getattr(g, "geoms", [g])]
        points = [g for g in geometries if g.geom_type.endswith("Point")]
        if polygons and any(p is not None for p in polygons):
            geometry = shapely.unary_union([p for p in polygons if p is not None])
        elif lines:
            joined = _join_lines(lines, 1e-6) if len(lines) > 1 else [LineString(lines[0])]
            areas, open_lines = _polygons_from_rings(joined, close_open=False) if is_area(tags) else ([], joined)
            geometry = _single(areas) if areas and not open_lines else _single(joined)
        elif points:
            geometry = points[0]
        else:
            continue
        features.append(Feature(geometry, tags))
    return features


def _read_geojson(path: Path) -> list[Feature]:
    from shapely.geometry import shape

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{path}: cannot read the GeoJSON file ({error}); pass a valid FeatureCollection") from None
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
        raise SourceError(f"{path}: not a GeoJSON FeatureCollection; pass one whose properties are OSM tags")
    items = []
    for number, feature in enumerate(data.get("features") or []):
        try:
            geometry = shape(feature["geometry"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise SourceError(f"{path}: feature {number} has no valid geometry ({error}); fix or remove it") from None
        items.append((to_mercator(geometry), _tags(feature.get("properties") or {})))
    return _merge_by_id(items)


def _read_osm(path: Path, keys: frozenset | None = None) -> list[Feature]:
    """Tagged nodes, ways and (multipolygon) areas of an OSM extract, with pyosmium.

    Only objects with one of `keys` are kept when keys is given.
    """
    import osmium
    import shapely
    from tqdm import tqdm

    factory = osmium.geom.WKBFactory()
    items: list[tuple[object, dict]] = []
    area_ways: set[int] = set()
    try:
        processor = osmium.FileProcessor(str(path)).with_locations().with_areas()
        progress = tqdm(desc=f"reading {path.name}", unit=" objects", file=sys.stderr, mininterval=1.0, disable=None)
        for obj in processor:
            progress.update()
            if not obj.tags:
                continue
            tags = {tag.k: tag.v for tag in obj.tags}
            if keys is not None and keys.isdisjoint(tags):
                continue
            try:
                if obj.is_node():
                    wkb = factory.create_point(obj)
                    kind = "node"
                elif obj.is_way():
                    closed = obj.is_closed() and len(obj.nodes) >= 4
                    if closed and is_area(tags):
                        continue  # the area handler hands it back as an area below
                    wkb = factory.create_linestring(obj)
                    kind = "way"
                elif obj.is_area():
                    if obj.from_way() and not is_area(tags):
                        continue  # a closed line (roundabout, fence): kept as a line above
                    # Relations: osmium builds areas from type=multipolygon and type=boundary
                    # only, and drops the `type` tag from the area's tags.
                    wkb = factory.create_multipolygon(obj)
                    kind = "way" if obj.from_way() else "relation"
                    if obj.from_way():
                        area_ways.add(obj.orig_id())
                else:
                    continue
            except (RuntimeError, osmium.InvalidLocationError):
                continue  # an object whose nodes lie outside the extract: nothing to draw
            object_id = obj.orig_id() if obj.is_area() else obj.id
            tags["@id"], tags["@type"] = str(object_id), kind
            geometry = shapely.from_wkb(wkb)
            if kind != "node" and geometry.geom_type.endswith("Polygon"):
                geometry = _polygonal(shapely.make_valid(geometry)) if not geometry.is_valid else geometry
                if geometry is None:
                    continue
                if geometry.geom_type == "MultiPolygon" and len(geometry.geoms) == 1:
                    geometry = geometry.geoms[0]
            items.append((to_mercator(geometry), tags))
        progress.close()
    except (RuntimeError, OSError, ValueError) as error:
        raise SourceError(
            f"{path}: cannot read the OSM file ({error}); pass a valid .osm or .osm.pbf extract"
        ) from None
    return [Feature(g, t) for g, t in items]


# --------------------------------------------------------------------------------------
# Overpass API.

_KEY = re.compile(r"\[([^\[\]]+)\]")


def filter_keys(classes) -> list[str]:
    """The OSM tag keys a classes file's mapnik filters mention ([key] names), sorted.

    A plain scan of the filters' attribute names, not a parser: mapnik evaluates the filters
    when rendering; this only chooses what to download.
    """
    keys = set()
    for entry in classes.classes:
        for key in _KEY.findall(entry.filter or ""):
            key = key.strip()
            if key and not key.startswith(("mapnik::", "@")):
                keys.add(key)
    return sorted(keys)


def overpass_query(bbox: mercantile.LngLatBbox, keys: list[str], timeout: int = 180) -> str:
    """One Overpass QL query for every node, way and relation with any of these keys in bbox.

    `(._;>;);` adds the ways' nodes and the relations' members so that geometries can be
    built from the answer; `out body` answers in OSM XML (a .osm file).
    """
    west, south, east, north = bbox
    selectors = "".join(f'  nwr["{key}"];\n' for key in keys)
    return (
        f"[out:xml][timeout:{int(timeout)}][bbox:{south},{west},{north},{east}];\n"
        f"(\n{selectors});\n(._;>;);\nout body;\n"
    )


def overpass_source(
    location, *, bbox=None, classes=None, endpoint: str = OVERPASS_URL, timeout: int = 180, name: str | None = None
) -> FileSource:
    """Query Overpass once for the classes' keys in bbox, save the answer, and read it.

    Where the answer goes: if location ends in ``.osm``, that file (e.g.
    data/osm/overpass.osm, with the query beside it in ``<file>.query``); otherwise the
    folder location, as ``overpass-<hash of the query>.osm``. A saved answer to the same
    query is read instead of asking again, and later stages (labels, filter) may open the
    ``.osm`` location without bbox and classes to read what all-tiles saved.

    Args:
        location: a ``.osm`` file, or a folder (data/osm).
        bbox: the area, a mercantile.LngLatBbox or its "west,south,east,north" text.
        classes: the classes (a Classes, or the path of a classes file) whose keys to ask for.
        endpoint: the Overpass API interpreter URL.
        timeout: seconds the server may spend (sent in the query) and we wait beyond that.
        name: the name written in tile lists (default "overpass").

    Raises:
        SourceError: 429 (rate limited) and 504 (busy or box too large) with what to do,
            other HTTP errors, network errors and answers that report a runtime error.
    """
    from osmseg.classes import load_classes

    location = Path(location)
    name = name or "overpass"
    if bbox is None or classes is None:
        if location.suffix == ".osm" and location.is_file():
            return FileSource(location, name=name)
        raise SourceError(
            f"{location}: no saved Overpass answer; run `prepare.py all-tiles --osm-source overpass` "
            "(make data/all_tiles.txt) first, or pass the bounding box and the classes file"
        )
    bbox = tiles.parse_bbox(bbox) if isinstance(bbox, str) else mercantile.LngLatBbox(*bbox)
    classes = load_classes(classes) if isinstance(classes, (str, Path)) else classes
    keys = filter_keys(classes)
    if not keys:
        raise SourceError("the classes file's filters name no OSM keys ([key]); nothing to ask Overpass for")
    query = overpass_query(bbox, keys, timeout)
    if location.suffix == ".osm":
        path, saved_query = location, location.with_name(location.name + ".query")
        if path.is_file() and saved_query.is_file() and saved_query.read_text() == query:
            return FileSource(path, name=name, keys=keys)
        if path.exists():
            print(f"{path}: saved for another box or classes; asking Overpass again", file=sys.stderr)
        _fetch_overpass(endpoint, query, path, timeout)

        atomic.write_text_atomic(saved_query, query)
    else:
        path = location / f"overpass-{hashlib.sha1(query.encode()).hexdigest()[:12]}.osm"
        if not path.exists():
            _fetch_overpass(endpoint, query, path, timeout)
    return FileSource(path, name=name, keys=keys)


def _fetch_overpass(endpoint: str, query: str, path: Path, timeout: int) -> None:
    """POST one query and save the OSM XML answer at path (atomically), or raise SourceError."""
    import requests


    print(f"asking the Overpass API at {endpoint} (up to {timeout} s)", file=sys.stderr)
    try:
        response = requests.post(
            endpoint, data={"data": query}, headers={"User-Agent": USER_AGENT}, timeout=(30, timeout + 30), stream=True
        )
    except requests.RequestException as error:
        raise SourceError(
            f"Overpass API at {endpoint}: cannot connect ({error}); check the endpoint or retry later"
        ) from None
    with response:
        if response.status_code == 429:
            raise SourceError(
                f"Overpass API at {endpoint}: too many requests (HTTP 429); wait a few minutes and retry, "
                "or use a smaller bounding box"
            )
        if response.status_code == 504:
            raise SourceError(
                f"Overpass API at {endpoint}: the server timed out (HTTP 504, busy or the box is too big); "
                "retry later, use a smaller bounding box, or download an extract and use --osm-source file"
            )
        if response.status_code != 200:
            raise SourceError(
                f"Overpass API at {endpoint}: HTTP {response.status_code} {response.reason}; check the endpoint "
                "and the bounding box"
            )
        with atomic.atomic_path(path) as tmp:
            try:
                with open(tmp, "wb") as out:
                    out.writelines(response.iter_content(1 << 16))
            except requests.RequestException as error:
                raise SourceError(f"Overpass API at {endpoint}: the answer broke off ({error}); retry") from None
            with open(tmp, "rb") as handle:
                head = handle.read(4096).decode("utf-8", "replace")
            if "<osm" not in head:
                raise SourceError(f"Overpass API at {endpoint}: the answer is not OSM XML; check the endpoint")
            # Overpass reports a query that ran out of time or memory inside a 200 answer.
            remark = re.search(r"<remark>(.*?)</remark>", head + _tail(tmp), re.DOTALL)
            if remark and "error" in remark.group(1).lower():
                raise SourceError(
                    f"Overpass API at {endpoint}: {remark.group(1).strip()}; retry later or use a smaller bounding box"
                )


def _tail(path: Path, size: int = 4096) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        handle.seek(max(0, handle.tell() - size))
        return handle.read().decode("utf-8", "replace")


# --------------------------------------------------------------------------------------
# prepare.py download-osm


def qa_tiles_url(name: str, base_url: str = QA_TILES_URL) -> str:
    """Where OSM QA tiles for a country (or "planet") live under base_url."""
    if name == "planet":
        if base_url.rstrip("/").endswith("latest.country"):
            return base_url.rstrip("/")[: -len("latest.country")] + "latest.planet.mbtiles.gz"
        return base_url + "latest.planet.mbtiles.gz"
    return base_url + f"{name}.mbtiles.gz"


def download_qa_tiles(name: str, out_dir, base_url: str = QA_TILES_URL, timeout: float = 60) -> Path:
    """Download and gunzip OSM QA tiles to out_dir/<name>.mbtiles, unless that file exists.

    The compressed bytes are kept in ``<name>.mbtiles.gz.partial``, with a record of the
    response they came from beside it (``.gz.partial.json``), so that a download that breaks
    off resumes where it stopped when called again. The whole ``.gz`` is then gunzipped into
    ``<name>.mbtiles.partial``, which is renamed once it opens as vector MBTiles, and the
    ``.gz`` is deleted. The disk needs room for both the ``.gz`` and the ``.mbtiles``.

    Raises:
        SourceError: an unknown name (HTTP 404), other HTTP or network errors (the partial
            download is kept), a broken gzip or a file that is not QA tiles (it is deleted).
    """
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise SourceError(
            f"QA tiles name {name!r}: names are country names in lower case with underscores "
            f"(e.g. united_kingdom) or 'planet'; see {QA_TILES_LIST}"
        )
    path = Path(out_dir) / f"{name}.mbtiles"
    compressed = path.with_name(path.name + ".gz.partial")
    record = compressed.with_name(compressed.name + ".json")
    if path.exists():
        print(f"{path}: already here, using it as it is (delete it to download again)", file=sys.stderr)
        # A run stopped between the rename and the clean-up leaves the download behind.
        for leftover in (compressed, record):
            leftover.unlink(missing_ok=True)
        return path
    url = qa_tiles_url(name, base_url)
    path.parent.mkdir(parents=True, exist_ok=True)
    _download_resumably(url, compressed, record, name, timeout)
    _gunzip_qa_tiles(url, compressed, record, path)
    compressed.unlink()
    record.unlink()
    print(f"{path}: downloaded from {url}", file=sys.stderr)
    return path


def _download_resumably(url: str, partial: Path, record: Path, name: str, timeout: float) -> None:
    """Download url's bytes, as served, into partial, carrying on from the bytes already there.

    record (JSON: url, etag, last_modified, size) describes the response that the kept bytes
    came from. A resumed request sends ``Range`` with ``If-Range`` (RFC 9110, 13.1.5), so that
    a server whose file changed sends the whole new file instead of the rest of the old one.

    Raises:
        SourceError: HTTP errors, or the download broke off (partial and record are kept).
    """
    import requests
    import urllib3
    from tqdm import tqdm


    kept, previous = _kept_download(url, partial, record)
    # identity: ranges then count the bytes as stored, not those of a compression made on the fly.
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if kept:
        headers.update({"Range": f"bytes={kept}-", "If-Range": _if_range(previous)})
    resume = f"; {partial} is kept: run the command again to resume"
    try:
        response = requests.get(url, stream=True, timeout=timeout, headers=headers)
    except requests.RequestException as error:
        hint = resume if kept else ""
        raise SourceError(f"{url}: cannot connect ({error}); check --base-url and the network{hint}") from None
    with response:
        status = response.status_code
        if status == 404:
            raise SourceError(
                f"{url}: no QA tiles named {name!r} (HTTP 404); names are country names in lower case with "
                f"underscores (e.g. united_kingdom, new_zealand), listed at {QA_TILES_LIST}"
            )
        if status != 200 and not (kept and status in (206, 416)):
            hint = resume if kept else ""
            raise SourceError(f"{url}: HTTP {status} {response.reason}; retry later or check --base-url{hint}")
        action, size, note = _resume_plan(status, response.headers, kept, previous)
        if note:
            print(f"{partial}: {note}", file=sys.stderr)
        if action in ("fresh", "append"):
            try:
                with (
                    open(partial, "wb" if action == "fresh" else "ab") as out,
                    tqdm(
                        total=size,
                        initial=0 if action == "fresh" else kept,
                        unit="B",
                        unit_scale=True,
                        desc=f"{name}.mbtiles.gz",
                        file=sys.stderr,
                        disable=None,
                    ) as progress,
                ):
                    if action == "fresh":  # once the old bytes are gone, so that it never describes them
                        atomic.write_text_atomic(
                            record, json.dumps({"url": url, **_validators(response.headers), "size": size})
                        )
                    # The bytes as served: some hosts label .gz files Content-Encoding: gzip,
                    # which requests would otherwise undo before we gunzip.
                    for chunk in response.raw.stream(1 << 20, decode_content=False):
                        out.write(chunk)
                        progress.update(len(chunk))
            except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
                got = _size_text(partial.stat().st_size, size)
                raise SourceError(f"{url}: the download broke off at {got} ({error}){resume}") from None
    if action == "restart":
        partial.unlink()
        record.unlink(missing_ok=True)
        _download_resumably(url, partial, record, name, timeout)  # nothing kept now: a plain request
    elif size is not None and partial.stat().st_size < size:
        got = _size_text(partial.stat().st_size, size)
        raise SourceError(f"{url}: the download ended early at {got}{resume}")


def _kept_download(url: str, partial: Path, record: Path) -> tuple[int, dict]:
    """How many bytes of url a previous run left in partial, and its record; (0, {}) if none usable."""
    if not partial.exists():
        return 0, {}
    try:
        previous = json.loads(record.read_text())
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict) or previous.get("url") != url:
        why = f"{record.name} does not say it came from {url}"
    elif not _if_range(previous):
        why = "the server gave no ETag or Last-Modified to check it against"
    else:
        return partial.stat().st_size, previous
    print(f"{partial}: cannot resume ({why}); starting over", file=sys.stderr)
    return 0, {}


def _resume_plan(status: int, headers, kept: int, previous: dict) -> tuple[str, int | None, str]:
    """What to do with the answer (200, 206 or 416) to a request that had `kept` bytes already.

    Args:
        status: the HTTP status; 206 and 416 only come after a Range request (kept > 0).
        headers: the response's headers.
        kept: bytes already downloaded (0: a plain request).
        previous: the record of the response the kept bytes came from.

    Returns:
        (action, size, note): action is "fresh" (write the body from byte 0), "append" (add
        the body to the kept bytes), "done" (the kept bytes are the whole file) or "restart"
        (drop the kept bytes and ask again); size is the whole file's bytes where known; note
        is what to tell the user, or "".
    """
    if status == 200:
        size = int(headers.get("Content-Length") or 0) or None
        if not kept:
            return "fresh", size, ""
        if _changed(_validators(headers), previous):
            return "fresh", size, "the server's file changed; starting over"
        return "fresh", size, "the server sent the whole file again (it does not resume downloads); starting over"
    first, size = _content_range(headers.get("Content-Range", ""))
    size = size or previous.get("size")
    if status == 416:  # nothing past the kept bytes
        if size in (None, kept):
            return "done", kept, f"the download was already complete ({_size_text(kept)})"
        return "restart", size, f"cannot resume ({_size_text(kept)} kept of {_size_text(size)}); starting over"
    if _changed(_validators(headers), previous):  # a server that honours Range but not If-Range
        return "restart", size, "the server's file changed; starting over"
    if first != kept:
        return "restart", size, f"cannot resume (the server sent bytes from {first}, not {kept}); starting over"
    return "append", size, f"resuming at {_size_text(kept, size)}"


def _validators(headers) -> dict:
    """A response's ETag and Last-Modified, as the download record stores them."""
    return {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}


def _if_range(validators: dict) -> str | None:
    """The If-Range value: a strong ETag, else the Last-Modified date (RFC 9110, 13.1.5)."""
    etag = validators.get("etag")
    return etag if etag and not etag.startswith("W/") else validators.get("last_modified")


def _changed(validators: dict, previous: dict) -> bool:
    """Whether an ETag or Last-Modified that both sides have differs."""
    return any(validators.get(key) and previous.get(key) and validators[key] != previous[key] for key in validators)


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(first byte, whole size) from a Content-Range like "bytes 100-199/1000" or "bytes */1000"."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value)
    if match is None:
        return None, None
    first, size = match.groups()
    return (int(first) if first else None), (int(size) if size != "*" else None)


def _size_text(done: int, size: int | None = None) -> str:
    """Byte counts for people: "312 MB", or "312 MB of 1.2 GB" (decimal units)."""

    def text(count: float) -> str:
        units = ("bytes", "kB", "MB", "GB", "TB")
        scale = 0
        while count >= 999.5 and scale < len(units) - 1:
            count, scale = count / 1000, scale + 1
        return f"{count:.3g} {units[scale]}" if scale else f"{count} bytes"

    return text(done) if size is None else f"{text(done)} of {text(size)}"


def _gunzip_qa_tiles(url: str, compressed: Path, record: Path, path: Path) -> None:
    """Gunzip a downloaded .gz to path (through ``<path>.partial``) and check it opens as QA tiles.

    A .gz that is not a whole gzip file, or that holds no QA tiles, is deleted with its record:
    resuming it cannot help.

    Raises:
        SourceError: a broken gzip, or not QA tiles.
    """
    from tqdm import tqdm

    partial = path.with_name(path.name + ".partial")
    try:
        with (
            open(compressed, "rb") as raw,
            gzip.GzipFile(fileobj=raw) as unpacked,
            open(partial, "wb") as out,
            tqdm(
                total=compressed.stat().st_size,
                unit="B",
                unit_scale=True,
                desc=f"gunzip {compressed.name}",
                file=sys.stderr,
                disable=None,
            ) as progress,
        ):
            while chunk := unpacked.read(1 << 20):
                out.write(chunk)
                progress.update(raw.tell() - progress.n)
        QaTilesSource(partial, name=path.stem).close()
        partial.replace(path)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        compressed.unlink()
        record.unlink(missing_ok=True)
        if isinstance(error, EOFError):
            what = "ended early, inside its gzip stream"
        else:
            what = f"is broken or not a gzip file ({error})"
        raise SourceError(
            f"{url}: the downloaded .gz {what}; deleted it: check --base-url, or run the command again "
            "to download it afresh"
        ) from None
    except SourceError as error:
        compressed.unlink()
        record.unlink(missing_ok=True)
        raise SourceError(f"{url}: not OSM QA tiles ({error}); deleted the download; check --base-url") from None
    finally:
        partial.unlink(missing_ok=True)


