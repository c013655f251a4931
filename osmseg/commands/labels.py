"""prepare.py labels: render one label PNG per sampled tile with mapnik.

Writes data/labels/color/{z}-{x}-{y}.png (format in osmseg.labels) for every tile of
data/sample.txt that has no label yet, so a re-run resumes; the work uses every core.
With --shard I/N, only part I of the sample's tiles (osmseg.labels.shard_tiles: runs of
neighbouring tiles, so that each part reads about 1/N of the OSM source tiles, cut where a
run over the whole sample would start a new group, so that each label comes out the same).
"""

from __future__ import annotations

import sys

from osmseg import datafiles, labels, tiles
from osmseg.classes import load_classes
from osmseg.commands import options
from osmseg.errors import UserError

NAME = "labels"
HELP = "render one label PNG per sampled tile with mapnik"


def add_arguments(parser) -> None:
    parser.add_argument("--sample", default="data/sample.txt", help="tiles to label (lines `source z x y`)")
    options.add_classes(parser)
    options.add_osm_source(parser, default_osm=None, from_list=True)
    options.add_bbox(parser, f"overpass only: the box the sample was drawn in {options.FROM_LIST}", default=None)
    options.add_tile_size(parser)
    parser.add_argument("--out", default="data/labels/color", help="folder of label PNGs {z}-{x}-{y}.png")
    options.add_workers(parser, "processes to render with")
    options.add_shard(parser, "the sample's tiles")


def read_sample(path) -> datafiles.TileList:
    """The sample, or a UserError saying how to make it."""
    return datafiles.read_tile_list(path, make_hint="run `make data/sample.txt` (prepare.py sample)")


def fill_osm_source(args, made_by: dict) -> None:
    """The OSM source options the tile list was made with, where not given."""
    options.fill_from_record(
        args,
        made_by,
        osm_source="qa-tiles",
        osm=options.DEFAULT_OSM,
        overpass_url=options.OVERPASS_URL,
        timeout=180,
        bbox=options.DEFAULT_BBOX,
    )


def check_source_names(entries, source, sample_path) -> None:
    """Refuse a sample drawn from another OSM source than --osm (a stale data/sample.txt)."""
    others = sorted({name for name, _ in entries} - {source.name})
    if others:
        raise UserError(
            f"{sample_path}: lists tiles of OSM source(s) {', '.join(map(repr, others))}, but --osm is "
            f"{source.name!r}; remake the sample for this source (make clean, then make data/sample.txt)"
        )


def main(args) -> int:
    options.check_tile_size(args.tile_size)
    classes = load_classes(args.classes)
    labels.LabelRenderer(classes, args.tile_size, origin=str(args.classes))  # checks every filter up front
    sample = read_sample(args.sample)
    fill_osm_source(args, sample.made_by)
    entries = sample.entries
    with options.open_osm_source(args, tiles.parse_bbox(args.bbox)) as source:
        check_source_names(entries, source, args.sample)
        todo = [t for _, t in entries]
        if args.shard is not None:
            todo = labels.shard_tiles(todo, args.shard, source.zoom)
        summary = labels.render_labels(todo, source, classes, args.out, args.tile_size, args.workers)
    part = "" if args.shard is None else f" (shard {args.shard}: {len(todo)} of the sample's tiles)"
    print(
        f"labels{part}: {summary['rendered']} rendered, {summary['skipped']} already there, in {args.out}",
        file=sys.stderr,
    )
    return 0
