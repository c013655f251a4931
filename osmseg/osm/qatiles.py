"""OSM QA tiles: an MBTiles file of gzipped vector tiles, read as an OSM source.

Both generations are read: the 2015 one (extent 4096, closed ways stored as LineStrings, so
areas are reassembled across tiles) and the newer one (extent 2^20, areas stored as
Polygons). Pieces of one object cut apart by tile borders come back merged.
"""

from __future__ import annotations

import collections
import sqlite3
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import mercantile

from osmseg import tiles
from osmseg.errors import SourceError
from osmseg.osm.areas import is_area
from osmseg.osm.geometry import clip, join_lines, polygonal, polygons_from_rings, single
from osmseg.osm.mvt import LayerError, decode_tile, geometry_kinds, gunzip
from osmseg.osm.source import Feature, OsmSource, osm_tags

QA_ZOOM = 12  # OSM QA tiles are cut at z12 (https://osmlab.github.io/osm-qa-tiles/)


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
        data = gunzip(data)
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
        for piece in self._decode_bytes(gunzip(row[0][0] or b""), tile) if row else []:
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
                polygon = polygon if polygon.is_valid else polygonal(shapely.make_valid(polygon))
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
        kinds = geometry_kinds(geometries)
        # Clip lines to the tile's own square: buffers overlap the neighbours', and each piece
        # must be drawn once for the ends to be joined (see _join_lines).
        tile_box = shapely.box(*mercantile.xy_bounds(tile))
        lines = (kinds == "line") & ~shapely.contains(tile_box, geometries)
        geometries[lines] = shapely.intersection(geometries[lines], tile_box)
        polygons = kinds == "polygon"
        invalid = polygons & ~shapely.is_valid(geometries)
        for index in invalid.nonzero()[0]:
            geometries[index] = polygonal(shapely.make_valid(geometries[index]))
        pieces = []
        for number, (geometry, kind, props) in enumerate(zip(geometries, kinds, properties)):
            if geometry is None or geometry.is_empty:
                continue
            object_id = props.get("@id")
            key = (props.get("@type", ""), object_id) if object_id is not None else ("", tile, number)
            pieces.append(_Piece(key, osm_tags(props), str(kind), geometry, tile))
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
                geometry = clip(geometry, query_box)
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
        joined = join_lines(lines, self._tolerance())
        return single(joined) if joined else None

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
        joined = join_lines(lines, tolerance)
        polygons, open_lines = [], []
        for line in joined:
            ends = (line.coords[0], line.coords[-1])
            if not line.is_closed and not all(tiles.on_tile_edge(x, y, self.zoom, tolerance) for x, y in ends):
                open_lines.append(line)  # it ends inside a tile: not a closed way in OSM
            else:
                found, left_open = polygons_from_rings([line], close_open=True)
                polygons.extend(found)
                open_lines.extend(left_open)
        geometry = single(polygons) if polygons else (single(open_lines) if open_lines else None)
        self._areas[key] = geometry
        while len(self._areas) > 4096:
            self._areas.popitem(last=False)
        return geometry
