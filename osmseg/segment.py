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

Images arrive through an osmseg.rasters.ImageReader, as RGB uint8 rows read top to bottom,
each row once; osmseg.scene writes what segment_strips yields.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from osmseg.rasters import ArrayReader, ImageReader

Predict = Callable[[np.ndarray], np.ndarray]

# Weight at a window's very edge relative to its centre: small, so that a pixel near one
# window's border is decided by the window that sees it near its centre, yet above zero so
# that the image's own border pixels (covered by one window only) still have a weight.
# bench/bench_feed_forward.py: with 0.05, pixels within 8 px of window borders erred 2-4×
# as much as interior ones; with 0.01, 1.2-2×.
WINDOW_FLOOR = 0.01
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


@dataclass(frozen=True)
class Windows:
    """How a scene is cut into model windows: their size (pixels, the model's input size),
    the fraction of a window shared with its neighbour, windows per model call, and the
    blending profile's edge weight (window_profile)."""

    size: int
    overlap: float = 0.25
    batch_size: int = 8
    floor: float = WINDOW_FLOOR

    def __post_init__(self):
        if self.size < 1 or self.batch_size < 1:
            raise ValueError(f"window size {self.size} and batch size {self.batch_size} must be at least 1")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if not self.floor > 0:
            raise ValueError(f"the blending floor must be above 0, got {self.floor}")

    @property
    def stride(self) -> int:
        return window_stride(self.size, self.overlap)

    def positions(self, length: int) -> np.ndarray:
        """Start offsets of the windows along an axis of `length` pixels (window_positions)."""
        return window_positions(length, self.size, self.stride)

    def count(self, height: int, width: int) -> int:
        """How many windows segment_strips runs the model on for an image of this size."""
        return len(self.positions(height)) * len(self.positions(width))


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


# Test-time augmentation: how many of the square's eight symmetries (turns, then a mirror) to average.
TTA_CHOICES = (1, 2, 4, 8)


def symmetries(count: int) -> list[tuple[int, bool]]:
    """The first `count` (1, 2, 4 or 8) symmetries of the square as (quarter turns, mirrored):
    1 the identity, 2 adds the left-right mirror, 4 the four turns, 8 all eight."""
    if count not in TTA_CHOICES:
        raise ValueError(f"test-time augmentation {count!r}: choose one of {', '.join(map(str, TTA_CHOICES))}")
    if count == 2:
        return [(0, False), (0, True)]
    return [(turns, mirrored) for mirrored in (False, True) for turns in range(4)][:count]


def _transform(batch: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    batch = np.rot90(batch, turns, axes=(1, 2))
    return batch[:, :, ::-1] if mirrored else batch


def _untransform(batch: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    if mirrored:
        batch = batch[:, :, ::-1]
    return np.rot90(batch, -turns, axes=(1, 2))


def tta_predict(predict: Predict, count: int) -> Predict:
    """Test-time augmentation: predict each of `count` turned and mirrored copies of a batch
    of square windows, turn the probabilities back and average them (count model calls a
    batch). A model trained on turned and mirrored tiles errs differently on each copy, so
    the average errs less. Turning or mirroring the input by one of the chosen symmetries
    (any, for count 8) turns or mirrors the output exactly, to the bit, whenever `predict`
    answers a window the same wherever it is in a batch.

    Raises:
        ValueError: count is not one of TTA_CHOICES, or the windows are not square (turns).
    """
    chosen = symmetries(count)
    if count == 1:
        return predict

    def predict_all(batch: np.ndarray) -> np.ndarray:
        if count > 2 and batch.shape[1] != batch.shape[2]:
            raise ValueError(f"test-time augmentation {count} turns windows, which must be square: {batch.shape[1:3]}")
        copies = None
        for index, (turns, mirrored) in enumerate(chosen):
            predicted = np.asarray(predict(np.ascontiguousarray(_transform(batch, turns, mirrored))), np.float32)
            if copies is None:
                copies = np.empty((count,) + predicted.shape, np.float32)
            copies[index] = _untransform(predicted, turns, mirrored)
        # A symmetry of the input permutes the copies at each pixel; summed in sorted order,
        # the mean does not depend on that order (float addition does), so it is exact.
        copies.sort(axis=0)
        return copies.sum(axis=0, dtype=np.float32) / np.float32(count)

    return predict_all


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


def segment_strips(
    reader: ImageReader, predict: Predict, num_classes: int, windows: Windows, progress: bool = False
) -> Iterator[Strip]:
    """Segment an image in overlapping windows and yield its blended rows, top to bottom.

    Args:
        reader: the image (ImageReader).
        predict: batch float32 (B, window, window, 3) RGB 0..255 -> (B, window, window,
            num_classes) probabilities.
        num_classes: the model's number of outputs.
        windows: the windows' size (the model's input size), overlap, batch and floor.
        progress: show a progress bar (tqdm, stderr) counting windows.

    Yields:
        Strips covering every row once, in order; their widths are the image's.
    """
    import cv2
    from tqdm import tqdm

    height, width = reader.height, reader.width
    window, batch_size, floor = windows.size, windows.batch_size, windows.floor
    padded_height, padded_width = max(height, window), max(width, window)
    rows = windows.positions(height)
    cols = windows.positions(width)
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

    def cut() -> Iterator[tuple[int, int, np.ndarray]]:
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
    stream = cut()

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


def segment_array(image: np.ndarray, predict: Predict, num_classes: int, windows: Windows) -> np.ndarray:
    """Blended probabilities float32 (H, W, C) of a whole RGB uint8 (H, W, 3) image in memory."""
    strips = segment_strips(ArrayReader(image), predict, num_classes, windows)
    return np.concatenate([strip.probabilities.copy() for strip in strips], axis=0)
