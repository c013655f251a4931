"""Sliding-window segmentation of images of any size, blended without seams, in strips.

A model sees windows of a fixed size (its input size). An image of any other size is cut
into overlapping windows laid on a regular grid; each window's class probabilities are
weighted by a 2D Hann window with a floor (weights fall off towards the window's edges but
never reach zero, so the image's own edges still count) and the weights are normalised so
that, at every pixel, the weights of the windows covering it sum to 1. Images smaller than
a window are padded by reflection and cropped back.

Memory stays bounded for very large scenes: windows are processed one row of windows at a
time and only that row's accumulator (window × image width × classes, float32) is kept;
rows of pixels that no later window touches are handed on as a `Strip` and forgotten.

This module never imports Keras: it takes a `predict` function, batch float32
(B, S, S, 3) RGB 0..255 -> probabilities (B, S, S, C), so it can be tested with a fake model.

Files written by `write_scene` into an output directory:

- `mask.png`: RGB 8-bit PNG, the image's size; class i in the classes file's colour
  (#0i0i0i for classes/mine.json), background #000000, so it compares pixel for pixel with
  data/labels/color/*.png.
- `segments.png`: RGB 8-bit PNG, the image's size; the image in its true colours with each
  non-background class's display colour (osmseg.visualise.display_palette) blended over it.
- `heatmap-<class>.png`: RGB PNG per class (background included), the blended probability
  of that class colour-mapped (viridis, 0 dark to 1 yellow) with a labelled scale bar on the
  right; downscaled (area mean) so that the longer side is at most `heatmap_size` pixels.
- `mask.tif` and `probabilities.tif` (only for georeferenced input, e.g. a GeoTIFF):
  GeoTIFFs with the input's CRS and transform, in 64-row strips, deflate-compressed. mask.tif: one uint8 band of
  class indices (0 background) with a colour table of the display colours. probabilities.tif:
  one uint8 band per class (band i+1 = class i, described by its name), probability × 255
  rounded.
- `segments.geojson` (with geojson=True): a FeatureCollection of Polygons (with holes) of
  the non-background classes, properties {"class": name, "class_index": i, "area": area}. Without
  georeferencing, coordinates are pixels (x = column, y = row, origin at the top-left corner
  of the image); with it, they are in the input's CRS, named in a top-level "crs" member.
- `counts.json`, written last (its presence means the scene is complete): {"image",
  "width", "height", "pixels", "counts": {class name: pixel count, every class, summing to
  pixels}, "window", "overlap", "notes", "files": [the other outputs], "inputs": {what
  the result was made from}}.

Images are RGB uint8 (H, W, 3) in memory. TIFFs, georeferenced rasters and images larger
than 4096 × 4096 pixels (PNG, JPEG, WebP, BMP) are read by rasterio in windows of rows, each
row once, top to bottom, so only the accumulators and one strip of pixels are in memory
whatever the scene's size; smaller images are decoded whole by OpenCV.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from osmseg import visualise
from osmseg.atomic import atomic_path, write_text_atomic
from osmseg.classes import Classes
from osmseg.errors import UserError

Predict = Callable[[np.ndarray], np.ndarray]

# Weight at a window's very edge relative to its centre: small, so that a pixel near one
# window's border is decided by the window that sees it near its centre, yet above zero so
# that the image's own border pixels (covered by one window only) still have a weight.
# bench/bench_feed_forward.py: with 0.05, pixels within 8 px of window borders erred 2-4×
# as much as interior ones; with 0.01, 1.2-2×.
WINDOW_FLOOR = 0.01
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp") + TIFF_SUFFIXES
HEATMAP_SIZE = 1024
# Non-TIFF images above this many pixels are streamed from disk rather than decoded whole
# (open_image): a 4096 × 4096 RGB image decoded whole takes 48 MiB, a 20,000² one 1.2 GiB.
STREAM_PIXELS = 4096 * 4096
CHUNK_ROWS = 64  # rows handed to the output thread at a time
WEIGHT_CACHE_BYTES = 32 << 20  # blending weights kept for reuse (segment_strips)


# --- Window maths (pure) ---------------------------------------------------------------


def window_stride(window: int, overlap: float) -> int:
    """The step between windows that overlap by `overlap` (a fraction in [0, 1))."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return max(1, round(window * (1 - overlap)))


def window_positions(length: int, window: int, stride: int) -> np.ndarray:
    """Start offsets of windows covering [0, max(length, window)) along one axis.

    The first window starts at 0 and the last ends at the end; the windows between are
    spread evenly, so that no step is longer than `stride`.

    Returns:
        int64 (n,) increasing offsets.
    """
    if length <= window:
        return np.zeros(1, dtype=np.int64)
    count = math.ceil((length - window) / stride) + 1
    return np.round(np.linspace(0, length - window, count)).astype(np.int64)


def window_profile(window: int, floor: float = WINDOW_FLOOR) -> np.ndarray:
    """float64 (window,): a Hann window sampled at pixel centres, lifted to `floor`."""
    centres = (np.arange(window) + 0.5) / window
    return floor + (1 - floor) * np.sin(np.pi * centres) ** 2


def axis_weights(length: int, window: int, positions: np.ndarray, floor: float = WINDOW_FLOOR) -> np.ndarray:
    """Normalised 1D blending weights of the windows along one axis.

    Args:
        length: the (padded) axis length the windows cover, >= window.
        window: the window size.
        positions: the windows' start offsets (window_positions).
        floor: the profile's edge value (> 0).

    Returns:
        float32 (len(positions), window): row k holds the weights of window k at its pixels;
        at every pixel of the axis, the weights of the windows covering it sum to 1.
    """
    profile = window_profile(window, floor)
    total = np.zeros(max(length, window))
    for start in positions:
        total[start : start + window] += profile
    weights = np.stack([profile / total[start : start + window] for start in positions])
    return weights.astype(np.float32)


# --- Reading images ----------------------------------------------------------------------


@dataclass
class Georeference:
    """Where a raster lies: its rasterio CRS and affine transform (pixel -> CRS)."""

    crs: object
    transform: object


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
    import cv2

    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.size == 0:
        if raster is not None:  # a format only GDAL knows, or a damaged file it reports when read
            return raster
        raise UserError(f"{path}: not an image we can decode; pass a PNG, JPEG, WebP, BMP or TIFF file")
    if raster is not None:
        raster.close()
    bands = 1 if pixels.ndim == 2 else pixels.shape[2]
    if bands == 3:
        pixels = pixels[:, :, ::-1]  # OpenCV decodes to BGR
    elif bands == 4:
        pixels = pixels[:, :, [2, 1, 0, 3]]
    scale_max = float(pixels.max()) if pixels.dtype != np.uint8 else None
    notes = _conversion_notes(bands, pixels.dtype, scale_max)
    return ArrayReader(to_rgb8(pixels, scale_max), path, notes)


# --- Models ----------------------------------------------------------------------------------


def model_predict(run: Callable[[np.ndarray], np.ndarray], batch_size: int) -> Predict:
    """A Predict function from a model's batch function (model.inference(network), or a
    Keras model's predict_on_batch).

    A model traces a new graph for each new batch shape; a short batch (a scene's last) is
    padded with zeros up to a power of two, so a model sees at most log2(batch_size) + 2
    shapes however many scenes of whatever sizes it segments.
    """

    def predict(batch: np.ndarray) -> np.ndarray:
        count = len(batch)
        size = min(batch_size, 1 << (count - 1).bit_length())
        if size > count:
            batch = np.concatenate([batch, np.zeros((size - count,) + batch.shape[1:], batch.dtype)])
        return np.asarray(run(batch))[:count]

    return predict


# --- Sliding windows in strips -------------------------------------------------------------


@dataclass
class Strip:
    """Finished rows of a scene: rows [top, top + len(image)) of the image and their
    blended probabilities, float32 (rows, W, C), summing to 1 over classes.

    `probabilities` is a view into segment_strips' accumulator, valid until the generator
    resumes (no copy: on a 20,000-pixel-wide scene a strip is hundreds of MB); copy it to
    keep it.
    """

    top: int
    image: np.ndarray
    probabilities: np.ndarray


def _pad_to(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reflect-pad (rows, cols, ...) at the bottom and right to at least height × width."""
    extra_rows, extra_cols = max(0, height - pixels.shape[0]), max(0, width - pixels.shape[1])
    if not extra_rows and not extra_cols:
        return pixels
    padding = [(0, extra_rows), (0, extra_cols)] + [(0, 0)] * (pixels.ndim - 2)
    mode = "reflect" if min(pixels.shape[:2]) > 1 else "edge"
    return np.pad(pixels, padding, mode=mode)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 (num_classes,): how many pixels of uint8 labels hold each class index."""
    import cv2

    if labels.size >= 1 << 24:  # calcHist counts in float32, exact below 2**24
        return np.bincount(labels.ravel(), minlength=num_classes)[:num_classes]
    # 4× faster than np.bincount, which widens every label to int64 first.
    histogram = cv2.calcHist([np.ascontiguousarray(labels)], [0], None, [256], [0, 256])
    return histogram.ravel()[:num_classes].astype(np.int64)


def count_windows(height: int, width: int, window: int, overlap: float) -> int:
    """How many windows segment_strips runs the model on for an image of this size."""
    stride = window_stride(window, overlap)
    return len(window_positions(height, window, stride)) * len(window_positions(width, window, stride))


def segment_strips(
    reader: ImageReader,
    predict: Predict,
    num_classes: int,
    window: int,
    overlap: float = 0.25,
    batch_size: int = 8,
    floor: float = WINDOW_FLOOR,
    progress: bool = False,
) -> Iterator[Strip]:
    """Segment an image in overlapping windows and yield its blended rows, top to bottom.

    Args:
        reader: the image (ImageReader).
        predict: batch float32 (B, window, window, 3) RGB 0..255 -> (B, window, window,
            num_classes) probabilities.
        num_classes: the model's number of outputs.
        window: the model's input size.
        overlap: the fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per predict call.
        floor: the blending window's edge weight (see window_profile).
        progress: show a progress bar (tqdm, stderr) counting windows.

    Yields:
        Strips covering every row once, in order; their widths are the image's.
    """
    import cv2
    from tqdm import tqdm

    height, width = reader.height, reader.width
    stride = window_stride(window, overlap)
    padded_height, padded_width = max(height, window), max(width, window)
    rows = window_positions(height, window, stride)
    cols = window_positions(width, window, stride)
    row_weights = axis_weights(padded_height, window, rows, floor)
    # Each column weight repeated once per class, so that a window's weights match its
    # probabilities seen as (window, window × classes) rows (see the accumulation below).
    col_weights = np.repeat(axis_weights(padded_width, window, cols, floor), num_classes, axis=1)
    # Steps between windows differ by a pixel at most, so windows share a few distinct
    # weight profiles along each axis: their products are made once each, within a bound.
    kinds: dict[bytes, int] = {}
    row_kinds = [kinds.setdefault(weights.tobytes(), len(kinds)) for weights in row_weights]
    col_kinds = [kinds.setdefault(weights.tobytes(), len(kinds)) for weights in col_weights]
    products: dict[tuple[int, int], np.ndarray] = {}

    def weight_of(k: int, index: int) -> np.ndarray:
        key = (row_kinds[k], col_kinds[index])
        weight = products.get(key)
        if weight is None:
            weight = np.outer(row_weights[k], col_weights[index])
            if (len(products) + 1) * weight.nbytes <= WEIGHT_CACHE_BYTES:
                products[key] = weight
        return weight

    pixels_of_row: dict[int, np.ndarray] = {}

    def windows() -> Iterator[tuple[int, int, np.ndarray]]:
        # Each row of pixels is read once, top to bottom: rows shared with the previous row
        # of windows are kept, so readers that decode sequentially (PNG, JPEG, compressed
        # TIFF strips) never go back.
        kept, kept_top = np.zeros((0, width, 3), dtype=np.uint8), 0
        for k, top in enumerate(rows):
            top, bottom = int(top), int(min(top + window, height))
            shared = kept[max(0, top - kept_top) :]
            fresh = reader.read(top + len(shared), bottom)
            pixels = np.concatenate([shared, fresh]) if len(shared) else fresh
            kept, kept_top = pixels, top
            pixels_of_row[k] = pixels
            strip = _pad_to(pixels, window, padded_width)  # uint8: a float copy is 4× the size
            for index, left in enumerate(cols):
                yield k, index, strip[:, left : left + window]

    # The accumulator holds the rows of the current row of windows; when its last window is
    # in, the rows above the next row of windows are final and leave as a Strip. Batches run
    # on across rows of windows, so only a scene's very last batch is short.
    accumulator = np.zeros((window, padded_width, num_classes), dtype=np.float32)
    stream = windows()

    def batches() -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
        while batch := list(itertools.islice(stream, batch_size)):
            yield [(k, index) for k, index, _ in batch], np.stack([tile for *_, tile in batch], dtype=np.float32)

    bar = tqdm(total=len(rows) * len(cols), unit="window", file=sys.stderr, disable=not progress, leave=False)
    # The model runs on a thread of its own, a batch ahead: while it works on one batch
    # (TensorFlow and OpenCV release the GIL), this thread blends the one before and the
    # consumer turns finished strips into outputs; run in turn, the model sat idle meanwhile.
    with ThreadPoolExecutor(max_workers=1) as model_thread:
        running = None  # (windows, future) of the batch the model works on
        try:
            for batch, tiles in itertools.chain(batches(), [(None, None)]):
                previous = running
                running = (batch, model_thread.submit(predict, tiles)) if batch is not None else None
                if previous is None:
                    continue
                batch, future = previous
                probabilities = np.asarray(future.result(), dtype=np.float32)
                expected = (len(batch), window, window, num_classes)
                if probabilities.shape != expected:
                    raise ValueError(f"predict returned shape {probabilities.shape}, expected {expected}")
                for (k, index), window_probabilities in zip(batch, probabilities):
                    left = cols[index]
                    # accumulator += probabilities × weights in one pass and no temporary:
                    # 40% faster than numpy's multiply-then-add (issue 8). The accumulator's
                    # columns are a view with a row stride, which OpenCV writes through.
                    region = accumulator[:, left : left + window].reshape(window, window * num_classes)
                    cv2.accumulateProduct(window_probabilities.reshape(window, -1), weight_of(k, index), region)
                    if index + 1 < len(cols):
                        continue
                    top = int(rows[k])
                    done = (int(rows[k + 1]) if k + 1 < len(rows) else height) - top
                    pixels = pixels_of_row.pop(k)
                    yield Strip(top, pixels[:done, :width], accumulator[:done, :width])
                    # Move the unfinished rows up in blocks of `done` rows: blocks that do not
                    # overlap need no temporary copy (an overlapping assignment makes one).
                    for first in range(0, window - done, done):
                        rows_moved = min(done, window - done - first)
                        accumulator[first : first + rows_moved] = accumulator[first + done : first + done + rows_moved]
                    accumulator[window - done :] = 0
                bar.update(len(batch))
        finally:
            bar.close()


def segment_array(
    image: np.ndarray,
    predict: Predict,
    num_classes: int,
    window: int,
    overlap: float = 0.25,
    batch_size: int = 8,
    floor: float = WINDOW_FLOOR,
) -> np.ndarray:
    """Blended probabilities float32 (H, W, C) of a whole RGB uint8 (H, W, 3) image in memory."""
    strips = segment_strips(ArrayReader(image), predict, num_classes, window, overlap, batch_size, floor)
    return np.concatenate([strip.probabilities.copy() for strip in strips], axis=0)


# --- Polygons ------------------------------------------------------------------------------


def polygons(
    labels: np.ndarray,
    names: list[str],
    georeference: Georeference | None = None,
    simplify: float = 1.0,
    min_area: float = 16.0,
) -> dict:
    """Vectorise a label image into a GeoJSON FeatureCollection, one feature per polygon.

    Args:
        labels: uint8 (H, W) class indices.
        names: class names, background first (background is not vectorised).
        georeference: map pixel coordinates into this CRS (None: pixel coordinates).
        simplify: Douglas-Peucker tolerance in pixels (0: none).
        min_area: polygons smaller than this many pixels (after simplifying) are dropped.

    Returns:
        A GeoJSON dict (see the module docstring).
    """
    from affine import Affine
    from rasterio import features
    from shapely.geometry import mapping, shape

    transform = georeference.transform if georeference else Affine.identity()
    pixel_size = math.sqrt(abs(transform.determinant))
    collection: dict = {"type": "FeatureCollection", "features": []}
    if georeference is not None:
        crs = georeference.crs.to_string()
        collection["crs"] = {"type": "name", "properties": {"name": crs}}
    for index, name in enumerate(names):
        if index == 0 or not (labels == index).any():
            continue
        mask = labels == index
        for geometry, _ in features.shapes(labels, mask=mask, connectivity=4, transform=transform):
            polygon = shape(geometry)
            if simplify > 0:
                polygon = polygon.simplify(simplify * pixel_size, preserve_topology=True)
            if polygon.is_empty or polygon.area < min_area * pixel_size**2:
                continue
            collection["features"].append(
                {
                    "type": "Feature",
                    "geometry": mapping(polygon),
                    "properties": {"class": name, "class_index": index, "area": round(polygon.area, 3)},
                }
            )
    return collection


# --- Writing a scene ------------------------------------------------------------------------


def safe_name(name: str) -> str:
    """A class name made safe for a file name (heatmap-<name>.png)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "class"


@dataclass
class SceneResult:
    """What write_scene made: counts per class (every class, background first)."""

    counts: dict[str, int]
    height: int
    width: int
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


class _HeatmapAccumulator:
    """Area-mean downscaling of (H, W, C) strips (probabilities, or their bytes) to at most
    `size` pixels a side.

    Cells are factor × factor blocks of pixels (smaller at the right and bottom edges).
    Strips need not start or end on a block boundary: rows short of a whole block wait
    for the next strip.
    """

    def __init__(self, height: int, width: int, num_classes: int, size: int):
        self.factor = max(1, math.ceil(max(height, width) / size))
        self.height, self.width = height, width
        shape = (math.ceil(height / self.factor), math.ceil(width / self.factor))
        self.sums = np.zeros(shape + (num_classes,), dtype=np.float32)
        self._next_row = 0  # the first image row not yet summed into self.sums
        self._waiting: np.ndarray | None = None

    def _column_sums(self, rows: np.ndarray) -> np.ndarray:
        """(n, W, C) -> (n, ceil(W / factor), C) sums over each cell's columns."""
        factor, width = self.factor, self.width
        if factor == 1:
            return rows.astype(np.float32)
        whole = width // factor * factor
        # Strided adds of whole columns: several times faster than np.add.reduceat here.
        sums = np.zeros((len(rows), self.sums.shape[1], rows.shape[2]), dtype=np.float32)
        for offset in range(factor):
            sums[:, : whole // factor] += rows[:, offset:whole:factor]
        if whole < width:
            sums[:, -1] = rows[:, whole:].sum(axis=1)
        return sums

    def add(self, top: int, probabilities: np.ndarray) -> None:
        waiting = 0 if self._waiting is None else len(self._waiting)
        if top != self._next_row + waiting:
            raise ValueError(f"strips must come in order: expected row {self._next_row + waiting}, got {top}")
        rows = np.concatenate([self._waiting, probabilities]) if waiting else probabilities
        last = top + len(probabilities) == self.height
        whole = len(rows) if last else len(rows) // self.factor * self.factor
        self._waiting = rows[whole:].copy()
        if not whole:
            return
        # Rows first (contiguous, cheap), then columns on factor-times fewer rows.
        factor = self.factor
        first_cell = self._next_row // factor
        blocks = whole // factor
        if blocks:
            cells = rows[: blocks * factor].reshape(blocks, factor, *rows.shape[1:]).sum(axis=1, dtype=np.float32)
            self.sums[first_cell : first_cell + blocks] += self._column_sums(cells)
        if whole % factor:  # the image's last, shorter row of cells
            last_rows = rows[blocks * factor : whole].sum(axis=0, dtype=np.float32)
            self.sums[first_cell + blocks] += self._column_sums(last_rows[None])[0]
        self._next_row += whole

    def means(self) -> np.ndarray:
        """float32 (ceil(H / factor), ceil(W / factor), C) mean probabilities per cell."""
        factor = self.factor
        cell_rows = np.diff(np.r_[np.arange(0, self.height, factor), self.height])
        cell_cols = np.diff(np.r_[np.arange(0, self.width, factor), self.width])
        areas = np.outer(cell_rows, cell_cols).astype(np.float32)
        return self.sums / areas[:, :, None]


def write_scene(
    reader: ImageReader,
    predict: Predict,
    classes: Classes,
    outdir: Path,
    *,
    window: int,
    overlap: float = 0.25,
    batch_size: int = 8,
    geojson: bool = False,
    simplify: float = 1.0,
    min_area: float = 16.0,
    heatmap_size: int = HEATMAP_SIZE,
    inputs: dict | None = None,
    progress: bool = False,
) -> SceneResult:
    """Segment one image and write its outputs (see the module docstring) into outdir.

    Every file is written under a temporary name and renamed when the whole scene is
    done, counts.json last; a failure leaves no output file behind.

    Args:
        reader: the image.
        predict, window, overlap, batch_size: as for segment_strips.
        classes: the model's classes (names and mask colours).
        outdir: the output directory (created if missing).
        geojson: also write segments.geojson (keeps the label image, 1 byte a pixel).
        simplify, min_area: polygon simplification and minimum area, in pixels.
        heatmap_size: the heatmaps' longest side at most.
        inputs: recorded in counts.json (what the result was made from).
        progress: show a progress bar.
    """
    height, width = reader.height, reader.width
    names = classes.names
    num_classes = classes.num_classes
    display = visualise.display_palette(num_classes)
    outdir.mkdir(parents=True, exist_ok=True)
    counts = np.zeros(num_classes, dtype=np.int64)
    heat = _HeatmapAccumulator(height, width, num_classes, heatmap_size)
    labels_all = np.zeros((height, width), dtype=np.uint8) if geojson else None
    georeference = reader.georeference
    finals: list[tuple[Path, Path]] = []
    with contextlib.ExitStack() as stack:

        def temporary(name: str) -> Path:
            final = outdir / name
            path = stack.enter_context(atomic_path(final))
            finals.append((final, path))
            return path

        mask_png = stack.enter_context(visualise.PngWriter(temporary("mask.png"), width, height))
        segments_png = stack.enter_context(visualise.PngWriter(temporary("segments.png"), width, height))
        tiffs = None
        if georeference is not None:
            tiffs = stack.enter_context(
                _GeoTiffWriters(temporary("mask.tif"), temporary("probabilities.tif"), height, width,
                                georeference, names, display)
            )
        def finish_segments(image: np.ndarray, labels: np.ndarray) -> None:
            segments_png.write(visualise.overlay(image, labels, display))

        def finish_rest(top: int, labels: np.ndarray, probability_bytes: np.ndarray) -> None:
            counts[:] += class_counts(labels, num_classes)
            mask_png.write(visualise.colorize(labels, classes.palette))
            heat.add(top, probability_bytes)
            if tiffs is not None:
                tiffs.write(top, labels, probability_bytes)
            if labels_all is not None:
                labels_all[top : top + len(labels)] = labels

        # Finished strips are turned into outputs on two more threads while the model runs
        # on the next windows (compression and numpy release the GIL): one deflates
        # segments.png, the slowest output, the other does everything else; each keeps its
        # outputs' rows in order. They get each strip's labels and probability bytes (a
        # quarter of the float32 probabilities), in chunks of rows, and at most one chunk
        # waits: memory stays bounded. One thread for all made the model wait for it, and
        # left it working alone after the last window (issue 8).
        strips = segment_strips(reader, predict, num_classes, window, overlap, batch_size, progress=progress)
        with ThreadPoolExecutor(max_workers=1) as segments_pool, ThreadPoolExecutor(max_workers=1) as pool:
            pending: collections.deque = collections.deque()
            for strip in strips:
                for start in range(0, len(strip.probabilities), CHUNK_ROWS):
                    probabilities = strip.probabilities[start : start + CHUNK_ROWS]
                    labels = probabilities.argmax(axis=2).astype(np.uint8)
                    image = strip.image[start : start + CHUNK_ROWS]
                    pending.append((
                        segments_pool.submit(finish_segments, image, labels),
                        pool.submit(finish_rest, strip.top + start, labels, visualise.to_byte(probabilities)),
                    ))  # fmt: skip
                    while len(pending) > 1:
                        for future in pending.popleft():
                            future.result()
                del strip, probabilities  # views into the accumulator, which is about to change
            while pending:
                for future in pending.popleft():
                    future.result()
        means = heat.means() / 255
        heatmap_paths = [temporary(f"heatmap-{safe_name(name)}.png") for name in names]

        def write_heatmap(index: int) -> None:
            picture = visualise.heatmap(means[:, :, index], title=names[index])
            visualise.write_png(heatmap_paths[index], picture)

        # The heatmaps are independent and zlib releases the GIL: threads compress them
        # on the cores the model has just left (one at a time took 0.24 s, issue 8).
        with ThreadPoolExecutor(max_workers=min(num_classes, os.cpu_count() or 1)) as pool:
            list(pool.map(write_heatmap, range(num_classes)))
        if labels_all is not None:
            collection = polygons(labels_all, names, georeference, simplify, min_area)
            temporary("segments.geojson").write_text(json.dumps(collection))
        # Leaving the stack closes each writer, then renames its temporary file into place.
    result = SceneResult({name: int(count) for name, count in zip(names, counts)}, height, width, reader.notes)
    record = {
        "image": str(reader.path),
        "width": width,
        "height": height,
        "pixels": width * height,
        "counts": result.counts,
        "window": window,
        "overlap": overlap,
        "notes": reader.notes,
        "files": [final.name for final, _ in finals],
        "inputs": inputs or {},
    }
    # counts.json goes last: its presence says that every other output is complete.
    write_text_atomic(outdir / "counts.json", json.dumps(record, indent=1) + "\n")
    finals.append((outdir / "counts.json", outdir / "counts.json"))
    result.files = [final for final, _ in finals]
    return result


class _GeoTiffWriters:
    """mask.tif and probabilities.tif written strip by strip with the input's georeference.

    The files are striped (ROWS_PER_STRIP rows a block), and rows are buffered until whole
    blocks can be written: on a 20,000-pixel-wide scene, 256 × 256 tiles written in partial
    rows took 7× as long (GDAL re-reads and re-compresses partial blocks) and came out
    2.5× larger.
    """

    ROWS_PER_STRIP = 64

    def __init__(self, mask_path, probabilities_path, height, width, georeference, names, display):
        self._paths = (mask_path, probabilities_path)
        self._args = (height, width, georeference, names, display)
        self._next_row = 0
        self._buffered: list[tuple[np.ndarray, np.ndarray]] = []

    def __enter__(self):
        import rasterio

        height, width, georeference, names, display = self._args
        profile = {
            "driver": "GTiff",
            "height": height,
            "width": width,
            "dtype": "uint8",
            "crs": georeference.crs,
            "transform": georeference.transform,
            "compress": "deflate",
            # Horizontal differencing, then fast deflate: on smooth 7-band probabilities,
            # level 6 took 15× as long as level 1 for files only 25% smaller.
            "predictor": 2,
            "zlevel": 1,
            "tiled": False,
            "blockysize": self.ROWS_PER_STRIP,
        }
        # GDAL caches blocks up to 5% of RAM by default; a small cache keeps memory bounded.
        self._env = rasterio.Env(GDAL_CACHEMAX=64)
        self._env.__enter__()
        self.mask = rasterio.open(self._paths[0], "w", count=1, **profile)
        self.mask.write_colormap(1, {i: tuple(int(v) for v in color) + (255,) for i, color in enumerate(display)})
        self.mask.set_band_description(1, "class index")
        self.probabilities = rasterio.open(self._paths[1], "w", count=len(names), **profile)
        for band, name in enumerate(names, start=1):
            self.probabilities.set_band_description(band, name)
        return self

    def write(self, top: int, labels: np.ndarray, probability_bytes: np.ndarray) -> None:
        """Take rows [top, top + rows) of labels (rows, W) and probability bytes (rows, W, C)."""
        buffered = sum(len(labels) for labels, _ in self._buffered)
        if top != self._next_row + buffered:
            raise ValueError(f"rows must come in order: expected {self._next_row + buffered}, got {top}")
        self._buffered.append((labels, probability_bytes))
        buffered += len(labels)
        height = self._args[0]
        if buffered >= self.ROWS_PER_STRIP or self._next_row + buffered == height:
            labels = np.concatenate([labels for labels, _ in self._buffered])
            probability_bytes = np.concatenate([values for _, values in self._buffered])
            whole = len(labels) if self._next_row + buffered == height else buffered // self.ROWS_PER_STRIP * self.ROWS_PER_STRIP
            self._write(labels[:whole], probability_bytes[:whole])
            self._buffered = [(labels[whole:], probability_bytes[whole:])] if whole < len(labels) else []

    def _write(self, labels: np.ndarray, probability_bytes: np.ndarray) -> None:
        from rasterio.windows import Window

        rows, width = labels.shape
        window = Window(0, self._next_row, width, rows)
        self.mask.write(labels[None], window=window)
        self.probabilities.write(np.ascontiguousarray(np.moveaxis(probability_bytes, -1, 0)), window=window)
        self._next_row += rows

    def __exit__(self, kind, value, traceback):
        try:
            if kind is None and self._next_row != self._args[0]:
                raise ValueError(f"GeoTIFFs got {self._next_row} of {self._args[0]} rows")
            self.mask.close()
            self.probabilities.close()
        finally:
            self._env.__exit__(kind, value, traceback)
        return False
