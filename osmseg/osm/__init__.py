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

Modules: ``source`` (Feature, OsmSource), ``qatiles`` with ``mvt`` (vector tile decoding),
``files``, ``overpass``; ``areas`` and ``geometry`` are shared by them; ``download`` fetches
``data/osm/<name>.mbtiles`` for `prepare.py download-osm`.
"""

from __future__ import annotations

from osmseg.errors import SourceError
from osmseg.osm.files import FileSource
from osmseg.osm.overpass import overpass_source
from osmseg.osm.qatiles import QaTilesSource
from osmseg.osm.source import KINDS, Feature, OsmSource

__all__ = ["KINDS", "Feature", "OsmSource", "open_source"]


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

