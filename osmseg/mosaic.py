"""A block of image tiles read as one seamless image, a row of tiles at a time.

`MosaicReader` is an osmseg.rasters.ImageReader over the tile files of a tiles.TileBlock
({z}-{x}-{y}.jpg|png|webp in one folder, as `prepare.py images` and `prepare.py map` store
them): rows are read top to bottom, and only the tile row being read is decoded and held,
so memory does not grow with the block. Its georeference is the tile grid's own (EPSG:3857,
tiles.TileBlock.transform). A tile with no image (the source does not have it, or it was
rejected) reads as black and counts as having no imagery (`valid`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from osmseg import datafiles, rasters, tiles
from osmseg.errors import UserError


class MosaicReader(rasters.ImageReader):
    """The image of a block of tiles (see the module docstring).

    Args:
        block: the tiles.
        tiles_dir: the folder of tile images.
        tile_size: the tiles' width and height in pixels.
        ready: called with a tile row's index before it is read, and returns when that row's
            tiles are in tiles_dir (a download running alongside); None: all are there.
        workers: threads decoding a row's tiles.
    """

    def __init__(
        self,
        block: tiles.TileBlock,
        tiles_dir: str | Path,
        tile_size: int = 256,
        ready: Callable[[int], None] | None = None,
        workers: int = 4,
    ):
        from affine import Affine
        from rasterio.crs import CRS

        self.block, self.tiles_dir, self.tile_size = block, Path(tiles_dir), tile_size
        self.path = self.tiles_dir
        self.height, self.width = block.rows * tile_size, block.columns * tile_size
        self.notes: list[str] = []
        self.georeference = rasters.Georeference(CRS.from_epsg(3857), Affine(*block.transform(tile_size)))
        self.missing: set = set()  # tiles read as black: no image
        self._ready = ready
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="mosaic")
        self._lock = threading.Lock()
        self._row_index: int | None = None
        self._row_pixels: np.ndarray | None = None
        self._valid: dict[int, np.ndarray] = {}  # tile row -> bool per column, kept for every row read

    def _tile(self, tile) -> np.ndarray | None:
        path = datafiles.find_image(self.tiles_dir, tile)
        if path is None:
            return None
        image = rasters.read_rgb(path)
        if image is None or image.shape[:2] != (self.tile_size, self.tile_size):
            return None
        return image

    def _load_row(self, index: int) -> None:
        if self._ready is not None:
            self._ready(index)
        size = self.tile_size
        pixels = np.zeros((size, self.width, 3), dtype=np.uint8)
        valid = np.ones(self.block.columns, dtype=bool)
        row = self.block.row(index)
        for column, image in enumerate(self._pool.map(self._tile, row)):
            if image is None:
                valid[column] = False
                self.missing.add(row[column])
            else:
                pixels[:, column * size : (column + 1) * size] = image
        self._row_index, self._row_pixels, self._valid[index] = index, pixels, valid

    def _check(self, top: int, bottom: int) -> range:
        if not 0 <= top <= bottom <= self.height:
            raise ValueError(f"rows {top}-{bottom} are outside the mosaic's 0-{self.height}")
        size = self.tile_size
        return range(top // size, (bottom - 1) // size + 1) if bottom > top else range(0)

    def read(self, top: int, bottom: int) -> np.ndarray:
        size = self.tile_size
        parts = []
        with self._lock:
            for index in self._check(top, bottom):
                if index != self._row_index:
                    if self._row_index is not None and index < self._row_index:
                        raise ValueError(f"tile row {index} was read already: read the mosaic top to bottom")
                    self._load_row(index)
                start, stop = max(top, index * size) - index * size, min(bottom, (index + 1) * size) - index * size
                parts.append(self._row_pixels[start:stop])
        return np.concatenate(parts) if parts else np.zeros((0, self.width, 3), dtype=np.uint8)

    def valid(self, top: int, bottom: int) -> np.ndarray:
        """bool (bottom - top, width): whether each pixel of those rows, read already, has imagery."""
        size = self.tile_size
        parts = []
        for index in self._check(top, bottom):
            if index not in self._valid:
                raise ValueError(f"tile row {index} has not been read yet")
            rows = min(bottom, (index + 1) * size) - max(top, index * size)
            parts.append(np.broadcast_to(np.repeat(self._valid[index], size), (rows, self.width)))
        return np.concatenate(parts) if parts else np.zeros((0, self.width), dtype=bool)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def check_tiles_exist(block: tiles.TileBlock, tiles_dir: Path) -> None:
    """Refuse a block none of whose tiles has an image (nothing to map)."""
    if not any(datafiles.find_image(tiles_dir, tile) for tile in block.tiles()):
        raise UserError(f"{tiles_dir}: holds no image of the box's {len(block)} tiles; nothing to map")
