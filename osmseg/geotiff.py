"""GeoTIFFs written a strip of rows at a time: striped ones, and Cloud-Optimized ones never
copied afterwards.

`GeoTiffWriters` writes a segmented scene's mask.tif and probabilities.tif. feed_forward.py's
are striped (`StripedGeoTiff`); a map's are Cloud-Optimized (`CogWriter`).

GDAL's COG driver only copies a finished dataset: it reads the whole image back, computes
the overviews and compresses everything a second time. On a map's 7-band probabilities that
copy took 1.7 s of a 3584² map's 29 s, and 8.8 s under the 64 MB block cache that keeps a
large map's memory bounded (its overview pass re-reads the source many times; issue 14).

`CogWriter` instead tiles and compresses every resolution as the rows come in: the full
resolution, and each overview level reduced 2 × 2 from the one above it (`reduce_mean` for
probabilities, `reduce_mode` for class masks), each into a tiled GeoTIFF of its own beside
the output. Closing the writer assembles them (`assemble`) into one file in COG order,
copying the compressed tiles byte for byte:

- the TIFF header (classic, or BigTIFF beyond 4 GiB) and GDAL's "ghost" structural metadata
  (LAYOUT=IFDS_BEFORE_DATA, BLOCK_ORDER=ROW_MAJOR, each tile led by its size as uint32 and
  trailed by its last 4 bytes repeated), from which GDAL reports LAYOUT=COG;
- the IFDs, full resolution first, then the overviews from the largest down, each followed
  by its out-of-line tag values;
- the tiles, the smallest overview's first and the full resolution's last, row by row.

Readers that fetch a part at a time over HTTP (QGIS, GDAL's /vsicurl/, web maps) find every
IFD in the first bytes and the coarse levels before the fine ones.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

BLOCK_SIZE = 512  # tile side, pixels (GDAL's COG default)

# TIFF tags this module writes or drops by number.
NEW_SUBFILE_TYPE, TILE_OFFSETS, TILE_BYTE_COUNTS = 254, 324, 325
STRIP_TAGS = {273, 279}  # StripOffsets, StripByteCounts: tiled files have none
# Georeferencing and GDAL's band metadata belong to the full resolution only.
MAIN_ONLY_TAGS = {33550, 33922, 34264, 34735, 34736, 34737, 42112}
TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
LONG, LONG8 = 4, 16


def overview_shapes(height: int, width: int, block_size: int = BLOCK_SIZE) -> list[tuple[int, int]]:
    """(height, width) of each overview level, halving (rounded up) until the level fits in one
    tile, as GDAL's COG driver chooses them."""
    shapes = []
    while max(height, width) > block_size:
        height, width = math.ceil(height / 2), math.ceil(width / 2)
        shapes.append((height, width))
    return shapes


def _pairs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four pixels of each 2 × 2 cell of (2n, W, C) rows, the last column repeated when W
    is odd: top-left, top-right, bottom-left, bottom-right, each (n, ceil(W / 2), C)."""
    if rows.shape[1] % 2:
        rows = np.concatenate([rows, rows[:, -1:]], axis=1)
    top, bottom = rows[0::2], rows[1::2]
    return top[:, 0::2], top[:, 1::2], bottom[:, 0::2], bottom[:, 1::2]


def reduce_mean(rows: np.ndarray) -> np.ndarray:
    """uint8 (2n, W, C) -> (n, ceil(W / 2), C): the mean of each 2 × 2 cell, rounded half up
    (an odd last column is averaged with itself)."""
    a, b, c, d = (part.astype(np.uint16) for part in _pairs(rows))
    return ((a + b + c + d + 2) >> 2).astype(np.uint8)


def reduce_mode(rows: np.ndarray, nodata: int | None = None) -> np.ndarray:
    """uint8 (2n, W, C) -> (n, ceil(W / 2), C): the most frequent value of each 2 × 2 cell, ties
    to the first in reading order (top-left, top-right, bottom-left, bottom-right); `nodata`
    only where the whole cell is nodata."""
    corners = _pairs(rows)
    votes = []
    for i, value in enumerate(corners):
        count = sum((value == other).astype(np.int8) for j, other in enumerate(corners) if j != i)
        if nodata is not None:
            count = np.where(value == nodata, np.int8(-1), count)
        votes.append(count)
    # argmax keeps the first of equal counts: reading order breaks ties.
    choice = np.argmax(np.stack(votes), axis=0)
    return np.choose(choice, corners).astype(np.uint8)


class _Level:
    """One resolution: rows in, tiled and compressed into a GeoTIFF of its own a tile row at a
    time, and handed on, reduced 2 × 2, to the next coarser level.

    The rows wait in one preallocated row of tiles, which is written a tile at a time: no
    joined or transposed copy of the whole row (on a 13,568-pixel-wide map, 48 MB each for
    the probabilities' full resolution).
    """

    def __init__(self, path: Path, shape: tuple[int, int], bands: int, profile: dict, reduce, following):
        self.path, self.shape, self.reduce, self.following = path, shape, reduce, following
        self.profile = {**profile, "height": shape[0], "width": shape[1]}
        self.dataset = None
        self.written = 0  # rows written to the file
        self._buffer = np.empty((min(profile["blockysize"], shape[0]), shape[1], bands), dtype=np.uint8)
        self._filled = 0  # rows of the buffer in use
        self._odd: np.ndarray | None = None  # a row waiting for its pair

    def open(self, setup) -> None:
        import rasterio

        self.dataset = rasterio.open(self.path, "w", **self.profile)
        setup(self.dataset)

    def add(self, rows: np.ndarray) -> None:
        """Rows (n, W, C) of this level, in order."""
        done = 0
        while done < len(rows):
            take = min(len(rows) - done, len(self._buffer) - self._filled)
            self._buffer[self._filled : self._filled + take] = rows[done : done + take]
            self._filled += take
            done += take
            if self._filled == len(self._buffer):
                self._write()
        if self.following is not None:
            if self._odd is not None:
                rows = np.concatenate([self._odd, rows])
                self._odd = None
            if len(rows) % 2:
                rows, self._odd = rows[:-1], rows[-1:].copy()
            if len(rows):
                self.following.add(self.reduce(rows))

    def _write(self) -> None:
        from rasterio.windows import Window

        rows, width = self._filled, self.shape[1]
        if self.written + rows > self.shape[0]:
            raise ValueError(f"{self.path.name}: more than {self.shape[0]} rows")
        size = self.profile["blockxsize"]
        for left in range(0, width, size):
            tile = np.ascontiguousarray(np.moveaxis(self._buffer[:rows, left : left + size], -1, 0))
            self.dataset.write(tile, window=Window(left, self.written, tile.shape[2], rows))
        self.written += rows
        self._filled = 0

    def finish(self) -> None:
        """Write the rows still waiting (the last, partial row of tiles) and close the file."""
        if self._filled:
            self._write()
        if self.written != self.shape[0]:
            raise ValueError(f"{self.path.name}: {self.written} of {self.shape[0]} rows written")
        self.dataset.close()
        self._buffer = None
        if self.following is not None:
            if self._odd is not None:  # an odd last row pairs with itself
                self.following.add(self.reduce(np.concatenate([self._odd, self._odd])))
                self._odd = None
            self.following.finish()

    def close(self) -> None:
        if self.dataset is not None and not self.dataset.closed:
            self.dataset.close()


class CogWriter:
    """A Cloud-Optimized GeoTIFF of uint8 bands written in strips of rows (see the module
    docstring); a context manager that assembles the file on a clean exit and leaves nothing
    but `path` behind (nothing at all after an error).

    Args:
        path: the file to write (typically a temporary name of osmseg.atomic's).
        height, width, bands: the image's size and number of bands.
        crs, transform: its georeference (rasterio CRS and affine transform).
        resampling: "mean" (probabilities, imagery) or "mode" (class indices) for the overviews.
        nodata: the value of pixels without data (the overviews' mode ignores it).
        colormap: {value: (r, g, b, a)} for a one-band palette image.
        descriptions: one name per band.
        block_size: the tiles' side.
    """

    def __init__(self, path, height: int, width: int, bands: int, crs, transform, *, resampling: str = "mean",
                 nodata: int | None = None, colormap: dict | None = None, descriptions=None,
                 block_size: int = BLOCK_SIZE):  # fmt: skip
        if resampling not in ("mean", "mode"):
            raise ValueError(f"resampling {resampling!r}: use 'mean' or 'mode'")
        self.path, self.shape, self.bands = Path(path), (height, width), bands
        self.crs, self.transform, self.nodata = crs, transform, nodata
        self.colormap, self.descriptions, self.block_size = colormap, descriptions, block_size
        self.reduce = reduce_mean if resampling == "mean" else (lambda rows: reduce_mode(rows, nodata))
        self.next_row = 0
        self.levels: list[_Level] = []

    def __enter__(self):
        from affine import Affine

        profile = {
            "driver": "GTiff", "count": self.bands, "dtype": "uint8", "nodata": self.nodata,
            "tiled": True, "blockxsize": self.block_size, "blockysize": self.block_size,
            # Horizontal differencing, then fast deflate, as for the striped GeoTIFFs.
            "compress": "deflate", "predictor": 2, "zlevel": 1, "interleave": "pixel", "bigtiff": "IF_SAFER",
        }  # fmt: skip
        shapes = [self.shape, *overview_shapes(*self.shape, self.block_size)]
        following = None
        try:
            for number in reversed(range(len(shapes))):
                handle, name = tempfile.mkstemp(prefix=f".{self.path.name}.level{number}.", suffix=".partial.tif",
                                                dir=self.path.parent)  # fmt: skip
                os.close(handle)
                following = _Level(Path(name), shapes[number], self.bands, profile, self.reduce, following)
                self.levels.insert(0, following)
            for number, level in enumerate(self.levels):
                level.profile.update(crs=self.crs, transform=self.transform @ Affine.scale(2**number))
                level.open(self._setup)
        except BaseException:
            self._clean_up()
            raise
        return self

    def _setup(self, dataset) -> None:
        _describe(dataset, self.colormap, self.descriptions)

    def write(self, top: int, rows: np.ndarray) -> None:
        """Rows [top, top + n) of the image, uint8 (n, W, bands) or (n, W) for one band, in order."""
        if top != self.next_row:
            raise ValueError(f"rows must come in order: expected row {self.next_row}, got {top}")
        if rows.ndim == 2:
            rows = rows[..., None]
        if rows.shape[1:] != (self.shape[1], self.bands):
            raise ValueError(f"rows of shape {rows.shape[1:]}, expected {(self.shape[1], self.bands)}")
        self.levels[0].add(rows)
        self.next_row += len(rows)

    def __exit__(self, kind, value, traceback):
        try:
            if kind is None:
                if self.next_row != self.shape[0]:
                    raise ValueError(f"{self.path.name}: got {self.next_row} of {self.shape[0]} rows")
                self.levels[0].finish()
                assemble([level.path for level in self.levels], self.path)
        finally:
            self._clean_up()
        return False

    def _clean_up(self) -> None:
        for level in self.levels:
            level.close()
            level.path.unlink(missing_ok=True)


class StripedGeoTiff:
    """A GeoTIFF of uint8 bands in strips of ROWS_PER_STRIP rows, written as rows come in.

    Rows are buffered until whole strips can be written: on a 20,000-pixel-wide scene,
    256 × 256 tiles written in partial rows took 7× as long (GDAL re-reads and re-compresses
    partial blocks) and came out 2.5× larger. Arguments as for CogWriter.
    """

    ROWS_PER_STRIP = 64

    def __init__(self, path, height: int, width: int, bands: int, crs, transform, *, nodata: int | None = None,
                 colormap: dict | None = None, descriptions=None):  # fmt: skip
        self.path, self.shape, self.bands = Path(path), (height, width), bands
        self.profile = {
            "driver": "GTiff", "height": height, "width": width, "count": bands, "dtype": "uint8",
            "crs": crs, "transform": transform, "nodata": nodata, "compress": "deflate",
            # Horizontal differencing, then fast deflate: on smooth 7-band probabilities,
            # level 6 took 15× as long as level 1 for files only 25% smaller.
            "predictor": 2, "zlevel": 1, "tiled": False, "blockysize": self.ROWS_PER_STRIP,
        }  # fmt: skip
        self.colormap, self.descriptions = colormap, descriptions
        self.next_row = 0  # rows written
        self._waiting: list[np.ndarray] = []

    def __enter__(self):
        import rasterio

        self.dataset = rasterio.open(self.path, "w", **self.profile)
        _describe(self.dataset, self.colormap, self.descriptions)
        return self

    def write(self, top: int, rows: np.ndarray) -> None:
        """Rows [top, top + n), uint8 (n, W, bands) or (n, W), in order."""
        waiting = sum(len(part) for part in self._waiting)
        if top != self.next_row + waiting:
            raise ValueError(f"rows must come in order: expected row {self.next_row + waiting}, got {top}")
        self._waiting.append(rows[..., None] if rows.ndim == 2 else rows)
        waiting += len(rows)
        last = self.next_row + waiting == self.shape[0]
        if waiting >= self.ROWS_PER_STRIP or last:
            joined = np.concatenate(self._waiting)
            whole = waiting if last else waiting // self.ROWS_PER_STRIP * self.ROWS_PER_STRIP
            self._write(joined[:whole])
            self._waiting = [joined[whole:]] if whole < waiting else []

    def _write(self, rows: np.ndarray) -> None:
        from rasterio.windows import Window

        window = Window(0, self.next_row, self.shape[1], len(rows))
        self.dataset.write(np.ascontiguousarray(np.moveaxis(rows, -1, 0)), window=window)
        self.next_row += len(rows)

    def __exit__(self, kind, value, traceback):
        self.dataset.close()
        if kind is None and self.next_row != self.shape[0]:
            raise ValueError(f"{self.path.name}: got {self.next_row} of {self.shape[0]} rows")
        return False


def _describe(dataset, colormap: dict | None, descriptions) -> None:
    if colormap is not None:
        dataset.write_colormap(1, colormap)
    for band, name in enumerate(descriptions or (), start=1):
        dataset.set_band_description(band, name)


class GeoTiffWriters:
    """mask.tif and probabilities.tif written strip by strip with the input's georeference.

    mask.tif: one uint8 band of class indices with a colour table of the display colours;
    probabilities.tif: one uint8 band per class (probability × 255, band i+1 = class i, named).
    Striped (StripedGeoTiff), or with cog Cloud-Optimized (CogWriter: 512-pixel tiles,
    overviews, the mask's by the most frequent class and the probabilities' by their mean),
    which web maps and QGIS read a part at a time over HTTP. `nodata` marks pixels of the
    mask without imagery (the probabilities are 0 there).
    """

    def __init__(self, mask_path, probabilities_path, height, width, georeference, names, display, *,
                 cog: bool = False, nodata: int | None = None):  # fmt: skip
        colormap = {i: tuple(int(v) for v in color) + (255,) for i, color in enumerate(display)}
        where = (georeference.crs, georeference.transform)
        if cog:
            self.files = (
                CogWriter(mask_path, height, width, 1, *where, resampling="mode", nodata=nodata, colormap=colormap,
                          descriptions=["class index"]),
                CogWriter(probabilities_path, height, width, len(names), *where, resampling="mean", descriptions=names),
            )  # fmt: skip
        else:
            self.files = (
                StripedGeoTiff(mask_path, height, width, 1, *where, nodata=nodata, colormap=colormap,
                               descriptions=["class index"]),
                StripedGeoTiff(probabilities_path, height, width, len(names), *where, descriptions=names),
            )  # fmt: skip

    def __enter__(self):
        import rasterio

        with contextlib.ExitStack() as stack:
            # GDAL caches blocks up to 5% of RAM by default; a small cache keeps memory bounded.
            stack.enter_context(rasterio.Env(GDAL_CACHEMAX=64))
            for file in self.files:
                stack.enter_context(file)
            self._stack = stack.pop_all()
        return self

    def write(self, top: int, labels: np.ndarray, probability_bytes: np.ndarray) -> None:
        """Take rows [top, top + rows) of labels (rows, W) and probability bytes (rows, W, C)."""
        self.files[0].write(top, labels)
        self.files[1].write(top, probability_bytes)

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


# --- Assembling tiled GeoTIFFs into COG order ------------------------------------------------


class _Ifd:
    """The first IFD of a little-endian TIFF or BigTIFF: its tags as (type, count, raw value
    bytes) by number, and where its tiles lie."""

    def __init__(self, path: Path):
        with open(path, "rb") as file:
            header = file.read(16)
            if header[:2] != b"II":
                raise ValueError(f"{path.name}: not a little-endian TIFF")
            version = struct.unpack_from("<H", header, 2)[0]
            self.bigtiff = version == 43
            if version not in (42, 43):
                raise ValueError(f"{path.name}: TIFF version {version}")
            offset = struct.unpack_from("<Q", header, 8)[0] if self.bigtiff else struct.unpack_from("<I", header, 4)[0]
            count_format, entry_format, entry_size, inline = ("<Q", "<HHQ", 20, 8) if self.bigtiff else ("<H", "<HHI", 12, 4)
            file.seek(offset)
            (entries,) = struct.unpack(count_format, file.read(struct.calcsize(count_format)))
            table = file.read(entries * entry_size)
            self.tags: dict[int, tuple[int, int, bytes]] = {}
            for index in range(entries):
                code, kind, count = struct.unpack_from(entry_format, table, index * entry_size)
                size = TYPE_SIZES[kind] * count
                start = index * entry_size + struct.calcsize(entry_format)
                if size <= inline:
                    raw = table[start : start + size]
                else:
                    (where,) = struct.unpack_from("<Q" if self.bigtiff else "<I", table, start)
                    file.seek(where)
                    raw = file.read(size)
                self.tags[code] = (kind, count, raw)
        self.offsets = self._values(TILE_OFFSETS)
        self.byte_counts = self._values(TILE_BYTE_COUNTS)
        if len(self.offsets) != len(self.byte_counts) or not len(self.offsets):
            raise ValueError(f"{path.name}: not a tiled TIFF")

    def _values(self, code: int) -> np.ndarray:
        kind, count, raw = self.tags[code]
        return np.frombuffer(raw, dtype={3: "<u2", 4: "<u4", 16: "<u8"}[kind], count=count).astype(np.int64)


def _ghost_area() -> bytes:
    """GDAL's structural metadata of a COG, right after the header."""
    body = ("LAYOUT=IFDS_BEFORE_DATA\nBLOCK_ORDER=ROW_MAJOR\nBLOCK_LEADER=SIZE_AS_UINT4\n"
            "BLOCK_TRAILER=LAST_4_BYTES_REPEATED\nKNOWN_INCOMPATIBLE_EDITION=NO\n")  # fmt: skip
    ghost = f"GDAL_STRUCTURAL_METADATA_SIZE={len(body):06d} bytes\n{body}"
    if len(ghost) % 2:  # the first IFD starts on a word boundary
        body += " "
        ghost = f"GDAL_STRUCTURAL_METADATA_SIZE={len(body):06d} bytes\n{body}"
    return ghost.encode("ascii")


def _ifd_bytes(tags: dict[int, tuple[int, int, bytes]], start: int, bigtiff: bool, last: bool) -> bytes:
    """An IFD at file offset `start` with its out-of-line values after it; its next-IFD offset
    points right after those values (or is 0 for the last)."""
    number_format, word, inline = ("<Q", "<Q", 8) if bigtiff else ("<H", "<I", 4)
    codes = sorted(tags)
    entry_size = 4 + 2 * inline  # number, type, count, value (or where the value is)
    table_size = struct.calcsize(number_format) + len(codes) * entry_size + inline
    values, table = bytearray(), bytearray(struct.pack(number_format, len(codes)))
    for code in codes:
        kind, count, raw = tags[code]
        table += struct.pack("<HH", code, kind) + struct.pack(word, count)
        if len(raw) <= inline:
            table += raw.ljust(inline, b"\0")
        else:
            table += struct.pack(word, start + table_size + len(values))
            values += raw
            values += b"\0" * (len(values) % 2)  # the next value starts on a word boundary
    table += struct.pack(word, 0 if last else start + table_size + len(values))
    assert len(table) == table_size
    return bytes(table + values)


def assemble(level_paths: list[Path], out_path: Path, bigtiff: bool | None = None) -> None:
    """Write tiled TIFFs (the full resolution first, then each overview, coarser and coarser)
    into one Cloud-Optimized GeoTIFF at out_path, copying their compressed tiles as they are.

    bigtiff: write a BigTIFF (None: only where a classic TIFF's 4 GiB would not hold it).
    """
    ifds = [_Ifd(Path(path)) for path in level_paths]
    tile_bytes = sum(int(ifd.byte_counts.sum()) + 8 * len(ifd.byte_counts) for ifd in ifds)
    if bigtiff is None:  # classic TIFF addresses 4 GiB; leave room for the IFDs and their tile tables
        bigtiff = tile_bytes + 16 * sum(len(ifd.offsets) for ifd in ifds) > 2**32 - 2**24
    bigtiff = bigtiff or any(ifd.bigtiff for ifd in ifds)
    offset_type, offset_format = (LONG8, "<u8") if bigtiff else (LONG, "<u4")
    header_size = 16 if bigtiff else 8
    ghost = _ghost_area()

    def tags_of(number: int, offsets: np.ndarray) -> dict:
        ifd = ifds[number]
        tags = {code: value for code, value in ifd.tags.items() if code not in STRIP_TAGS}
        if number:
            tags = {code: value for code, value in tags.items() if code not in MAIN_ONLY_TAGS}
            tags[NEW_SUBFILE_TYPE] = (LONG, 1, struct.pack("<I", 1))  # a reduced-resolution image
        else:
            tags.pop(NEW_SUBFILE_TYPE, None)
        counts = ifd.byte_counts
        tags[TILE_OFFSETS] = (offset_type, len(offsets), offsets.astype(offset_format).tobytes())
        tags[TILE_BYTE_COUNTS] = (offset_type, len(counts), counts.astype(offset_format).tobytes())
        return tags

    # The IFDs' sizes do not depend on the offsets they hold: lay them out with zeros first.
    start = header_size + len(ghost)
    starts = []
    for number, ifd in enumerate(ifds):
        starts.append(start)
        start += len(_ifd_bytes(tags_of(number, np.zeros(len(ifd.offsets), np.int64)), start, bigtiff, False))
    # Then the tiles, the coarsest level first, each as (size, tile, its last 4 bytes).
    offsets = [None] * len(ifds)
    for number in reversed(range(len(ifds))):
        counts = ifds[number].byte_counts
        if (counts < 4).any():
            raise ValueError(f"{Path(level_paths[number]).name}: a tile of under 4 bytes")
        leaders = np.cumsum(np.concatenate([[0], counts[:-1] + 8]))
        offsets[number] = start + 4 + leaders
        start += int(counts.sum()) + 8 * len(counts)
    with open(out_path, "wb") as out:
        if bigtiff:
            out.write(b"II" + struct.pack("<HHHQ", 43, 8, 0, header_size + len(ghost)))
        else:
            out.write(b"II" + struct.pack("<HI", 42, header_size + len(ghost)))
        out.write(ghost)
        for number in range(len(ifds)):
            assert out.tell() == starts[number]
            out.write(_ifd_bytes(tags_of(number, offsets[number]), starts[number], bigtiff, number == len(ifds) - 1))
        for number in reversed(range(len(ifds))):
            ifd = ifds[number]
            with open(level_paths[number], "rb") as source:
                for where, size in zip(ifd.offsets.tolist(), ifd.byte_counts.tolist()):
                    source.seek(where)
                    tile = source.read(size)
                    out.write(struct.pack("<I", size) + tile + tile[-4:])
        assert out.tell() == start
