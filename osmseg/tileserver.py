"""The demo world's imagery: a loopback HTTP tile server that behaves like a real one.

`DemoTileServer` serves, on 127.0.0.1 and a free port, in a background thread:

* `GET /demo.json` -- a TileJSON 2.2.0 document: `tiles` ["<url>/{z}/{x}/{y}.jpg"],
  `minzoom` 15, `maxzoom` 19, `bounds` [w, s, e, n] (the demo world's, degrees), `center`.
* `GET /{z}/{x}/{y}.jpg` -- a 256×256 RGB JPEG (quality 85) of that XYZ tile (y from the
  north, as in Google/OSM tiles), drawn from *every* feature of the demo world, mapped or
  not: roofs with gable shading and shadows, crowns of trees, fields with furrows, forest,
  lawns, asphalt, water. Textures come from value noise seeded by global position in metres,
  so they are deterministic and continuous across tile borders. Zoom levels outside 15-19 or
  x, y outside the zoom's range answer 404. Tiles outside the town show bare ground, as a
  real imagery provider covers the whole planet.

Faults, for tests and benchmarks, switched on at construction or with `set_faults`:

* `latency` seconds slept before answering each tile request;
* `rate_limit_every=N`: every N-th request (counting all requests) answers 429 with a
  `Retry-After: <retry_after>` header;
* `error_every=N`: every N-th request answers `error_status` (default 503);
* `truncate_every=N`: every N-th request that would succeed sends the full Content-Length
  header, half of the body, and closes the connection;
* `token`: requests need `?access_token=<token>`: none answers 401, a wrong one 403.

`prepare.py serve-demo` runs the server until Ctrl-C.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

import mercantile
import numpy as np
import shapely

from osmseg.errors import SourceError

MIN_ZOOM = 15
MAX_ZOOM = 19
TILE_SIZE = 256
JPEG_QUALITY = 85
CACHE_TILES = 4096  # about 60 MB of JPEG bytes at most

_FAULTS = ("latency", "token", "rate_limit_every", "retry_after", "error_every", "error_status", "truncate_every")

# --------------------------------------------------------------------------- drawing

# Noise fields, by index: 0 haze (250 m), 1 patches (40 m), 2 detail (5 m), 3 crowns (3 m),
# 4 grain (one pixel), 5 furrows along x (4 m period), 6 furrows along y.
_FIELDS = 7
# Textures: name -> amplitudes of the fields above (relative brightness change).
_TEXTURES = {
    "ground": (0.06, 0.12, 0.06, 0.0, 0.05, 0.0, 0.0),
    "lawn": (0.05, 0.10, 0.10, 0.08, 0.05, 0.0, 0.0),
    "paved": (0.04, 0.05, 0.04, 0.0, 0.06, 0.0, 0.0),
    "concrete": (0.04, 0.10, 0.05, 0.0, 0.07, 0.0, 0.0),
    "rubble": (0.05, 0.15, 0.12, 0.0, 0.18, 0.0, 0.0),
    "forest": (0.04, 0.10, 0.10, 0.40, 0.06, 0.0, 0.0),
    "field_x": (0.04, 0.08, 0.04, 0.0, 0.05, 0.10, 0.0),
    "field_y": (0.04, 0.08, 0.04, 0.0, 0.05, 0.0, 0.10),
    "meadow": (0.05, 0.12, 0.08, 0.04, 0.07, 0.0, 0.0),
    "scrub": (0.05, 0.12, 0.12, 0.30, 0.06, 0.0, 0.0),
    "orchard": (0.04, 0.06, 0.05, 0.10, 0.05, 0.16, 0.16),
    "vineyard": (0.04, 0.06, 0.05, 0.0, 0.05, 0.22, 0.0),
    "allotments": (0.05, 0.25, 0.12, 0.05, 0.07, 0.0, 0.0),
    "water": (0.03, 0.05, 0.03, 0.0, 0.02, 0.0, 0.0),
    "asphalt": (0.03, 0.04, 0.03, 0.0, 0.08, 0.0, 0.0),
    "roof": (0.02, 0.0, 0.03, 0.0, 0.07, 0.0, 0.0),
    "metal": (0.02, 0.0, 0.02, 0.0, 0.04, 0.08, 0.0),
    "crown": (0.02, 0.05, 0.10, 0.35, 0.06, 0.0, 0.0),
}
_TEXTURE_IDS = {name: i for i, name in enumerate(_TEXTURES)}
_AMPLITUDES = np.array(list(_TEXTURES.values()), dtype=np.float32)

GROUND = (148, 140, 104)


class _Style(NamedTuple):
    """How one feature is drawn: `shape` is area, line, building or tree."""

    shape: str
    color: tuple[int, int, int]
    texture: int
    width: float = 0.0  # metres, lines; crown radius for trees
    height: float = 0.0  # metres, shadow casters
    gable: bool = False


def _variation(feature_id: int, salt: int, spread: float) -> float:
    """A deterministic factor in [1 - spread, 1 + spread] for one feature."""
    value = ((feature_id * 2654435761 + salt * 40503) & 0xFFFFFFFF) / 2**32
    return 1.0 + spread * (2 * value - 1)


def _tint(color, feature_id: int, spread: float = 0.08) -> tuple[int, int, int]:
    brightness = _variation(feature_id, 1, spread)
    return tuple(int(np.clip(c * brightness * _variation(feature_id, 2 + k, spread / 2), 0, 255)) for k, c in enumerate(color))


_AREA_STYLES = {
    ("landuse", "residential"): ((112, 134, 84), "lawn"),
    ("landuse", "commercial"): ((168, 164, 156), "paved"),
    ("landuse", "industrial"): ((152, 146, 134), "concrete"),
    ("landuse", "brownfield"): ((138, 114, 84), "rubble"),
    ("landuse", "forest"): ((46, 78, 42), "forest"),
    ("natural", "wood"): ((52, 80, 40), "forest"),
    ("landuse", "meadow"): ((128, 158, 80), "meadow"),
    ("natural", "grassland"): ((138, 152, 88), "meadow"),
    ("natural", "heath"): ((122, 108, 86), "scrub"),
    ("natural", "scrub"): ((88, 104, 60), "scrub"),
    ("landuse", "orchard"): ((104, 132, 70), "orchard"),
    ("landuse", "vineyard"): ((128, 126, 82), "vineyard"),
    ("landuse", "allotments"): ((116, 128, 78), "allotments"),
    ("leisure", "park"): ((98, 148, 70), "lawn"),
    ("leisure", "pitch"): ((78, 150, 62), "field_x"),
    ("amenity", "school"): ((170, 164, 148), "paved"),
    ("amenity", "parking"): ((108, 108, 110), "asphalt"),
    ("natural", "water"): ((42, 70, 88), "water"),
}
_CROPS = ((176, 162, 92), (112, 142, 62), (132, 104, 74), (150, 150, 80))
_ROOFS = ((164, 82, 62), (150, 72, 56), (96, 96, 104), (122, 92, 72))
_LINE_STYLES = {
    "primary": ((80, 80, 84), 14.0),
    "secondary": ((86, 86, 88), 11.0),
    "tertiary": ((90, 90, 92), 9.0),
    "residential": ((94, 94, 96), 7.0),
    "footway": ((184, 172, 150), 2.0),
}


def _style(feature) -> _Style | None:
    """The drawing style of a world feature, from its tags (as a renderer would)."""
    tags, fid = feature.tags, feature.id
    levels = float(tags.get("building:levels", 1))
    building = tags.get("building")
    if building in ("house", "yes", "residential", "detached"):
        return _Style("building", _tint(_ROOFS[fid % len(_ROOFS)], fid), _TEXTURE_IDS["roof"], height=3 * levels + 2, gable=True)
    if building in ("shed", "garage"):
        return _Style("building", _tint((128, 118, 108), fid), _TEXTURE_IDS["roof"], height=2.5)
    if building in ("industrial", "warehouse"):
        color = (178, 182, 186) if fid % 3 else (120, 126, 132)
        return _Style("building", _tint(color, fid, 0.05), _TEXTURE_IDS["metal"], height=4 * levels + 4)
    if building == "storage_tank":
        return _Style("building", _tint((214, 212, 206), fid, 0.03), _TEXTURE_IDS["paved"], height=10)
    if building is not None:
        color = (190, 188, 182) if fid % 2 else (150, 148, 146)
        return _Style("building", _tint(color, fid, 0.06), _TEXTURE_IDS["roof"], height=3.2 * levels)
    natural = tags.get("natural")
    if natural == "tree":
        radius = 2.5 + 2.5 * (_variation(fid, 7, 1.0) / 2)
        return _Style("tree", _tint((52, 86, 44), fid), _TEXTURE_IDS["crown"], width=radius, height=2 * radius + 3)
    if natural == "tree_row":
        return _Style("line", _tint((50, 82, 42), fid), _TEXTURE_IDS["crown"], width=7.0, height=8.0)
    highway = tags.get("highway")
    if highway in _LINE_STYLES:
        color, width = _LINE_STYLES[highway]
        return _Style("line", color, _TEXTURE_IDS["asphalt"], width=width)
    if tags.get("railway") == "rail":
        return _Style("rail", (112, 102, 92), _TEXTURE_IDS["rubble"], width=7.0)
    if tags.get("waterway"):
        return None  # the river's area is drawn; its centre line adds nothing
    if tags.get("landuse") == "farmland":
        texture = "field_x" if fid % 2 else "field_y"
        return _Style("area", _tint(_CROPS[fid % len(_CROPS)], fid), _TEXTURE_IDS[texture])
    for key, value in tags.items():
        if (key, value) in _AREA_STYLES:
            color, texture = _AREA_STYLES[(key, value)]
            return _Style("area", _tint(color, fid, 0.06), _TEXTURE_IDS[texture])
    return None


def _hash(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Integer lattice coordinates -> float32 in [-1, 1), a fixed pseudo-random function."""
    h = (ix.astype(np.int64) * 73856093) ^ (iy.astype(np.int64) * 19349663) ^ (salt * 83492791)
    h &= 0xFFFFFFFF
    h = ((h >> 16) ^ h) * 0x45D9F3B & 0xFFFFFFFF
    h = ((h >> 16) ^ h) * 0x45D9F3B & 0xFFFFFFFF
    h = (h >> 16) ^ h
    return (h.astype(np.float32) / np.float32(2**31)) - 1.0


def _value_noise(xs: np.ndarray, ys: np.ndarray, cell: float, salt: int) -> np.ndarray:
    """Smooth value noise at pixel centres (xs columns, ys rows, metres), lattice `cell` metres.

    Depends only on the global position, so neighbouring tiles join without a seam.
    """
    u, v = xs / cell, ys / cell
    iu, iv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = (u - iu).astype(np.float32), (v - iv).astype(np.float32)
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    u0, v0 = iu.min(), iv.min()
    lattice_u = np.arange(u0, iu.max() + 2)
    lattice_v = np.arange(v0, iv.max() + 2)
    grid = _hash(lattice_u[None, :], lattice_v[:, None], salt)  # (rows, cols)
    cu, cv = iu - u0, iv - v0
    across = grid[:, cu] * (1 - fu) + grid[:, cu + 1] * fu  # (lattice rows, W)
    return across[cv] * (1 - fv)[:, None] + across[cv + 1] * fv[:, None]


class _Painter:
    """Draws imagery tiles of one world; thread-safe (holds no per-tile state)."""

    def __init__(self, world):
        self.world = world
        self.seed = world.seed
        self.features = world.features
        self.styles = [_style(f) for f in world.features]
        self._coords: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def _rings(self, index: int) -> list[np.ndarray]:
        """A feature's coordinate arrays in metres (exterior and interior rings, or lines)."""
        rings = self._coords.get(index)
        if rings is None:
            geometry = self.features[index].geometry
            parts = getattr(geometry, "geoms", [geometry])
            rings = []
            for part in parts:
                if part.geom_type == "Polygon":
                    rings.append(np.asarray(part.exterior.coords))
                    rings.extend(np.asarray(r.coords) for r in part.interiors)
                elif part.geom_type == "LineString":
                    rings.append(np.asarray(part.coords))
                elif part.geom_type == "Point":
                    rings.append(np.asarray(part.coords))
            with self._lock:
                self._coords[index] = rings
        return rings

    def noise(self, tile: mercantile.Tile) -> np.ndarray:
        """The noise fields of one tile, float32 (_FIELDS, 256, 256)."""
        left, bottom, right, top = mercantile.xy_bounds(tile)
        size = (right - left) / TILE_SIZE
        centres = (np.arange(TILE_SIZE) + 0.5) * size
        xs, ys = left + centres, top - centres
        salt = self.seed * 1000
        fields = np.empty((_FIELDS, TILE_SIZE, TILE_SIZE), dtype=np.float32)
        fields[0] = _value_noise(xs, ys, 250.0, salt + 1)
        fields[1] = _value_noise(xs, ys, 40.0, salt + 2)
        fields[2] = _value_noise(xs, ys, max(5.0, size), salt + 3)
        crowns = _value_noise(xs, ys, max(3.0, size), salt + 4)
        fields[3] = np.clip(crowns * 3, -1, 1)
        fields[4] = _value_noise(xs, ys, size * 1.0001, salt + 5)
        # Furrows and rows: 4 m period, fading out where a pixel is larger than a furrow.
        fade = np.float32(min(1.0, 2.0 / size))
        fields[5] = np.sin(xs * (2 * np.pi / 4.0)).astype(np.float32)[None, :] * fade
        fields[6] = np.sin(ys * (2 * np.pi / 4.0)).astype(np.float32)[:, None] * fade
        return fields

    def draw(self, tile: mercantile.Tile) -> np.ndarray:
        """The RGB uint8 (256, 256, 3) image of one tile."""
        import cv2

        left, bottom, right, top = mercantile.xy_bounds(tile)
        scale = TILE_SIZE / (right - left)
        shift = 3  # cv2 sub-pixel bits: coordinates in 1/8 pixel
        one = 1 << shift

        def pixels(coords: np.ndarray) -> np.ndarray:
            px = np.empty((len(coords), 2), dtype=np.float64)
            px[:, 0] = (coords[:, 0] - left) * scale
            px[:, 1] = (top - coords[:, 1]) * scale
            return np.round(px * one).astype(np.int32)

        color = np.empty((TILE_SIZE, TILE_SIZE, 3), dtype=np.uint8)
        color[:] = GROUND
        texture = np.full((TILE_SIZE, TILE_SIZE), _TEXTURE_IDS["ground"], dtype=np.uint8)
        shadow = np.zeros((TILE_SIZE, TILE_SIZE), dtype=np.uint8)

        # Shadows fall to the north-west (sun in the south-east), up to ~35 m: look that far.
        margin = 40.0
        hits = self.world.tree.query(shapely.box(left - margin, bottom - margin, right + margin, top + margin))
        order = np.sort(hits)
        casters = []
        for index in order:
            style = self.styles[index]
            if style is None:
                continue
            if style.shape in ("building", "tree"):
                casters.append(index)
                continue
            rings = self._rings(index)
            if style.shape == "area":
                polygons = [pixels(r) for r in rings]
                cv2.fillPoly(color, polygons, style.color, cv2.LINE_8, shift)
                cv2.fillPoly(texture, polygons, style.texture, cv2.LINE_8, shift)
            else:
                thickness = max(1, int(round(style.width * scale)))
                lines = [pixels(r) for r in rings]
                if style.height:  # tree rows cast shadows too
                    offset = self._shadow_offset(style.height, scale, one)
                    cv2.polylines(shadow, [line + offset for line in lines], False, 1, thickness, cv2.LINE_8, shift)
                cv2.polylines(color, lines, False, style.color, thickness, cv2.LINE_8, shift)
                cv2.polylines(texture, lines, False, style.texture, thickness, cv2.LINE_8, shift)
                if style.shape == "rail":
                    # Two steel rails 1.4 m apart on the ballast.
                    rail = max(1, int(round(0.3 * scale)))
                    for side in (-0.7, 0.7):
                        for ring in rings:
                            shifted = ring + np.array([0.0, side])
                            cv2.polylines(color, [pixels(shifted)], False, (70, 66, 62), rail, cv2.LINE_8, shift)
                if style.height:
                    cv2.polylines(shadow, lines, False, 0, thickness, cv2.LINE_8, shift)

        # Buildings and trees: all shadows first, then roofs and crowns over them.
        shapes = []
        for index in casters:
            style = self.styles[index]
            rings = self._rings(index)
            offset = self._shadow_offset(style.height, scale, one)
            if style.shape == "tree":
                centre = pixels(rings[0])[0]
                radius = max(1, int(round(style.width * scale * one)))
                cv2.circle(shadow, tuple(int(c) for c in centre + offset), radius, 1, -1, cv2.LINE_8, shift)
                shapes.append((style, None, centre, radius))
            else:
                outline = pixels(rings[0])
                hull = cv2.convexHull(np.concatenate([outline, outline + offset]))
                cv2.fillPoly(shadow, [hull], 1, cv2.LINE_8, shift)
                shapes.append((style, [pixels(r) for r in rings], None, None))
        for style, polygons, centre, radius in shapes:
            if polygons is None:
                cv2.circle(color, tuple(int(c) for c in centre), radius, style.color, -1, cv2.LINE_8, shift)
                cv2.circle(texture, tuple(int(c) for c in centre), radius, style.texture, -1, cv2.LINE_8, shift)
                cv2.circle(shadow, tuple(int(c) for c in centre), radius, 0, -1, cv2.LINE_8, shift)
                continue
            cv2.fillPoly(color, polygons, style.color, cv2.LINE_8, shift)
            cv2.fillPoly(texture, polygons, style.texture, cv2.LINE_8, shift)
            cv2.fillPoly(shadow, polygons, 0, cv2.LINE_8, shift)
            if style.gable and len(polygons[0]) == 5:
                # The half of the roof facing away from the sun is darker; the ridge runs
                # along the longer side.
                c = polygons[0][:4].astype(np.int64)
                if np.hypot(*(c[1] - c[0])) < np.hypot(*(c[2] - c[1])):
                    c = np.roll(c, -1, axis=0)
                half = np.array([c[0], c[1], (c[1] + c[2]) // 2, (c[0] + c[3]) // 2], dtype=np.int32)
                dark = tuple(int(v * 0.72) for v in style.color)
                cv2.fillPoly(color, [half], dark, cv2.LINE_8, shift)

        # Texture and light: brightness = 1 + sum of amplitude × noise field.
        fields = self.noise(tile)
        amplitudes = _AMPLITUDES[texture]  # (H, W, fields)
        brightness = 1.0 + np.einsum("hwf,fhw->hw", amplitudes, fields)
        brightness *= np.where(shadow > 0, np.float32(0.55), np.float32(1.0))
        image = color.astype(np.float32) * brightness[..., None]
        # Shadows are lit by the blue sky: a little more blue, a little less red.
        image[..., 2] += np.where(shadow > 0, np.float32(8), np.float32(0))
        return np.clip(image, 0, 255).astype(np.uint8)

    @staticmethod
    def _shadow_offset(height: float, scale: float, one: int) -> np.ndarray:
        # Sun 45° up in the south-east: a shadow as long as the caster is high, to the
        # north-west (up and left in the image).
        return np.round(np.array([-0.6, -0.8]) * height * scale * one).astype(np.int32)

    def jpeg(self, tile: mercantile.Tile) -> bytes:
        import cv2

        image = self.draw(tile)
        ok, data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"cv2 could not encode tile {tile} as JPEG")
        return data.tobytes()


@functools.lru_cache(maxsize=4)
def _painter(seed: int) -> _Painter:
    from osmseg.demo import build_world

    return _Painter(build_world(seed))


def draw_tile(tile: mercantile.Tile, seed: int = 0) -> np.ndarray:
    """The demo imagery of one tile as RGB uint8 (256, 256, 3), without a server."""
    return _painter(seed).draw(tile)


# --------------------------------------------------------------------------- server


class DemoTileServer:
    """The demo world's imagery over HTTP on 127.0.0.1 (see the module docstring).

    Use as a context manager, or call start() and close(). Keyword arguments are the fault
    switches; `port=0` picks a free port.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        latency: float = 0.0,
        token: str | None = None,
        rate_limit_every: int = 0,
        retry_after: int = 1,
        error_every: int = 0,
        error_status: int = 503,
        truncate_every: int = 0,
        port: int = 0,
    ):
        self.seed = seed
        self.port = port
        self._painter = _painter(seed)
        self._faults: dict = {}
        self.set_faults(
            latency=latency,
            token=token,
            rate_limit_every=rate_limit_every,
            retry_after=retry_after,
            error_every=error_every,
            error_status=error_status,
            truncate_every=truncate_every,
        )
        self._count = 0
        self._count_lock = threading.Lock()
        self._cache: dict[tuple[int, int, int], bytes] = {}
        self._cache_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- faults and counters

    def set_faults(self, **faults) -> None:
        """Change fault switches while running (same keywords as the constructor)."""
        unknown = set(faults) - set(_FAULTS)
        if unknown:
            raise TypeError(f"unknown fault switch(es) {sorted(unknown)}; known: {list(_FAULTS)}")
        for name in ("rate_limit_every", "error_every", "truncate_every", "retry_after"):
            if name in faults and (not isinstance(faults[name], int) or faults[name] < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {faults[name]!r}")
        if "latency" in faults and not faults["latency"] >= 0:
            raise ValueError(f"latency must be >= 0 seconds, got {faults['latency']!r}")
        if "error_status" in faults and not 500 <= faults["error_status"] <= 599:
            raise ValueError(f"error_status must be a 5xx status, got {faults['error_status']!r}")
        self._faults.update(faults)

    @property
    def request_count(self) -> int:
        """How many requests the server has received (all paths, all answers)."""
        return self._count

    def _next_request(self) -> int:
        with self._count_lock:
            self._count += 1
            return self._count

    # -- addresses

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the demo tile server is not started; call start() or use `with`")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def tilejson_url(self) -> str:
        return self.url + "/demo.json"

    def tilejson(self) -> dict:
        bbox = self._painter.world.bbox
        return {
            "tilejson": "2.2.0",
            "name": "osmseg demo world",
            "description": f"synthetic imagery of the osmseg demo world, seed {self.seed}",
            "attribution": "osmseg demo world (synthetic)",
            "scheme": "xyz",
            "format": "jpg",
            "tiles": [self.url + "/{z}/{x}/{y}.jpg"],
            "minzoom": MIN_ZOOM,
            "maxzoom": MAX_ZOOM,
            "bounds": [bbox.west, bbox.south, bbox.east, bbox.north],
            "center": [(bbox.west + bbox.east) / 2, (bbox.south + bbox.north) / 2, 17],
        }

    # -- tiles

    def tile_bytes(self, tile: mercantile.Tile) -> bytes:
        """The JPEG bytes of one tile, drawn once and then cached."""
        key = (tile.z, tile.x, tile.y)
        data = self._cache.get(key)
        if data is None:
            data = self._painter.jpeg(tile)
            with self._cache_lock:
                if len(self._cache) >= CACHE_TILES:
                    self._cache.pop(next(iter(self._cache)))  # oldest first
                self._cache[key] = data
        return data

    # -- lifecycle

    def start(self) -> "DemoTileServer":
        if self._server is not None:
            return self
        owner = self

        class Handler(_Handler):
            server_owner = owner

        try:
            server = _Server(("127.0.0.1", self.port), Handler)
        except OSError as error:
            raise SourceError(
                f"cannot listen on 127.0.0.1:{self.port} ({error.strerror}); pass another port, or 0 for a free one"
            ) from None
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="demo-tile-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> "DemoTileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # benchmarks open dozens of connections at once

    def handle_error(self, request, client_address):
        # A client that hangs up mid-answer (as downloaders under test do) is not news.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so that clients can pool connections
    server_owner: DemoTileServer

    def log_message(self, format, *args):  # quiet: tests and benchmarks read stderr
        pass

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None, truncate: bool = False):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if truncate:
            # The promised length, half the bytes, then hang up: a dropped connection.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _send_json(self, status: int, document: dict, headers: dict | None = None, truncate: bool = False):
        self._send(status, json.dumps(document).encode(), "application/json", headers, truncate)

    def do_GET(self):
        owner = self.server_owner
        number = owner._next_request()
        faults = dict(owner._faults)
        parsed = urllib.parse.urlsplit(self.path)
        parts = parsed.path.strip("/").split("/")
        is_tile = len(parts) == 3 and parts[2].endswith(".jpg")
        if is_tile and faults["latency"]:
            time.sleep(faults["latency"])

        token = faults["token"]
        if token is not None:
            given = urllib.parse.parse_qs(parsed.query).get("access_token")
            if not given:
                return self._send_json(401, {"message": "Not Authorized - No Token"})
            if given[0] != token:
                return self._send_json(403, {"message": "Not Authorized - Invalid Token"})

        if faults["rate_limit_every"] and number % faults["rate_limit_every"] == 0:
            return self._send_json(
                429, {"message": "Too Many Requests"}, {"Retry-After": str(faults["retry_after"])}
            )
        if faults["error_every"] and number % faults["error_every"] == 0:
            return self._send_json(faults["error_status"], {"message": "Server Error (demo fault)"})
        truncate = bool(faults["truncate_every"]) and number % faults["truncate_every"] == 0

        if parsed.path == "/demo.json":
            return self._send_json(200, owner.tilejson(), truncate=truncate)
        if is_tile:
            try:
                z, x, y = int(parts[0]), int(parts[1]), int(parts[2][: -len(".jpg")])
            except ValueError:
                return self._send_json(404, {"message": f"Not Found: {parsed.path}"})
            if not (MIN_ZOOM <= z <= MAX_ZOOM and 0 <= x < 2**z and 0 <= y < 2**z):
                return self._send_json(404, {"message": f"Tile {z}/{x}/{y} does not exist (zoom {MIN_ZOOM}-{MAX_ZOOM})"})
            body = owner.tile_bytes(mercantile.Tile(x, y, z))
            return self._send(200, body, "image/jpeg", {"Cache-Control": "max-age=3600"}, truncate=truncate)
        return self._send_json(404, {"message": f"Not Found: {parsed.path}"})


# --------------------------------------------------------------------------- prepare.py serve-demo


def configure_serve_demo(parser) -> None:
    parser.add_argument("--port", type=int, default=8765, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--seed", type=int, default=0, help="the demo world's random seed")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds to wait before answering each tile")
    parser.add_argument("--token", default=None, help="require ?access_token=TOKEN on every request")


def _wait_forever(server: DemoTileServer) -> None:
    """Block until Ctrl-C (a separate function so that tests can stand in for the user)."""
    threading.Event().wait()


def run_serve_demo(args) -> int:
    if not 0 <= args.port <= 65535:
        raise SourceError(f"--port {args.port} is not a TCP port; pass 0-65535 (0: any free port)")
    if args.latency < 0:
        raise SourceError(f"--latency {args.latency} is negative; pass seconds >= 0")
    server = DemoTileServer(args.seed, latency=args.latency, token=args.token, port=args.port)
    with server:
        print(server.tilejson_url, flush=True)
        note = " (requests need ?access_token=<the --token value>)" if args.token else ""
        print(f"serving the demo world's imagery at {server.url}/{{z}}/{{x}}/{{y}}.jpg{note}; Ctrl-C stops",
              file=sys.stderr, flush=True)
        try:
            _wait_forever(server)
        except KeyboardInterrupt:
            print(f"stopped after {server.request_count} requests", file=sys.stderr)
    return 0
