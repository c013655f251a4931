"""Reading images: files and bytes to RGB uint8, decoded whole (OpenCV) or in strips of rows (GDAL).

Every stage reads images through here: the cache builders (`read_rgb`), label counting
(osmseg.labels.read_label), the tile checks (`decode_unchanged`) and segmentation
(`open_image`, which streams large and georeferenced rasters a strip of rows at a time).
OpenCV decodes to BGR; everything returned here is RGB.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import mercantile
import numpy as np

from osmseg import tiles
from osmseg.errors import UserError

TIFF_SUFFIXES = (".tif", ".tiff")
READABLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp") + TIFF_SUFFIXES  # what open_image reads
# Non-TIFF images above this many pixels are streamed from disk rather than decoded whole
# (open_image): a 4096 × 4096 RGB image decoded whole takes 48 MiB, a 20,000² one 1.2 GiB.
STREAM_PIXELS = 4096 * 4096


class NotEightBit(ValueError):
    """An image whose samples are not 8-bit (16-bit or float GeoTIFFs, 16-bit PNGs)."""


def decode_rgb(data: bytes | np.ndarray) -> np.ndarray | None:
    """Decode image bytes as RGB uint8 (H, W, 3); None when they cannot be decoded.

    Palette and grey images come back as RGB (cv2.IMREAD_COLOR expands palettes and drops
    alpha).

    Raises:
        NotEightBit: 16-bit or float samples. OpenCV would keep only their high byte, which
            turns the 12-bit values of most satellite GeoTIFFs nearly black; the user
            should choose the scaling.
    """
    import cv2

    data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    if data.size == 0:
        return None
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if bgr is None:
        return None
    if bgr.dtype != np.uint8:
        raise NotEightBit(f"{bgr.dtype} samples, not 8-bit (rescale to 8-bit RGB first, e.g. gdal_translate -ot Byte -scale)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_rgb(path: str | os.PathLike) -> np.ndarray | None:
    """Read an image file as RGB uint8 (H, W, 3); None when it is missing or cannot be decoded.

    Raises:
        NotEightBit: see decode_rgb.
    """
    # np.fromfile + imdecode rather than imread: imread cannot open non-ASCII paths on
    # some platforms and gives no way to tell "missing" from "corrupt".
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    return decode_rgb(data)


def decode_unchanged(data: bytes | np.ndarray) -> np.ndarray | None:
    """Decode image bytes as stored: grey (H, W), RGB or RGBA (H, W, 3|4), 8 or 16 bits; None if undecodable."""
    import cv2

    data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if pixels is None or pixels.size == 0:
        return None
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return pixels[:, :, ::-1]  # OpenCV decodes to BGR
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        return pixels[:, :, [2, 1, 0, 3]]
    return pixels


@dataclass
class Georeference:
    """Where a raster lies: its rasterio CRS and affine transform (pixel -> CRS), and the XYZ
    tile it is, when it is one (an image named {z}-{x}-{y}, as the pipeline names tiles)."""

    crs: object
    transform: object
    tile: mercantile.Tile | None = None

    @classmethod
    def of_tile(cls, tile: mercantile.Tile, width: int, height: int) -> Georeference:
        """An image of `tile`, `width` × `height` pixels: EPSG:3857 over the tile's bounds."""
        from affine import Affine
        from rasterio.crs import CRS

        return cls(CRS.from_epsg(3857), Affine(*tiles.pixel_transform([tile], width, height)), tile)


class ImageReader:
    """Rows of an image as RGB uint8, whatever the file holds.

    Attributes:
        path: the file.
        height, width: in pixels.
        notes: what was converted on the way (greyscale, alpha, 16-bit...).
        georeference: a Georeference for a georeferenced raster, else None.
    """

    path: Path
    height: int
    width: int
    notes: list[str]
    georeference: Georeference | None = None

    def read(self, top: int, bottom: int) -> np.ndarray:
        """RGB uint8 (bottom - top, width, 3) rows [top, bottom)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def to_rgb8(pixels: np.ndarray, scale_max: float | None = None) -> np.ndarray:
    """Turn (H, W) or (H, W, bands) pixels of any dtype into RGB uint8 (H, W, 3).

    Greyscale is repeated into three channels; a fourth band (alpha) and any further bands
    are dropped; two bands are read as grey + alpha. Non-uint8 values are scaled linearly so
    that `scale_max` (default: the array's maximum) becomes 255.
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] <= 2:
        pixels = np.repeat(pixels[:, :, :1], 3, axis=2)
    else:
        pixels = pixels[:, :, :3]
    if pixels.dtype != np.uint8:
        if scale_max is None:
            scale_max = float(pixels.max()) if pixels.size else 0.0
        scale = 255.0 / scale_max if scale_max > 0 else 0.0
        pixels = np.clip(pixels.astype(np.float32) * scale + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels)


def _conversion_notes(bands: int, dtype: np.dtype, scale_max: float | None) -> list[str]:
    notes = []
    if bands == 1:
        notes.append("greyscale image: repeated into three RGB channels")
    elif bands == 2:
        notes.append("greyscale + alpha image: alpha dropped, grey repeated into RGB")
    elif bands == 4:
        notes.append("RGBA image: alpha channel dropped")
    elif bands > 4:
        notes.append(f"{bands}-band image: the first three bands used as RGB")
    if dtype != np.uint8:
        notes.append(f"{dtype} image: scaled linearly to 8 bits ({scale_max:g} -> 255)")
    return notes


class ArrayReader(ImageReader):
    """An image already in memory (segment_array, tests and benches)."""

    def __init__(self, image: np.ndarray, path: str | os.PathLike = "<array>", notes: list[str] | None = None):
        self.path = Path(path)
        self.image = image
        self.height, self.width = image.shape[:2]
        self.notes = list(notes or [])

    def read(self, top: int, bottom: int) -> np.ndarray:
        return self.image[top:bottom]


class RasterReader(ImageReader):
    """Any raster GDAL reads (PNG, JPEG, WebP, BMP, TIFF, GeoTIFF), read by rasterio in
    windows of rows; palette images are looked up in their colour table."""

    def __init__(self, path: Path):
        import rasterio
        from rasterio.enums import ColorInterp
        from rasterio.windows import Window

        self._window, self._read_error = Window, rasterio.errors.RasterioIOError
        self.path = path
        # GDAL's block cache may grow to 5% of RAM by default; reading strips needs little.
        self._env = rasterio.Env(GDAL_CACHEMAX=64)
        self._env.__enter__()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self._dataset = rasterio.open(path)
        except rasterio.errors.RasterioIOError as error:
            self._env.__exit__(None, None, None)
            raise UserError(
                f"{path}: not an image we can read ({error}); pass a PNG, JPEG, WebP, BMP or TIFF file"
            ) from None
        dataset = self._dataset
        if dataset.count == 0:
            self.close()
            raise UserError(f"{path}: holds no raster bands; pass a PNG, JPEG, WebP, BMP or TIFF file")
        self.height, self.width = dataset.height, dataset.width
        self._bands = list(range(1, min(dataset.count, 3) + 1)) if dataset.count != 2 else [1]
        dtype = np.dtype(dataset.dtypes[0])
        self._scale_max = None
        self._palette = None
        if dataset.colorinterp[0] == ColorInterp.palette and dtype == np.uint8:
            colours = dataset.colormap(1)
            self._palette = np.zeros((256, 3), dtype=np.uint8)
            for index, colour in colours.items():
                self._palette[index] = colour[:3]
            self._bands = [1]
            self.notes = ["palette image: indices looked up in its colour table"]
        elif dtype != np.uint8:
            # A decimated read (GDAL picks overviews when there are some) estimates the
            # maximum without reading the whole scene; values above it are clipped.
            factor = max(1, math.ceil(max(self.height, self.width) / 2048))
            shape = (len(self._bands), max(1, self.height // factor), max(1, self.width // factor))
            self._scale_max = float(dataset.read(self._bands, out_shape=shape).max())
        if self._palette is None:
            self.notes = _conversion_notes(dataset.count, dtype, self._scale_max)
        if dataset.crs is not None:
            self.georeference = Georeference(dataset.crs, dataset.transform)

    def read(self, top: int, bottom: int) -> np.ndarray:
        try:
            if self._dataset.driver != "GTiff" and bottom - top == self.height > 1:
                # GDAL's PNG driver reads a whole image by another path, which returns zeros
                # for a truncated or corrupt file without a word; reads of part of it fail.
                middle = self.height // 2
                pixels = np.concatenate([self._read(0, middle), self._read(middle, self.height)], axis=1)
            else:
                pixels = self._read(top, bottom)
        except self._read_error as error:
            raise UserError(
                f"{self.path}: cannot read rows {top}-{bottom} ({error}); "
                "the file is truncated or corrupt: copy or export it again"
            ) from None
        if self._palette is not None:
            return self._palette[pixels[0]]
        return to_rgb8(np.moveaxis(pixels, 0, -1), self._scale_max)

    def _read(self, top: int, bottom: int) -> np.ndarray:
        return self._dataset.read(self._bands, window=self._window(0, top, self.width, bottom - top))

    def close(self) -> None:
        try:
            self._dataset.close()
        finally:
            self._env.__exit__(None, None, None)


def open_image(path: str | os.PathLike) -> ImageReader:
    """Open an image for reading as RGB uint8 rows.

    TIFFs, georeferenced rasters (a PNG or JPEG with a world file and .aux.xml too) and
    images of more than STREAM_PIXELS pixels are read by rasterio (GDAL) in windows of
    rows, so memory does not grow with the scene. Smaller PNG, JPEG, WebP and BMP files are
    decoded whole by OpenCV, the faster for them, and turned from BGR into RGB.

    Raises:
        UserError: the file is missing, not a file, or not an image we can decode.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such image; pass an existing image file or directory")
    if not path.is_file():
        raise UserError(f"{path}: not a file; pass an image file or a directory of images")
    if path.suffix.lower() in TIFF_SUFFIXES:
        return RasterReader(path)
    try:
        raster = RasterReader(path)
    except UserError:
        raster = None  # not for GDAL; OpenCV may still decode it
    if raster is not None and (raster.georeference is not None or raster.height * raster.width > STREAM_PIXELS):
        return raster
    pixels = decode_unchanged(np.fromfile(path, dtype=np.uint8))
    if pixels is None:
        if raster is not None:  # a format only GDAL knows, or a damaged file it reports when read
            return raster
        raise UserError(f"{path}: not an image we can decode; pass a PNG, JPEG, WebP, BMP or TIFF file")
    if raster is not None:
        raster.close()
    bands = 1 if pixels.ndim == 2 else pixels.shape[2]
    scale_max = float(pixels.max()) if pixels.dtype != np.uint8 else None
    notes = _conversion_notes(bands, pixels.dtype, scale_max)
    return ArrayReader(to_rgb8(pixels, scale_max), path, notes)
