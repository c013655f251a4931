"""Geometry helpers the OSM sources share: joining pieces cut apart by tiles, filling rings, clipping."""

from __future__ import annotations

from osmseg import tiles


def join_lines(lines: list, tolerance: float) -> list:
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


def polygons_from_rings(lines: list, close_open: bool) -> tuple[list, list]:
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
            polygon = polygonal(shapely.make_valid(Polygon(coords)))
            if polygon is not None:
                polygons.append(polygon)
        else:
            open_lines.append(line)
    return polygons, open_lines


def polygonal(geometry):
    """The polygonal part of a geometry (make_valid can leave stray lines), or None."""
    from shapely.geometry import MultiPolygon

    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry if geometry.area > 0 else None
    parts = [g for g in getattr(geometry, "geoms", []) if g.geom_type == "Polygon" and g.area > 0]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def clip(geometry, rectangle):
    """geometry cut to a shapely box: GEOS's fast rectangle clip, or a full intersection where
    that one fails (it can leave a degenerate ring behind on valid input)."""
    import shapely

    try:
        return shapely.clip_by_rect(geometry, *rectangle.bounds)
    except shapely.errors.GEOSException:
        return shapely.intersection(geometry, rectangle)


def single(geometries: list):
    """One geometry from several of the same dimension (Multi* when needed)."""
    import shapely

    if len(geometries) == 1:
        return geometries[0]
    return (
        shapely.unary_union(geometries)
        if geometries[0].geom_type.endswith("Polygon")
        else shapely.union_all(geometries)
    )


def to_mercator(geometry):
    """A shapely geometry in WGS84 degrees -> EPSG:3857 metres (latitudes clamped to ±85.0511)."""
    import numpy as np
    import shapely

    def project(lonlat):
        return np.column_stack(tiles.lnglat_to_xy(lonlat[:, 0], lonlat[:, 1]))

    return shapely.transform(geometry, project)
