"""Tiles and bounds: boxes, zooms, Web Mercator (EPSG:3857) maths and random samples of tiles.

The one home of tile and bounds maths in osmseg, on top of mercantile, and a leaf: it imports
no other module of ours. Units are in every name or docstring: WGS84 degrees
(mercantile.LngLatBbox), EPSG:3857 metres (mercantile.Bbox, x east, y north) and pixels.

Tiles are mercantile.Tile(x, y, z) in the XYZ (slippy map) scheme: y counts from the north.

The sample is a seeded pseudo-random permutation of the index range of the candidate tiles
(the ZOOM_LEVEL tiles inside BBOX and inside the listed source tiles), so it never lists every
candidate: a country at z17 (tens of millions of tiles) samples in well under a second with
memory proportional to the number of source tiles. The stream yields distinct tiles, can be
read past COUNT (the filter step draws more when tiles fail the label ratio), and ends when
every candidate has been drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import mercantile
import numpy as np

MAX_LATITUDE = 85.0511287798066  # Web Mercator's limit: arctan(sinh(pi)) in degrees
MAX_ZOOM = 22
EARTH_RADIUS = 6378137.0  # metres: WGS84's semi-major axis, which EPSG:3857 uses as a sphere
WEB_MERCATOR_HALF = math.pi * EARTH_RADIUS  # metres from the origin to the edge of EPSG:3857 (20037508.34)
BBOX_FORMAT = "-lon,-lat,+lon,+lat (west,south,east,north in degrees), e.g. -3.3843,51.2437,-2.3923,51.848"


class TileError(ValueError):
    """A box or zoom the user gave that cannot be used; the message says what to write instead.

    Not an osmseg.errors.UserError (this module imports none of ours), but treated as one:
    osmseg.errors.USER_ERRORS holds both.
    """


class BBoxError(TileError):
    """A bounding box that is malformed, inverted, out of range or empty."""


class ZoomError(TileError):
    """A zoom level that is not a whole number in 0-22."""


# ---- bounding boxes and zooms -----------------------------------------------------------------


def parse_bbox(text: str) -> mercantile.LngLatBbox:
    """Parse "west,south,east,north" in degrees into a mercantile.LngLatBbox.

    Raises:
        BBoxError: for text that is not four numbers, an inverted box (west > east or
            south > north), one outside Web Mercator's range (|lon| > 180, |lat| > 85.0511),
            or an empty one (zero width or height).
    """
    where = f"bounding box {text!r}"
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) != 4:
        raise BBoxError(f"{where}: expected 4 comma-separated numbers, got {len(parts)}; write it as {BBOX_FORMAT}")
    try:
        west, south, east, north = (float(part) for part in parts)
    except ValueError:
        raise BBoxError(f"{where}: not all numbers; write it as {BBOX_FORMAT}") from None
    if not all(math.isfinite(v) for v in (west, south, east, north)):
        raise BBoxError(f"{where}: coordinates must be finite numbers; write it as {BBOX_FORMAT}")
    for name, value, limit in (
        ("west", west, 180),
        ("east", east, 180),
        ("south", south, MAX_LATITUDE),
        ("north", north, MAX_LATITUDE),
    ):
        if abs(value) > limit:
            raise BBoxError(
                f"{where}: {name} {value} is outside [-{limit:g}, {limit:g}] (longitude within ±180, latitude "
                f"within ±85.0511, Web Mercator's range); write it as {BBOX_FORMAT}"
            )
    if west > east or south > north:
        raise BBoxError(
            f"{where}: inverted (west {west} > east {east} or south {south} > north {north}); write it as {BBOX_FORMAT}"
        )
    if west == east or south == north:
        raise BBoxError(f"{where}: empty (zero width or height); give it an area, as {BBOX_FORMAT}")
    return mercantile.LngLatBbox(west, south, east, north)


def check_zoom(zoom, name: str = "zoom") -> int:
    """Return zoom as an int if it is a whole number in 0..22, else raise ZoomError."""
    try:
        value = int(zoom.strip()) if isinstance(zoom, str) else int(zoom)
        if isinstance(zoom, bool) or value != zoom and not isinstance(zoom, str):
            raise ValueError
    except (TypeError, ValueError):
        raise ZoomError(f"{name} {zoom!r} is not a whole number; pick a zoom level in 0-{MAX_ZOOM}") from None
    if not 0 <= value <= MAX_ZOOM:
        raise ZoomError(f"{name} {zoom!r} is outside 0-{MAX_ZOOM}; pick a zoom level in 0-{MAX_ZOOM} (17 for training)")
    return value


def tile_range(bbox: mercantile.LngLatBbox, zoom: int) -> tuple[int, int, int, int]:
    """The inclusive range (x0, y0, x1, y1) of tiles at zoom that overlap bbox.

    A tile that only touches bbox's edge is left out, as mercantile.tiles does.
    """
    eps = 1e-9  # degrees: keeps an edge lying exactly on a tile border from pulling in the next tile
    west, south, east, north = bbox
    first = mercantile.tile(west + eps, min(north, MAX_LATITUDE) - eps, zoom)
    last = mercantile.tile(max(east - eps, west + eps), max(south + eps, -MAX_LATITUDE) + eps, zoom)
    top = (1 << zoom) - 1
    return (min(max(first.x, 0), top), min(max(first.y, 0), top), min(max(last.x, 0), top), min(max(last.y, 0), top))


def source_tiles(bbox: mercantile.LngLatBbox, zoom: int) -> list[mercantile.Tile]:
    """Every tile at zoom that overlaps bbox, sorted by (x, y). For source tiles (z12), not z17."""
    x0, y0, x1, y1 = tile_range(bbox, zoom)
    if (x1 - x0 + 1) * (y1 - y0 + 1) > 10_000_000:
        raise TileError(f"{(x1 - x0 + 1) * (y1 - y0 + 1)} tiles at z{zoom} is too many to list; use a smaller zoom")
    return [mercantile.Tile(x, y, zoom) for x in range(x0, x1 + 1) for y in range(y0, y1 + 1)]


# ---- EPSG:3857 metres --------------------------------------------------------------------------


def tile_metres(zoom: int) -> float:
    """The side of a tile at `zoom` in EPSG:3857 metres (true size at the equator only)."""
    return 2 * WEB_MERCATOR_HALF / (1 << zoom)


def metres_per_pixel(zoom: int, tile_size: int = 256) -> float:
    """The size of one pixel of a `tile_size`-pixel tile at `zoom`, in EPSG:3857 metres."""
    return tile_metres(zoom) / tile_size


def lnglat_to_xy(lng: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """WGS84 degrees -> EPSG:3857 metres, for arrays; latitudes are clamped to ±MAX_LATITUDE."""
    lat = np.clip(np.asarray(lat, dtype=np.float64), -MAX_LATITUDE, MAX_LATITUDE)
    x = np.radians(np.asarray(lng, dtype=np.float64)) * EARTH_RADIUS
    y = np.log(np.tan(np.pi / 4 + np.radians(lat) / 2)) * EARTH_RADIUS
    return x, y


def xy_to_lnglat(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """EPSG:3857 metres -> WGS84 degrees, for arrays (the inverse of lnglat_to_xy)."""
    lng = np.degrees(np.asarray(x, dtype=np.float64) / EARTH_RADIUS)
    lat = np.degrees(np.arctan(np.sinh(np.asarray(y, dtype=np.float64) / EARTH_RADIUS)))
    return lng, lat


def ground_scale(y: np.ndarray | float) -> np.ndarray | float:
    """Ground metres per EPSG:3857 metre at northing `y`: cos(latitude) = sech(y / R).

    Web Mercator stretches lengths by 1 / cos(latitude) (Snyder 1987, p. 41), areas by its
    square: a pixel's ground area is (metres_per_pixel * ground_scale(y)) ** 2.
    """
    return 1.0 / np.cosh(np.asarray(y, dtype=np.float64) / EARTH_RADIUS)


def bbox_to_xy(bbox: mercantile.LngLatBbox) -> mercantile.Bbox:
    """The EPSG:3857 bounds (metres) of a WGS84 box."""
    left, bottom = mercantile.xy(bbox.west, bbox.south)
    right, top = mercantile.xy(bbox.east, bbox.north)
    return mercantile.Bbox(left, bottom, right, top)


def xy_to_bbox(bounds: mercantile.Bbox) -> mercantile.LngLatBbox:
    """The WGS84 box (degrees) of EPSG:3857 bounds, clamped to the projection's square."""
    west, south = mercantile.lnglat(max(bounds.left, -WEB_MERCATOR_HALF), max(bounds.bottom, -WEB_MERCATOR_HALF))
    east, north = mercantile.lnglat(min(bounds.right, WEB_MERCATOR_HALF), min(bounds.top, WEB_MERCATOR_HALF))
    return mercantile.LngLatBbox(west, south, east, north)


def grow(bounds: mercantile.Bbox, fraction: float) -> mercantile.Bbox:
    """EPSG:3857 bounds grown on every side by `fraction` of their width and height."""
    dx, dy = (bounds.right - bounds.left) * fraction, (bounds.top - bounds.bottom) * fraction
    return mercantile.Bbox(bounds.left - dx, bounds.bottom - dy, bounds.right + dx, bounds.top + dy)


def tiles_bounds(tiles: Sequence[mercantile.Tile], margin: float = 0.0) -> mercantile.Bbox:
    """The EPSG:3857 bounds (metres) of `tiles` together, grown by `margin` metres on every side."""
    boxes = [mercantile.xy_bounds(tile) for tile in tiles]
    return mercantile.Bbox(
        min(b.left for b in boxes) - margin,
        min(b.bottom for b in boxes) - margin,
        max(b.right for b in boxes) + margin,
        max(b.top for b in boxes) + margin,
    )


def tiles_touching(bounds: mercantile.Bbox, zoom: int) -> list[mercantile.Tile]:
    """The tiles at zoom whose area overlaps EPSG:3857 bounds (not those that only touch an edge)."""
    lnglat = xy_to_bbox(bounds)
    # Shrink by a hair so that bounds ending exactly on a tile edge do not pull in the
    # neighbour (mercantile.tiles counts edges as inside).
    eps = 1e-9
    return list(
        mercantile.tiles(lnglat.west + eps, lnglat.south + eps, lnglat.east - eps, lnglat.north - eps, zooms=[zoom])
    )


def on_tile_edge(x: float, y: float, zoom: int, tolerance: float) -> bool:
    """Whether EPSG:3857 point (x, y) lies within `tolerance` metres of an edge of the tiles at zoom."""
    size = tile_metres(zoom)
    fx, fy = (x + WEB_MERCATOR_HALF) / size, (WEB_MERCATOR_HALF - y) / size
    return min(abs(fx - round(fx)), abs(fy - round(fy))) * size <= tolerance


def pixel_transform(tiles_: Sequence[mercantile.Tile], width: int, height: int) -> tuple[float, ...]:
    """The affine transform (a, b, c, d, e, f) from pixels to EPSG:3857 metres of an image
    `width` × `height` pixels covering `tiles_` exactly (one tile, or a block of them).

    x = a * column + b * row + c and y = d * column + e * row + f, at pixel corners: GDAL's
    and rasterio's Affine order. North is up: e is negative.
    """
    left, bottom, right, top = tiles_bounds(tiles_)
    return ((right - left) / width, 0.0, left, 0.0, -(top - bottom) / height, top)


class TileBlock(NamedTuple):
    """A rectangle of tiles at one zoom: columns x0..x1 and rows y0..y1, both inclusive.

    Images of its tiles, side by side, make one mosaic of (rows * tile_size) ×
    (columns * tile_size) pixels whose pixel (0, 0) is the north-west corner of tile (x0, y0).
    """

    x0: int
    y0: int
    x1: int
    y1: int
    z: int

    @classmethod
    def of_bbox(cls, bbox: mercantile.LngLatBbox, zoom: int) -> TileBlock:
        """The tiles at zoom that overlap a WGS84 box (tile_range)."""
        return cls(*tile_range(bbox, zoom), zoom)

    @property
    def columns(self) -> int:
        return self.x1 - self.x0 + 1

    @property
    def rows(self) -> int:
        return self.y1 - self.y0 + 1

    def __len__(self) -> int:
        return self.columns * self.rows

    def row(self, index: int) -> list[mercantile.Tile]:
        """The tiles of row `index` (0: the northernmost), west to east."""
        return [mercantile.Tile(x, self.y0 + index, self.z) for x in range(self.x0, self.x1 + 1)]

    def tiles(self) -> list[mercantile.Tile]:
        """Every tile, row by row from the north, west to east in each row."""
        return [tile for index in range(self.rows) for tile in self.row(index)]

    @property
    def bounds(self) -> mercantile.Bbox:
        """EPSG:3857 bounds (metres) of the whole block."""
        west, north = mercantile.xy_bounds(mercantile.Tile(self.x0, self.y0, self.z))[0::3]
        east, south = mercantile.xy_bounds(mercantile.Tile(self.x1, self.y1, self.z))[2:0:-1]
        return mercantile.Bbox(west, south, east, north)

    def transform(self, tile_size: int = 256) -> tuple[float, ...]:
        """The mosaic's affine transform (pixel_transform), tile_size pixels a tile."""
        corners = [mercantile.Tile(self.x0, self.y0, self.z), mercantile.Tile(self.x1, self.y1, self.z)]
        return pixel_transform(corners, self.columns * tile_size, self.rows * tile_size)


def ancestor(tile: mercantile.Tile, zoom: int) -> mercantile.Tile:
    """The tile at `zoom` that holds `tile` (the tile itself when it is at or above that zoom)."""
    return mercantile.parent(tile, zoom=zoom) if tile.z > zoom else tile


# ---- the random sample ------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea & Flood 2014): a fast, well-mixed 64-bit hash."""
    values = values ^ (values >> np.uint64(30))
    values = values * np.uint64(0xBF58476D1CE4E5B9)
    values = values ^ (values >> np.uint64(27))
    values = values * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


class _Permutation:
    """A seeded pseudo-random permutation of range(size), computed on demand.

    A balanced Feistel network (Luby & Rackoff 1988) with SplitMix64 round functions is a
    bijection of [0, 2^(2h)) for the smallest h with 2^(2h) >= size (so at most 4x size).
    Feeding it the inputs 0, 1, 2, ... in order and keeping only the outputs below size
    visits every value of [0, size) exactly once, in a seeded order; numpy evaluates it a
    block of inputs at a time. Nothing is stored but the round keys.
    """

    ROUNDS = 6

    def __init__(self, size: int, seed: int):
        self.size = size
        self.half = max(1, math.ceil(math.log2(max(size, 2)) / 2))
        self.domain = 1 << (2 * self.half)
        keys = _mix64(
            np.arange(1, self.ROUNDS + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(seed & _MASK64)
        )
        self.keys = [np.uint64(k) for k in keys]

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        mask = np.uint64((1 << self.half) - 1)
        shift = np.uint64(self.half)
        left, right = inputs >> shift, inputs & mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & mask)
        return (left << shift) | right

    def blocks(self, block: int = 1 << 14) -> Iterator[np.ndarray]:
        """The permutation's values in order, a block at a time."""
        for start in range(0, self.domain, block):
            inputs = np.arange(start, min(start + block, self.domain), dtype=np.uint64)
            outputs = self(inputs)
            yield outputs[outputs < np.uint64(self.size)]


class SampleStream:
    """An iterator over the random sample (see sample_stream); `total` is how many it holds."""

    def __init__(
        self,
        bbox: mercantile.LngLatBbox,
        zoom: int,
        seed: int,
        within: Sequence[mercantile.Tile | tuple[str, mercantile.Tile]] | None = None,
    ):
        zoom = check_zoom(zoom)
        bx0, by0, bx1, by1 = tile_range(bbox, zoom)
        # Candidate tiles as rectangles in tile index space: the box itself, or the part of
        # each source tile's descendants (or ancestor) at zoom that lies inside the box.
        rectangles: list[tuple[int, int, int, int]] = []
        self._names: list[str | None] = []
        self.entries = False
        if within is None:
            rectangles.append((bx0, by0, bx1, by1))
            self._names.append(None)
        else:
            seen = set()
            for item in within:
                name, tile = item if isinstance(item[0], str) else (None, item)
                self.entries = self.entries or name is not None
                if tile.z <= zoom:
                    shift = zoom - tile.z
                    x0, y0 = tile.x << shift, tile.y << shift
                    x1, y1 = x0 + (1 << shift) - 1, y0 + (1 << shift) - 1
                else:
                    parent = mercantile.parent(tile, zoom=zoom)
                    x0 = x1 = parent.x
                    y0 = y1 = parent.y
                rect = (max(x0, bx0), max(y0, by0), min(x1, bx1), min(y1, by1))
                if rect[0] > rect[2] or rect[1] > rect[3] or rect in seen:
                    continue
                seen.add(rect)
                rectangles.append(rect)
                self._names.append(name)
        self.zoom = zoom
        self._rectangles = rectangles
        sizes = [(x1 - x0 + 1) * (y1 - y0 + 1) for x0, y0, x1, y1 in rectangles]
        self._starts = np.cumsum([0] + sizes[:-1], dtype=np.int64)
        self.total = int(sum(sizes))
        self._blocks = _Permutation(self.total, seed).blocks() if self.total else iter(())
        self._pending: list[tuple[int, mercantile.Tile]] = []

    def __iter__(self) -> SampleStream:
        return self

    def __len__(self) -> int:
        return self.total

    def _locate(self, indices: np.ndarray) -> list[tuple[int, mercantile.Tile]]:
        regions = np.searchsorted(self._starts, indices.astype(np.int64), side="right") - 1
        located = []
        for index, region in zip(indices.tolist(), regions.tolist()):
            x0, y0, x1, _ = self._rectangles[region]
            offset = index - int(self._starts[region])
            width = x1 - x0 + 1
            located.append((region, mercantile.Tile(x0 + offset % width, y0 + offset // width, self.zoom)))
        return located

    def next_entry(self) -> tuple[int, mercantile.Tile]:
        """The next (region index, tile); raises StopIteration when every candidate was drawn."""
        while not self._pending:
            block = next(self._blocks)  # StopIteration ends the stream
            self._pending = self._locate(block)[::-1]
        return self._pending.pop()

    def __next__(self):
        region, tile = self.next_entry()
        return (self._names[region], tile) if self.entries else tile

    def source_name(self, region: int) -> str | None:
        """The source name of a region (next_entry's first item); None when given bare Tiles."""
        return self._names[region]


def sample_stream(
    bbox: mercantile.LngLatBbox, zoom: int, seed: int = 0, within: Sequence[mercantile.Tile] | None = None
) -> SampleStream:
    """A reproducible random stream of distinct tiles at zoom inside bbox (and inside `within`).

    data/sample.txt holds its first COUNT tiles; the filter step reads on to replace tiles
    that fail the label ratio. The stream ends when every candidate tile has been drawn, and
    `len(stream)` says how many that is.

    Args:
        bbox: the WGS84 box the tiles must overlap.
        zoom: the tiles' zoom (0-22).
        seed: the same seed, box, zoom and source tiles always give the same stream.
        within: the source tiles the tiles must lie in: Tiles, or the (source, Tile) entries
            of data/all_tiles.txt (osmseg.datafiles.read_tile_list); None: the whole box.

    Returns:
        An iterator of Tiles, or of (source name, Tile) entries when `within` holds entries
        (the source tile's name each drawn tile lies in), in the same order either way.
    """
    return SampleStream(bbox, zoom, seed, within)


def sample_entries(
    bbox: mercantile.LngLatBbox, zoom: int, seed: int, entries: Sequence[tuple[str, mercantile.Tile]]
) -> Iterator[tuple[str, mercantile.Tile]]:
    """sample_stream over data/all_tiles.txt entries, always yielding (source name, Tile)."""
    stream = SampleStream(bbox, zoom, seed, entries)
    while True:
        try:
            region, tile = stream.next_entry()
        except StopIteration:
            return
        yield stream.source_name(region), tile


# ---- prepare.py all-tiles ---------------------------------------------------------------------


# ---- prepare.py sample ------------------------------------------------------------------------


