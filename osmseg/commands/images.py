"""prepare.py images: download the imagery tiles of the filtered sample.

Writes data/images/{z}-{x}-{y}.{jpg,png,webp}, rejected.txt and missing.txt (formats in
osmseg.imagery.download), resumably, and ends with a summary and how many tiles have both a
label and an image. With --shard I/N, only part I of the list's tiles (osmseg.shards); shards
may run at once into one folder (a shared filesystem): each touches only its own tiles' files,
and they take turns at rejected.txt and missing.txt.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import mercantile

from osmseg import shards
from osmseg.commands import options
from osmseg.datafiles import MISSING, REJECTED, find_image, label_path, read_tile_list, read_tile_log, tile_stem
from osmseg.errors import SourceError, UserError
from osmseg.imagery import DownloadSummary, download_tiles

NAME = "images"
HELP = "download the imagery tiles of the filtered sample"


def add_arguments(parser) -> None:
    parser.add_argument("--sample", type=Path, default=Path("data/sample-filtered.txt"),
                        help="tiles to download (`source z x y ...` lines)")
    options.add_image_tiles(parser)
    parser.add_argument("--out", type=Path, default=Path("data/images"), help="images directory")
    parser.add_argument("--labels", type=Path, default=Path("data/labels/color"),
                        help="label PNGs, to report how many tiles have both a label and an image")
    parser.add_argument("--workers", type=int, default=8, help="concurrent downloads")
    parser.add_argument("--rps", type=options.rps, default=None, help="at most this many requests per second (none: no limit)")
    parser.add_argument("--tile-size", type=int, default=None,
                        help=f"every image must be this many pixels wide and high {options.FROM_LIST}, else 256")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a server before retrying")
    parser.add_argument("--retries", type=int, default=5, help="retries per tile (timeouts, 5xx, cut transfers)")
    parser.add_argument("--retry-rejected", action="store_true",
                        help="ask again for tiles an earlier run rejected (listed in rejected.txt)")
    options.add_shard(parser, "the list's tiles")


def training_set_report(entries: Sequence[tuple[str, mercantile.Tile]], images: Path, labels: Path,
                        summary: DownloadSummary | None = None) -> str:
    """Say how many sampled tiles have both a label and an accepted image, and why others lack one."""
    tiles = list(dict.fromkeys(tile for _, tile in entries))
    with_label = {t for t in tiles if label_path(labels, t).is_file()}
    with_image = {t for t in tiles if find_image(images, t) is not None}
    both = with_label & with_image
    short = len(tiles) - len(both)
    text = f"training set: {len(both)} of {len(tiles)} sampled tiles have both a label and an accepted image"
    if short:
        reasons = []
        rejected = read_tile_log(images / REJECTED)
        missing = read_tile_log(images / MISSING)
        failed = summary.failed if summary else {}
        no_image = [t for t in tiles if t not in with_image]
        counts = {
            "rejected": sum(tile_stem(t) in rejected for t in no_image),
            "missing imagery": sum(tile_stem(t) in missing for t in no_image),
            "failed": sum(tile_stem(t) in failed for t in no_image),
        }
        counts["no image for another reason"] = len(no_image) - sum(counts.values())
        counts["without a label"] = len(with_image - with_label)
        reasons = [f"{n} {what}" for what, n in counts.items() if n]
        text += f" ({short} short: {', '.join(reasons)})"
    return text


def main(args) -> int:
    token = options.token(args)
    listed = read_tile_list(args.sample, make_hint="run `make data/sample-filtered.txt`")
    options.fill_from_record(args, listed.made_by, tile_size=options.DEFAULT_TILE_SIZE)
    entries = listed.entries
    if args.shard is not None:
        entries = shards.pick(entries, args.shard, tile_of=lambda entry: entry[1])
        print(f"images: shard {args.shard}: {len(entries)} of the {len(listed)} tiles of {args.sample}")
    if args.tile_size < 1:
        raise UserError(f"--tile-size {args.tile_size}: give a positive number of pixels")
    if args.retries < 0:
        raise UserError(f"--retries {args.retries}: give zero or more")
    # Every tile already there (or rejected before)? Then do not even open the source: a
    # TileJSON request is a billed API call, and the demo server takes seconds to start.
    rejected = {} if args.retry_rejected else read_tile_log(args.out / REJECTED)
    pending = [t for _, t in entries if find_image(args.out, t) is None and tile_stem(t) not in rejected]
    if not pending:
        print(f"images: all {len(entries)} tiles are in {args.out} already (or were rejected); nothing to download")
        print(training_set_report(entries, args.out, args.labels))
        return 0
    source = options.open_imagery(args.image_tiles, token, timeout=args.timeout)
    with source:
        print(f"imagery: {len(entries)} tiles from {source.description} into {args.out}", file=sys.stderr)
        try:
            summary = download_tiles((tile for _, tile in entries), source, args.out, workers=args.workers,
                                     rps=args.rps, tile_size=args.tile_size, timeout=args.timeout,
                                     retries=args.retries, retry_rejected=args.retry_rejected,
                                     shared_folder=args.shard is not None)
        except SourceError as error:
            if getattr(error, "summary", None) is not None:
                print(error.summary.line())
            raise
    print(summary.line())
    if summary.missing and len(summary.missing) == summary.requested - summary.rejected_before:
        zooms = sorted({t.z for _, t in entries})
        raise SourceError(
            f"{source.description} has none of the {len(summary.missing)} tiles "
            f"({next(iter(summary.missing.values()))}): does it serve zoom {', '.join(map(str, zooms))} "
            "in this area? Check ZOOM_LEVEL, BBOX and the template in IMAGE_TILES"
        )
    for title, entries_ in (("failed", summary.failed), ("rejected", summary.rejected), ("missing", summary.missing)):
        for stem, reason in list(entries_.items())[:5]:
            print(f"  {title} {stem}: {source.redact(reason)}")
        if len(entries_) > 5:
            print(f"  ... {len(entries_) - 5} more {title}" + (f" (see {args.out / (title + '.txt')})"
                                                              if title != "failed" else ""))
    if summary.rejected or summary.rejected_before:
        print(f"rejected tiles are listed in {args.out / 'rejected.txt'} and not asked for again; "
              "pass --retry-rejected to ask anyway")
    print(training_set_report(entries, args.out, args.labels, summary))
    if summary.failed:
        print(f"{len(summary.failed)} tiles failed; re-run to retry them (finished tiles are kept)", file=sys.stderr)
        return 1
    return 0
