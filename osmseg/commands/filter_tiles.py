"""prepare.py filter: count label pixels per class and keep tiles above a ratio.

Writes data/sample-filtered.txt (osmseg.datafiles): the first COUNT tiles of the sample whose
labelled share of pixels exceeds LABEL_RATIO, with their pixel count per class; when the
sample holds too few, it draws on from the sample's random stream and labels those too. And
data/labels/label-stats.csv (osmseg.labels.stats_csv).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from osmseg import atomic, datafiles, labels, tiles
from osmseg.classes import Classes, load_classes
from osmseg.commands import options
from osmseg.commands.labels import fill_osm_source, read_sample
from osmseg.errors import UserError

NAME = "filter"
HELP = "count label pixels per class and keep tiles above a ratio"


def add_arguments(parser) -> None:
    parser.add_argument("--sample", default="data/sample.txt", help="sampled tiles (lines `source z x y`)")
    parser.add_argument("--labels", default="data/labels/color", help="folder of label PNGs")
    options.add_classes(parser, "classes file the labels were drawn with")
    parser.add_argument(
        "--label-ratio", type=float, default=0.0, help="keep tiles whose labelled share of pixels exceeds this"
    )
    parser.add_argument("--count", type=int, default=None, help=f"tiles to keep (TRAIN_SIZE) {options.FROM_LIST}")
    # The stream the sample was drawn from, to draw more tiles from: as recorded in the sample.
    options.add_bbox(parser, f"the box the sample was drawn in {options.FROM_LIST}", default=None)
    parser.add_argument("--zoom", type=int, default=None, help=f"zoom of the sampled tiles {options.FROM_LIST}")
    parser.add_argument("--seed", type=int, default=None, help=f"the sample's random seed {options.FROM_LIST}")
    parser.add_argument("--all-tiles", default=None, help=f"OSM source tiles in the box {options.FROM_LIST}")
    options.add_osm_source(parser, default_osm=None, from_list=True)
    options.add_tile_size(parser)
    options.add_workers(parser, "processes to render more labels with")
    parser.add_argument("--out", default="data/sample-filtered.txt", help="kept tiles with their pixel counts")
    parser.add_argument("--stats", default="data/labels/label-stats.csv", help="per-class statistics (CSV)")


def _counts_of(path: Path, classes: Classes, classes_path: str, tile_size: int) -> np.ndarray:
    label = labels.read_label(path)
    if label.shape[:2] != (tile_size, tile_size):
        raise UserError(
            f"{path}: a {label.shape[1]}x{label.shape[0]} label, not --tile-size {tile_size}; "
            "delete data/labels/color and re-run `make data/labels/color` with this TILE_SIZE"
        )
    try:
        return labels.count_labels(label, classes)
    except ValueError as error:
        raise UserError(
            f"{path}: {error}; it was drawn with another classes file than {classes_path}: "
            "delete data/labels/color and re-run `make data/labels/color`"
        ) from None


def main(args) -> int:
    options.check_tile_size(args.tile_size)
    if args.count is not None and args.count <= 0:
        raise UserError(f"--count {args.count}: must be a positive number of tiles (TRAIN_SIZE)")
    if not 0 <= args.label_ratio < 1:
        raise UserError(f"--label-ratio {args.label_ratio}: must be at least 0 and below 1 (LABEL_RATIO)")
    sample = read_sample(args.sample)
    # Drawing more tiles needs the very stream the sample came from.
    options.check_record(args, sample.made_by, args.sample, ["bbox", "zoom", "seed", "all_tiles"])
    options.fill_from_record(
        args, sample.made_by, bbox=options.DEFAULT_BBOX, zoom=17, seed=0, all_tiles="data/all_tiles.txt", count=10000
    )
    fill_osm_source(args, sample.made_by)
    bbox = tiles.parse_bbox(args.bbox)
    zoom = tiles.check_zoom(args.zoom, "--zoom")
    classes = load_classes(args.classes)
    labels.check_filters(classes, str(args.classes))
    entries = sample.entries
    labels_dir = Path(args.labels)

    def counts_of(tile):
        return _counts_of(datafiles.label_path(labels_dir, tile), classes, str(args.classes), args.tile_size)

    in_sample = {tile for _, tile in entries}

    def more():
        # The same stream that drew data/sample.txt (same box, zoom, seed, source tiles),
        # read on past the tiles the sample already holds.
        within = datafiles.read_tile_list(args.all_tiles).entries
        for entry in tiles.sample_entries(bbox, zoom, args.seed, within):
            if entry[1] not in in_sample:
                yield entry

    sources = []  # opened once, at the first batch that needs labels

    def render(batch):
        if not sources:
            sources.append(options.open_osm_source(args, bbox))
        labels.render_labels(batch, sources[0], classes, labels_dir, args.tile_size, args.workers)

    try:
        kept, considered = labels.filter_tiles(entries, counts_of, args.label_ratio, args.count, more(), render)
    finally:
        for source in sources:
            source.close()
    if not kept:
        raise UserError(
            f"no tile in --bbox {args.bbox} has a labelled share above {args.label_ratio} "
            f"({considered} tiles looked at); lower LABEL_RATIO, or pick a BBOX or classes with data"
        )
    if len(kept) < args.count:
        print(
            f"filter: the box holds only {len(kept)} tiles whose labelled share exceeds {args.label_ratio} "
            f"(of {considered} tiles at z{args.zoom}), fewer than --count {args.count}; keeping all {len(kept)}",
            file=sys.stderr,
        )
    recorded = ["sample", "labels", "classes", "label_ratio", "count", "tile_size", "bbox", "zoom", "seed", "all_tiles"]
    datafiles.write_tile_list(
        args.out,
        [(source, tile) for source, tile, _ in kept],
        options.record(sample.made_by, NAME, args, recorded),
        columns=labels.count_columns(classes),
        counts=[counts for _, _, counts in kept],
    )
    atomic.write_text_atomic(args.stats, labels.stats_csv(labels.label_stats([counts for _, _, counts in kept], classes)))
    print(f"filter: kept {len(kept)} of {considered} tiles looked at, in {args.out}", file=sys.stderr)
    return 0
