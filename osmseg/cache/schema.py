"""The HDF5 training cache's schema, opening a cache, and reading its rows.

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
threads can compress and inflate outside h5py's global lock (compress_tile, read_rows), so
building and reading scale with threads. Level 1 because decoded imagery barely compresses
further (real satellite tiles: 16% smaller than raw at level 1, 14% at level 6; labels 20
to 35 times smaller at any level) while higher levels cost time.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from h5py._objects import phil as _H5PY_LOCK

from osmseg.classes import Classes, parse_classes
from osmseg.errors import CacheError

SCHEMA_VERSION = 1


COMPRESSION = "gzip"


COMPRESSION_LEVEL = 1


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


def write_attrs(file: h5py.File, classes: Classes, tile_size: int, params: dict) -> None:
    file.attrs["classes"] = classes.to_json()
    file.attrs["tile_size"] = int(tile_size)
    file.attrs["schema_version"] = SCHEMA_VERSION
    file.attrs["params"] = json.dumps(params, sort_keys=True)


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


def inflatable(dataset: h5py.Dataset) -> bool:
    """Whether a dataset's chunks are one row each and only gzip-compressed, so that
    read_rows may read them raw and inflate them itself."""
    return (
        dataset.chunks == (1,) + dataset.shape[1:]
        and dataset.compression == "gzip"
        and not dataset.shuffle
        and not dataset.fletcher32
        and dataset.scaleoffset is None
    )


def read_rows(dataset: h5py.Dataset, indices: np.ndarray, inflate: bool = False) -> np.ndarray:
    """dataset[indices] for indices in any order, with repeats, one chunk read per row.

    Not h5py's fancy indexing (dataset[[i, j, ...]]): it wants increasing indices and is
    about ten times slower than a read per row here (40 against 450 tiles/s, 16-tile
    batches). Rows are read in file order, which helps a cold disk, and placed where asked.

    With inflate (see inflatable), each chunk is read raw and decompressed by zlib here:
    h5py runs HDF5's filters under its global lock, so reader threads would take turns,
    while zlib releases the GIL and lets them decompress side by side. The raw read itself
    holds h5py's lock: h5py 3.14 does not take it in read_direct_chunk (fixed upstream in
    h5py pull request 2764), and threads reading at once corrupt HDF5's state, even to a
    double free.

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
                with _H5PY_LOCK:
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


def check_indices(indices, length: int, path: Path) -> np.ndarray:
    indices = np.arange(length, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64).ravel()
    if len(indices) and (indices.min() < 0 or indices.max() >= length):
        raise IndexError(f"{path}: tile indices must lie in 0..{length - 1}")
    return indices
