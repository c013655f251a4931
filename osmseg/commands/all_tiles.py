"""prepare.py all-tiles: list the OSM source tiles that intersect a bounding box.

Writes data/all_tiles.txt (osmseg.datafiles): the source tiles (z12 for OSM QA tiles) of the
OSM source that hold data inside BBOX, sorted by x, then y. Its #made-by record holds the OSM
source and the box, so later stages need not be told them again.
"""

from __future__ import annotations

import sys

from osmseg import datafiles, tiles
from osmseg.commands import options
from osmseg.errors import SourceError

NAME = "all-tiles"
HELP = "list the OSM source tiles that intersect a bounding box"


def add_arguments(parser) -> None:
    options.add_osm_source(parser)
    options.add_bbox(parser)
    options.add_classes(parser, "overpass only: the classes file whose tag keys to query")
    parser.add_argument("--out", default="data/all_tiles.txt", help="the tile list to write (source z x y)")


def main(args) -> int:
    bbox = tiles.parse_bbox(args.bbox)
    with options.open_osm_source(args, bbox) as source:
        found = source.source_tiles(bbox)
        name = source.name
    if not found:
        raise SourceError(
            f"{args.osm}: no OSM data inside the bounding box {args.bbox}; pick a box inside the file's area "
            "or another OSM file"
        )
    recorded = ["osm_source", "osm", "bbox"]
    if args.osm_source == "overpass":
        recorded += ["classes", "overpass_url", "timeout"]
    made_by = options.record({}, NAME, args, recorded)
    datafiles.write_tile_list(args.out, [(name, tile) for tile in found], made_by)
    print(f"{args.out}: {len(found)} z{found[0].z} source tiles of {name!r} inside {args.bbox}", file=sys.stderr)
    return 0
