"""Reading a cache for training and evaluation: batches in order, shuffled and augmented, never whole."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Sequence

import h5py
import numpy as np

from osmseg.cache.schema import check_indices, inflatable, open_cache, read_rows
from osmseg.classes import IGNORE
from osmseg.errors import CacheError, UserError


def iter_tiles(
    path: str | os.PathLike, indices: Sequence[int] | None = None, batch_size: int = 16
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield the cache's tiles in the given order, batch_size at a time, for evaluation.

    Yields:
        (indices int64 (B,), images uint8 (B, H, W, 3) RGB, labels uint8 (B, H, W)),
        255 kept as the ignore value.
    """
    info = open_cache(path)
    indices = check_indices(indices, info.length, info.path)
    with h5py.File(info.path, "r") as file:
        images, labels = file["images"], file["labels"]
        inflate = inflatable(images) and inflatable(labels)
        for start in range(0, len(indices), batch_size):
            chosen = indices[start : start + batch_size]
            yield chosen, read_rows(images, chosen, inflate), read_rows(labels, chosen, inflate)


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
    indices = np.sort(check_indices(indices, info.length, info.path))
    with h5py.File(info.path, "r") as file:
        labels = file["labels"]
        inflate = inflatable(labels)
        for start in range(0, len(indices), batch_size):
            yield read_rows(labels, indices[start : start + batch_size], inflate)


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


def jitter_colours(image: np.ndarray, draws: np.ndarray, amount: float) -> np.ndarray:
    """Mild photometric jitter of one float32 image (H, W, 3) 0..255, labels untouched.

    `draws` holds five numbers in [-1, 1): brightness, contrast and a gain per channel, each
    scaled by `amount` (the channel gains by half of it): contrast stretches about the tile's
    mean, brightness and gains multiply, and the result is clipped to 0..255. Imagery
    providers, seasons and sensors differ in exactly these ways, so a model that has seen
    them keys on texture and shape more than on one provider's colours.
    """
    brightness, contrast = 1 + amount * draws[0], 1 + amount * draws[1]
    gains = (1 + 0.5 * amount * draws[2:5]) * brightness
    pixels = image.reshape(-1, 3)
    # The channel means as a product with ones (BLAS): numpy's mean over two axes took 1 ms
    # of the 2 this function took per demo tile; so does folding the steps into one affine map.
    mean = np.ones(len(pixels), np.float32) @ pixels / len(pixels)
    # (x - mean)·contrast + mean, times the gains: x·scale + shift.
    out = image * (contrast * gains).astype(np.float32)
    out += (mean * (1 - contrast) * gains).astype(np.float32)
    return np.clip(out, 0, 255, out=out)


# Label value → training target: class indices stay, IGNORE becomes 0 (its weight is 0).
_TARGETS = np.arange(256, dtype=np.int32)
_TARGETS[IGNORE] = 0


def weighted_draw(weights, count: int, offset: float) -> np.ndarray:
    """`count` positions into `weights`, each drawn about count * w / sum(w) times, in order.

    Systematic sampling: the points offset, offset + 1, ... on the cumulative weights scaled
    to `count`; a position whose share is k.f of the draws gets k or k + 1 of them.

    Args:
        weights: positive (N,).
        count: how many to draw.
        offset: in [0, 1), the random start.
    """
    edges = np.cumsum(np.asarray(weights, dtype=np.float64))
    edges *= count / edges[-1]
    drawn = np.searchsorted(edges, offset + np.arange(count), side="right")
    return np.minimum(drawn, len(edges) - 1)  # rounding at the last edge


class BatchReader:
    """Shuffled, optionally augmented training batches drawn straight from a cache.

    The logic behind make_batches, without Keras: item b is batch b of the current epoch,
    (images float32 (B, H, W, 3) 0..255 RGB, labels int32 (B, H, W) with 255 → 0,
    sample_weight float32 (B, H, W): class_weights[label], 0 where the label was 255).

    The order is a permutation drawn from (seed, epoch); augmentation from (seed, epoch,
    batch); so any worker computes any batch alike, and a run is reproducible. With
    `tile_weights` (one positive number per index, e.g. recipe.repeat_factors), an epoch
    still reads len(indices) tiles, but drawn in proportion to the weights: a tile whose
    expected count is k.f is drawn k or k + 1 times (systematic sampling, so no tile's count
    strays further), and the draws are then shuffled. The HDF5
    file is opened lazily in each process that reads, never inherited across a fork.
    """

    def __init__(
        self, path, indices, batch_size, shuffle=True, augment=False, seed=0, class_weights=None, jitter=0.0,
        tile_weights=None,
    ):
        info = open_cache(path)
        self.path = info.path
        self.indices = check_indices(indices, info.length, info.path)
        if not len(self.indices):
            raise CacheError(f"{self.path}: no tiles selected to read")
        if batch_size < 1:
            raise UserError(f"batch size {batch_size}: must be at least 1")
        self.batch_size = int(batch_size)
        self.shuffle, self.augment, self.seed = bool(shuffle), bool(augment), int(seed)
        if not 0 <= jitter < 1:
            raise UserError(f"colour jitter {jitter}: use a fraction in [0, 1), e.g. 0.1 (0: none)")
        self.jitter = float(jitter)
        self.tile_weights = None
        if tile_weights is not None:
            tile_weights = np.asarray(tile_weights, dtype=np.float64).ravel()
            if tile_weights.shape != self.indices.shape or not (np.isfinite(tile_weights) & (tile_weights > 0)).all():
                raise UserError(f"tile weights: expected {len(self.indices)} positive numbers, one per tile")
            if not self.shuffle:
                raise UserError("tile weights draw tiles at random: use them with shuffle")
            self.tile_weights = tile_weights
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
            if self.tile_weights is not None:
                rng = np.random.default_rng([self.seed, self.epoch])
                drawn = weighted_draw(self.tile_weights, len(self.indices), rng.random())
                cached = self.indices[drawn[rng.permutation(len(drawn))]]
            elif self.shuffle:
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
                self._handles = (images, labels, inflatable(images) and inflatable(labels))
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
        images, labels = read_rows(images_ds, chosen, inflate), read_rows(labels_ds, chosen, inflate)
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
            if self.jitter:
                # Drawn after the flips, so a run without jitter keeps its flips and turns.
                draws = rng.uniform(-1, 1, (len(whole), 5))[picked]
                for i in range(len(chosen)):
                    inputs[i] = jitter_colours(inputs[i], draws[i], self.jitter)
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
                         class_weights=None, jitter=0.0, tile_weights=None, **pydataset_kwargs):
                keras.utils.PyDataset.__init__(self, **pydataset_kwargs)
                BatchReader.__init__(
                    self, path, indices, batch_size, shuffle, augment, seed, class_weights, jitter, tile_weights
                )

        # Pickle (worker processes started with spawn) finds the class as osmseg.cache.batches.CacheBatches.
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
    jitter: float = 0.0,
    tile_weights: Sequence[float] | None = None,
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
        jitter: with augment, the amount of colour jitter (jitter_colours; 0: none).
        tile_weights: with shuffle, draw each epoch's tiles in proportion to these (one per index).
        **pydataset_kwargs: workers, use_multiprocessing, max_queue_size.
    """
    return _batches_class()(
        path, indices, batch_size, shuffle, augment, seed, class_weights, jitter, tile_weights, **pydataset_kwargs
    )
