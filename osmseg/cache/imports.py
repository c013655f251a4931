"""Caching your own image/mask pairs (`prepare.py import`): pairing by file name, cutting into tiles."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from osmseg.cache.build import (
    BuildSummary,
    Log,
    PairWords,
    Prepared,
    default_workers,
    digest,
    file_stamp,
    needs_build,
    read_pair,
    unknown_colors,
    write_cache,
)
from osmseg.cache.schema import compress_tile
from osmseg.classes import IGNORE, Classes
from osmseg.errors import UserError

IMPORT_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")


IMPORT_MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".webp", ".jpg", ".jpeg")


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


_PAIR_WORDS = PairWords(
    "image cannot be decoded",
    "mask cannot be decoded",
    "image and mask sizes differ (masks must cover their image pixel for pixel)",
    "{stem} (image {image}, mask {other})",
)


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
        "classes": digest([classes.to_json()]),
        "tile_size": int(tile_size),
        "stride": int(stride),
        "tiles": digest(stem for stem, _, _ in pairs),
        "files": digest(f"{file_stamp(image)} {file_stamp(mask)}" for _, image, mask in pairs),
    }
    if not needs_build(out_path, fingerprint, summary, log):
        return summary
    record = {"command": "import", "tile_size": int(tile_size), "stride": int(stride), "pairs": len(pairs)}
    record.update(params or {})

    def prepare(pair) -> Prepared:
        # Runs in a worker thread, one image at a time per thread.
        stem, image_path, mask_path = pair
        image, rgb, problem = read_pair(image_path, mask_path, stem, _PAIR_WORDS)
        if problem:
            return Prepared(skip=problem)
        labels, ignored = classes.colors_to_labels(rgb)
        unknown = unknown_colors(rgb, labels) if ignored else Counter()
        chunks = [compress_tile(*tile) for tile in cut_tiles(image, labels, tile_size, stride)]
        return Prepared(chunks, (-1, -1, -1), stem, ignored, unknown)

    # A window of one image per thread: each result holds a whole image's tiles.
    write_cache(
        out_path, pairs, prepare, workers, summary, (classes, tile_size, record, fingerprint),
        window=workers, description=f"importing {out_path.name}", unit="image",
        nothing="no image/mask pair could be imported",
    )  # fmt: skip
    return summary
