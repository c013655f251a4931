"""The demo world's imagery: every feature, mapped or not, drawn into 256×256 RGB tiles.

Roofs with gable shading and shadows, crowns of trees, fields with furrows, forest, lawns,
asphalt, water. Textures are value noise indexed by global pixel position (sizes in metres,
so a crown is as wide at z19 as at z17; they repeat every 1024 pixels), under a 250 m haze
that does not repeat: deterministic, and continuous across tile borders. Tiles outside the
town show bare ground, as a real imagery provider covers the whole planet.
"""

from __future__ import annotations

import functools
import threading
from typing import NamedTuple

import mercantile
import numpy as np
import shapely

from osmseg import tiles

TILE_SIZE = 256
JPEG_QUALITY = 85


# Texture fields, by index: 0 patches (40 m), 1 detail (5 m), 2 crowns (3 m), 3 grain (one
# pixel), 4 furrows along x (4 m period), 5 furrows along y. A haze of 250 m lies over all.
_FIELDS = 6


HAZE = 0.07


# Textures: name -> amplitudes of the fields above (relative brightness change).
_TEXTURES = {
    "ground": (0.12, 0.06, 0.0, 0.05, 0.0, 0.0),
    "lawn": (0.10, 0.10, 0.08, 0.05, 0.0, 0.0),
    "paved": (0.05, 0.04, 0.0, 0.06, 0.0, 0.0),
    # Oil stains and a grid of 4 m slabs: industrial yards must not look like the paved
    # commercial blocks or bare ground, or a model learns them as one (issue 7's demo runs).
    "concrete": (0.16, 0.06, 0.0, 0.07, 0.12, 0.12),
    "rubble": (0.15, 0.12, 0.0, 0.18, 0.0, 0.0),
    "forest": (0.10, 0.10, 0.40, 0.06, 0.0, 0.0),
    "field_x": (0.08, 0.04, 0.0, 0.05, 0.10, 0.0),
    "field_y": (0.08, 0.04, 0.0, 0.05, 0.0, 0.10),
    "meadow": (0.12, 0.08, 0.04, 0.07, 0.0, 0.0),
    "scrub": (0.12, 0.12, 0.30, 0.06, 0.0, 0.0),
    "orchard": (0.06, 0.05, 0.10, 0.05, 0.16, 0.16),
    "vineyard": (0.06, 0.05, 0.0, 0.05, 0.22, 0.0),
    "allotments": (0.25, 0.12, 0.05, 0.07, 0.0, 0.0),
    "water": (0.05, 0.03, 0.0, 0.02, 0.0, 0.0),
    "asphalt": (0.04, 0.03, 0.0, 0.08, 0.0, 0.0),
    "roof": (0.0, 0.03, 0.0, 0.07, 0.0, 0.0),
    "metal": (0.0, 0.02, 0.0, 0.04, 0.08, 0.0),
    "crown": (0.05, 0.10, 0.35, 0.06, 0.0, 0.0),
}


_TEXTURE_IDS = {name: i for i, name in enumerate(_TEXTURES)}


_AMPLITUDES = np.array(list(_TEXTURES.values()), dtype=np.float32)


# Textures repeat every PERIOD pixels (4 tiles); the haze over them does not repeat.
PERIOD = 1024


GROUND = (148, 140, 104)


class _Style(NamedTuple):
    """How one feature is drawn: `shape` is area, line, rail, building or tree."""

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
    return tuple(
        int(np.clip(c * brightness * _variation(feature_id, 2 + k, spread / 2), 0, 255)) for k, c in enumerate(color)
    )


_AREA_STYLES = {
    ("landuse", "residential"): ((112, 134, 84), "lawn"),
    ("landuse", "commercial"): ((168, 164, 156), "paved"),
    ("landuse", "industrial"): ((128, 132, 140), "concrete"),
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
    "service": ((102, 102, 104), 5.0),
    "footway": ((184, 172, 150), 2.0),
}


def _style(feature) -> _Style | None:
    """The drawing style of a world feature, from its tags (as a renderer would)."""
    tags, fid = feature.tags, feature.id
    levels = float(tags.get("building:levels", 1))
    building = tags.get("building")
    if building in ("house", "yes", "residential", "detached"):
        return _Style(
            "building", _tint(_ROOFS[fid % len(_ROOFS)], fid), _TEXTURE_IDS["roof"], height=3 * levels + 2, gable=True
        )
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
        return _Style("rail", (96, 88, 80), _TEXTURE_IDS["rubble"], width=9.0)
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
    """Smooth value noise at positions xs (columns) × ys (rows), lattice `cell` apart.

    Depends only on the global position, so neighbouring tiles join without a seam.
    """
    u, v = xs / cell, ys / cell
    iu, iv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = (u - iu).astype(np.float32), (v - iv).astype(np.float32)
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    u0, v0 = iu.min(), iv.min()
    grid = _hash(np.arange(u0, iu.max() + 2)[None, :], np.arange(v0, iv.max() + 2)[:, None], salt)
    cu, cv = iu - u0, iv - v0
    across = grid[:, cu] * (1 - fu) + grid[:, cu + 1] * fu  # (lattice rows, len(xs))
    return across[cv] * (1 - fv)[:, None] + across[cv + 1] * fv[:, None]


def _periodic_noise(size: int, cell: float, salt: int) -> np.ndarray:
    """Smooth value noise on a square of `size` pixels that wraps around at its edges."""
    if cell <= 1.5:
        index = np.arange(size)
        return _hash(index[None, :], index[:, None], salt)
    n = max(1, round(size / cell))
    u = (np.arange(size) + 0.5) * (n / size)
    i0 = np.floor(u).astype(np.int64)
    f = (u - i0).astype(np.float32)
    f = f * f * (3 - 2 * f)
    i0 %= n
    i1 = (i0 + 1) % n
    lattice = np.arange(n)
    grid = _hash(lattice[None, :], lattice[:, None], salt)
    across = grid[:, i0] * (1 - f) + grid[:, i1] * f
    return across[i0] * (1 - f)[:, None] + across[i1] * f[:, None]


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenated np.arange(start, end) for each pair, without a Python loop."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return offsets + np.arange(total)


# Drawing stages, bottom to top.
_LANDUSE, _OVERLAY, _WAYS, _TREE_ROWS, _BUILDINGS, _TREES = range(6)
_SHADE = np.array([1.0, 0.55], dtype=np.float32)  # shadowed ground keeps 55% of the light


_SHIFT = 3  # cv2 sub-pixel bits: coordinates in 1/8 pixel


_SUN = np.array([-0.6, -0.8])  # shadow direction in pixels (x right, y down): north-west


def _stage(style: _Style, tags: dict) -> int:
    if style.shape == "building":
        return _BUILDINGS
    if style.shape == "tree":
        return _TREES
    if style.shape in ("line", "rail"):
        return _TREE_ROWS if style.height else _WAYS
    if tags.get("natural") == "water" or tags.get("amenity") == "parking" or tags.get("leisure") == "pitch":
        return _OVERLAY
    return _LANDUSE


class _Painter:
    """Draws imagery tiles of one world; thread-safe (no per-tile state is shared)."""

    def __init__(self, world):
        self.world = world
        self.seed = world.seed
        self.styles = [_style(f) for f in world.features]
        self.drawable = np.array([style is not None for style in self.styles])
        self.stages = [(_stage(style, f.tags) if style else -1) for style, f in zip(self.styles, world.features)]
        # Every ring of every feature in one coordinate array, so that a tile's features
        # are moved to pixels in one numpy operation.
        coords, ring_lengths, first_ring = [], [], []
        for feature in world.features:
            first_ring.append(len(ring_lengths))
            geometry = feature.geometry
            for part in getattr(geometry, "geoms", [geometry]):
                if part.geom_type == "Polygon":
                    rings = [part.exterior.coords, *(r.coords for r in part.interiors)]
                else:
                    rings = [part.coords]
                for ring in rings:
                    array = np.asarray(ring, dtype=np.float64)[:, :2]
                    coords.append(array)
                    ring_lengths.append(len(array))
        first_ring.append(len(ring_lengths))
        self.coords = np.concatenate(coords)
        self.ring_lengths = np.array(ring_lengths, dtype=np.int64)
        self.ring_starts = np.concatenate([[0], np.cumsum(self.ring_lengths)[:-1]])
        self.first_ring = np.array(first_ring, dtype=np.int64)
        self.tree = world.tree  # built now, not in racing request threads
        self._textures: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    # -- textures

    def textures(self, zoom: int) -> np.ndarray:
        """Brightness ×100 of every texture at `zoom`: uint8 (PERIOD, PERIOD, textures).

        Made once per zoom: sizes are in metres, so a crown is as wide at z19 as at z17.
        """
        stack = self._textures.get(zoom)
        if stack is not None:
            return stack
        with self._lock:
            if zoom in self._textures:
                return self._textures[zoom]
            metres = tiles.metres_per_pixel(zoom, TILE_SIZE)  # per pixel at the equator
            salt = self.seed * 1000 + zoom * 10
            fields = np.zeros((_FIELDS, PERIOD, PERIOD), dtype=np.float32)
            fields[0] = _periodic_noise(PERIOD, 40 / metres, salt + 1)
            fields[1] = _periodic_noise(PERIOD, 5 / metres, salt + 2)
            fields[2] = np.clip(_periodic_noise(PERIOD, 3 / metres, salt + 3) * 3, -1, 1)
            fields[3] = _periodic_noise(PERIOD, 1, salt + 4)
            if metres < 2:  # furrows 4 m apart vanish where a pixel is half as wide
                periods = max(1, round(PERIOD * metres / 4))
                wave = np.sin(2 * np.pi * periods * (np.arange(PERIOD) + 0.5) / PERIOD).astype(np.float32)
                fields[4] = wave[None, :]
                fields[5] = wave[:, None]
            # Element-wise sums, not a matrix product: BLAS threads fight over shared CPUs.
            stack = np.empty((PERIOD, PERIOD, len(_AMPLITUDES)), dtype=np.uint8)
            for index, amplitudes in enumerate(_AMPLITUDES):
                brightness = np.ones((PERIOD, PERIOD), dtype=np.float32)
                for field, amplitude in zip(fields, amplitudes):
                    if amplitude:
                        brightness += amplitude * field
                stack[..., index] = np.clip(brightness * 100, 0, 255)
            self._textures[zoom] = stack
            return stack

    def haze(self, tile: mercantile.Tile) -> np.ndarray:
        """A 250 m brightness haze over the tile, float32 (256, 256), seamless between tiles.

        Sampled every 32 pixels on the tile's edges and interpolated linearly, so that
        neighbours share their edge samples.
        """
        left, _bottom, right, top = mercantile.xy_bounds(tile)
        step = (right - left) / 8
        samples = _value_noise(left + step * np.arange(9), top - step * np.arange(9), 250.0, self.seed * 1000 + 7)
        low, fraction = _EDGE_SAMPLES
        across = samples[:, low] * (1 - fraction) + samples[:, low + 1] * fraction  # (9, 256)
        field = across[low] * (1 - fraction)[:, None] + across[low + 1] * fraction[:, None]
        return 1.0 + HAZE * field

    # -- geometry

    def _pixel_rings(self, indices: np.ndarray, bounds: mercantile.Bbox) -> list[list[np.ndarray]]:
        """Each feature's rings in cv2 fixed-point pixels (int32, 1/8 pixel)."""
        left, _bottom, right, top = bounds
        factor = TILE_SIZE / (right - left) * (1 << _SHIFT)
        rings = _ranges(self.first_ring[indices], self.first_ring[indices + 1])
        starts = self.ring_starts[rings]
        lengths = self.ring_lengths[rings]
        points = self.coords[_ranges(starts, starts + lengths)]
        pixels = np.empty(points.shape, dtype=np.int32)
        pixels[:, 0] = np.round((points[:, 0] - left) * factor)
        pixels[:, 1] = np.round((top - points[:, 1]) * factor)
        flat = np.split(pixels, np.cumsum(lengths)[:-1])
        counts = self.first_ring[indices + 1] - self.first_ring[indices]
        out, at = [], 0
        for count in counts:
            out.append(flat[at : at + count])
            at += count
        return out

    def draw(self, tile: mercantile.Tile) -> np.ndarray:
        """The RGB uint8 (256, 256, 3) image of one tile."""
        import cv2

        bounds = mercantile.xy_bounds(tile)
        left, bottom, right, top = bounds
        per_metre = TILE_SIZE / (right - left)
        one = 1 << _SHIFT

        color = np.empty((TILE_SIZE, TILE_SIZE, 3), dtype=np.uint8)
        color[:] = GROUND
        texture = np.full((TILE_SIZE, TILE_SIZE), _TEXTURE_IDS["ground"], dtype=np.uint8)
        shadow = np.zeros((TILE_SIZE, TILE_SIZE), dtype=np.uint8)

        # Shadows reach up to ~35 m: features that far outside cast into the tile.
        margin = 40.0
        hits = self.tree.query(shapely.box(left - margin, bottom - margin, right + margin, top + margin))
        indices = np.sort(hits)
        indices = indices[self.drawable[indices]]
        rings_of = self._pixel_rings(indices, bounds)

        # Group features that look alike, so that cv2 fills each group in one call.
        groups: dict[tuple, list] = {}
        casters = []
        for index, rings in zip(indices, rings_of):
            style, stage = self.styles[index], self.stages[index]
            if stage >= _TREE_ROWS:
                casters.append((stage, style, rings))
                continue
            key = (stage, style.shape, style.color, style.texture, style.width)
            groups.setdefault(key, []).extend(rings)
        for (stage, shape, rgb, texture_id, width), rings in sorted(groups.items(), key=lambda item: item[0][0]):
            if shape == "area":
                cv2.fillPoly(color, rings, rgb, cv2.LINE_8, _SHIFT)
                cv2.fillPoly(texture, rings, texture_id, cv2.LINE_8, _SHIFT)
            else:
                thickness = max(1, round(width * per_metre))
                cv2.polylines(color, rings, False, rgb, thickness, cv2.LINE_8, _SHIFT)
                cv2.polylines(texture, rings, False, texture_id, thickness, cv2.LINE_8, _SHIFT)
                if shape == "rail":  # the dark tracks down the middle of the ballast
                    cv2.polylines(color, rings, False, (58, 54, 52), max(1, thickness // 3), cv2.LINE_8, _SHIFT)

        # Shadow casters: all shadows first, then roofs and crowns over them. The sun is 45°
        # up in the south-east, so a shadow is as long as its caster is high.
        tops = []
        for stage, style, rings in casters:
            offset = np.round(_SUN * style.height * per_metre * one).astype(np.int32)
            if stage == _TREES:
                centre = rings[0][0]
                radius = max(one, round(style.width * per_metre * one))
                cv2.circle(shadow, tuple(int(c) for c in centre + offset), radius, 1, -1, cv2.LINE_8, _SHIFT)
            elif stage == _TREE_ROWS:
                thickness = max(1, round(style.width * per_metre))
                cv2.polylines(shadow, [r + offset for r in rings], False, 1, thickness, cv2.LINE_8, _SHIFT)
            else:
                # The outline swept along the sun's direction (outlines are convex here).
                hull = cv2.convexHull(np.concatenate([rings[0], rings[0] + offset]))
                cv2.fillPoly(shadow, [hull], 1, cv2.LINE_8, _SHIFT)
            tops.append((stage, style, rings))
        gables = []
        for stage, style, rings in tops:
            if stage == _TREES:
                centre = tuple(int(c) for c in rings[0][0])
                radius = max(one, round(style.width * per_metre * one))
                cv2.circle(color, centre, radius, style.color, -1, cv2.LINE_8, _SHIFT)
                cv2.circle(texture, centre, radius, style.texture, -1, cv2.LINE_8, _SHIFT)
                cv2.circle(shadow, centre, radius, 0, -1, cv2.LINE_8, _SHIFT)
            elif stage == _TREE_ROWS:
                thickness = max(1, round(style.width * per_metre))
                cv2.polylines(color, rings, False, style.color, thickness, cv2.LINE_8, _SHIFT)
                cv2.polylines(texture, rings, False, style.texture, thickness, cv2.LINE_8, _SHIFT)
                cv2.polylines(shadow, rings, False, 0, thickness, cv2.LINE_8, _SHIFT)
            else:
                cv2.fillPoly(color, rings, style.color, cv2.LINE_8, _SHIFT)
                cv2.fillPoly(texture, rings, style.texture, cv2.LINE_8, _SHIFT)
                cv2.fillPoly(shadow, rings, 0, cv2.LINE_8, _SHIFT)
                if style.gable and len(rings[0]) == 5:
                    gables.append((rings[0][:4], style.color))
        if gables:
            # The half of a gable roof facing away from the sun is darker; the ridge runs
            # along the longer side.
            corners = np.stack([c for c, _ in gables]).astype(np.int64)  # (K, 4, 2)
            first = np.hypot(*(corners[:, 1] - corners[:, 0]).T)
            second = np.hypot(*(corners[:, 2] - corners[:, 1]).T)
            corners = np.where((first < second)[:, None, None], np.roll(corners, -1, axis=1), corners)
            halves = np.stack(
                [
                    corners[:, 0],
                    corners[:, 1],
                    (corners[:, 1] + corners[:, 2]) // 2,
                    (corners[:, 0] + corners[:, 3]) // 2,
                ],
                axis=1,
            ).astype(np.int32)
            by_color: dict[tuple, list] = {}
            for half, (_, rgb) in zip(halves, gables):
                by_color.setdefault(rgb, []).append(half)
            for rgb, polygons in by_color.items():
                cv2.fillPoly(color, polygons, tuple(int(v * 0.72) for v in rgb), cv2.LINE_8, _SHIFT)

        # Light: each pixel's texture brightness, the haze, and the shadows.
        zoom_textures = self.textures(tile.z)
        row, col = (tile.y * TILE_SIZE) % PERIOD, (tile.x * TILE_SIZE) % PERIOD
        window = zoom_textures[row : row + TILE_SIZE, col : col + TILE_SIZE]
        brightness = np.take_along_axis(window, texture[..., None], axis=2)[..., 0]
        light = brightness * (self.haze(tile) / np.float32(100)) * _SHADE[shadow]
        image = color * light[..., None]
        # Shadows are lit by the blue sky: a little more blue.
        image[..., 2] += shadow * np.float32(8)
        np.minimum(image, 255, out=image)
        return image.astype(np.uint8)

    def jpeg(self, tile: mercantile.Tile) -> bytes:
        import cv2

        image = self.draw(tile)
        ok, data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"cv2 could not encode tile {tile} as JPEG")
        return data.tobytes()


def _edge_samples(samples: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel centre, the sample on pixel edges 0, k, 2k... before it and how far past it."""
    position = (np.arange(size) + 0.5) / (size / (samples - 1))
    low = np.floor(position).astype(np.int64)
    return low, (position - low).astype(np.float32)


_EDGE_SAMPLES = _edge_samples(9, TILE_SIZE)


@functools.lru_cache(maxsize=4)
def _painter(seed: int) -> _Painter:
    from osmseg.demo.world import build_world

    return _Painter(build_world(seed))


def draw_tile(tile: mercantile.Tile, seed: int = 0) -> np.ndarray:
    """The demo imagery of one tile as RGB uint8 (256, 256, 3), without a server."""
    return _painter(seed).draw(tile)
