"""The HDF5 training cache: its schema, its two writers and its streaming readers.

`prepare.py cache` builds data/training.hdf5 and data/testing.hdf5 from the pipeline's
imagery (data/images) and colour labels (data/labels/color), holding back a reproducible test
set listed in data/test-sample-filtered.txt. `prepare.py import` builds the same kind of file
from your own image/mask pairs. train.py and validate.py read it in batches, never whole.

Schema (schema_version 1), one row per tile, N rows::

    images    uint8  (N, H, W, 3)  RGB, H = W = tile_size
    labels    uint8  (N, H, W)     class index: 0 background, i the i-th class of the
                                   classes file, 255 ignore (training and metrics skip it)
    tiles     int32  (N, 3)        z, x, y of the tile (-1, -1, -1 for imported data)
    sources   str    (N,)          variable-length UTF-8: the OSM source name (`demo`,
                                   `united_kingdom`...) or, for imported data, the image's
                                   file-name stem

    attrs:
    classes         str   the classes file as Classes.to_json() (names and colours)
    tile_size       int   H (= W)
    schema_version  int   1
    params          str   JSON: how the file was made (command, tile size, seed, counts...)
                          and `fingerprint`, the hashes of its inputs that decide whether a
                          re-run may skip the build

`images` and `labels` are chunked one tile per chunk, so that reading one tile reads (and
decompresses) one chunk, and compressed with gzip level 1: 0.17 MB a 256-pixel tile (0.26 MB
raw). gzip rather than lzf because every HDF5 reader (C, MATLAB, R, netCDF tools) has gzip
while lzf exists only in h5py, and because a gzip chunk is a plain zlib stream that our own
threads can compress and inflate outside h5py's global lock (compress_tile, _read_rows), so
building and reading scale with threads. Level 1 because decoded imagery barely compresses
further (real satellite tiles: 16% smaller than raw at level 1, 14% at level 6; labels 20
to 35 times smaller at any level) while higher levels cost time.

Both writers stream (memory independent of N: about 100 MB peak for 1,000 or 10,000 tiles,
bench/bench_cache.py) into a temporary file renamed onto the output only when complete, so
an interrupted build never leaves a file that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import mercantile
import numpy as np

from osmseg import cli
from osmseg.classes import IGNORE, Classes, load_classes, parse_classes
from osmseg.errors import CacheError, UserError
from osmseg.imagery import find_image, tile_stem

SCHEMA_VERSION = 1
COMPRESSION = "gzip"
COMPRESSION_LEVEL = 1
IMPORT_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
IMPORT_MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".webp", ".jpg", ".jpeg")
_WRITE_BLOCK = 32  # rows allocated at least, before the datasets double as they fill
_LIST_LIMIT = 20  # skipped items named in full before "... and N more"

Entry = tuple[str, mercantile.Tile]  # (source name, tile)
Log = Callable[[str], None]


# --- Small value types ------------------------------------------------------------------


@dataclass(frozen=True)
class CacheInfo:
    """What open_cache found: an existing, readable cache of `length` tiles."""

    path: Path
    length: int
    tile_size: int
    classes: Classes
    attrs: dict

    @property
    def params(self) -> dict:
        """The creation parameters stored in the `params` attribute."""
        return json.loads(self.attrs.get("params", "{}"))


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


def _digest(parts: Iterable[str]) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode())
        hasher.update(b"\n")
    return hasher.hexdigest()[:16]


def _file_stamp(path: Path | None) -> str:
    if path is None:
        return "-"
    stat = path.stat()
    return f"{path.name} {stat.st_size} {stat.st_mtime_ns}"


# The order in which fingerprint parts are compared, and how a difference is explained.
_FINGERPRINT_REASONS = {
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
    for key, reason in _FINGERPRINT_REASONS.items():
        if old.get(key) != fingerprint.get(key):
            if key in ("tile_size", "stride"):
                return f"{reason} ({old.get(key)} -> {fingerprint.get(key)})"
            return reason
    if old != fingerprint:
        return "its inputs changed"
    return None


def _needs_build(out_path: Path, fingerprint: dict, summary: BuildSummary, log: Log) -> bool:
    """Decide whether to build; delete a stale cache first so it can never be used."""
    # A killed build (SIGKILL, power cut) leaves its temporary file (see cli.atomic_path):
    # as large as the cache, hidden, and of no use, since a build never resumes half-way.
    for leftover in out_path.parent.glob(f".{out_path.stem}.*.partial{out_path.suffix}"):
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


def compress_tile(image: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
    """One tile's image and label chunks, compressed as HDF5's gzip filter stores them.

    The filter keeps a zlib stream of the chunk's C-order bytes, so zlib.compress gives the
    same bytes; doing it here lets threads compress in parallel (zlib releases the GIL,
    while HDF5's own filter runs under h5py's global lock, one chunk at a time).
    """
    return (
        zlib.compress(np.ascontiguousarray(image, dtype=np.uint8).tobytes(), COMPRESSION_LEVEL),
        zlib.compress(np.ascontiguousarray(labels, dtype=np.uint8).tobytes(), COMPRESSION_LEVEL),
    )


class _Writer:
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


def _ordered_map(function: Callable, items: Iterable, workers: int, window: int | None = None) -> Iterator:
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
    """Threads for building: the machine's cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _write_attrs(file: h5py.File, classes: Classes, tile_size: int, params: dict) -> None:
    file.attrs["classes"] = classes.to_json()
    file.attrs["tile_size"] = int(tile_size)
    file.attrs["schema_version"] = SCHEMA_VERSION
    file.attrs["params"] = json.dumps(params, sort_keys=True)


def _progress(total: int | None, description: str, unit: str = "tile"):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, leave=False)


class NotEightBit(ValueError):
    """An image whose samples are not 8-bit (16-bit or float GeoTIFFs, 16-bit PNGs)."""


def read_rgb(path: Path) -> np.ndarray | None:
    """Read an image file as RGB uint8 (H, W, 3); None when it cannot be decoded.

    Palette and grey images come back as RGB (cv2.IMREAD_COLOR expands palettes and drops
    alpha).

    Raises:
        NotEightBit: 16-bit or float samples. OpenCV would keep only their high byte, which
            turns the 12-bit values of most satellite GeoTIFFs nearly black; the user
            should choose the scaling.
    """
    import cv2

    # np.fromfile + imdecode rather than imread: imread cannot open non-ASCII paths on
    # some platforms and gives no way to tell "missing" from "corrupt".
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if bgr is None:
        return None
    if bgr.dtype != np.uint8:
        raise NotEightBit(f"{bgr.dtype} samples, not 8-bit (rescale to 8-bit RGB first, e.g. gdal_translate -ot Byte -scale)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _read_pair(image_path: Path, other_path: Path) -> tuple[np.ndarray | None, np.ndarray | None, tuple[str, str] | None]:
    """Read an image and its label or mask; the third value says why one cannot be used."""
    try:
        image = read_rgb(image_path)
    except NotEightBit as error:
        return None, None, (f"image has {error}", image_path.name)
    try:
        other = read_rgb(other_path)
    except NotEightBit as error:
        return None, None, (f"mask or label has {error}", other_path.name)
    return image, other, None


def _unknown_colors(rgb: np.ndarray, labels: np.ndarray, limit: int = 5) -> Counter:
    """The most frequent mask colours that no class lists (for the report)."""
    unknown = rgb[labels == IGNORE]
    if not len(unknown):
        return Counter()
    colors, counts = np.unique(unknown.reshape(-1, 3), axis=0, return_counts=True)
    top = np.argsort(counts)[::-1][:limit]
    return Counter({"#{:02x}{:02x}{:02x}".format(*colors[i]): int(counts[i]) for i in top})


@dataclass
class _Prepared:
    """A worker's result: compressed tiles ready to append, or why the input was skipped."""

    chunks: list = field(default_factory=list)
    tile: tuple[int, int, int] = (-1, -1, -1)
    source: str = ""
    ignored: int = 0
    unknown: Counter = field(default_factory=Counter)
    skip: tuple[str, str] | None = None

    def add_to(self, writer: _Writer, summary: BuildSummary) -> None:
        if self.skip:
            summary.skip(*self.skip)
            return
        for chunks in self.chunks:
            writer.append(chunks, self.tile, self.source)
        summary.ignored_pixels += self.ignored
        summary.unknown_colors.update(self.unknown)


# --- Writer 1: the pipeline's tiles --------------------------------------------------------


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
    resolved = []
    for source, tile in entries:
        tile = mercantile.Tile(*tile)
        label_path = labels_dir / f"{tile_stem(tile)}.png"
        resolved.append((source, tile, find_image(images_dir, tile), label_path if label_path.is_file() else None))
    fingerprint = {
        "classes": _digest([classes.to_json()]),
        "tile_size": int(tile_size),
        "tiles": _digest(f"{source} {tile.z} {tile.x} {tile.y}" for source, tile, _, _ in resolved),
        "files": _digest(f"{_file_stamp(image)} {_file_stamp(label)}" for _, _, image, label in resolved),
    }
    if not _needs_build(out_path, fingerprint, summary, log):
        return summary

    record = {"command": "cache", "tile_size": int(tile_size), "tiles_listed": len(resolved)}
    record.update(params or {})

    def prepare(item) -> _Prepared:
        # Runs in a worker thread: decoding, colour lookup and compression release the GIL.
        source, tile, image_path, label_path = item
        stem = tile_stem(tile)
        if image_path is None:
            return _Prepared(skip=("no image (run `prepare.py images`)", stem))
        if label_path is None:
            return _Prepared(skip=("no label (run `prepare.py labels`)", stem))
        image, rgb, problem = _read_pair(image_path, label_path)
        if problem:
            return _Prepared(skip=problem)
        if image is None:
            return _Prepared(skip=("corrupt image (delete it and re-download)", image_path.name))
        if rgb is None:
            return _Prepared(skip=("corrupt label (delete it and re-render)", label_path.name))
        if image.shape != rgb.shape:
            return _Prepared(skip=("image and label sizes differ", f"{stem} ({_size(image)} vs {_size(rgb)})"))
        if image.shape[:2] != (tile_size, tile_size):
            reason = f"not {tile_size}x{tile_size} (pass the --tile-size they were made with)"
            return _Prepared(skip=(reason, f"{stem} ({_size(image)})"))
        labels, ignored = classes.colors_to_labels(rgb)
        unknown = _unknown_colors(rgb, labels) if ignored else Counter()
        return _Prepared([compress_tile(image, labels)], (tile.z, tile.x, tile.y), source, ignored, unknown)

    with cli.atomic_path(out_path) as tmp, h5py.File(tmp, "w") as file:
        writer = _Writer(file, tile_size, expected=len(resolved))
        with _progress(len(resolved), f"caching {out_path.name}") as bar:
            for prepared in _ordered_map(prepare, resolved, workers):
                bar.update()
                prepared.add_to(writer, summary)
        summary.written = writer.close()
        if not summary.written:
            raise CacheError(f"{out_path}: no tile could be cached{_skipped_text(summary)}")
        record.update(written=summary.written, skipped=summary.skipped_count, ignored_pixels=summary.ignored_pixels)
        _write_attrs(file, classes, tile_size, dict(record, fingerprint=fingerprint))
    return summary


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


def _skipped_text(summary: BuildSummary) -> str:
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
    text = f"{summary.path}: {summary.written} tiles written{_skipped_text(summary)}"
    if summary.ignored_pixels:
        colors = ", ".join(f"{color} ({count} px)" for color, count in summary.unknown_colors.most_common(5))
        text += (
            f"\n  {summary.ignored_pixels} pixels have colours no class lists and became the ignore "
            f"value {IGNORE} (skipped by training and metrics); most frequent: {colors}"
        )
    log(text)


# --- `prepare.py cache` -------------------------------------------------------------------


def read_sample(path: str | os.PathLike) -> tuple[str | None, list[tuple[Entry, str]]]:
    """Read a sample-filtered file: its '#' header and (entry, original line) pairs.

    Raises:
        UserError: a missing file or a malformed line (naming the line).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such tile list; run `make data/sample-filtered.txt` first") from None
    header, rows = None, []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.startswith("#"):
            header = header or line
            continue
        fields = line.split()
        try:
            z, x, y = (int(value) for value in fields[1:4])
            if len(fields) < 4 or min(z, x, y) < 0 or max(x, y) >= 2**z:
                raise ValueError
        except ValueError:
            raise UserError(
                f"{path}, line {number}: expected `source z x y [counts...]` with a valid tile, got {line!r}; "
                "fix the line or rebuild the file"
            ) from None
        rows.append(((fields[0], mercantile.Tile(x, y, z)), line))
    return header, rows


def configure_cache(parser) -> None:
    parser.add_argument("--sample", type=Path, default=Path("data/sample-filtered.txt"), help="the filtered tile list")
    parser.add_argument("--images", type=Path, default=Path("data/images"), help="imagery tiles {z}-{x}-{y}.jpg|png|webp")
    parser.add_argument("--labels", type=Path, default=Path("data/labels/color"), help="colour label tiles {z}-{x}-{y}.png")
    parser.add_argument("--classes", type=Path, default=Path("classes/mine.json"), help="the classes file the labels use")
    parser.add_argument("--tile-size", type=int, default=256, help="width and height of every tile, in pixels")
    parser.add_argument(
        "--test-size", type=float, default=0.1,
        help="tiles held back for testing: a fraction (< 1, at least one tile) or a count (>= 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the test draw")
    parser.add_argument("--test-list", type=Path, default=Path("data/test-sample-filtered.txt"), help="where the held-back tiles are listed")
    parser.add_argument("--workers", type=int, default=default_workers(), help="threads that decode and compress")
    parser.add_argument("--out", type=Path, default=Path("data/training.hdf5"), help="the training cache")
    parser.add_argument("--test-out", type=Path, default=Path("data/testing.hdf5"), help="the test cache")


def _check_distinct(paths: dict[str, Path]) -> None:
    """Refuse two options that name one file (the second write would clobber the first)."""
    seen: dict[Path, str] = {}
    for option, path in paths.items():
        resolved = Path(path).resolve()
        if resolved in seen:
            raise UserError(f"{seen[resolved]} and {option} are both {path}; give each its own file")
        seen[resolved] = option


def run_cache(args) -> int:
    classes = load_classes(args.classes, require_filters=False)
    if args.test_size <= 0:
        raise UserError(f"--test-size {args.test_size}: must be positive; validate.py measures on the held-back test set")
    _check_distinct({"--sample": args.sample, "--test-list": args.test_list, "--out": args.out, "--test-out": args.test_out})
    header, rows = read_sample(args.sample)
    kept, missing = [], BuildSummary(args.out)
    for (source, tile), line in rows:
        if find_image(args.images, tile) is None:
            missing.skip(
                f"no image in {args.images} (not downloaded yet, or rejected: see rejected.txt and missing.txt there)",
                tile_stem(tile),
            )
        elif not (args.labels / f"{tile_stem(tile)}.png").is_file():
            missing.skip(f"no label in {args.labels} (run `make data/labels/color`)", tile_stem(tile))
        else:
            kept.append(((source, tile), line))
    if missing.skipped:
        print(f"{args.sample}: {len(kept)} of {len(rows)} tiles have an image and a label{_skipped_text(missing)}")
    if len(kept) < 2:
        raise UserError(
            f"{args.sample}: {len(kept)} tile(s) have both an image and a label; need at least 2 "
            "(one to train on, one to test on): run `make data/images` or sample more tiles"
        )
    train, test = split_indices(len(kept), args.test_size, args.seed)
    # Written only when it changes, so that make sees an unchanged file as up to date.
    test_text = "".join(f"{kept[i][1]}\n" for i in test)
    if header:
        test_text = f"{header}\n{test_text}"
    if not args.test_list.exists() or args.test_list.read_text() != test_text:
        cli.write_text_atomic(args.test_list, test_text)
    print(f"{args.test_list}: {len(test)} tiles held back for testing (seed {args.seed}), {len(train)} for training")

    params = {"seed": args.seed, "test_size": args.test_size, "sample": str(args.sample)}
    for role, indices, out in (("training", train, args.out), ("testing", test, args.test_out)):
        summary = build_cache(
            [kept[i][0] for i in indices], args.images, args.labels, classes, out, args.tile_size,
            params=dict(params, role=role), workers=args.workers,
        )
        report(summary)
    return 0


# --- Writer 2: `prepare.py import` your own image/mask pairs ------------------------------


def pair_files(images_dir: Path, masks_dir: Path) -> tuple[list[tuple[str, Path, Path]], BuildSummary]:
    """Pair images and masks by file-name stem; the summary lists what has no partner."""
    unpaired = BuildSummary(Path())

    def by_stem(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder of {what}; pass an existing one")
        found: dict[str, list[Path]] = {}
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith("."):
                found.setdefault(path.stem, []).append(path)
        single = {}
        for stem, paths in found.items():
            if len(paths) > 1:
                unpaired.skip(f"several {what} share the stem (keep one)", ", ".join(p.name for p in paths))
            else:
                single[stem] = paths[0]
        return single

    images = by_stem(images_dir, IMPORT_IMAGE_SUFFIXES, "images")
    masks = by_stem(masks_dir, IMPORT_MASK_SUFFIXES, "masks")
    for stem in sorted(set(images) - set(masks)):
        unpaired.skip(f"image without a mask in {masks_dir}", images[stem].name)
    for stem in sorted(set(masks) - set(images)):
        unpaired.skip(f"mask without an image in {images_dir}", masks[stem].name)
    pairs = [(stem, images[stem], masks[stem]) for stem in sorted(set(images) & set(masks))]
    return pairs, unpaired


def tile_origins(length: int, tile_size: int, stride: int) -> list[int]:
    """Start offsets of the tiles that cover `length` pixels (the last one may overhang)."""
    steps = max(0, math.ceil((length - tile_size) / stride))
    return [step * stride for step in range(steps + 1)]


def cut_tiles(
    image: np.ndarray, labels: np.ndarray, tile_size: int, stride: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Cut an image and its labels into tile_size squares every `stride` pixels.

    Tiles that overhang the right or bottom edge are padded: images with 0 (black), labels
    with IGNORE, so that training never learns from the padding.
    """
    height, width = labels.shape
    for top in tile_origins(height, tile_size, stride):
        for left in tile_origins(width, tile_size, stride):
            tile_image = np.zeros((tile_size, tile_size, 3), np.uint8)
            tile_labels = np.full((tile_size, tile_size), IGNORE, np.uint8)
            window = np.s_[top : top + tile_size, left : left + tile_size]
            part = labels[window]
            tile_labels[: part.shape[0], : part.shape[1]] = part
            tile_image[: part.shape[0], : part.shape[1]] = image[window]
            yield tile_image, tile_labels


def import_pairs(
    pairs: Sequence[tuple[str, Path, Path]],
    classes: Classes,
    out_path: str | os.PathLike,
    tile_size: int,
    stride: int,
    *,
    params: dict | None = None,
    log: Log = print,
    workers: int | None = None,
) -> BuildSummary:
    """Cut image/mask pairs into tiles and cache them to out_path, streaming.

    Memory holds one image and its mask at a time, whatever the number of pairs. Skips the
    build when out_path was made from the same inputs (classes, tile size, stride, and the
    name, size and time of every file).

    Args:
        pairs: (stem, image path, mask path); the stem becomes the tiles' `sources` value.
        classes: the classes whose colours the masks use (#000000 is background).
        out_path: the .hdf5 file to write.
        tile_size: the width and height of the tiles.
        stride: pixels between the starts of neighbouring tiles.
        params: extra creation parameters to record.
        log: where progress messages go.
        workers: threads that decode, cut and compress (each holds one image and its mask).

    Raises:
        CacheError: nothing could be imported, or out_path is a file that is not ours.
    """
    out_path = Path(out_path)
    workers = default_workers() if workers is None else workers
    summary = BuildSummary(out_path)
    fingerprint = {
        "classes": _digest([classes.to_json()]),
        "tile_size": int(tile_size),
        "stride": int(stride),
        "tiles": _digest(stem for stem, _, _ in pairs),
        "files": _digest(f"{_file_stamp(image)} {_file_stamp(mask)}" for _, image, mask in pairs),
    }
    if not _needs_build(out_path, fingerprint, summary, log):
        return summary
    record = {"command": "import", "tile_size": int(tile_size), "stride": int(stride), "pairs": len(pairs)}
    record.update(params or {})

    def prepare(pair) -> _Prepared:
        # Runs in a worker thread, one image at a time per thread.
        stem, image_path, mask_path = pair
        image, rgb, problem = _read_pair(image_path, mask_path)
        if problem:
            return _Prepared(skip=problem)
        if image is None:
            return _Prepared(skip=("image cannot be decoded", image_path.name))
        if rgb is None:
            return _Prepared(skip=("mask cannot be decoded", mask_path.name))
        if image.shape != rgb.shape:
            reason = "image and mask sizes differ (masks must cover their image pixel for pixel)"
            return _Prepared(skip=(reason, f"{stem} (image {_size(image)}, mask {_size(rgb)})"))
        labels, ignored = classes.colors_to_labels(rgb)
        unknown = _unknown_colors(rgb, labels) if ignored else Counter()
        chunks = [compress_tile(*tile) for tile in cut_tiles(image, labels, tile_size, stride)]
        return _Prepared(chunks, (-1, -1, -1), stem, ignored, unknown)

    with cli.atomic_path(out_path) as tmp, h5py.File(tmp, "w") as file:
        writer = _Writer(file, tile_size)
        with _progress(len(pairs), f"importing {out_path.name}", "image") as bar:
            # A window of one image per thread: each result holds a whole image's tiles.
            for prepared in _ordered_map(prepare, pairs, workers, window=workers):
                bar.update()
                prepared.add_to(writer, summary)
        summary.written = writer.close()
        if not summary.written:
            raise CacheError(f"{out_path}: no image/mask pair could be imported{_skipped_text(summary)}")
        record.update(written=summary.written, skipped=summary.skipped_count, ignored_pixels=summary.ignored_pixels)
        _write_attrs(file, classes, tile_size, dict(record, fingerprint=fingerprint))
    return summary


def testing_path_for(out: Path) -> Path:
    """The test file written beside an import's --out: training → testing, else <stem>-test."""
    if "training" in out.stem:
        return out.with_name(out.stem.replace("training", "testing") + out.suffix)
    return out.with_name(f"{out.stem}-test{out.suffix}")


def configure_import(parser) -> None:
    parser.add_argument("images", type=Path, metavar="IMAGES", help="folder of images (jpg, png, webp, tif, bmp), any size")
    parser.add_argument(
        "masks", type=Path, metavar="MASKS",
        help="folder of colour masks (png, palette PNGs too) paired with the images by file-name stem",
    )
    parser.add_argument(
        "--classes", type=Path, required=True,
        help="classes file: names and colours (#000000 is background; unlisted colours become ignore)",
    )
    parser.add_argument("--out", type=Path, default=Path("data/training.hdf5"), help="the cache to write")
    parser.add_argument("--tile-size", type=int, default=256, help="width and height of the tiles, in pixels")
    parser.add_argument("--stride", type=int, default=None, help="pixels between tile starts; None: the tile size (no overlap)")
    parser.add_argument(
        "--test-size", type=float, default=0,
        help="whole images held back for a test file beside --out (training→testing in its name, "
        "else <stem>-test.hdf5): a fraction (< 1) or a count (>= 1); 0 holds back none",
    )
    parser.add_argument("--test-out", type=Path, default=None, help="the test file; None: beside --out (see --test-size)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the test draw")
    parser.add_argument("--workers", type=int, default=min(4, default_workers()), help="threads that decode, cut and compress; each holds one image (lower it for huge images)")


def run_import(args) -> int:
    classes = load_classes(args.classes, require_filters=False)
    stride = args.tile_size if args.stride is None else args.stride
    if args.tile_size < 1:
        raise UserError(f"--tile-size {args.tile_size}: must be a positive number of pixels")
    if not 1 <= stride <= args.tile_size:
        raise UserError(f"--stride {stride}: must be between 1 and the tile size ({args.tile_size}) so no pixel is left out")
    pairs, unpaired = pair_files(args.images, args.masks)
    if unpaired.skipped:
        print(f"{len(pairs)} image/mask pairs{_skipped_text(unpaired)}")
    if not pairs:
        raise UserError(
            f"no image in {args.images} has a mask of the same file-name stem in {args.masks}; "
            "name each mask like its image (a.jpg ↔ a.png)"
        )
    params = {"seed": args.seed, "test_size": args.test_size, "images": str(args.images), "masks": str(args.masks)}
    # Whole images are held back, never single tiles: neighbouring (or, with a stride below
    # the tile size, overlapping) tiles of one image would otherwise leak into training.
    if args.test_size:
        keep, test = split_indices(len(pairs), args.test_size, args.seed, what="images")
        test_out = args.test_out or testing_path_for(args.out)
        _check_distinct({"--out": args.out, "--test-out": test_out})
        jobs = [("training", [pairs[i] for i in keep], args.out), ("testing", [pairs[i] for i in test], test_out)]
        print(f"{len(test)} of {len(pairs)} images held back for {test_out}: {', '.join(pairs[i][0] for i in test)}")
    else:
        jobs = [("training", pairs, args.out)]
    for role, chosen, out in jobs:
        summary = import_pairs(
            chosen, classes, out, args.tile_size, stride, params=dict(params, role=role), workers=args.workers
        )
        report(summary)
    return 0


# --- Readers -------------------------------------------------------------------------------


def _make_hint(path: Path, make_target: str | None) -> str:
    if make_target:
        return f"run `make {make_target}`"
    if path.name in ("training.hdf5", "testing.hdf5"):
        return f"run `make data/{path.name}` (or `prepare.py import` for your own data)"
    return f"build it with `prepare.py cache --out {path}` or `prepare.py import ... --out {path}`"


def open_cache(path: str | os.PathLike, make_target: str | None = None) -> CacheInfo:
    """Check that path is a readable cache of this schema and describe it.

    Args:
        path: the .hdf5 file.
        make_target: the make target that builds it, for the message when it is missing
            (default: data/training.hdf5 or data/testing.hdf5 after the file's name).

    Raises:
        CacheError: missing, not HDF5 or corrupt, another schema, or inconsistent datasets.
    """
    path = Path(path)
    hint = _make_hint(path, make_target)
    if not path.exists():
        raise CacheError(f"{path}: no such cache; {hint}")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise CacheError(f"{path}: not an HDF5 file, or corrupt ({error}); delete it and {hint}") from None
    with file:
        attrs = {key: _plain(value) for key, value in file.attrs.items()}
        if "schema_version" not in attrs:
            raise CacheError(f"{path}: an HDF5 file but not an osmseg cache (no schema_version attribute); {hint}")
        if attrs["schema_version"] != SCHEMA_VERSION:
            raise CacheError(
                f"{path}: cache schema version {attrs['schema_version']}, this osmseg reads {SCHEMA_VERSION}; "
                f"delete it and {hint}"
            )
        try:
            images, labels, tiles, sources = (file[name] for name in ("images", "labels", "tiles", "sources"))
            length, height, width, bands = images.shape
            tile_size = int(attrs["tile_size"])
            classes = parse_classes(attrs["classes"], origin=f"{path} (classes attribute)", require_filters=False)
        except (KeyError, ValueError, TypeError) as error:
            raise CacheError(f"{path}: incomplete or corrupt cache ({error}); delete it and {hint}") from None
        problems = []
        if images.dtype != np.uint8 or bands != 3 or height != width or height != tile_size:
            problems.append(f"images {images.dtype} {images.shape}, expected uint8 (N, {tile_size}, {tile_size}, 3)")
        if labels.dtype != np.uint8 or labels.shape != images.shape[:3]:
            problems.append(f"labels {labels.dtype} {labels.shape}, expected uint8 {images.shape[:3]}")
        if tiles.shape != (length, 3) or sources.shape != (length,):
            problems.append(f"tiles {tiles.shape} / sources {sources.shape} do not match {length} images")
        if not length:
            problems.append("it holds no tiles")
        if problems:
            raise CacheError(f"{path}: inconsistent cache ({'; '.join(problems)}); delete it and {hint}")
    return CacheInfo(path, int(length), tile_size, classes, attrs)


def _plain(value):
    """An HDF5 attribute as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _inflatable(dataset: h5py.Dataset) -> bool:
    """Whether a dataset's chunks are one row each and only gzip-compressed, so that
    _read_rows may read them raw and inflate them itself."""
    return (
        dataset.chunks == (1,) + dataset.shape[1:]
        and dataset.compression == "gzip"
        and not dataset.shuffle
        and not dataset.fletcher32
        and dataset.scaleoffset is None
    )


def _read_rows(dataset: h5py.Dataset, indices: np.ndarray, inflate: bool = False) -> np.ndarray:
    """dataset[indices] for indices in any order, with repeats, one chunk read per row.

    Not h5py's fancy indexing (dataset[[i, j, ...]]): it wants increasing indices and is
    about ten times slower than a read per row here (40 against 450 tiles/s, 16-tile
    batches). Rows are read in file order, which helps a cold disk, and placed where asked.

    With inflate (see _inflatable), each chunk is read raw and decompressed by zlib here:
    h5py runs HDF5's filters under its global lock, so reader threads would take turns,
    while zlib releases the GIL and lets them decompress side by side.

    Raises:
        CacheError: a chunk cannot be read or decompressed (a damaged file).
    """
    indices = np.asarray(indices, dtype=np.int64)
    where = f"rows {indices.min()}..{indices.max()}" if len(indices) else "no rows"
    try:
        if not inflate and len(indices) and np.all(np.diff(indices) == 1):
            return dataset[indices[0] : indices[-1] + 1]
        rows = np.empty((len(indices),) + dataset.shape[1:], dataset.dtype)
        zeros = (0,) * (dataset.ndim - 1)
        for position in np.argsort(indices, kind="stable"):
            index = int(indices[position])
            where = f"row {index}"
            if inflate:
                filter_mask, raw = dataset.id.read_direct_chunk((index,) + zeros)
                if filter_mask == 0:  # 0: gzip was applied (HDF5 may store a chunk unfiltered)
                    rows[position] = np.frombuffer(zlib.decompress(raw), dataset.dtype).reshape(dataset.shape[1:])
                    continue
            dataset.read_direct(rows, np.s_[index], np.s_[position])
    except (OSError, zlib.error, ValueError) as error:
        raise CacheError(
            f"{dataset.file.filename}: cannot read {dataset.name.lstrip('/')} {where} ({error}); "
            "the file is damaged: delete it and build it again"
        ) from None
    return rows


def _check_indices(indices, length: int, path: Path) -> np.ndarray:
    indices = np.arange(length, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64).ravel()
    if len(indices) and (indices.min() < 0 or indices.max() >= length):
        raise IndexError(f"{path}: tile indices must lie in 0..{length - 1}")
    return indices


def iter_tiles(
    path: str | os.PathLike, indices: Sequence[int] | None = None, batch_size: int = 16
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield the cache's tiles in the given order, batch_size at a time, for evaluation.

    Yields:
        (indices int64 (B,), images uint8 (B, H, W, 3) RGB, labels uint8 (B, H, W)),
        255 kept as the ignore value.
    """
    info = open_cache(path)
    indices = _check_indices(indices, info.length, info.path)
    with h5py.File(info.path, "r") as file:
        images, labels = file["images"], file["labels"]
        inflate = _inflatable(images) and _inflatable(labels)
        for start in range(0, len(indices), batch_size):
            chosen = indices[start : start + batch_size]
            yield chosen, _read_rows(images, chosen, inflate), _read_rows(labels, chosen, inflate)


def iter_labels(
    path: str | os.PathLike, indices: Sequence[int] | None = None, batch_size: int = 256
) -> Iterator[np.ndarray]:
    """Yield the labels of the given tiles (all by default) in increasing index order.

    One read per row (h5py's fancy indexing is about 10x slower), batch_size rows at a time
    (16 MB at 256 pixels), never the whole set.

    Yields:
        uint8 (B, H, W) class indices, 255 kept as the ignore value.
    """
    info = open_cache(path)
    indices = np.sort(_check_indices(indices, info.length, info.path))
    with h5py.File(info.path, "r") as file:
        labels = file["labels"]
        inflate = _inflatable(labels)
        for start in range(0, len(indices), batch_size):
            yield _read_rows(labels, indices[start : start + batch_size], inflate)


def label_histogram(path: str | os.PathLike, indices: Sequence[int] | None = None) -> np.ndarray:
    """Pixel count of every class over the given tiles (all by default), ignore excluded.

    Returns:
        int64 (num_classes,): index i counts the pixels of class i.
    """
    counts = np.zeros(256, dtype=np.int64)
    for block in iter_labels(path, indices):
        counts += np.bincount(block.ravel(), minlength=256)
    return counts[: open_cache(path).classes.num_classes]


def augment_tile(image: np.ndarray, labels: np.ndarray, rotations: int, flip_h: bool, flip_v: bool):
    """Rotate by rotations×90° then flip, identically for an image (H, W, 3) and its labels (H, W)."""
    image, labels = np.rot90(image, rotations, axes=(0, 1)), np.rot90(labels, rotations, axes=(0, 1))
    if flip_h:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if flip_v:
        image, labels = image[::-1], labels[::-1]
    return image, labels


# Label value → training target: class indices stay, IGNORE becomes 0 (its weight is 0).
_TARGETS = np.arange(256, dtype=np.int32)
_TARGETS[IGNORE] = 0


class BatchReader:
    """Shuffled, optionally augmented training batches drawn straight from a cache.

    The logic behind make_batches, without Keras: item b is batch b of the current epoch,
    (images float32 (B, H, W, 3) 0..255 RGB, labels int32 (B, H, W) with 255 → 0,
    sample_weight float32 (B, H, W): class_weights[label], 0 where the label was 255).

    The order is a permutation drawn from (seed, epoch); augmentation from (seed, epoch,
    batch); so any worker computes any batch alike, and a run is reproducible. The HDF5
    file is opened lazily in each process that reads, never inherited across a fork.
    """

    def __init__(self, path, indices, batch_size, shuffle=True, augment=False, seed=0, class_weights=None):
        info = open_cache(path)
        self.path = info.path
        self.indices = _check_indices(indices, info.length, info.path)
        if not len(self.indices):
            raise CacheError(f"{self.path}: no tiles selected to read")
        if batch_size < 1:
            raise UserError(f"batch size {batch_size}: must be at least 1")
        self.batch_size = int(batch_size)
        self.shuffle, self.augment, self.seed = bool(shuffle), bool(augment), int(seed)
        self.epoch = 0
        self._begun = False
        self.weights = np.zeros(256, dtype=np.float32)  # label value → sample weight; 255 stays 0
        num_classes = info.classes.num_classes
        if class_weights is None:
            self.weights[:num_classes] = 1.0
        else:
            class_weights = np.asarray(class_weights, dtype=np.float32).ravel()
            if class_weights.shape != (num_classes,):
                raise UserError(f"class weights: expected {num_classes} values (background first), got {class_weights.size}")
            self.weights[:num_classes] = class_weights
        self._file = self._pid = self._handles = None
        self._lock = threading.Lock()
        self._order_cache = (None, None)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of this epoch from now on (until the next on_epoch_begin).

        A resumed training run calls it with its first epoch; a hand-written loop calls it at
        the start of every epoch.
        """
        self.epoch = int(epoch)
        self._begun = False

    def on_epoch_begin(self) -> None:
        # Keras' fit calls this once per epoch. Not on_epoch_end: fit also calls that once
        # before its first epoch (EpochIterator.reset), after peeking at batch 0.
        if self._begun:
            self.epoch += 1
        self._begun = True

    def order(self) -> np.ndarray:
        """The tile indices of this epoch, in reading order."""
        epoch, cached = self._order_cache
        if epoch != self.epoch:
            cached = self.indices
            if self.shuffle:
                cached = self.indices[np.random.default_rng([self.seed, self.epoch]).permutation(len(self.indices))]
            self._order_cache = (self.epoch, cached)
        return cached

    def _datasets(self):
        # One handle per process: an HDF5 handle inherited through fork is not safe to use.
        # Shared by the threads of one process (h5py is thread-safe), opened by the first.
        with self._lock:
            if self._file is None or self._pid != os.getpid():
                file = h5py.File(self.path, "r")
                images, labels = file["images"], file["labels"]
                self._handles = (images, labels, _inflatable(images) and _inflatable(labels))
                self._file, self._pid = file, os.getpid()
            return self._handles

    def __getitem__(self, batch: int):
        return self.read(batch)

    def read(self, batch: int, rows: slice = slice(None)):
        """Batch `batch` of this epoch, or only the rows `rows` of it.

        A worker of a multi-worker run reads its share of each global batch this way
        (osmseg/distributed.py): those rows come out augmented exactly as in the whole batch.
        """
        if not -len(self) <= batch < len(self):
            raise IndexError(f"batch {batch} out of range (0..{len(self) - 1})")
        batch %= len(self)
        whole = self.order()[batch * self.batch_size : (batch + 1) * self.batch_size]
        picked = np.arange(len(whole))[rows]
        chosen = whole[picked]
        images_ds, labels_ds, inflate = self._datasets()
        images, labels = _read_rows(images_ds, chosen, inflate), _read_rows(labels_ds, chosen, inflate)
        if not self.augment:
            inputs = images.astype(np.float32)
        else:
            # Drawn for the whole batch, then picked: a share gets its rows' draws.
            rng = np.random.default_rng([self.seed, self.epoch, batch])
            turns = rng.integers(0, 4, len(whole))[picked]
            flips = (rng.random((len(whole), 2)) < 0.5)[picked]
            # Augmented views are written into new arrays (the float32 inputs and fresh
            # labels), which converts and copies in one pass and never overlaps its source.
            inputs = np.empty(images.shape, np.float32)
            source_labels, labels = labels, np.empty_like(labels)
            for i in range(len(chosen)):
                inputs[i], labels[i] = augment_tile(images[i], source_labels[i], turns[i], *flips[i])
        # np.take: twice as fast as fancy indexing for a 256-entry lookup table.
        return inputs, np.take(_TARGETS, labels), np.take(self.weights, labels)

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._handles = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = state["_pid"] = state["_handles"] = state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


_BATCHES_CLASS = None


def _batches_class():
    """CacheBatches: BatchReader as a keras.utils.PyDataset, made on first use so that
    importing this module never imports Keras."""
    global _BATCHES_CLASS
    if _BATCHES_CLASS is None:
        import keras

        class CacheBatches(BatchReader, keras.utils.PyDataset):
            def __init__(self, path, indices, batch_size, shuffle=True, augment=False, seed=0,
                         class_weights=None, **pydataset_kwargs):
                keras.utils.PyDataset.__init__(self, **pydataset_kwargs)
                BatchReader.__init__(self, path, indices, batch_size, shuffle, augment, seed, class_weights)

        # Pickle (worker processes started with spawn) finds the class as osmseg.cache.CacheBatches.
        CacheBatches.__module__ = __name__
        CacheBatches.__qualname__ = "CacheBatches"
        _BATCHES_CLASS = CacheBatches
    return _BATCHES_CLASS


def __getattr__(name: str):
    if name == "CacheBatches":
        return _batches_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_batches(
    path: str | os.PathLike,
    indices: Sequence[int] | None,
    batch_size: int,
    shuffle: bool = True,
    augment: bool = False,
    seed: int = 0,
    class_weights: Sequence[float] | None = None,
    **pydataset_kwargs,
):
    """A keras.utils.PyDataset of training batches from the cache (see BatchReader).

    Pass it to model.fit with shuffle=False: it reshuffles itself per epoch, reproducibly
    (fit's own shuffle would reorder batches with Python's unseeded random).

    Args:
        path: the cache.
        indices: the tiles to draw from (None: all).
        batch_size: tiles per batch; len() = ceil(len(indices) / batch_size).
        shuffle: draw a new order every epoch, from (seed, epoch).
        augment: random flips and 90° rotations, the same for image and label.
        seed: the seed of order and augmentation.
        class_weights: (num_classes,) weight per class for sample_weight (None: all 1).
        **pydataset_kwargs: workers, use_multiprocessing, max_queue_size.
    """
    return _batches_class()(path, indices, batch_size, shuffle, augment, seed, class_weights, **pydataset_kwargs)
