"""OSM features from a local file: a .osm/.osm.pbf extract (pyosmium) or a GeoJSON of tagged features."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import mercantile

from osmseg import tiles
from osmseg.errors import SourceError
from osmseg.osm.areas import is_area
from osmseg.osm.geometry import clip, join_lines, polygonal, polygons_from_rings, single, to_mercator
from osmseg.osm.qatiles import QA_ZOOM
from osmseg.osm.source import Feature, OsmSource, osm_tags


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
            `keys` (Classes.tag_keys).
    """

    def __init__(self, path, name: str | None = None, zoom: int = QA_ZOOM, keys=None, classes=None):
        import shapely

        if classes is not None:
            from osmseg.classes import load_classes

            classes = load_classes(classes) if isinstance(classes, (str, Path)) else classes
            keys = sorted(set(keys or ()) | set(classes.tag_keys()))
        self.keys = None if keys is None else frozenset(keys)
        self.path = Path(path)
        self.name = name or self.path.name.split(".")[0]
        self.zoom = zoom
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such OSM file; pass an existing .osm, .osm.pbf or .geojson file")
        suffixes = [s.lower() for s in self.path.suffixes]
        if suffixes and suffixes[-1] in (".geojson", ".json"):
            features = read_geojson(self.path)
            if self.keys is not None:
                features = [f for f in features if not self.keys.isdisjoint(f.tags)]
        elif ".osm" in suffixes or ".pbf" in suffixes or ".o5m" in suffixes:
            features = read_osm(self.path, self.keys)
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
                geometry = clip(geometry, query_box)
                if geometry.is_empty:
                    continue
            found.append(Feature(geometry, feature.tags))
        return found


def merge_by_id(items: list[tuple[object, dict]]) -> list[Feature]:
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
        polygons = [polygonal(shapely.make_valid(g)) for g in geometries if g.geom_type.endswith("Polygon")]
        lines = [part for g in geometries if g.geom_type.endswith("LineString") for part in getattr(g, "geoms", [g])]
        points = [g for g in geometries if g.geom_type.endswith("Point")]
        if polygons and any(p is not None for p in polygons):
            geometry = shapely.unary_union([p for p in polygons if p is not None])
        elif lines:
            joined = join_lines(lines, 1e-6) if len(lines) > 1 else [LineString(lines[0])]
            areas, open_lines = polygons_from_rings(joined, close_open=False) if is_area(tags) else ([], joined)
            geometry = single(areas) if areas and not open_lines else single(joined)
        elif points:
            geometry = points[0]
        else:
            continue
        features.append(Feature(geometry, tags))
    return features


def read_geojson(path: Path) -> list[Feature]:
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
        items.append((to_mercator(geometry), osm_tags(feature.get("properties") or {})))
    return merge_by_id(items)


def read_osm(path: Path, keys: frozenset | None = None) -> list[Feature]:
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
                geometry = polygonal(shapely.make_valid(geometry)) if not geometry.is_valid else geometry
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
