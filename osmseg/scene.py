"""Writing a segmented scene: mask, segments picture, heatmaps, GeoTIFFs, polygons and counts.

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
  GeoTIFFs with the input's CRS and transform, in 64-row strips, deflate-compressed
  (osmseg.geotiff). mask.tif: one uint8 band of
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
  the result was made from}}; for georeferenced input also "crs", and "tile": {"z", "x", "y"}
  when the image is an XYZ tile.

Every file is written under a temporary name and renamed when the whole scene is done,
counts.json last.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from osmseg import visualise
from osmseg.atomic import atomic_path, write_text_atomic
from osmseg.classes import Classes
from osmseg.geotiff import GeoTiffWriters
from osmseg.rasters import Georeference, ImageReader
from osmseg.segment import Predict, Windows, class_counts, segment_strips

HEATMAP_SIZE = 1024


CHUNK_ROWS = 64  # rows handed to the output thread at a time


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


class AreaMean:
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


class OutputFiles:
    """The files of an output folder, each written under a temporary name (osmseg.atomic) and
    renamed into place when the ExitStack closes without an error."""

    def __init__(self, stack: contextlib.ExitStack, outdir: Path):
        self.stack, self.outdir = stack, outdir
        self.finals: list[Path] = []

    def __call__(self, name: str) -> Path:
        """The temporary path to write `name` at."""
        final = self.outdir / name
        self.finals.append(final)
        return self.stack.enter_context(atomic_path(final))

    @property
    def names(self) -> list[str]:
        return [final.name for final in self.finals]


def run_outputs(strips, outputs: list) -> None:
    """Hand every chunk of rows of segment_strips' strips to each output, each on a thread of its own.

    Each output is called as output(top, image, labels, probability_bytes) for chunks of
    CHUNK_ROWS rows, in order: image uint8 (rows, W, 3), labels uint8 (rows, W) (the argmax),
    probability_bytes uint8 (rows, W, C) (probability × 255). They run while the model works
    on the next windows (compression and numpy release the GIL), and at most one chunk waits
    for them, so memory stays bounded. One thread for all made the model wait for it, and
    left it working alone after the last window (issue 8): give the slowest output (a
    segments picture's deflate) its own.
    """
    pools = [ThreadPoolExecutor(max_workers=1) for _ in outputs]
    try:
        pending: collections.deque = collections.deque()
        for strip in strips:
            for start in range(0, len(strip.probabilities), CHUNK_ROWS):
                probabilities = strip.probabilities[start : start + CHUNK_ROWS]
                labels = probabilities.argmax(axis=2).astype(np.uint8)
                image = strip.image[start : start + CHUNK_ROWS]
                chunk = (strip.top + start, image, labels, visualise.to_byte(probabilities))
                pending.append([pool.submit(output, *chunk) for pool, output in zip(pools, outputs)])
                while len(pending) > 1:
                    for future in pending.popleft():
                        future.result()
            del strip, probabilities  # views into the accumulator, which is about to change
        while pending:
            for future in pending.popleft():
                future.result()
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)


def write_scene(
    reader: ImageReader,
    predict: Predict,
    classes: Classes,
    outdir: Path,
    windows: Windows,
    *,
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
        predict, windows: as for segment_strips.
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
    heat = AreaMean(height, width, num_classes, heatmap_size)
    labels_all = np.zeros((height, width), dtype=np.uint8) if geojson else None
    georeference = reader.georeference
    with contextlib.ExitStack() as stack:
        temporary = OutputFiles(stack, outdir)
        mask_png = stack.enter_context(visualise.PngWriter(temporary("mask.png"), width, height))
        segments_png = stack.enter_context(visualise.PngWriter(temporary("segments.png"), width, height))
        tiffs = None
        if georeference is not None:
            tiffs = stack.enter_context(
                GeoTiffWriters(temporary("mask.tif"), temporary("probabilities.tif"), height, width,
                                georeference, names, display)
            )
        def finish_segments(top: int, image: np.ndarray, labels: np.ndarray, probability_bytes: np.ndarray) -> None:
            segments_png.write(visualise.overlay(image, labels, display))

        def finish_rest(top: int, image: np.ndarray, labels: np.ndarray, probability_bytes: np.ndarray) -> None:
            counts[:] += class_counts(labels, num_classes)
            mask_png.write(visualise.colorize(labels, classes.palette))
            heat.add(top, probability_bytes)
            if tiffs is not None:
                tiffs.write(top, labels, probability_bytes)
            if labels_all is not None:
                labels_all[top : top + len(labels)] = labels

        strips = segment_strips(reader, predict, num_classes, windows, progress=progress)
        run_outputs(strips, [finish_segments, finish_rest])
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
        "window": windows.size,
        "overlap": windows.overlap,
        "notes": reader.notes,
        "files": temporary.names,
        "inputs": inputs or {},
    }
    if georeference is not None:
        record["crs"] = georeference.crs.to_string()
        if georeference.tile is not None:
            z, x, y = georeference.tile.z, georeference.tile.x, georeference.tile.y
            record["tile"] = {"z": z, "x": x, "y": y}
    # counts.json goes last: its presence says that every other output is complete.
    write_text_atomic(outdir / "counts.json", json.dumps(record, indent=1) + "\n")
    result.files = [*temporary.finals, outdir / "counts.json"]
    return result
