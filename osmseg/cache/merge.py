"""Shard caches: what `prepare.py cache --shard I/N` records in each, and joining them into one cache.

How the cache stage splits. The test split is drawn first, on the whole list, exactly as
without shards: the tiles of data/sample-filtered.txt that have an image and a label, split
by SEED (osmseg.cache.build.split_indices). So the held-back tiles are the same whatever the
sharding. Then shard I of N caches the I-th of N runs of consecutive rows of the training set
(lengths within one, osmseg.shards.Shard.bounds) into ``training.shard-I-of-N.hdf5``, and
the same of the test set into ``testing.shard-I-of-N.hdf5`` (names from --out and --test-out,
osmseg.shards.shard_path). Consecutive rows rather than the labels and imagery stages' map
order, because a cache's rows have an order: the shards, joined in order, are the rows of
the unsharded cache. A shard may hold no rows (a test set smaller than N, or a part whose
files are all unusable); it is still written, so that the merge knows it was done.

Each shard file is a cache of the usual schema (osmseg.cache.schema) whose ``params``
record has, besides what `prepare.py cache` records, ``shard`` ({"index": I, "count": N}),
``split`` (the fingerprint digest of the whole training or test set's tiles, every shard's,
in order), ``split_rows`` (their number) and ``rows`` ([start, stop) of this part). Its
``fingerprint`` is its own part's, so each shard is skipped on a re-run when its inputs
did not change, like any cache.

Joining (`prepare.py merge-cache`, `merge`): every shard's compressed chunks are copied as
they are (read_direct_chunk, then write_direct_chunk: no inflating or deflating, so the
bytes are the unsharded build's), in shard order, into a new file written under a temporary
name and renamed when complete. Not an HDF5 virtual dataset over the shard files: a virtual
dataset has no chunks of its own, so the cache reader's threaded raw-chunk path
(osmseg.cache.schema.read_rows) would fall back to h5py's filter pipeline under its global
lock, and every host that trains would need the N shard files at the same paths for good.
The copy reads and writes the compressed bytes once.

What "equal to the unsharded cache" means, and is tested: the datasets ``images``,
``labels``, ``tiles`` and ``sources`` hold the same values in the same order, with the same
shapes, chunks and compression (and the same compressed chunk bytes); the attributes
``classes``, ``tile_size`` and ``schema_version`` are the same; ``params`` is the same JSON
record with one key more, ``merged_from`` ({"shards": N, "files": [names]}), and so the same
``fingerprint``: a later unsharded `prepare.py cache` finds the merged file up to date. The
files are not equal byte for byte (HDF5 places the chunks itself).

Before writing anything the merge checks every shard: present, a shard cache, the shard its
name says (a copy of another shard is a duplicate), made with the same classes, tile size,
seed and test size as this merge, from the same split of the same tiles, and up to date
(its part's images and labels unchanged since it was built, the check a re-run of the
shard would make). A shard that fails is named with the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from osmseg import atomic
from osmseg.cache.build import FINGERPRINT_REASONS, BuildSummary, Log, Writer, tiles_digest
from osmseg.cache.schema import SCHEMA_VERSION, inflatable, write_attrs
from osmseg.classes import Classes
from osmseg.errors import CacheError
from osmseg.shards import Shard, shard_path

SHARD_KEYS = ("shard", "split", "split_rows", "rows")  # what a shard records beyond a plain cache
_BLOCK = 1024  # rows of tiles and sources read at a time


def shard_params(role_entries, shard: Shard) -> dict:
    """What shard `shard` of a training or test set records in its cache's params."""
    start, stop = shard.bounds(len(role_entries))
    return {
        "shard": shard.record(),
        "split": tiles_digest(role_entries),
        "split_rows": len(role_entries),
        "rows": [start, stop],
    }


@dataclass(frozen=True)
class Expected:
    """What every shard of one cache must have been made with, and how to remake one.

    Attributes:
        out: the merged cache's path (shard files are named after it).
        count: the number of shards.
        classes: the classes this merge uses.
        tile_size: the tile size this merge uses.
        role: "training" or "testing".
        settings: the creation parameters that must agree ({"seed": .., "test_size": ..}).
        split: tiles_digest of the whole set's tiles; split_rows: their number.
        fingerprints: each shard's part's fingerprint as a build now would compute it.
        make_target: the make target whose rule builds the shards (data/training.hdf5).
    """

    out: Path
    count: int
    classes: Classes
    tile_size: int
    role: str
    settings: dict
    split: str
    split_rows: int
    fingerprints: list[dict]
    make_target: str = "data/training.hdf5"


@dataclass(frozen=True)
class ShardFile:
    path: Path
    shard: Shard
    length: int
    params: dict


def _remake(expected: Expected, index: int) -> str:
    count = expected.count
    return f"`prepare.py cache --shard {index}/{count}` (`make {expected.make_target} SHARD={index} SHARDS={count}`)"


def check_shard(expected: Expected, index: int) -> ShardFile:
    """Shard `index` of the cache `expected` describes, checked before anything is merged.

    Raises:
        CacheError: missing, not a shard cache, another shard (a duplicate), made with other
            settings or from another split, or out of date; naming the file and the fix.
    """
    shard = Shard(index, expected.count)
    path = shard_path(expected.out, shard)
    remake = _remake(expected, index)
    fix = f"remake it with {remake}"
    if not path.exists():
        others = sorted(p.name for p in path.parent.glob(f"{expected.out.stem}.shard-*-of-*{expected.out.suffix}"))
        found = ""
        if others:
            shown = ", ".join(others[:4]) + (" ..." if len(others) > 4 else "")
            found = f" (there are {shown}: if those are the shards, pass the --shards they were made with)"
        raise CacheError(f"{path}: no such shard cache (shard {shard} of {expected.out}); make it with {remake}{found}")
    try:
        with h5py.File(path, "r") as file:
            attrs = dict(file.attrs)
            params = json.loads(attrs["params"])
            images, labels = file["images"], file["labels"]
            length = images.shape[0]
            layout_ok = (
                inflatable(images) and inflatable(labels) and labels.shape == images.shape[:3]
                and file["tiles"].shape == (length, 3) and file["sources"].shape == (length,)
            )
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise CacheError(f"{path}: not a readable shard cache ({error}); delete it, then {fix}") from None
    recorded = params.get("shard")
    if int(attrs.get("schema_version", -1)) != SCHEMA_VERSION or not isinstance(recorded, dict) or not layout_ok:
        raise CacheError(f"{path}: not a shard cache made by `prepare.py cache --shard`; delete it, then {fix}")
    if (recorded.get("index"), recorded.get("count")) != (index, expected.count):
        raise CacheError(
            f"{path}: holds shard {recorded.get('index')}/{recorded.get('count')}, not {shard} (a copy or a renamed "
            f"shard: that shard would be merged twice); delete it, then {fix}"
        )
    what = f"{path}: made with"
    if attrs.get("classes") != expected.classes.to_json():
        raise CacheError(
            f"{what} other classes (names or colours) than this merge: give merge-cache the shards' --classes, "
            f"or {fix} and this --classes"
        )
    if int(attrs.get("tile_size", -1)) != expected.tile_size:
        raise CacheError(
            f"{what} --tile-size {attrs.get('tile_size')}, this merge {expected.tile_size}: give merge-cache the "
            f"shards' --tile-size, or {fix} and --tile-size {expected.tile_size}"
        )
    if params.get("role") != expected.role:
        raise CacheError(f"{path}: a shard of the {params.get('role')} cache, not the {expected.role} one; {fix}")
    for key, value in expected.settings.items():
        if params.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise CacheError(
                f"{what} {flag} {params.get(key)}, this merge {value}: give merge-cache the options the shards "
                f"were made with, or {fix} and {flag} {value}"
            )
    if params.get("split") != expected.split or params.get("split_rows") != expected.split_rows:
        raise CacheError(
            f"{path}: made from another split ({params.get('split_rows')} {expected.role} tiles, now "
            f"{expected.split_rows}): the tile list, or which of its tiles have an image and a label, changed "
            f"since; {fix}"
        )
    rows = list(shard.bounds(expected.split_rows))
    if list(params.get("rows", [])) != rows:
        raise CacheError(f"{path}: holds rows {params.get('rows')}, shard {shard} is rows {rows}; {fix}")
    old, new = params.get("fingerprint", {}), expected.fingerprints[index]
    if old != new:
        changed = (text for key, text in FINGERPRINT_REASONS.items() if old.get(key) != new.get(key))
        reason = next(changed, "its inputs changed")
        raise CacheError(f"{path}: out of date: {reason} since it was built; {fix}")
    if params.get("written") != length:
        raise CacheError(
            f"{path}: holds {length} rows, its record says {params.get('written')}; delete it, then {fix}"
        )
    return ShardFile(path, shard, int(length), params)


def merge(
    shards: list[ShardFile],
    out_path: Path,
    classes: Classes,
    tile_size: int,
    params: dict,
    fingerprint: dict,
    log: Log = print,
) -> BuildSummary:
    """Join checked shard caches (check_shard, in shard order) into out_path, as one build would write it.

    Args:
        shards: every shard, in order.
        out_path: the cache to write (under a temporary name, renamed when complete).
        classes, tile_size: the cache's.
        params: the creation parameters an unsharded build records (seed, test size, sample, role).
        fingerprint: the whole set's fingerprint, as an unsharded build computes it.
        log: where progress messages go.

    Raises:
        CacheError: no shard holds a tile, or a chunk stored in a way the cache never writes.
    """
    summary = BuildSummary(Path(out_path))
    total = sum(shard.length for shard in shards)
    if not total:
        skipped = sum(shard.params.get("skipped", 0) for shard in shards)
        raise CacheError(
            f"{out_path}: no tile could be cached: its {len(shards)} shards hold none ({skipped} skipped when they "
            "were built: see their logs)"
        )
    record = {"command": "cache", "tile_size": int(tile_size), "tiles_listed": shards[0].params["split_rows"]}
    record.update(params)
    record.update(
        written=total,
        skipped=sum(shard.params.get("skipped", 0) for shard in shards),
        ignored_pixels=sum(shard.params.get("ignored_pixels", 0) for shard in shards),
        merged_from={"shards": len(shards), "files": [shard.path.name for shard in shards]},
    )
    with atomic.atomic_path(out_path) as tmp, h5py.File(tmp, "w") as file:
        writer = Writer(file, tile_size, expected=total)
        for shard in shards:
            with h5py.File(shard.path, "r") as source:
                _copy_rows(source, shard, writer)
        summary.written = writer.close()
        write_attrs(file, classes, tile_size, dict(record, fingerprint=fingerprint))
    log(f"{out_path}: {summary.written} tiles merged from {len(shards)} shards")
    return summary


def _copy_rows(source: h5py.File, shard: ShardFile, writer: Writer) -> None:
    images, labels = source["images"].id, source["labels"].id
    for start in range(0, shard.length, _BLOCK):
        stop = min(start + _BLOCK, shard.length)
        tiles = np.asarray(source["tiles"][start:stop])
        names = source["sources"].asstr()[start:stop]
        for offset, row in enumerate(range(start, stop)):
            image_mask, image = images.read_direct_chunk((row, 0, 0, 0))
            label_mask, label = labels.read_direct_chunk((row, 0, 0))
            if image_mask or label_mask:
                # The writer always stores gzip chunks (filter mask 0); another mask means
                # some other tool wrote this file.
                raise CacheError(
                    f"{shard.path}: row {row} is not stored as prepare.py cache stores rows; rebuild the shard"
                )
            writer.append((image, label), tuple(int(v) for v in tiles[offset]), names[offset])
