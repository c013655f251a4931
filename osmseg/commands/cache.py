"""prepare.py cache: hold back a test set and cache images and labels to HDF5.

Writes data/test-sample-filtered.txt (the held-back tiles, a tile list like
data/sample-filtered.txt), data/training.hdf5 and data/testing.hdf5 (schema in osmseg.cache).
With --shard I/N, part I of each set into data/training.shard-I-of-N.hdf5 and
data/testing.shard-I-of-N.hdf5, which `prepare.py merge-cache` joins (osmseg.cache.merge).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from osmseg import atomic, datafiles
from osmseg.cache import merge
from osmseg.cache.build import BuildSummary, build_cache, default_workers, report, skipped_text, split_indices
from osmseg.classes import Classes, load_classes
from osmseg.commands import options
from osmseg.errors import UserError
from osmseg.shards import shard_path

NAME = "cache"
HELP = "hold back a test set and cache images and labels to HDF5"


def add_arguments(parser) -> None:
    add_split_arguments(parser)
    parser.add_argument("--workers", type=int, default=default_workers(), help="threads that decode and compress")
    options.add_shard(
        parser,
        "the training and the test set, drawn from the whole list first, into --out and --test-out "
        "with .shard-I-of-N before .hdf5 (join them with prepare.py merge-cache)",
    )


def add_split_arguments(parser) -> None:
    """The options that say which tiles go where: the cache stage's, and the merge's."""
    parser.add_argument("--sample", type=Path, default=Path("data/sample-filtered.txt"), help="the filtered tile list")
    parser.add_argument("--images", type=Path, default=Path("data/images"), help="imagery tiles {z}-{x}-{y}.jpg|png|webp")
    parser.add_argument("--labels", type=Path, default=Path("data/labels/color"), help="colour label tiles {z}-{x}-{y}.png")
    options.add_classes(parser, f"the classes file the labels use {options.FROM_LIST}, else {options.DEFAULT_CLASSES}", None)
    options.add_tile_size(parser, f"width and height of every tile, in pixels {options.FROM_LIST}, else 256", None)
    parser.add_argument(
        "--test-size", type=float, default=0.1,
        help="tiles held back for testing: a fraction (< 1, at least one tile) or a count (>= 1)",
    )
    parser.add_argument("--seed", type=int, default=None, help=f"random seed of the test draw {options.FROM_LIST}, else 0")
    parser.add_argument("--test-list", type=Path, default=Path("data/test-sample-filtered.txt"), help="where the held-back tiles are listed")
    parser.add_argument("--out", type=Path, default=Path("data/training.hdf5"), help="the training cache")
    parser.add_argument("--test-out", type=Path, default=Path("data/testing.hdf5"), help="the test cache")


def check_distinct(paths: dict[str, Path]) -> None:
    """Refuse two options that name one file (the second write would clobber the first)."""
    seen: dict[Path, str] = {}
    for option, path in paths.items():
        resolved = Path(path).resolve()
        if resolved in seen:
            raise UserError(f"{seen[resolved]} and {option} are both {path}; give each its own file")
        seen[resolved] = option


@dataclass
class Plan:
    """What the cache stage caches: the split of the whole list, the same with or without shards.

    Attributes:
        sample: the filtered tile list.
        classes: the classes the labels use.
        roles: {"training": (entries, --out), "testing": (entries, --test-out)}, entries in row order.
        params: the creation parameters every cache of this split records (seed, test size, sample).
    """

    sample: datafiles.TileList
    classes: Classes
    roles: dict[str, tuple[list, Path]]
    params: dict


def plan(args) -> Plan:
    """Hold back the test set from the tiles that have an image and a label, and list it in --test-list.

    The split is drawn on the whole list whatever --shard says, so that every shard (and the
    merge, osmseg.cache.merge) sees the same training and test sets.

    Raises:
        UserError: a missing or malformed list, bad options, fewer than 2 usable tiles.
    """
    sample = datafiles.read_tile_list(args.sample, make_hint="run `make data/sample-filtered.txt`")
    options.fill_from_record(
        args, sample.made_by, classes=options.DEFAULT_CLASSES, tile_size=options.DEFAULT_TILE_SIZE, seed=0
    )
    classes = load_classes(args.classes, require_filters=False)
    if args.test_size <= 0:
        raise UserError(f"--test-size {args.test_size}: must be positive; validate.py measures on the held-back test set")
    check_distinct({"--sample": args.sample, "--test-list": args.test_list, "--out": args.out, "--test-out": args.test_out})
    kept, missing = [], BuildSummary(args.out)
    for row, (source, tile) in enumerate(sample.entries):
        if datafiles.find_image(args.images, tile) is None:
            missing.skip(
                f"no image in {args.images} (not downloaded yet, or rejected: see rejected.txt and missing.txt there)",
                datafiles.tile_stem(tile),
            )
        elif not datafiles.label_path(args.labels, tile).is_file():
            missing.skip(f"no label in {args.labels} (run `make data/labels/color`)", datafiles.tile_stem(tile))
        else:
            kept.append(row)
    if missing.skipped:
        print(f"{args.sample}: {len(kept)} of {len(sample)} tiles have an image and a label{skipped_text(missing)}")
    if len(kept) < 2:
        raise UserError(
            f"{args.sample}: {len(kept)} tile(s) have both an image and a label; need at least 2 "
            "(one to train on, one to test on): run `make data/images` or sample more tiles"
        )
    train, test = split_indices(len(kept), args.test_size, args.seed)
    # Written only when it changes, so that make sees an unchanged file as up to date (and
    # shards writing it at once write the same bytes).
    held_back = [kept[i] for i in test]
    made_by = dict(sample.made_by, command=NAME, test_size=args.test_size, test_seed=args.seed)
    test_text = datafiles.format_tile_list(
        [sample.entries[row] for row in held_back],
        made_by,
        columns=sample.columns,
        counts=None if sample.counts is None else sample.counts[held_back],
    )
    if not args.test_list.exists() or args.test_list.read_text() != test_text:
        atomic.write_text_atomic(args.test_list, test_text)
    print(f"{args.test_list}: {len(test)} tiles held back for testing (seed {args.seed}), {len(train)} for training")
    roles = {
        "training": ([sample.entries[kept[i]] for i in train], args.out),
        "testing": ([sample.entries[kept[i]] for i in test], args.test_out),
    }
    params = {"seed": args.seed, "test_size": args.test_size, "sample": str(args.sample)}
    return Plan(sample, classes, roles, params)


def main(args) -> int:
    work = plan(args)
    for role, (entries, out) in work.roles.items():
        params = dict(work.params, role=role)
        if args.shard is not None:
            # This shard's run of the set's rows, recorded with the whole set's digest for the merge.
            params.update(merge.shard_params(entries, args.shard))
            start, stop = args.shard.bounds(len(entries))
            print(f"shard {args.shard}: {role} rows {start}..{stop - 1} of {len(entries)}" if stop > start
                  else f"shard {args.shard}: none of the {len(entries)} {role} rows")
            entries, out = args.shard.take(entries), shard_path(out, args.shard)
        summary = build_cache(
            entries, args.images, args.labels, work.classes, out, args.tile_size,
            params=params, workers=args.workers, allow_empty=args.shard is not None,
        )
        report(summary)
    return 0
