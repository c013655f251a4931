"""Mapping an area: a mosaic of imagery tiles segmented into a georeferenced map, and where OSM
disagrees with it.

`map_area` segments a mosaic.MosaicReader as one seamless scene (osmseg.segment's blended
windows, in strips of rows) and writes into an output folder:

- ``mask.tif``: Cloud-Optimized GeoTIFF, EPSG:3857 with the tile grid's exact transform, one
  uint8 band of class indices (0 background), 255 (nodata) where a tile had no imagery, a
  colour table of the display colours.
- ``probabilities.tif``: COG, one uint8 band per class (band i+1 = class i, named),
  probability × 255; 0 where there is no imagery.
- ``segments.png`` and ``heatmap-<class>.png``: as for feed_forward.py (osmseg.scene).
- ``segments.geojson``: RFC 7946 (WGS84 lon/lat), one Feature per polygon of a non-background
  class, properties {"class", "class_index", "area_m2"} (ground square metres).
- with OSM labels: ``osm-diff.geojson``, places where the model and OSM disagree, ranked:
  "missing in OSM" (the model sees class c where OSM maps nothing, or only a class that c
  would paint over; properties "confidence", the model's mean probability of c there) and
  "check in OSM" (an area OSM maps as c that the model mostly does not see; "agreement", the
  share of it the model calls c or a class painted over c); both with "class", "area_m2",
  "score" (area × confidence, or area × (1 - agreement)) and "rank" (1 = most worth a look).
  Labels show the last class of the classes file that covers a pixel (later classes paint
  over earlier ones), so a building inside mapped residential land shows as building, and
  the residential land under it is neither missing nor unseen.
- ``index.html``: the results page (osmseg.mappage).
- ``counts.json``, last: {"pixels", "no_imagery_pixels", "counts" {class: pixels}, whose sum
  with no_imagery_pixels is pixels, "square_metres" {class: m²}, "agreement" (with OSM:
  {class: {"iou", "model_pixels", "osm_pixels"}} over the pixels with imagery), "crs",
  "transform", "tiles", "files", "inputs"}.
"""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from osmseg import polygonize, tiles, visualise
from osmseg.atomic import write_text_atomic
from osmseg.classes import Classes
from osmseg.geotiff import GeoTiffWriters
from osmseg.mosaic import MosaicReader
from osmseg.polygonize import NODATA
from osmseg.scene import HEATMAP_SIZE, AreaMean, OutputFiles, run_outputs, safe_name
from osmseg.segment import Predict, Windows, segment_strips

OVERVIEW_SIZE = 2048  # the results page's pictures, longest side at most


@dataclass(frozen=True)
class DiffOptions:
    """Thresholds of osm-diff.geojson: polygons smaller than min_area square metres are left
    out; "missing in OSM" needs the model's mean probability at least min_confidence; "check in
    OSM" needs the model to agree on at most max_agreement of the area OSM maps."""

    # Defaults: 50 m² is a small house's footprint (a garden shed's is 5-15 m², below what
    # 1.2 m pixels show reliably); 0.6 asks for more than even odds against the other classes.
    # On the demo town, with make demo's 38-epoch model of 2026-12-04 and 8-fold TTA (make
    # demo-map), they find 70% of the buildings its map leaves out with 3% of the places
    # false (69% and 8% without TTA); a lower min_confidence found no more there, only more
    # false places (bench/bench_map.py's sweep, bench/README.md).
    min_area: float = 50.0
    min_confidence: float = 0.6
    max_agreement: float = 0.25


@dataclass
class MapResult:
    """What map_area made: pixel counts, ground areas and agreement with OSM, per class."""

    counts: dict[str, int]
    square_metres: dict[str, float]
    no_imagery: int
    height: int
    width: int
    agreement: dict | None = None
    diff_features: int = 0
    files: list[Path] = field(default_factory=list)


class OsmLabelRows:
    """OSM labels of a block of tiles, rendered as training labels are (osmseg.labels), as rows
    of class indices aligned with the mosaic; one tile row rendered and held at a time."""

    def __init__(self, block: tiles.TileBlock, source, classes: Classes, tile_size: int = 256):
        from osmseg.labels import LabelRenderer

        self.block, self.source, self.classes, self.tile_size = block, source, classes, tile_size
        self.renderer = LabelRenderer(classes, tile_size)
        self._index: int | None = None
        self._rows: np.ndarray | None = None

    def _render(self, index: int) -> np.ndarray:
        from osmseg.labels import render_tiles

        size = self.tile_size
        row = np.zeros((size, self.block.columns * size), dtype=np.uint8)
        for tile, rgb in render_tiles(self.source, self.renderer, self.block.row(index)):
            labels, _ = self.classes.colors_to_labels(rgb)
            column = tile.x - self.block.x0
            row[:, column * size : (column + 1) * size] = labels
        return row

    def __call__(self, top: int, bottom: int) -> np.ndarray:
        """uint8 (bottom - top, W): OSM class indices of rows [top, bottom), read top to bottom."""
        size, parts = self.tile_size, []
        for index in range(top // size, (bottom - 1) // size + 1):
            if index != self._index:
                self._index, self._rows = index, self._render(index)
            start, stop = max(top, index * size) - index * size, min(bottom, (index + 1) * size) - index * size
            parts.append(self._rows[start:stop])
        return np.concatenate(parts)


def _row_areas(transform, top: int, rows: int) -> np.ndarray:
    """Ground square metres of one pixel in each of `rows` rows from `top` (EPSG:3857 transform)."""
    centres = transform.f + transform.e * (top + 0.5 + np.arange(rows))
    return (abs(transform.a * transform.e)) * tiles.ground_scale(centres) ** 2


@dataclass(frozen=True)
class MapOptions:
    """How map_area segments and what it writes.

    Attributes:
        windows: the model's windows (osmseg.segment.Windows: size, overlap, batch).
        osm_labels: (top, bottom) -> uint8 OSM class indices of those rows (OsmLabelRows), or
            None for no comparison with OSM.
        diff: osm-diff.geojson's thresholds.
        min_area: segments.geojson leaves out polygons below this many square metres.
        simplify: polygon simplification, in pixels.
        heatmap_size: the heatmaps' longest side at most.
        inputs: recorded in counts.json (what the map was made from).
        progress: show a progress bar.
    """

    windows: Windows
    osm_labels: object = None
    diff: DiffOptions = DiffOptions()
    min_area: float = 20.0
    simplify: float = 1.0
    heatmap_size: int = HEATMAP_SIZE
    inputs: dict | None = None
    progress: bool = False


def map_area(reader: MosaicReader, predict: Predict, classes: Classes, outdir: Path, options: MapOptions) -> MapResult:
    """Segment a mosaic and write the map's outputs (see the module docstring) into outdir.

    Args:
        reader: the mosaic (its georeference is the tile grid's, EPSG:3857).
        predict: as for osmseg.segment.segment_strips.
        classes: the model's classes.
        outdir: the output folder (created if missing).
        options: the windows, the OSM labels to compare with, the thresholds (MapOptions).

    Every file is written under a temporary name and renamed when the whole map is done,
    counts.json last; a failure leaves no output behind.
    """
    height, width, names = reader.height, reader.width, classes.names
    num_classes = classes.num_classes
    display = visualise.display_palette(num_classes)
    transform = reader.georeference.transform
    outdir.mkdir(parents=True, exist_ok=True)
    counts = np.zeros(num_classes, dtype=np.int64)
    metres = np.zeros(num_classes, dtype=np.float64)
    osm_labels, diff, windows = options.osm_labels, options.diff, options.windows
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64) if osm_labels is not None else None
    no_imagery = np.zeros(1, dtype=np.int64)
    heat = AreaMean(height, width, num_classes, options.heatmap_size)
    overview = AreaMean(height, width, 3, OVERVIEW_SIZE)
    with contextlib.ExitStack() as stack:
        temporary = OutputFiles(stack, outdir)
        mask_path, probabilities_path = temporary("mask.tif"), temporary("probabilities.tif")
        segments_path = temporary("segments.png")
        # The comparison with OSM, for vectorising afterwards: the model's class where OSM maps
        # another (band 1) and OSM's labels (band 2), beside the outputs, never one of them.
        diff_path = None
        if confusion is not None:
            diff_path = outdir / f".osm-diff.{os.getpid()}.partial.tif"
            stack.callback(diff_path.unlink, missing_ok=True)
        with contextlib.ExitStack() as writers:
            tiffs = writers.enter_context(
                GeoTiffWriters(mask_path, probabilities_path, height, width, reader.georeference, names, display,
                               cog=True, nodata=NODATA)
            )  # fmt: skip
            segments_png = writers.enter_context(visualise.PngWriter(segments_path, width, height))
            comparison = writers.enter_context(_DiffRaster(diff_path, height, width, reader.georeference)) if diff_path else None

            def draw(top: int, image: np.ndarray, labels: np.ndarray, probability_bytes: np.ndarray) -> None:
                valid = reader.valid(top, top + len(labels))
                segments_png.write(np.where(valid[..., None], visualise.overlay(image, labels, display), image))

            def account(top: int, image: np.ndarray, labels: np.ndarray, probability_bytes: np.ndarray) -> None:
                rows = len(labels)
                valid = reader.valid(top, top + rows)
                if not valid.all():
                    labels, probability_bytes = labels.copy(), probability_bytes.copy()
                    labels[~valid] = NODATA
                    probability_bytes[~valid] = 0
                    no_imagery[0] += int((~valid).sum())
                per_row = _class_rows(labels, num_classes)
                counts[:] += per_row.sum(axis=0)
                metres[:] += _row_areas(transform, top, rows) @ per_row
                tiffs.write(top, labels, probability_bytes)
                heat.add(top, probability_bytes)
                overview.add(top, image)
                if comparison is not None:
                    truth = osm_labels(top, top + rows)
                    truth = np.where(valid, truth, NODATA).astype(np.uint8)
                    confusion[:] += _confusion(truth, labels, num_classes)
                    # Later classes paint over earlier ones, so OSM's label j may hide a class
                    # below it: the model's class counts as missing only above OSM's label, and
                    # OSM's class as seen where the model's is it or one painted over it.
                    missing = np.where((labels > truth) & valid, labels, 0).astype(np.uint8)
                    confidence = probability_bytes.max(axis=2)
                    seen = ((labels >= truth) & (truth > 0) & valid).astype(np.uint8)
                    comparison.write(top, missing, truth, confidence, seen)

            strips = segment_strips(reader, predict, num_classes, windows, progress=options.progress)
            run_outputs(strips, [draw, account])
        # The GeoTIFFs are complete COGs now: vectorise from them.
        means = heat.means() / 255
        heatmap_paths = [temporary(f"heatmap-{safe_name(name)}.png") for name in names]
        with ThreadPoolExecutor(max_workers=min(num_classes, os.cpu_count() or 1)) as pool:
            list(pool.map(lambda i: visualise.write_png(heatmap_paths[i], visualise.heatmap(means[:, :, i], names[i])),
                          range(num_classes)))  # fmt: skip
        written_segments = polygonize.write_features(
            temporary("segments.geojson"), _segment_features(mask_path, names, transform, options.simplify, options.min_area)
        )
        diff_features = None
        if diff_path is not None:
            diff_features = list(_diff_features(diff_path, names, transform, options.simplify, diff))
            polygonize.write_features(temporary("osm-diff.geojson"), diff_features)
        square_metres = {name: round(float(value), 1) for name, value in zip(names, metres)}
        agreement = _agreement(confusion, names) if confusion is not None else None
        from osmseg import mappage

        page = mappage.render(
            imagery=overview.means().round().clip(0, 255).astype(np.uint8),
            probabilities=means,
            classes=classes,
            counts=dict(zip(names, counts.tolist())),
            square_metres=square_metres,
            diff=diff_features,
            bounds=reader.georeference.transform,
            shape=(height, width),
            agreement=agreement,
            title=(options.inputs or {}).get("title", "osmseg map"),
        )
        temporary("index.html").write_text(page)
    result = MapResult(
        dict(zip(names, map(int, counts))), square_metres, int(no_imagery[0]), height, width, agreement,
        len(diff_features or ()), list(temporary.finals),
    )  # fmt: skip
    block = reader.block
    record = {
        "width": width,
        "height": height,
        "pixels": width * height,
        "no_imagery_pixels": result.no_imagery,
        "counts": result.counts,
        "square_metres": square_metres,
        "segments": written_segments,
        "crs": "EPSG:3857",
        "transform": list(transform)[:6],
        "tiles": {"z": block.z, "x0": block.x0, "y0": block.y0, "x1": block.x1, "y1": block.y1, "count": len(block),
                  "without_imagery": len(reader.missing)},
        "window": windows.size,
        "overlap": windows.overlap,
        "files": temporary.names,
        "inputs": options.inputs or {},
    }  # fmt: skip
    if agreement is not None:
        record["agreement"] = agreement
        record["osm_diff"] = {"features": result.diff_features, **diff.__dict__}
    write_text_atomic(outdir / "counts.json", json.dumps(record, indent=1) + "\n")
    return result


def _class_rows(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 (rows, num_classes): pixels of each class in each row (NODATA not counted)."""
    rows = len(labels)
    codes = labels.astype(np.int64) + (np.arange(rows, dtype=np.int64) * 256)[:, None]
    return np.bincount(codes.ravel(), minlength=rows * 256).reshape(rows, 256)[:, :num_classes]


def _confusion(truth: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    keep = truth != NODATA
    codes = truth[keep].astype(np.int64) * num_classes + labels[keep]
    return np.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _agreement(confusion: np.ndarray, names: list[str]) -> dict:
    """Per class: IoU of the model against OSM, and each side's pixels (background included)."""
    both, osm_side, model_side = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    union = osm_side + model_side - both
    return {
        name: {
            "iou": round(float(both[c] / union[c]), 4) if union[c] else None,
            "model_pixels": int(model_side[c]),
            "osm_pixels": int(osm_side[c]),
        }
        for c, name in enumerate(names)
    }


class _DiffRaster:
    """The comparison with OSM, a GeoTIFF of four uint8 bands written in rows: the model's class
    where OSM's label is below it ("missing"), OSM's labels, the model's probability × 255 of
    its class, and 1 where the model sees OSM's class (or one painted over it)."""

    BANDS = 4

    def __init__(self, path: Path, height: int, width: int, georeference, bands: int = BANDS, dtype: str = "uint8"):
        self.path, self.shape, self.georeference, self.bands = path, (height, width), georeference, bands
        self.dtype = dtype

    def __enter__(self):
        import rasterio

        self._env = rasterio.Env(GDAL_CACHEMAX=64)
        self._env.__enter__()
        self.file = rasterio.open(
            self.path, "w", driver="GTiff", height=self.shape[0], width=self.shape[1], count=self.bands,
            dtype=self.dtype, crs=self.georeference.crs, transform=self.georeference.transform, compress="deflate",
            zlevel=1, tiled=False, blockysize=64,
        )  # fmt: skip
        return self

    def write(self, top: int, *bands: np.ndarray) -> None:
        from rasterio.windows import Window

        self.file.write(np.stack(bands), window=Window(0, top, self.shape[1], len(bands[0])))

    def write_band(self, band: int, top: int, rows: np.ndarray) -> None:
        from rasterio.windows import Window

        self.file.write(rows, band, window=Window(0, top, self.shape[1], len(rows)))

    def __exit__(self, *exc):
        try:
            self.file.close()
        finally:
            self._env.__exit__(*exc)
        return False


def _band_rows(path: Path, band: int):
    import rasterio
    from rasterio.windows import Window

    dataset = rasterio.open(path)

    def read(top: int, bottom: int) -> np.ndarray:
        return dataset.read(band, window=Window(0, top, dataset.width, bottom - top))

    return dataset, read


def _simplified(polygons: list, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on an array of polygons at once, then repaired where it made one invalid or
    empty: on the large, many-holed regions of a whole map, GEOS's topology-preserving
    simplifier took 30 ms a polygon, this under 1 ms."""
    import shapely

    polygons = np.asarray(polygons, dtype=object)
    if tolerance <= 0 or not len(polygons):
        return polygons
    simpler = shapely.simplify(polygons, tolerance, preserve_topology=False)
    empty = shapely.is_empty(simpler)
    simpler[empty] = polygons[empty]
    for index in np.flatnonzero(~shapely.is_valid(simpler)):
        fixed = polygonize.repaired(simpler[index])
        simpler[index] = fixed if fixed.geom_type in ("Polygon", "MultiPolygon") else polygons[index]
    return simpler


def _batches(items, size: int = 512):
    """Lists of up to `size` items: polygons are simplified and projected a batch at a time."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _segment_features(mask_path: Path, names: list[str], transform, simplify: float, min_area: float):
    """segments.geojson's features: the mask's regions of at least min_area square metres.

    Regions are chosen by their ground area in raster space first (polygonize.select_regions),
    so that the many specks of a noisy mask are never made into polygons at all.
    """
    import rasterio

    with rasterio.open(mask_path) as mask:
        regions, ids_path = _choose(
            mask, lambda top, bottom: mask.read(1, window=((top, bottom), (0, mask.width))), [], transform,
            lambda values, counts, sums: (values > 0) & (values < len(names)) & (sums[0] >= min_area),
        )  # fmt: skip
    try:
        for batch in _batches(_id_polygons(ids_path, transform)):
            properties = []
            for number, _ in batch:
                value, area = int(regions.values[number]), float(regions.sums[0][number])
                properties.append({"class": names[value], "class_index": value, "area_m2": round(area, 1)})
            polygons = _simplified([polygon for _, polygon in batch], simplify * abs(transform.a))
            yield from polygonize.lnglat_features(polygons, properties)
    finally:
        ids_path.unlink(missing_ok=True)


def _choose(dataset, read_values, measures, transform, keep):
    """select_regions over a raster with their ground area as the first measure; the kept
    regions' statistics and a temporary int32 GeoTIFF of their ids beside the dataset."""
    import tempfile

    path = Path(dataset.name)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".ids.partial.tif", dir=path.parent)
    os.close(handle)
    ids_path, width = Path(name), dataset.width

    def ground(top: int, bottom: int) -> np.ndarray:
        return np.broadcast_to(_row_areas(transform, top, bottom - top)[:, None], (bottom - top, width))

    try:
        with _DiffRaster(ids_path, dataset.height, width, dataset, bands=1, dtype="int32") as ids:
            regions = polygonize.select_regions(
                read_values, [ground, *measures], dataset.height, keep, lambda top, rows: ids.write_band(1, top, rows)
            )
    except BaseException:
        ids_path.unlink(missing_ok=True)
        raise
    return regions, ids_path


def _id_polygons(ids_path: Path, transform):
    dataset, read = _band_rows(ids_path, 1)
    with dataset:
        yield from polygonize.raster_polygons(read, dataset.height, transform, nodata=None)


def _diff_features(diff_path: Path, names: list[str], transform, simplify: float, options: DiffOptions):
    """The ranked places of osm-diff.geojson (see the module docstring).

    Regions are chosen by their statistics in raster space (polygonize.select_regions: ground
    area, mean confidence or agreement, summed over each region), and only the chosen ones
    are made into polygons.
    """
    import rasterio

    found = []
    with rasterio.open(diff_path) as diff:

        def band(number: int):
            return lambda top, bottom: diff.read(number, window=((top, bottom), (0, diff.width)))

        def confident(values, counts, sums):
            area, confidence = sums
            return (values < len(names)) & (area >= options.min_area) & (confidence / counts / 255 >= options.min_confidence)

        def unseen(values, counts, sums):
            area, seen = sums
            return (values < len(names)) & (area >= options.min_area) & (seen / counts <= options.max_agreement)

        missing = _choose(diff, band(1), [band(3)], transform, confident)
        checks = _choose(diff, band(2), [band(4)], transform, unseen)
    for kind, (regions, ids_path) in (("missing in OSM", missing), ("check in OSM", checks)):
        try:
            for number, polygon in _id_polygons(ids_path, transform):
                area, share = float(regions.sums[0][number]), float(regions.sums[1][number] / regions.counts[number])
                if kind == "missing in OSM":
                    confidence = share / 255
                    extra, score = {"confidence": round(confidence, 3)}, area * confidence
                else:
                    extra, score = {"agreement": round(share, 3)}, area * (1 - share)
                found.append((kind, int(regions.values[number]), polygon, area, extra, score))
        finally:
            ids_path.unlink(missing_ok=True)
    found.sort(key=lambda item: -item[5])
    properties = [
        {"kind": kind, "class": names[value], "class_index": value, "area_m2": round(area, 1), **extra,
         "score": round(score, 1), "rank": rank}
        for rank, (kind, value, _, area, extra, score) in enumerate(found, start=1)
    ]  # fmt: skip
    polygons = _simplified([item[2] for item in found], simplify * abs(transform.a))
    for item in polygonize.lnglat_features(polygons, properties):
        yield item.geojson()  # the results page draws them from GeoJSON


