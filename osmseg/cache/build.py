"""Building caches: the streaming writer, the fingerprint that lets a re-run skip a build, and the
pipeline's tiles (data/images + data/labels/color) cached by `build_cache`.

Both writers (this one, and osmseg.cache.imports for your own image/mask pairs) stream
(memory independent of N: about 100 MB peak for 1,000 or 10,000 tiles, bench/bench_cache.py)
into a temporary file renamed onto the output only when complete, so an interrupted build
never leaves a file that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import h5py
import mercantile
import numpy as np

from osmseg import atomic
from osmseg.cache.schema import COMPRESSION, COMPRESSION_LEVEL, SCHEMA_VERSION, compress_tile, write_attrs
from osmseg.classes import IGNORE, Classes
from osmseg.datafiles import find_image, label_path, tile_stem
from osmseg.errors import CacheError, UserError
from osmseg.rasters import NotEightBit, read_rgb
from osmseg.shards import usable_cores

_WRITE_BLOCK = 32  # rows allocated at least, before the datasets double as they fill
_LIST_LIMIT = 20  # skipped items named in full before "... and N more"

Entry = tuple[str, mercantile.Tile]  # (source name, tile)
Log = Callable[[str], None]


# --- Small value types ------------------------------------------------------------------


@dataclass
class BuildSummary:
    """What a build did: tiles written, what it skipped and why, ignored pixels."""

    path: Path
    written: int = 0
    up_to_date: bool = False
    rebuilt_because: str | None = None
    skipped: dict[str, list[str]] = field(default_factory=dict)
    ignored_pixels: int = 0
    unknown_colors: Counter = field(default_factory=Counter)

    def skip(self, reason: str, name: str) -> None:
        self.skipped.setdefault(reason, []).append(name)

    @property
    def skipped_count(self) -> int:
        return sum(map(len, self.skipped.values()))


# --- Splitting ---------------------------------------------------------------------------


def held_back_count(n: int, size: float, what: str = "tiles") -> int:
    """How many of n items a test size holds back: a fraction (< 1) or a count (>= 1).

    A positive fraction holds back at least one item; at least one item is always kept.

    Raises:
        UserError: a negative size, a fractional count, or one that keeps nothing.
    """
    if not size >= 0 or not math.isfinite(size):
        raise UserError(f"test size {size}: must be a fraction below 1 or a whole count of {what}")
    if size >= 1:
        if size != int(size):
            raise UserError(f"test size {size}: a count of {what} must be a whole number (or pass a fraction < 1)")
        count = int(size)
    else:
        count = max(1, round(n * size)) if size > 0 else 0
    if count and count >= n:
        raise UserError(
            f"test size {size}: holding back {count} of {n} {what} leaves none to train on; "
            f"pass a smaller --test-size or provide more {what}"
        )
    return count


def split_indices(n: int, fraction: float, seed: int, what: str = "tiles") -> tuple[np.ndarray, np.ndarray]:
    """Split range(n) into (kept, held_back), reproducibly from the seed.

    Args:
        n: the number of items.
        fraction: how many to hold back: a fraction (< 1, at least one item when > 0)
            or a count (>= 1).
        seed: the random seed; the same (n, fraction, seed) always gives the same split.
        what: what the items are, for messages.

    Returns:
        Two sorted, disjoint int64 arrays whose union is range(n).
    """
    count = held_back_count(n, fraction, what)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[count:]).astype(np.int64), np.sort(order[:count]).astype(np.int64)


# --- Fingerprints: when may a re-run skip the build? ---------------------------------------


def digest(parts: Iterable[str]) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode())
        hasher.update(b"\n")
    return hasher.hexdigest()[:16]


def file_stamp(path: Path | None) -> str:
    if path is None:
        return "-"
    stat = path.stat()
    return f"{path.name} {stat.st_size} {stat.st_mtime_ns}"


# The order in which fingerprint parts are compared, and how a difference is explained.
FINGERPRINT_REASONS = {
    "classes": "the classes changed (another classes file, or its names or colours were edited)",
    "tile_size": "the tile size changed",
    "stride": "the stride changed",
    "tiles": "the tile list changed",
    "files": "image or label files changed on disk (re-downloaded or re-rendered)",
}


def _stale_reason(out_path: Path, fingerprint: dict) -> str | None:
    """None if out_path is a cache made from exactly these inputs, else why it is not.

    Raises:
        CacheError: out_path exists but is not one of our caches (never overwrite it).
    """
    try:
        with h5py.File(out_path, "r") as file:
            attrs = dict(file.attrs)
    except OSError:
        raise CacheError(
            f"{out_path}: exists but is not a readable HDF5 file; it is not overwritten: "
            "move or delete it, or pass another --out"
        ) from None
    if "schema_version" not in attrs or "params" not in attrs:
        raise CacheError(
            f"{out_path}: exists but is not an osmseg cache; it is not overwritten: move or delete it, or pass another --out"
        )
    if int(attrs["schema_version"]) != SCHEMA_VERSION:
        return f"it has schema version {attrs['schema_version']}, this osmseg writes {SCHEMA_VERSION}"
    try:
        old = json.loads(attrs["params"]).get("fingerprint", {})
    except (json.JSONDecodeError, AttributeError):
        return "its creation parameters are unreadable"
    for key, reason in FINGERPRINT_REASONS.items():
        if old.get(key) != fingerprint.get(key):
            if key in ("tile_size", "stride"):
                return f"{reason} ({old.get(key)} -> {fingerprint.get(key)})"
            return reason
    if old != fingerprint:
        return "its inputs changed"
    return None


def is_up_to_date(out_path: Path, fingerprint: dict) -> bool:
    """Whether out_path is a cache made from exactly the inputs this fingerprint describes.

    Raises:
        CacheError: out_path exists but is not one of our caches.
    """
    return out_path.exists() and _stale_reason(out_path, fingerprint) is None


def needs_build(out_path: Path, fingerprint: dict, summary: BuildSummary, log: Log) -> bool:
    """Decide whether to build; delete a stale cache first so it can never be used."""
    # A killed build (SIGKILL, power cut) leaves its temporary file (see atomic.atomic_path):
    # as large as the cache, hidden, and of no use, since a build never resumes half-way.
    for leftover in out_path.parent.glob(f".{out_path.stem}.*.partial{out_path.suffix}"):
        # .training.<random>.partial.hdf5 only: not a shard's (.training.shard-0-of-2.<random>...),
        # which may be in flight; atomic_path's random part has no dot.
        if "." in leftover.name[len(out_path.stem) + 2 : -len(".partial" + out_path.suffix)]:
            continue
        log(f"{leftover}: removing what an interrupted build left")
        leftover.unlink(missing_ok=True)
    if not out_path.exists():
        return True
    reason = _stale_reason(out_path, fingerprint)
    if reason is None:
        with h5py.File(out_path, "r") as file:
            summary.written = len(file["images"])
        summary.up_to_date = True
        log(f"{out_path}: up to date ({summary.written} tiles), not rebuilt")
        return False
    # Removing it now means an interrupted rebuild leaves no cache rather than a stale one.
    log(f"{out_path}: rebuilding: {reason}")
    summary.rebuilt_because = reason
    out_path.unlink()
    return True


# --- The streaming writer ----------------------------------------------------------------


class Writer:
    """Appends compressed tiles to an open HDF5 file; memory independent of N."""

    def __init__(self, file: h5py.File, tile_size: int, expected: int = 0):
        self.count = 0
        self._meta: list[tuple[tuple[int, int, int], str]] = []
        size = tile_size
        initial = max(expected, _WRITE_BLOCK)
        pixels = {"compression": COMPRESSION, "compression_opts": COMPRESSION_LEVEL}
        self.images = file.create_dataset(
            "images", (initial, size, size, 3), np.uint8, maxshape=(None, size, size, 3),
            chunks=(1, size, size, 3), **pixels,
        )
        self.labels = file.create_dataset(
            "labels", (initial, size, size), np.uint8, maxshape=(None, size, size),
            chunks=(1, size, size), **pixels,
        )
        self.tiles = file.create_dataset("tiles", (0, 3), np.int32, maxshape=(None, 3), chunks=(1024, 3), **pixels)
        self.sources = file.create_dataset(
            "sources", (0,), h5py.string_dtype("utf-8"), maxshape=(None,), chunks=(1024,)
        )

    def append(self, chunks: tuple[bytes, bytes], tile: tuple[int, int, int], source: str) -> None:
        """Add one tile: its compress_tile chunks, its z x y and its source name."""
        row = self.count
        if row >= self.images.shape[0]:
            grown = 2 * self.images.shape[0]
            self.images.resize(grown, axis=0)
            self.labels.resize(grown, axis=0)
        self.images.id.write_direct_chunk((row, 0, 0, 0), chunks[0])
        self.labels.id.write_direct_chunk((row, 0, 0), chunks[1])
        self._meta.append((tile, source))
        self.count += 1
        if len(self._meta) >= 1024:
            self._flush_meta()

    def _flush_meta(self) -> None:
        start, stop = self.tiles.shape[0], self.tiles.shape[0] + len(self._meta)
        self.tiles.resize(stop, axis=0)
        self.sources.resize(stop, axis=0)
        self.tiles[start:stop] = np.array([tile for tile, _ in self._meta], dtype=np.int32).reshape(-1, 3)
        self.sources[start:stop] = [source for _, source in self._meta]
        self._meta.clear()

    def close(self) -> int:
        """Write what is buffered and trim the datasets to the tiles written; returns their number."""
        if self._meta:
            self._flush_meta()
        self.images.resize(self.count, axis=0)
        self.labels.resize(self.count, axis=0)
        return self.count


def ordered_map(function: Callable, items: Iterable, workers: int, window: int | None = None) -> Iterator:
    """function(item) for every item, in order, by up to `workers` threads.

    At most `window` (default 4 x workers) items are in flight or waiting, so memory stays
    bounded however many items there are.
    """
    if workers <= 1:
        yield from map(function, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= (window or 4 * workers):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def default_workers() -> int:
    """Threads for building: the cores this process may use (a job's allocation), at most 8."""
    return max(1, min(8, usable_cores()))


def progress_bar(total: int | None, description: str, unit: str = "tile"):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, leave=False)


class PairWords(NamedTuple):
    """How read_pair names what is wrong with an image and its label (or mask): skip reasons."""

    image_unreadable: str
    other_unreadable: str
    sizes_differ: str
    sizes_name: str = "{stem} ({image} vs {other})"  # names the pair whose sizes differ


def read_pair(image_path: Path, other_path: Path, stem: str, words: PairWords):
    """Read an image and its label or mask, both RGB uint8 of one size.

    Returns:
        (image, other, None), or (None, None, (reason, name)) saying why the pair is skipped:
        samples that are not 8-bit, a file that cannot be decoded, sizes that differ.
    """
    try:
        image = read_rgb(image_path)
    except NotEightBit as error:
        return None, None, (f"image has {error}", image_path.name)
    try:
        other = read_rgb(other_path)
    except NotEightBit as error:
        return None, None, (f"mask or label has {error}", other_path.name)
    if image is None:
        return None, None, (words.image_unreadable, image_path.name)
    if other is None:
        return None, None, (words.other_unreadable, other_path.name)
    if image.shape != other.shape:
        name = words.sizes_name.format(stem=stem, image=size_text(image), other=size_text(other))
        return None, None, (words.sizes_differ, name)
    return image, other, None


def unknown_colors(rgb: np.ndarray, labels: np.ndarray, limit: int = 5) -> Counter:
    """The most frequent mask colours that no class lists (for the report)."""
    unknown = rgb[labels == IGNORE]
    if not len(unknown):
        return Counter()
    colors, counts = np.unique(unknown.reshape(-1, 3), axis=0, return_counts=True)
    top = np.argsort(counts)[::-1][:limit]
    return Counter({"#{:02x}{:02x}{:02x}".format(*colors[i]): int(counts[i]) for i in top})


@dataclass
class Prepared:
    """A worker's result: compressed tiles ready to append, or why the input was skipped."""

    chunks: list = field(default_factory=list)
    tile: tuple[int, int, int] = (-1, -1, -1)
    source: str = ""
    ignored: int = 0
    unknown: Counter = field(default_factory=Counter)
    skip: tuple[str, str] | None = None

    def add_to(self, writer: Writer, summary: BuildSummary) -> None:
        if self.skip:
            summary.skip(*self.skip)
            return
        for chunks in self.chunks:
            writer.append(chunks, self.tile, self.source)
        summary.ignored_pixels += self.ignored
        summary.unknown_colors.update(self.unknown)


# --- Writer 1: the pipeline's tiles --------------------------------------------------------


Resolved = tuple[str, mercantile.Tile, "Path | None", "Path | None"]  # source, tile, image, label


def resolve_entries(entries: Iterable[Entry], images_dir: Path, labels_dir: Path) -> list[Resolved]:
    """Each entry with its image and label files (None where there is none)."""
    resolved = []
    for source, tile in entries:
        tile = mercantile.Tile(*tile)
        label = label_path(labels_dir, tile)
        resolved.append((source, tile, find_image(images_dir, tile), label if label.is_file() else None))
    return resolved


def tiles_fingerprint(resolved: Sequence[Resolved], classes: Classes, tile_size: int) -> dict:
    """The fingerprint build_cache records for these tiles: a cache of them is up to date while it holds."""
    return {
        "classes": digest([classes.to_json()]),
        "tile_size": int(tile_size),
        "tiles": tiles_digest((source, tile) for source, tile, _, _ in resolved),
        "files": digest(f"{file_stamp(image)} {file_stamp(label)}" for _, _, image, label in resolved),
    }


def tiles_digest(entries: Iterable[Entry]) -> str:
    """The fingerprint's `tiles`: which tiles, of which source, in which order."""
    return digest(f"{source} {tile.z} {tile.x} {tile.y}" for source, tile in entries)



_TILE_WORDS = PairWords(
    "corrupt image (delete it and re-download)",
    "corrupt label (delete it and re-render)",
    "image and label sizes differ",
)


def build_cache(
    entries: Sequence[Entry],
    images_dir: str | os.PathLike,
    labels_dir: str | os.PathLike,
    classes: Classes,
    out_path: str | os.PathLike,
    tile_size: int,
    *,
    params: dict | None = None,
    log: Log = print,
    workers: int | None = None,
    allow_empty: bool = False,
) -> BuildSummary:
    """Cache the images and colour labels of these tiles to out_path, streaming.

    Skips the build when out_path was made from the same inputs (classes, tile list, tile
    size, and the size and time of every image and label file); rebuilds it, saying why,
    when any of them changed.

    Args:
        entries: (source name, Tile) pairs, in the order the rows will have.
        images_dir: holds {z}-{x}-{y}.jpg|png|webp.
        labels_dir: holds {z}-{x}-{y}.png colour labels (#0i0i0i = class i).
        classes: the classes whose colours the labels use.
        out_path: the .hdf5 file to write.
        tile_size: the expected width and height of every image and label.
        params: extra creation parameters to record (seed, test size...).
        log: where progress messages go.
        workers: threads that decode and compress (default: cores, at most 8); the file
            is the same whatever their number.
        allow_empty: write a cache of no rows rather than fail when no tile can be cached
            (a shard's part, which osmseg.cache.merge joins with the others).

    Returns:
        What was written and skipped (tiles without image or label, corrupt files,
        sizes that differ).

    Raises:
        CacheError: nothing could be cached, or out_path is a file that is not ours.
    """
    images_dir, labels_dir, out_path = Path(images_dir), Path(labels_dir), Path(out_path)
    workers = default_workers() if workers is None else workers
    summary = BuildSummary(out_path)
    if tile_size < 1:
        raise CacheError(f"tile size {tile_size}: must be a positive number of pixels")
    resolved = resolve_entries(entries, images_dir, labels_dir)
    fingerprint = tiles_fingerprint(resolved, classes, tile_size)
    if not needs_build(out_path, fingerprint, summary, log):
        return summary

    record = {"command": "cache", "tile_size": int(tile_size), "tiles_listed": len(resolved)}
    record.update(params or {})

    def prepare(item) -> Prepared:
        # Runs in a worker thread: decoding, colour lookup and compression release the GIL.
        source, tile, image_path, label_file = item
        stem = tile_stem(tile)
        if image_path is None:
            return Prepared(skip=("no image (run `prepare.py images`)", stem))
        if label_file is None:
            return Prepared(skip=("no label (run `prepare.py labels`)", stem))
        image, rgb, problem = read_pair(image_path, label_file, stem, _TILE_WORDS)
        if problem:
            return Prepared(skip=problem)
        if image.shape[:2] != (tile_size, tile_size):
            reason = f"not {tile_size}x{tile_size} (pass the --tile-size they were made with)"
            return Prepared(skip=(reason, f"{stem} ({size_text(image)})"))
        labels, ignored = classes.colors_to_labels(rgb)
        unknown = unknown_colors(rgb, labels) if ignored else Counter()
        return Prepared([compress_tile(image, labels)], (tile.z, tile.x, tile.y), source, ignored, unknown)

    meta = (classes, tile_size, record, fingerprint)
    write_cache(out_path, resolved, prepare, workers, summary, meta, expected=len(resolved),
                nothing=None if allow_empty else "no tile could be cached")
    return summary


def write_cache(
    out_path: Path, items: Sequence, prepare: Callable, workers: int, summary: BuildSummary, meta: tuple, **options
) -> None:
    """Write the cache out_path from `items`, each turned into a Prepared by `prepare` in worker threads.

    Args:
        out_path: the .hdf5 file, written under a temporary name and renamed when complete.
        items: what `prepare` takes, in row order.
        prepare: item -> Prepared (runs in worker threads; results are written in order).
        workers: threads.
        summary: filled with what was written and skipped.
        meta: (classes, tile_size, record, fingerprint) for the file's attributes.
        options: expected (rows to allocate at first), window (items in flight, default
            4 × workers), unit and description of the progress bar, nothing (the message
            when no row could be written; None: write a file of no rows).

    Raises:
        CacheError: no row could be written (naming what was skipped).
    """
    classes, tile_size, record, fingerprint = meta
    description = options.get("description", f"caching {out_path.name}")
    with atomic.atomic_path(out_path) as tmp, h5py.File(tmp, "w") as file:
        writer = Writer(file, tile_size, expected=options.get("expected", 0))
        with progress_bar(len(items), description, options.get("unit", "tile")) as bar:
            for prepared in ordered_map(prepare, items, workers, window=options.get("window")):
                bar.update()
                prepared.add_to(writer, summary)
        summary.written = writer.close()
        if not summary.written and options.get("nothing", "") is not None:
            raise CacheError(f"{out_path}: {options.get('nothing', 'nothing could be cached')}{skipped_text(summary)}")
        record.update(written=summary.written, skipped=summary.skipped_count, ignored_pixels=summary.ignored_pixels)
        write_attrs(file, classes, tile_size, dict(record, fingerprint=fingerprint))


def size_text(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


def skipped_text(summary: BuildSummary) -> str:
    lines = []
    for reason, names in summary.skipped.items():
        shown = ", ".join(names[:_LIST_LIMIT])
        more = f" ... and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
        lines.append(f"\n  skipped {len(names)}: {reason}: {shown}{more}")
    return "".join(lines)


def report(summary: BuildSummary, log: Log = print) -> None:
    """Say what a build wrote and skipped, and which colours became the ignore value."""
    if summary.up_to_date:
        return
    text = f"{summary.path}: {summary.written} tiles written{skipped_text(summary)}"
    if summary.ignored_pixels:
        colors = ", ".join(f"{color} ({count} px)" for color, count in summary.unknown_colors.most_common(5))
        text += (
            f"\n  {summary.ignored_pixels} pixels have colours no class lists and became the ignore "
            f"value {IGNORE} (skipped by training and metrics); most frequent: {colors}"
        )
    log(text)

