"""prepare.py sample: draw a reproducible random sample of tiles in a bounding box.

Writes data/sample.txt (osmseg.datafiles): the first COUNT tiles at ZOOM_LEVEL of the seeded
random stream of tiles inside BBOX and inside the source tiles of data/all_tiles.txt
(osmseg.tiles.SampleStream), in stream order. Its #made-by record adds the zoom, count and
seed to all_tiles.txt's, so that `filter` can draw on from the same stream.
"""

from __future__ import annotations

import sys

from osmseg import datafiles, tiles
from osmseg.commands import options
from osmseg.errors import UserError

NAME = "sample"
HELP = "draw a reproducible random sample of tiles in a bounding box"


def add_arguments(parser) -> None:
    parser.add_argument("--all-tiles", default="data/all_tiles.txt", help="the source tiles to sample inside")
    options.add_bbox(parser, f"the area {options.FROM_LIST}", default=None)
    parser.add_argument("--zoom", type=int, default=17, help="the zoom level of the sampled tiles (ZOOM_LEVEL)")
    parser.add_argument("--count", type=int, default=10000, help="how many tiles to draw (TRAIN_SIZE)")
    parser.add_argument("--seed", type=int, default=0, help="the random seed: the same seed draws the same tiles")
    parser.add_argument("--out", default="data/sample.txt", help="the sample to write (source z x y)")


def main(args) -> int:
    all_tiles = datafiles.read_tile_list(args.all_tiles)
    options.fill_from_record(args, all_tiles.made_by, bbox=options.DEFAULT_BBOX)
    bbox = tiles.parse_bbox(args.bbox)
    zoom = tiles.check_zoom(args.zoom, "--zoom")
    if args.count <= 0:
        raise UserError(f"--count (TRAIN_SIZE) {args.count} must be positive; ask for at least one tile")
    entries = all_tiles.entries
    if not entries:
        raise UserError(f"{args.all_tiles}: lists no source tiles; remake it (make {args.all_tiles}) with another BBOX")
    stream = tiles.SampleStream(bbox, zoom, args.seed, entries)
    sample = []
    for _ in range(min(args.count, stream.total)):
        region, tile = stream.next_entry()
        sample.append((stream.source_name(region), tile))
    if stream.total < args.count:
        print(
            f"note: the bounding box holds only {stream.total} tiles at z{zoom} inside {args.all_tiles} "
            f"(asked for {args.count}); keeping them all",
            file=sys.stderr,
        )
    made_by = options.record(all_tiles.made_by, NAME, args, ["all_tiles", "bbox", "zoom", "count", "seed"])
    datafiles.write_tile_list(args.out, sample, made_by)
    print(f"{args.out}: {len(sample)} z{zoom} tiles drawn with seed {args.seed}", file=sys.stderr)
    return 0
