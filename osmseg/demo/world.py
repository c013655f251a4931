"""The demo world itself: a seeded synthetic town of OSM-tagged features, mapped and unmapped.

`build_world(seed)` lays out a small town of about 6 km × 6 km centred on lon 0, lat 0, so
that it straddles the z12 tile borders at lon 0 and lat 0. Streets form a jittered grid;
each block is zoned (commercial in the centre, residential around it, an industrial belt
along the railway, farmland, forest, meadows and other vegetation at the edge, a little
brownfield) and filled with buildings, trees, tree rows, parking and parks. A river, a
railway and the roads belong to no class of classes/mine.json. As in real OSM, a share of
what is on the ground is missing from the map: about 15% of buildings, 8% of landuse
areas and a third of single trees are flagged `mapped=False`. The imagery server
(osmseg.demo.server, drawn by osmseg.demo.painter) draws every feature; the QA tiles hold only the mapped ones, so the
labels are noisy the way real OSM labels are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import mercantile
import numpy as np
import shapely
import shapely.affinity
from shapely.geometry import LineString, Point, Polygon, box

from osmseg import tiles

# lon/lat ±0.0275° is ±3061 m in EPSG:3857 at the equator: 22 × 22 = 484 z17 tiles, and the
# z12 borders at lon 0 and lat 0 cross the middle of the town.
DEMO_BBOX = mercantile.LngLatBbox(-0.0275, -0.0275, 0.0275, 0.0275)
QA_ZOOM = 12
EXTENT = 2**20
LAYER = "osm"
# Bump when the generator's output changes, so that `demo-world` rebuilds old files.
GENERATOR_VERSION = "2"

# Probabilities of "missing from OSM" (the noisy labels of issue 2). As in real OSM, gaps
# cluster: some blocks have none of their buildings mapped, elsewhere a few are missing;
# about 15% of buildings in all.
UNMAPPED_BLOCK = 0.06
UNMAPPED_BUILDING = 0.10
UNMAPPED_LANDUSE = 0.08
UNMAPPED_TREE = 0.33

# Zoning: the tags of each kind of block. Vegetation tags are those of classes/mine.json's
# vegetation filter, so that every one of them occurs somewhere.
BLOCK_TAGS = {
    "residential": {"landuse": "residential"},
    "commercial": {"landuse": "commercial"},
    "industrial": {"landuse": "industrial"},
    "brownfield": {"landuse": "brownfield"},
    "forest": {"landuse": "forest"},
    "wood": {"natural": "wood"},
    "farmland": {"landuse": "farmland"},
    "meadow": {"landuse": "meadow"},
    "scrub": {"natural": "scrub"},
    "heath": {"natural": "heath"},
    "grassland": {"natural": "grassland"},
    "orchard": {"landuse": "orchard"},
    "allotments": {"landuse": "allotments"},
    "vineyard": {"landuse": "vineyard"},
    "park": {"leisure": "park", "surface": "grass"},
    "school": {"amenity": "school"},
    "empty": {},
}

ROAD_WIDTHS = {"primary": 14.0, "secondary": 11.0, "tertiary": 9.0, "residential": 7.0, "service": 5.0}
RIVER_WIDTH = 32.0
RAIL_WIDTH = 12.0


class WorldFeature(NamedTuple):
    """One feature of the demo world.

    Attributes:
        id: the OSM-style id (`@id`), unique in the world.
        geometry: a shapely geometry in EPSG:3857 metres.
        tags: OSM tags, str -> str.
        mapped: False for features that the imagery shows but OSM lacks.
    """

    id: int
    geometry: object
    tags: dict
    mapped: bool

    @property
    def osm_type(self) -> str:
        return "node" if self.geometry.geom_type == "Point" else "way"


@dataclass
class World:
    """The demo world: its features and where they are.

    Attributes:
        seed: the seed it was built from.
        bbox: its extent in degrees (mercantile.LngLatBbox).
        features: every feature, mapped or not, in drawing order (areas, then ways, then
            buildings and trees).
    """

    seed: int
    bbox: mercantile.LngLatBbox
    features: list[WorldFeature]
    _tree: shapely.STRtree | None = field(default=None, repr=False)

    @property
    def bounds(self) -> mercantile.Bbox:
        """The world's extent in EPSG:3857 metres."""
        return tiles.bbox_to_xy(self.bbox)

    @property
    def tree(self) -> shapely.STRtree:
        """A spatial index over all features' geometries (built once)."""
        if self._tree is None:
            self._tree = shapely.STRtree([f.geometry for f in self.features])
        return self._tree

    def query(self, bounds: mercantile.Bbox, mapped_only: bool = False) -> list[WorldFeature]:
        """The features whose geometry intersects `bounds` (EPSG:3857 metres), in drawing order."""
        hits = self.tree.query(box(*bounds), predicate="intersects")
        chosen = [self.features[i] for i in np.sort(hits)]
        return [f for f in chosen if f.mapped] if mapped_only else chosen

    def crop(self, bbox: mercantile.LngLatBbox) -> World:
        """The features that reach into `bbox` (degrees), whole, as a World of that extent."""
        inside = shapely.intersects([f.geometry for f in self.features], box(*tiles.bbox_to_xy(bbox)))
        return World(self.seed, bbox, [f for f, keep in zip(self.features, inside) if keep])

    def fully_mapped(self) -> World:
        """This world with every feature mapped: its QA tiles hold what the imagery shows."""
        return World(self.seed, self.bbox, [f._replace(mapped=True) for f in self.features])

    def mapped(self) -> list[WorldFeature]:
        return [f for f in self.features if f.mapped]

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts of features by main tag (`building`, `landuse=...`, ...), mapped and not."""
        counts: dict[str, dict[str, int]] = {}
        for feature in self.features:
            key = _main_tag(feature.tags)
            entry = counts.setdefault(key, {"mapped": 0, "unmapped": 0})
            entry["mapped" if feature.mapped else "unmapped"] += 1
        return dict(sorted(counts.items()))


def _main_tag(tags: dict) -> str:
    if "building" in tags:
        return "building"
    for key in ("landuse", "natural", "leisure", "amenity", "highway", "railway", "waterway"):
        if key in tags:
            return f"{key}={tags[key]}"
    return "other"


# --------------------------------------------------------------------------- generator


class _Builder:
    """Collects features and gives them ids; holds the random generator."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.features: list[WorldFeature] = []
        self._next_id = 1

    def add(self, geometry, tags: dict, mapped: bool = True) -> None:
        if geometry.geom_type == "GeometryCollection":
            # Clipping can leave stray points or lines beside an area: keep the main parts.
            for kinds in (PART_KINDS["Polygon"], PART_KINDS["LineString"]):
                parts = geometry_parts(geometry, kinds)
                if parts is not None:
                    geometry = parts
                    break
            else:
                return
        if geometry.is_empty:
            return
        self.features.append(WorldFeature(self._next_id, geometry, dict(tags), bool(mapped)))
        self._next_id += 1

    def add_many(self, geometries: Iterable, tags_list: Iterable[dict], mapped: Iterable[bool]) -> None:
        for geometry, tags, is_mapped in zip(geometries, tags_list, mapped):
            self.add(geometry, tags, is_mapped)


def _grid_lines(rng: np.random.Generator, low: float, high: float, town: float) -> np.ndarray:
    """Street positions from the middle outwards; 0 falls inside the central block.

    Blocks are smaller in the town (within `town` metres of the centre) than in the fields.
    """

    def step(position: float) -> float:
        return rng.uniform(120, 190) if abs(position) < town else rng.uniform(170, 280)

    positions = [-rng.uniform(70, 100), rng.uniform(70, 100)]
    while positions[0] > low - 60:
        positions.insert(0, positions[0] - step(positions[0]))
    while positions[-1] < high + 60:
        positions.append(positions[-1] + step(positions[-1]))
    return np.array(positions)


def _road_class(index: int, centre_index: int) -> str:
    offset = abs(index - centre_index)
    if offset in (0, 1) and index >= centre_index:
        return "primary"
    if offset % 4 == 2:
        return "secondary"
    if offset % 4 == 0:
        return "tertiary"
    return "residential"


def _inset_quad(corners: np.ndarray, insets: np.ndarray) -> np.ndarray:
    """Move each edge of a counter-clockwise quad inwards by its own distance."""
    directions = np.roll(corners, -1, axis=0) - corners
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    normals = np.stack([-directions[:, 1], directions[:, 0]], axis=1)  # left = inside for CCW
    points = corners + normals * insets[:, None]
    out = np.empty_like(corners)
    for k in range(4):
        # Intersect offset edge k-1 with offset edge k.
        p, t = points[k - 1], directions[k - 1]
        q, w = points[k], directions[k]
        denominator = t[0] * w[1] - t[1] * w[0]
        s = ((q[0] - p[0]) * w[1] - (q[1] - p[1]) * w[0]) / denominator
        out[k] = p + s * t
    return out


def _rectangles(centres: np.ndarray, along: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Rotated rectangles as shapely Polygons: centres (N,2), unit `along` (N,2), sizes (N,2)=(length, depth)."""
    across = np.stack([-along[:, 1], along[:, 0]], axis=1)
    half_l = along * (sizes[:, :1] / 2)
    half_d = across * (sizes[:, 1:] / 2)
    ring = np.stack(
        [centres - half_l - half_d, centres + half_l - half_d, centres + half_l + half_d, centres - half_l + half_d],
        axis=1,
    )
    return shapely.polygons(ring)


def _bilinear(quad: np.ndarray, u: float, v: float) -> np.ndarray:
    v0, v1, v2, v3 = quad
    return (1 - u) * (1 - v) * v0 + u * (1 - v) * v1 + u * v * v2 + (1 - u) * v * v3


def _sub_quad(quad: np.ndarray, u0: float, u1: float, v0: float, v1: float) -> Polygon:
    return Polygon([_bilinear(quad, u0, v0), _bilinear(quad, u1, v0), _bilinear(quad, u1, v1), _bilinear(quad, u0, v1)])


def _keep_inside(candidates: list, area) -> list[int]:
    """Indices of candidate geometries inside `area` that overlap no earlier kept one."""
    if not candidates:
        return []
    geoms = np.array(candidates, dtype=object)
    inside = shapely.within(geoms, area)
    tree = shapely.STRtree(geoms)
    pairs = tree.query(geoms, predicate="intersects")
    clash = {int(b) for a, b in pairs.T if a < b}  # the later of two overlapping ones goes
    return [i for i in range(len(candidates)) if inside[i] and i not in clash]


_HOUSEPART_KINDS = ("house", "house", "house", "yes", "yes", "residential", "detached")


def _unmapped_buildings(rng: np.random.Generator, count: int) -> np.ndarray:
    """Which of a block's buildings OSM lacks: all of them in a few blocks, some elsewhere."""
    if rng.random() < UNMAPPED_BLOCK:
        return np.ones(count, dtype=bool)
    return rng.random(count) < UNMAPPED_BUILDING


def _fill_residential(b: _Builder, quad: np.ndarray, area) -> None:
    """Houses in a row along each street, sheds and trees in the back gardens."""
    rng = b.rng
    centres, alongs, sizes, tags = [], [], [], []
    trees = []
    streets = [quad]
    sides = np.hypot(*(np.roll(quad, -1, axis=0) - quad).T)
    if sides.min() > 150:
        # A deep block gets a lane round its middle, with houses along the lane too.
        lane = _inset_quad(quad, np.full(4, 48.0))
        b.add(LineString(np.vstack([lane, lane[:1]])).intersection(area), {"highway": "service", "service": "driveway"})
        streets.append(_inset_quad(lane, np.full(4, 4.0)))
    edges = [(street[k], street[(k + 1) % 4]) for street in streets for k in range(4)]
    for a, c in edges:
        length = float(np.hypot(*(c - a)))
        along = (c - a) / length
        inward = np.array([-along[1], along[0]])
        # Draw enough houses for the longest street, then keep those that fit.
        n = int(length / 10) + 1
        width, depth = rng.uniform(7, 13, n), rng.uniform(8, 12, n)
        setback, gap = rng.uniform(4, 8, n), rng.uniform(2, 7, n)
        start = rng.uniform(20, 30) + np.concatenate([[0.0], np.cumsum(width + gap)[:-1]])
        fits = start + width < length - 20
        mid = (start + width / 2)[fits, None]
        depth, width, setback = depth[fits], width[fits], setback[fits]
        house = a + along * mid + inward * (setback + depth / 2)[:, None]
        centres.append(house)
        alongs.append(np.repeat(along[None], len(house), axis=0))
        sizes.append(np.column_stack([width, depth]))
        kinds = rng.integers(0, len(_HOUSEPART_KINDS), len(house))
        levels = rng.integers(1, 4, len(house))
        tags += [{"building": _HOUSEPART_KINDS[kind], "building:levels": str(level)} for kind, level in zip(kinds, levels)]
        # Sheds and garages behind a third of the houses.
        has_shed = rng.random(len(house)) < 0.35
        behind = (depth / 2 + rng.uniform(5, 9, len(house)))[:, None]
        shed = house + inward * behind + along * rng.uniform(-2, 2, (len(house), 1))
        centres.append(shed[has_shed])
        alongs.append(np.repeat(along[None], int(has_shed.sum()), axis=0))
        sizes.append(np.column_stack([rng.uniform(3, 5, len(house)), rng.uniform(3, 4, len(house))])[has_shed])
        tags += [{"building": "garage" if g else "shed"} for g in rng.random(int(has_shed.sum())) < 0.5]
        # Trees at the back of almost half the gardens.
        has_tree = rng.random(len(house)) < 0.45
        back = (depth / 2 + rng.uniform(10, 16, len(house)))[:, None]
        trees.append((house + inward * back + along * rng.uniform(-4, 4, (len(house), 1)))[has_tree])
    geoms = list(_rectangles(np.concatenate(centres), np.concatenate(alongs), np.concatenate(sizes)))
    keep = _keep_inside(geoms, area)
    unmapped = _unmapped_buildings(rng, len(geoms))
    b.add_many([geoms[i] for i in keep], [tags[i] for i in keep], [not unmapped[i] for i in keep])
    _add_trees(b, list(np.concatenate(trees)), area)


def _add_trees(b: _Builder, points: list, area) -> None:
    if not points:
        return
    geoms = shapely.points(np.array(points))
    inside = shapely.within(geoms, area)
    unmapped = b.rng.random(len(points)) < UNMAPPED_TREE
    for geometry, ok, missing in zip(geoms, inside, unmapped):
        if ok:
            b.add(geometry, {"natural": "tree"}, not missing)


def _fill_lots(b: _Builder, quad: np.ndarray, area, kind: str) -> None:
    """Commercial and industrial blocks: a few large buildings on lots, the rest paved."""
    rng = b.rng
    nu, nv = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    geoms, tags = [], []
    for i in range(nu):
        for j in range(nv):
            u0, u1, v0, v1 = i / nu, (i + 1) / nu, j / nv, (j + 1) / nv
            roll = rng.random()
            if kind == "industrial" and roll < 0.2:
                # Storage tanks in a row.
                count = int(rng.integers(1, 4))
                radius = rng.uniform(6, 11)
                for t in range(count):
                    centre = _bilinear(quad, u0 + (u1 - u0) * (t + 1) / (count + 1), (v0 + v1) / 2)
                    geoms.append(Point(centre).buffer(radius, quad_segs=6))
                    tags.append({"building": "storage_tank", "man_made": "storage_tank"})
            elif roll < 0.8:
                mu, mv = rng.uniform(0.08, 0.2, size=2)
                du, dv = (u1 - u0) * mu, (v1 - v0) * mv
                geoms.append(_sub_quad(quad, u0 + du, u1 - du, v0 + dv, v1 - dv))
                if kind == "industrial":
                    tags.append(
                        {
                            "building": str(rng.choice(["industrial", "warehouse", "industrial"])),
                            "building:levels": str(int(rng.integers(1, 3))),
                        }
                    )
                else:
                    tags.append(
                        {
                            "building": str(rng.choice(["commercial", "retail", "office"])),
                            "building:levels": str(int(rng.integers(2, 8))),
                        }
                    )
            else:
                b.add(
                    _sub_quad(quad, u0 + 0.03, u1 - 0.03, v0 + 0.03, v1 - 0.03).intersection(area),
                    {"amenity": "parking", "parking": "surface"},
                )
    keep = _keep_inside(geoms, area)
    unmapped = _unmapped_buildings(rng, len(geoms))
    b.add_many([geoms[i] for i in keep], [tags[i] for i in keep], [not unmapped[i] for i in keep])


def _fill_park(b: _Builder, quad: np.ndarray, area) -> None:
    rng = b.rng
    path = LineString([_bilinear(quad, 0, rng.uniform(0.2, 0.8)), _bilinear(quad, 1, rng.uniform(0.2, 0.8))])
    b.add(path.intersection(area), {"highway": "footway"})
    if rng.random() < 0.5:
        centre = _bilinear(quad, rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
        pond = shapely.affinity.scale(Point(centre).buffer(rng.uniform(12, 25), quad_segs=8), 1.6, 1.0)
        pond = pond.difference(path.buffer(3))
        b.add(pond.intersection(area), {"natural": "water"})
    trees = [_bilinear(quad, *rng.uniform(0.05, 0.95, size=2)) for _ in range(int(rng.integers(5, 15)))]
    _add_trees(b, trees, area)


def _fill_school(b: _Builder, quad: np.ndarray, area) -> None:
    rng = b.rng
    geoms = [_sub_quad(quad, 0.1, 0.45, 0.15, 0.6)]
    tags = [{"building": "school", "building:levels": "2"}]
    keep = _keep_inside(geoms, area)
    b.add_many([geoms[i] for i in keep], [tags[i] for i in keep], [True] * len(keep))
    pitch = _sub_quad(quad, 0.55, 0.9, 0.2, 0.8).intersection(area)
    b.add(pitch, {"leisure": "pitch", "sport": "soccer", "surface": "grass"}, rng.random() > UNMAPPED_LANDUSE)


def _hedges(b: _Builder, quad: np.ndarray, area) -> None:
    """Tree rows along one or two edges of a field, a few metres inside it."""
    rng = b.rng
    for k in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
        a, c = quad[k], quad[(k + 1) % 4]
        along = (c - a) / np.hypot(*(c - a))
        inward = np.array([-along[1], along[0]]) * 3.0
        row = LineString([a + inward + along * 5, c + inward - along * 5]).intersection(area)
        if not row.is_empty and row.geom_type == "LineString":
            b.add(row, {"natural": "tree_row"}, rng.random() > UNMAPPED_TREE)


def _zone(rng: np.random.Generator, centre: np.ndarray, radius: float, rail_distance: float) -> str:
    r = float(np.hypot(*centre)) / radius + rng.normal(0, 0.06)

    def pick(options: dict) -> str:
        names = list(options)
        weights = np.array([options[n] for n in names], dtype=float)
        return str(rng.choice(names, p=weights / weights.sum()))

    if centre[0] > -0.15 * radius and rail_distance < 0.23 * radius and r < 0.95:
        return pick({"industrial": 58, "brownfield": 10, "commercial": 10, "residential": 12, "empty": 5, "meadow": 5})
    if r < 0.25:
        return pick({"commercial": 60, "residential": 25, "park": 8, "school": 7})
    if r < 0.7:
        return pick(
            {
                "residential": 66,
                "commercial": 12,
                "industrial": 3,
                "park": 4,
                "school": 3,
                "brownfield": 3,
                "empty": 3,
                "allotments": 3,
                "grassland": 3,
            }
        )
    return pick(
        {
            "farmland": 28,
            "forest": 12,
            "wood": 8,
            "meadow": 11,
            "scrub": 6,
            "orchard": 4,
            "heath": 3,
            "grassland": 4,
            "allotments": 2,
            "vineyard": 3,
            "residential": 13,
            "empty": 4,
            "brownfield": 2,
        }
    )


def build_world(seed: int = 0, bbox: mercantile.LngLatBbox = DEMO_BBOX) -> World:
    """Lay out the demo town deterministically from `seed`.

    Args:
        seed: the random seed; the same seed gives the same features, ids and tags.
        bbox: keep only the features that reach into this extent (degrees): a smaller world
            for tests that is still the very town the imagery server draws for `seed`.

    Returns:
        The World, with features in drawing order.
    """
    rng = np.random.default_rng(seed)
    b = _Builder(rng)
    left, bottom, right, top = tiles.bbox_to_xy(DEMO_BBOX)
    radius = min(right - left, top - bottom) / 2

    xs = _grid_lines(rng, left, right, 0.6 * radius)
    ys = _grid_lines(rng, bottom, top, 0.6 * radius)
    grid = np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1)
    grid += rng.uniform(-12, 12, size=grid.shape)
    cx, cy = len(xs) // 2, len(ys) // 2  # the line index just right of / above 0
    column_class = [_road_class(i, cx) for i in range(len(xs))]
    row_class = [_road_class(j, cy) for j in range(len(ys))]

    # The river runs north-south west of the centre, the railway east-west south of it:
    # both cross a z12 border (lat 0 and lon 0).
    river_y = np.linspace(bottom - 200, top + 200, 60)
    river_x = left + 0.22 * (right - left) + 90 * np.sin(river_y / 400 + rng.uniform(0, 6)) + 40 * np.sin(river_y / 137)
    river = LineString(np.column_stack([river_x, river_y]))
    rail_x = np.linspace(left - 200, right + 200, 40)
    rail_y = bottom + 0.33 * (top - bottom) + 60 * np.sin(rail_x / 900 + rng.uniform(0, 6))
    railway = LineString(np.column_stack([rail_x, rail_y]))
    obstacles = shapely.union(river.buffer(RIVER_WIDTH / 2 + 4), railway.buffer(RAIL_WIDTH / 2 + 4))

    # Blocks, zoned and filled. Landuse first so that it is drawn underneath.
    fills = []
    for i in range(len(xs) - 1):
        for j in range(len(ys) - 1):
            corners = np.array([grid[i, j], grid[i + 1, j], grid[i + 1, j + 1], grid[i, j + 1]], dtype=float)
            insets = (
                np.array(
                    [
                        ROAD_WIDTHS[row_class[j]],
                        ROAD_WIDTHS[column_class[i + 1]],
                        ROAD_WIDTHS[row_class[j + 1]],
                        ROAD_WIDTHS[column_class[i]],
                    ]
                )
                / 2
                + 2.0
            )
            quad = _inset_quad(corners, insets)
            area = Polygon(quad)
            if area.intersects(obstacles):
                area = area.difference(obstacles)
                if area.is_empty or area.area < 500:
                    continue
            centre = quad.mean(axis=0)
            if i == cx - 1 and j == cy - 1:
                kind = "commercial"  # the town square around (0, 0)
            else:
                kind = _zone(rng, centre, radius, railway.distance(Point(centre)))
            tags = BLOCK_TAGS[kind]
            if kind == "farmland" and rng.random() < 0.6:
                # Two or three fields of different crops side by side.
                parts = int(rng.integers(2, 4))
                for p in range(parts):
                    field_area = _sub_quad(quad, p / parts, (p + 1) / parts, 0, 1).intersection(area)
                    b.add(field_area, tags, rng.random() > UNMAPPED_LANDUSE)
            elif tags:
                b.add(
                    area, tags, rng.random() > UNMAPPED_LANDUSE or kind == "commercial" and i == cx - 1 and j == cy - 1
                )
            fills.append((kind, quad, area, i == cx - 1 and j == cy - 1))

    # Water and ways above landuse.
    b.add(river.buffer(RIVER_WIDTH / 2), {"natural": "water", "water": "river"})
    b.add(river, {"waterway": "river", "name": "Demo River"})
    for i in range(len(xs)):
        b.add(LineString(grid[i, :]), {"highway": column_class[i], "name": f"Avenue {i}"})
    for j in range(len(ys)):
        b.add(LineString(grid[:, j]), {"highway": row_class[j], "name": f"Street {j}"})
    b.add(railway, {"railway": "rail", "usage": "main"})

    # What stands on the blocks.
    for kind, quad, area, is_square in fills:
        if is_square:
            town_hall = _rectangles(np.zeros((1, 2)), np.array([[1.0, 0.0]]), np.array([[44.0, 32.0]]))[0]
            b.add(town_hall, {"building": "townhall", "amenity": "townhall", "building:levels": "3"})
            _add_trees(b, [_bilinear(quad, u, v) for u in (0.1, 0.9) for v in (0.1, 0.5, 0.9)], area)
        elif kind == "residential":
            _fill_residential(b, quad, area)
        elif kind in ("commercial", "industrial"):
            _fill_lots(b, quad, area, kind)
        elif kind == "park":
            _fill_park(b, quad, area)
        elif kind == "school":
            _fill_school(b, quad, area)
        elif kind == "farmland":
            _hedges(b, quad, area)
        elif kind in ("meadow", "grassland", "empty") and rng.random() < 0.5:
            _add_trees(
                b, [_bilinear(quad, *rng.uniform(0.1, 0.9, size=2)) for _ in range(int(rng.integers(2, 8)))], area
            )

    # Drawing order: areas underneath, then ways, then buildings and trees on top.
    def layer(feature: WorldFeature) -> int:
        tags = feature.tags
        if "building" in tags:
            return 4
        if tags.get("natural") in ("tree", "tree_row"):
            return 5
        if feature.geometry.geom_type in ("LineString", "MultiLineString"):
            return 3
        if tags.get("natural") == "water" or tags.get("amenity") == "parking" or tags.get("leisure") == "pitch":
            return 2
        return 1

    features = sorted(b.features, key=lambda f: (layer(f), f.id))
    world = World(seed=seed, bbox=DEMO_BBOX, features=features)
    return world if tuple(bbox) == tuple(DEMO_BBOX) else world.crop(bbox)


def geometry_parts(geometry, wanted: tuple[str, ...]):
    """The parts of a clipped geometry of the wanted kinds (clipping can yield collections)."""
    if geometry.is_empty:
        return None
    if geometry.geom_type in wanted:
        return geometry
    if geometry.geom_type == "GeometryCollection":
        pieces = [g for g in geometry.geoms if g.geom_type in wanted and not g.is_empty]
        if not pieces:
            return None
        return shapely.union_all(pieces) if len(pieces) > 1 else pieces[0]
    return None


PART_KINDS = {
    "Polygon": ("Polygon", "MultiPolygon"),
    "MultiPolygon": ("Polygon", "MultiPolygon"),
    "LineString": ("LineString", "MultiLineString"),
    "MultiLineString": ("LineString", "MultiLineString"),
}
