"""The demo world written as OSM QA tiles, read by the same code as real ones.

File written here (by `write_qa_tiles`, `prepare.py demo-world`):

data/osm/demo.mbtiles -- OSM QA tiles, the format of osmlab's planet/country QA tiles:
    * an MBTiles 1.3 SQLite file with tables `metadata(name, value)` and
      `tiles(zoom_level, tile_column, tile_row, tile_data)`;
    * tiles at z12 only, `tile_row` in TMS order (tile_row = 2**12 - 1 - y);
    * `tile_data` is a gzipped Mapbox Vector Tile (spec 2.1) with one layer, `osm`, extent
      2**20 (EXTENT; the newer QA tiles' precision: about 1 cm at z12 at the equator);
      features are clipped to the tile with no buffer; closed areas are Polygons or
      MultiPolygons, ways are LineStrings, nodes are Points;
    * properties: the OSM tags (strings), `@id` (integer, the same for a way in every
      tile it crosses) and `@type` ("way" or "node"); the MVT feature id is `@id` too;
    * metadata: name, description, version, type, format=pbf, minzoom=maxzoom=12,
      bounds "w,s,e,n" and center "lon,lat,12" in degrees, json with `vector_layers`
      (the `osm` layer's `fields`, every tag key as "String", as tippecanoe writes them),
      plus `demo_seed` and `demo_generator` so that a re-run can skip a finished file.
"""

from __future__ import annotations

import gzip
import json
import sqlite3
import sys
import warnings
from pathlib import Path

import mercantile
from shapely.geometry import box

from osmseg import atomic
from osmseg.demo.world import EXTENT, GENERATOR_VERSION, LAYER, PART_KINDS, QA_ZOOM, World, geometry_parts


def tile_features(world: World, tile: mercantile.Tile) -> list[dict]:
    """The mapped features of one QA tile, clipped to it, as mapbox_vector_tile feature dicts."""
    bounds = mercantile.xy_bounds(tile)
    frame = box(*bounds)
    features = []
    for feature in world.query(bounds, mapped_only=True):
        geometry = feature.geometry
        if geometry.geom_type == "Point":
            # Half-open tile extent, so that a node on a border lands in one tile only.
            if not (bounds.left <= geometry.x < bounds.right and bounds.bottom < geometry.y <= bounds.top):
                continue
            clipped = geometry
        else:
            clipped = geometry_parts(geometry.intersection(frame), PART_KINDS[geometry.geom_type])
            if clipped is None:
                continue
        properties = dict(feature.tags)
        properties["@id"] = feature.id
        properties["@type"] = feature.osm_type
        features.append({"geometry": clipped, "properties": properties, "id": feature.id})
    return features


def encode_tile(world: World, tile: mercantile.Tile) -> bytes | None:
    """The raw (not gzipped) MVT bytes of one QA tile, or None if it holds no feature."""
    import mapbox_vector_tile

    features = tile_features(world, tile)
    if not features:
        return None
    bounds = mercantile.xy_bounds(tile)
    options = {
        "quantize_bounds": tuple(bounds),
        "extents": EXTENT,
        "on_invalid_geometry": mapbox_vector_tile.encoder.on_invalid_geometry_make_valid,
    }
    with warnings.catch_warnings():
        # mapbox_vector_tile 2.x calls shapely.ops.transform, deprecated in shapely 2.1.
        warnings.simplefilter("ignore", DeprecationWarning)
        return mapbox_vector_tile.encode({"name": LAYER, "features": features}, default_options=options)


def qa_tiles_of(world: World) -> list[mercantile.Tile]:
    """The z12 tiles that cover the world."""
    return list(mercantile.tiles(*world.bbox, zooms=QA_ZOOM))


def write_qa_tiles(world: World, path: str | Path, progress: bool = False) -> int:
    """Write the world's mapped features as OSM QA tiles (see the module docstring).

    The file appears at `path` only when complete.

    Returns:
        The number of tiles written.
    """
    qa_tiles = qa_tiles_of(world)
    fields = sorted({key for f in world.features if f.mapped for key in f.tags})
    vector_layer = {
        "id": LAYER,
        "description": "",
        "minzoom": QA_ZOOM,
        "maxzoom": QA_ZOOM,
        "fields": {"@id": "Number", "@type": "String", **{key: "String" for key in fields}},
    }
    west, south, east, north = world.bbox
    metadata = {
        "name": "demo",
        "description": f"osmseg demo world, seed {world.seed}: synthetic OSM QA tiles",
        "version": "2",
        "type": "overlay",
        "format": "pbf",
        "minzoom": str(QA_ZOOM),
        "maxzoom": str(QA_ZOOM),
        "bounds": f"{west:.6f},{south:.6f},{east:.6f},{north:.6f}",
        "center": f"{(west + east) / 2:.6f},{(south + north) / 2:.6f},{QA_ZOOM}",
        "json": json.dumps({"vector_layers": [vector_layer]}),
        "demo_seed": str(world.seed),
        "demo_generator": GENERATOR_VERSION,
    }
    written = 0
    with atomic.atomic_path(path) as tmp:
        connection = sqlite3.connect(tmp)
        try:
            connection.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
            connection.execute(
                "CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)"
            )
            connection.execute("CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)")
            connection.executemany("INSERT INTO metadata VALUES (?, ?)", metadata.items())
            iterator = qa_tiles
            if progress:
                from tqdm import tqdm

                iterator = tqdm(qa_tiles, desc="demo QA tiles", unit="tile", file=sys.stderr)
            for tile in iterator:
                data = encode_tile(world, tile)
                if data is None:
                    continue
                tms_row = 2**tile.z - 1 - tile.y
                connection.execute(
                    "INSERT INTO tiles VALUES (?, ?, ?, ?)",
                    (tile.z, tile.x, tms_row, gzip.compress(data, mtime=0)),
                )
                written += 1
            connection.commit()
        finally:
            connection.close()
    return written


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata table of an MBTiles file (empty if it is not one)."""
    try:
        connection = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
        try:
            return dict(connection.execute("SELECT name, value FROM metadata").fetchall())
        finally:
            connection.close()
    except sqlite3.Error:
        return {}
