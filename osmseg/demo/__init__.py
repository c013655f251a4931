"""The offline demo world: a synthetic town mapped in OSM QA tiles, with imagery served over HTTP.

Modules: ``world`` (the seeded town: every feature, mapped or not), ``qatiles`` (its mapped
features written as OSM QA tiles, data/osm/demo.mbtiles), ``painter`` (its imagery, drawn
from every feature) and ``server`` (the loopback tile server that serves it like a real
imagery provider). `make demo` runs the whole pipeline on it, with no network and no account.
"""

from __future__ import annotations

from osmseg.demo.qatiles import read_metadata, write_qa_tiles
from osmseg.demo.world import DEMO_BBOX, GENERATOR_VERSION, QA_ZOOM, World, WorldFeature, build_world

__all__ = [
    "DEMO_BBOX",
    "GENERATOR_VERSION",
    "QA_ZOOM",
    "World",
    "WorldFeature",
    "build_world",
    "read_metadata",
    "write_qa_tiles",
]
