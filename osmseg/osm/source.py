"""The interface every OSM source implements: "the OSM features in this area"."""

from __future__ import annotations

from typing import NamedTuple

import mercantile

KINDS = ("qa-tiles", "file", "overpass")
USER_AGENT = "osmseg/0.1 (segmentation training labels from OpenStreetMap; python-requests)"


class Feature(NamedTuple):
    """One OSM object: a shapely geometry in EPSG:3857 metres and its tags (str -> str)."""

    geometry: object
    tags: dict


def osm_tags(properties: dict) -> dict:
    """OSM tags as str -> str (QA tiles store @id and friends as numbers)."""
    return {str(k): str(v) for k, v in properties.items() if v is not None}


class OsmSource:
    """The interface every OSM source implements (osmseg.osm's docstring describes it).

    Attributes:
        name: the source's name as written in tile lists (e.g. ``demo`` for demo.mbtiles).
        zoom: the zoom of its source tiles (12 for OSM QA tiles).
    """

    name: str
    zoom: int

    def source_tiles(self, bbox: mercantile.LngLatBbox) -> list[mercantile.Tile]:
        """The source tiles at self.zoom holding data inside bbox, sorted by (z, x, y)."""
        raise NotImplementedError

    def features(self, bounds: mercantile.Bbox, margin: float = 0.0) -> list[Feature]:
        """The features inside EPSG:3857 bounds (left, bottom, right, top), merged across
        source tiles and clipped to bounds grown by `margin` (a fraction of its size)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (sources reopen them on the next call)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
