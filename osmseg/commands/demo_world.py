"""prepare.py demo-world: write the offline demo world's OSM QA tiles (MBTiles).

Writes data/osm/demo.mbtiles (format in osmseg.demo) from DEMO_SEED; a re-run with the same
seed does nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from osmseg.demo import GENERATOR_VERSION, QA_ZOOM, build_world, read_metadata, write_qa_tiles
from osmseg.errors import SourceError

NAME = "demo-world"
HELP = "write the offline demo world's OSM QA tiles (MBTiles)"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="data/osm/demo.mbtiles", help="the MBTiles file to write")
    parser.add_argument("--seed", type=int, default=0, help="the demo world's random seed")


def main(args) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise SourceError(f"{out} is a directory; pass a file name for --out (e.g. data/osm/demo.mbtiles)")
    if out.exists():
        metadata = read_metadata(out)
        if "demo_generator" not in metadata:
            # Someone else's file (real QA tiles, say): never clobber it.
            raise SourceError(f"{out} exists and is not a demo world; move it away or pass another --out")
        if metadata.get("demo_seed") == str(args.seed) and metadata.get("demo_generator") == GENERATOR_VERSION:
            print(f"{out}: demo world (seed {args.seed}) already written; skipping", file=sys.stderr)
            return 0
        print(f"{out}: made from another seed or generator version; rebuilding", file=sys.stderr)
    world = build_world(args.seed)
    count = write_qa_tiles(world, out, progress=True)
    mapped = sum(f.mapped for f in world.features)
    print(
        f"{out}: {count} z{QA_ZOOM} QA tiles, {mapped} mapped features "
        f"({len(world.features) - mapped} more only in the imagery), seed {args.seed}",
        file=sys.stderr,
    )
    return 0
