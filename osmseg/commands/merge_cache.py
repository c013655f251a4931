"""prepare.py merge-cache: join the shard caches of `prepare.py cache --shard I/N` into one of each.

Reads data/training.shard-I-of-N.hdf5 and data/testing.shard-I-of-N.hdf5 for I = 0..N-1 and
writes data/training.hdf5 and data/testing.hdf5, equal to what `prepare.py cache` writes
without shards (osmseg.cache.merge says what "equal" means and how). It takes the cache
stage's options, with the same defaults, to draw the same split from the tile list and
refuse shards that were made otherwise; every shard is checked before anything is written.
A merged cache that is up to date is left as it is, so a re-run does nothing, even once the
shard files are deleted.
"""

from __future__ import annotations

from osmseg.cache import merge
from osmseg.cache.build import (
    BuildSummary,
    is_up_to_date,
    needs_build,
    resolve_entries,
    tiles_digest,
    tiles_fingerprint,
)
from osmseg.commands import cache, options
from osmseg.shards import Shard

NAME = "merge-cache"
HELP = "join the shard caches of `cache --shard I/N` into one training and one test cache"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--shards", type=options.positive_int, required=True, metavar="N",
        help="how many shards the caches were made in (cache --shard I/N, I = 0..N-1; the Makefile's SHARDS)",
    )
    cache.add_split_arguments(parser)


def main(args) -> int:
    work = cache.plan(args)
    count = args.shards
    checked = []
    for role, (entries, out) in work.roles.items():
        # The fingerprints an unsharded build, and each shard's re-run, would compute now.
        resolved = resolve_entries(entries, args.images, args.labels)
        fingerprint = tiles_fingerprint(resolved, work.classes, args.tile_size)
        if is_up_to_date(out, fingerprint):
            print(f"{out}: up to date, not merged again")
            continue
        parts = [slice(*Shard(index, count).bounds(len(resolved))) for index in range(count)]
        expected = merge.Expected(
            out=out,
            count=count,
            classes=work.classes,
            tile_size=args.tile_size,
            role=role,
            settings={"seed": args.seed, "test_size": args.test_size},
            split=tiles_digest(entries),
            split_rows=len(entries),
            fingerprints=[tiles_fingerprint(resolved[part], work.classes, args.tile_size) for part in parts],
        )
        shards = [merge.check_shard(expected, index) for index in range(count)]
        checked.append((role, out, shards, fingerprint))
    # Only once every shard of both caches passed: nothing is written for a merge that would fail.
    for role, out, shards, fingerprint in checked:
        # As a build does: a stale cache goes first, so that an interrupted merge leaves none.
        needs_build(out, fingerprint, BuildSummary(out), print)
        merge.merge(shards, out, work.classes, args.tile_size, dict(work.params, role=role), fingerprint)
    return 0
