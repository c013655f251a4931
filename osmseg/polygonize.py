"""Polygons from label rasters of any size, a block of rows at a time, and GeoJSON in WGS84.

`raster_polygons` vectorises the regions of equal class value of a raster read in blocks of
rows, so that memory holds one block and the polygons open across its lower edge, never the
whole raster; regions cut by block edges are merged and come back whole. `write_features`
streams RFC 7946 GeoJSON (WGS84 longitude/latitude, exterior rings counterclockwise) into a
file. `select_regions` chooses regions by statistics summed over them (area, confidence...)
before any is vectorised. Areas are ground square metres: Web Mercator scales areas by
1 / cos²(latitude) (tiles.ground_scale), taken at each polygon's centroid.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from osmseg import tiles

NODATA = 255  # label value of pixels without imagery: never vectorised
BLOCK_ROWS = 2048


def raster_polygons(
    read_rows: Callable[[int, int], np.ndarray],
    height: int,
    transform,
    block_rows: int = BLOCK_ROWS,
    nodata: int | None = NODATA,
) -> Iterator[tuple[int, object]]:
    """(value, shapely Polygon in the transform's CRS) for every 4-connected region of equal,
    non-zero values other than `nodata`.

    Args:
        read_rows: (top, bottom) -> uint8 or int32 (bottom - top, W) rows of the raster (class
            values, or select_regions' region ids).
        height: the raster's rows.
        transform: its affine transform (pixel -> CRS), north up.
        block_rows: rows read at a time.
        nodata: a value never vectorised (None: every non-zero value is).
    """
    import shapely
    from affine import Affine
    from rasterio import features

    pending: dict[int, list] = {}  # polygons touching the previous block's lower edge, by value
    tolerance = abs(transform.e) * 1e-3
    for top in range(0, height, block_rows):
        bottom = min(top + block_rows, height)
        block = np.ascontiguousarray(read_rows(top, bottom))
        if block.dtype not in (np.uint8, np.int32):
            block = block.astype(np.int32)
        block_transform = transform @ Affine.translation(0, top)
        upper, lower = transform.f + transform.e * top, transform.f + transform.e * bottom
        mask = (block != 0) if nodata is None else (block != 0) & (block != nodata)
        joining: dict[int, list] = {value: list(polygons) for value, polygons in pending.items()}
        pending = {}
        for geometry, value in features.shapes(block, mask=mask, connectivity=4, transform=block_transform):
            polygon, value = _polygon(geometry["coordinates"]), int(value)
            _, miny, _, maxy = polygon.bounds
            if top > 0 and maxy >= upper - tolerance and value in joining:
                joining[value].append(polygon)
            elif bottom < height and miny <= lower + tolerance:
                pending.setdefault(value, []).append(polygon)
            else:
                yield value, polygon
        for value, polygons in joining.items():
            merged = shapely.unary_union(polygons) if len(polygons) > 1 else polygons[0]
            for part in getattr(merged, "geoms", [merged]):
                if part.geom_type != "Polygon" or part.is_empty:
                    continue
                if bottom < height and part.bounds[1] <= lower + tolerance:
                    pending.setdefault(value, []).append(part)
                else:
                    yield value, part
    for value, polygons in pending.items():  # only reached when the last block is empty of them
        for polygon in polygons:
            yield value, polygon


def ground_area(polygon) -> float:
    """A polygon's area on the ground in square metres, from EPSG:3857 metres."""
    return float(polygon.area * tiles.ground_scale(polygon.centroid.y) ** 2)


def _polygon(rings: list):
    """A shapely Polygon from GeoJSON rings (exterior first), built from one array of all their
    points: shapely.geometry.shape went through every point in Python, 2 s of a 3584² map's
    polygons (they have many holes)."""
    import shapely

    lengths = [len(ring) for ring in rings]
    points = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(rings)), np.float64,
                         count=2 * sum(lengths)).reshape(-1, 2)  # fmt: skip
    made = shapely.linearrings(points, indices=np.repeat(np.arange(len(rings)), lengths))
    return shapely.polygons(made[0], holes=made[1:] if len(made) > 1 else None)


def to_lnglat(geometry, digits: int | None = None):
    """An array of EPSG:3857 geometries in WGS84 degrees, exterior rings counterclockwise
    (RFC 7946, 3.1.6), coordinates rounded to `digits` decimals if given.

    Rounding is plain (GEOS's set_precision, which snaps with topology checks, took a tenth of
    a map's polygon time), then checked: a polygon left invalid (two rings closer than the
    grid, as where a hole nearly touches its exterior, end up crossing or sharing an edge) is
    repaired and snapped again with set_precision, which keeps it valid.
    """
    import shapely

    def project(xy: np.ndarray) -> np.ndarray:
        return np.column_stack(tiles.xy_to_lnglat(xy[:, 0], xy[:, 1]))

    lnglat = shapely.transform(geometry, project)
    if digits is not None:
        rounded = np.array(shapely.transform(lnglat, lambda xy: np.round(xy, digits)), dtype=object)
        broken = ~shapely.is_valid(rounded)
        rounded[broken] = [shapely.set_precision(repaired(g), 10.0**-digits) for g in lnglat[broken]]
        lnglat = rounded
    return shapely.orient_polygons(lnglat, exterior_cw=False)


def repaired(geometry):
    """A valid polygonal geometry covering what `geometry` (a polygon, perhaps invalid) covers:
    GEOS's make_valid, keeping only its polygons (it can add the lines where rings touched)."""
    import shapely

    if shapely.is_valid(geometry):
        return geometry
    valid = shapely.make_valid(geometry)
    parts = [g for g in getattr(valid, "geoms", [valid]) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else valid


@dataclass(frozen=True)
class Feature:
    """A GeoJSON Feature whose geometry stays a WGS84 shapely geometry until write_features
    writes it (shapely.to_geojson, in GEOS: 6× as fast as mapping it and json.dumps)."""

    geometry: object
    properties: dict

    def geojson(self) -> dict:
        from shapely.geometry import mapping

        return {"type": "Feature", "geometry": mapping(self.geometry), "properties": self.properties}


def lnglat_features(geometries_3857, properties: list[dict], digits: int = 7) -> list[Feature]:
    """Features of EPSG:3857 geometries, projected (to_lnglat) all at once."""
    geometries = to_lnglat(np.asarray(geometries_3857, dtype=object), digits) if len(properties) else []
    return [Feature(geometry, values) for geometry, values in zip(geometries, properties)]


def feature(geometry_3857, properties: dict, digits: int = 7) -> dict:
    """A GeoJSON Feature in WGS84 (coordinates rounded to `digits` decimals: 1e-7° is about 1 cm)."""
    return lnglat_features([geometry_3857], [properties], digits)[0].geojson()


def write_features(path: str | os.PathLike, features: Iterable[dict], members: dict | None = None) -> int:
    """Stream a GeoJSON FeatureCollection into `path`; returns the number of features.

    Args:
        path: the .geojson file (a temporary one of osmseg.atomic's: written in place).
        features: GeoJSON Feature dicts (feature()) or Features (lnglat_features()), written as
            they come.
        members: more top-level members (foreign members, RFC 7946 6.1), e.g. a bbox.
    """
    count = 0
    with open(path, "w") as out:
        out.write('{"type": "FeatureCollection"')
        for key, value in (members or {}).items():
            out.write(f", {json.dumps(key)}: {json.dumps(value)}")
        out.write(', "features": [')
        for item in features:
            if isinstance(item, Feature):
                import shapely

                properties = json.dumps(item.properties, separators=(",", ":"))
                text = f'{{"type":"Feature","geometry":{shapely.to_geojson(item.geometry)},"properties":{properties}}}'
            else:
                text = json.dumps(item, separators=(",", ":"))
            out.write(("," if count else "") + "\n" + text)
            count += 1
        out.write("\n]}\n")
    return count


# --- Regions chosen by their statistics, a block of rows at a time ----------------------------


def _label_block(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Component ids (int32 (rows, W), 0: none) of the 4-connected regions of each non-zero value
    other than NODATA, numbered from 1 within the block, and the value of each id (index 0: 0)."""
    import cv2

    labels = np.zeros(values.shape, dtype=np.int32)
    id_values = [0]
    present = np.flatnonzero(np.bincount(values.ravel(), minlength=256))  # np.unique hashes: 5× as slow
    for value in present:
        if value == 0 or value == NODATA:
            continue
        count, components = cv2.connectedComponents((values == value).astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
        np.add(components, len(id_values) - 1, out=labels, where=components > 0)
        id_values.extend([int(value)] * (count - 1))
    if len(id_values) >= 2**31 - 1:
        raise ValueError(f"{len(id_values) - 1} regions in one block are too many to number in int32")
    return labels, np.array(id_values, dtype=np.int64)


@dataclass
class Regions:
    """The regions select_regions kept, by the id it wrote for them (1..len; row 0 unused):
    their value, pixel count and the sums of its measures over them."""

    values: np.ndarray
    counts: np.ndarray
    sums: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.values) - 1


def select_regions(read_values, measures, height: int, keep, write, block_rows: int = BLOCK_ROWS) -> Regions:
    """Keep the regions of a raster that `keep` accepts by their statistics, and write their ids.

    Regions are 4-connected pixels of equal non-zero value (NODATA aside), whole across block
    borders: two passes over the raster, a block of rows at a time. The first labels each
    block's regions, sums `measures` over them and joins those that touch across block borders
    (union-find); the second labels the blocks again and writes each accepted region's id.
    Memory holds one block and a few numbers per region.

    Args:
        read_values: (top, bottom) -> uint8 (rows, W) region values.
        measures: functions (top, bottom) -> float (rows, W) to sum over each region.
        height: the raster's rows.
        keep: (values, counts, sums) -> bool per region: values and pixel counts int64 (R,),
            sums a list of float64 (R,), one per measure.
        write: called with (top, int32 (rows, W)): each block's kept regions' ids (1, 2, ...),
            0 elsewhere.
        block_rows: rows a block.

    Returns:
        The kept regions' statistics, by id.
    """
    parent: list[int] = [0]
    values, counts, sums = [np.zeros(1, np.int64)], [np.zeros(1, np.int64)], [[np.zeros(1)] for _ in measures]
    offsets: list[int] = []
    last_ids = last_values = None

    def find(node: int) -> int:
        root = node
        while parent[root] != root:
            root = parent[root]
        while parent[node] != root:
            parent[node], node = root, parent[node]
        return root

    for top in range(0, height, block_rows):
        bottom = min(top + block_rows, height)
        block = read_values(top, bottom)
        local, local_values = _label_block(block)
        offset = len(parent) - 1
        offsets.append(offset)
        found = len(local_values) - 1
        parent.extend(range(offset + 1, offset + 1 + found))
        flat = local.ravel()
        values.append(local_values[1:])
        counts.append(np.bincount(flat, minlength=found + 1)[1:])
        for index, measure in enumerate(measures):
            sums[index].append(np.bincount(flat, weights=measure(top, bottom).ravel(), minlength=found + 1)[1:])
        first_ids, last_row = (np.where(row > 0, row.astype(np.int64) + offset, 0) for row in (local[0], local[-1]))
        if last_ids is not None:
            touching = (last_ids > 0) & (first_ids > 0) & (last_values == block[0])
            for above, below in set(zip(last_ids[touching].tolist(), first_ids[touching].tolist())):
                a, b = find(above), find(below)
                if a != b:
                    parent[max(a, b)] = min(a, b)
        last_ids, last_values = last_row, block[-1]
    roots = np.array([find(node) for node in range(len(parent))], dtype=np.int64)
    total = len(parent)
    region_counts = np.bincount(roots, weights=np.concatenate(counts), minlength=total)
    region_sums = [np.bincount(roots, weights=np.concatenate(parts), minlength=total) for parts in sums]
    every_value = np.concatenate(values)
    heads = np.unique(roots[1:])
    chosen = heads[keep(every_value[heads], region_counts[heads].astype(np.int64), [s[heads] for s in region_sums])]
    if len(chosen) >= 2**31 - 1:
        raise ValueError(f"{len(chosen)} regions are too many to number in int32")
    numbers = np.zeros(total, dtype=np.int32)  # old root -> new id, 0: not kept
    numbers[chosen] = np.arange(1, len(chosen) + 1, dtype=np.int32)
    kept = numbers[roots]
    for number, top in enumerate(range(0, height, block_rows)):
        bottom = min(top + block_rows, height)
        local, _ = _label_block(read_values(top, bottom))
        write(top, kept[np.where(local > 0, local.astype(np.int64) + offsets[number], 0)])
    pick = np.concatenate([[0], chosen])
    return Regions(
        np.where(pick > 0, every_value[pick], 0),
        region_counts[pick].astype(np.int64),
        [region_sum[pick] for region_sum in region_sums],
    )
