"""Labels: render OSM features into one colour-per-class label image per tile, and count pixels.

The classes file's filters are mapnik expressions and mapnik evaluates them: a
LabelRenderer turns a classes file into one mapnik Map (EPSG:3857) with one Style per class,
in file order, so that later classes paint over earlier ones (as skynet-data does).

- Polygons are filled, with no outline. (skynet-data also strokes each polygon's outline
  `stroke-width` pixels wide, lib/layer.xml, which grows every area by half that width on
  each side and merges buildings less than a pixel apart; robosat fills only, and so do we.)
- Lines are drawn `stroke-width` pixels wide.
- Points are drawn as squares `stroke-width` pixels wide (skynet-data drew no points).
- No antialiasing: fills and strokes use mapnik's threshold gamma, so a pixel takes a class
  colour when the shape covers at least half of it and stays #000000 otherwise. (gamma 0
  with the default power method colours every pixel the shape touches at all: a 3-pixel
  line came out 4 pixels wide, and polygons grow to every pixel they touch.)

Files written (formats are the pipeline's contract):

- ``data/labels/color/{z}-{x}-{y}.png``: RGB PNG, 8 bits per channel, TILE_SIZE x TILE_SIZE,
  row 0 at the tile's north edge. Class i (1-based, in classes-file order) is its colour
  from the classes file (#0i0i0i in classes/mine.json); the background is #000000; no other
  colour occurs.
- ``data/sample-filtered.txt``: a tile list (osmseg.datafiles) whose columns are the pixel
  counts of count_labels: ``<pixels of class 1> ... <pixels of class N> <background pixels>``
  (integers that sum to TILE_SIZE squared).
- ``data/labels/label-stats.csv``: columns ``class,pixel_frequency,tile_count``, one row per
  class and a last row ``Background``: the share of all kept pixels (0..1) and the number of
  kept tiles in which the class occurs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import mercantile
import numpy as np

from osmseg import atomic, datafiles
from osmseg.classes import Classes
from osmseg.errors import ClassesError, UserError
from osmseg.rasters import NotEightBit, read_rgb
from osmseg.tiles import ancestor, metres_per_pixel, tiles_bounds

# A pixel takes a shape's colour when the shape covers at least this share of it
# (mapnik's "threshold" gamma method): no antialiasing, exact stroke widths.
COVERAGE_THRESHOLD = 0.5

EMPTY_COLLECTION = '{"type":"FeatureCollection","features":[]}'

# The property that tells a point's squares apart by stroke width (see features_geojson).
POINT_WIDTH = "osmseg_point_width"

DEFAULT_TILE_SIZE = 256


# mapnik's package points these at its own PROJ and GDAL data when imported; rasterio
# (feed_forward's GeoTIFF I/O) imported later in the same process then reads a proj.db of
# another PROJ version and fails to look up any CRS. Labels render in EPSG:3857 with no
# reprojection, so mapnik needs none of them: put them back as they were.
_MAPNIK_ENVIRONMENT = ("PROJ_LIB", "PROJ_DATA", "GDAL_DATA")  # not ICU_DATA: regex filters need it


def import_mapnik():
    """Import mapnik without leaving its PROJ/GDAL data paths in os.environ."""
    saved = {name: os.environ.get(name) for name in _MAPNIK_ENVIRONMENT}
    import mapnik

    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return mapnik


def check_filters(classes: Classes, origin: str = "classes file") -> None:
    """Have mapnik parse every class's filter.

    Raises:
        ClassesError: naming the class and the filter mapnik cannot parse.
    """
    mapnik = import_mapnik()

    for class_ in classes.classes:
        if class_.filter is None:
            raise ClassesError(f"{origin}: class {class_.name!r} has no 'filter'; labels need one per class")
        try:
            mapnik.Expression(class_.filter)
        except RuntimeError:
            raise ClassesError(
                f"{origin}: class {class_.name!r}: mapnik cannot parse filter {class_.filter!r}; "
                "fix it (syntax: https://github.com/mapnik/mapnik/wiki/Filter)"
            ) from None


def style_xml(classes: Classes, tile_size: int = DEFAULT_TILE_SIZE) -> str:
    """The mapnik map XML that draws `classes`: one style per class, in file order.

    Each style has one rule per geometry type so that a line is stroked and a polygon is
    filled, and the class's own filter is combined with the type test by mapnik.
    Points arrive as small squares (see LabelRenderer) and are filled like polygons.
    """
    # Query features this many pixels beyond the tile, so that a line just outside it
    # still paints its half-width inside.
    buffer = math.ceil(max(c.stroke_width for c in classes.classes)) + 2
    gamma = f'gamma="{COVERAGE_THRESHOLD}" gamma-method="threshold"'
    stroke_gamma = f'stroke-gamma="{COVERAGE_THRESHOLD}" stroke-gamma-method="threshold"'
    styles, names = [], []
    several_widths = len({c.stroke_width for c in classes.classes}) > 1
    for number, class_ in enumerate(classes.classes, start=1):
        name = f"class{number}"
        names.append(name)
        selected = f"({class_.filter})"
        polygon = f"{selected} and [mapnik::geometry_type] = polygon"
        if several_widths:
            # Points arrive as one square per width: keep real polygons and this width's squares.
            polygon += f" and ([{POINT_WIDTH}] = null or [{POINT_WIDTH}] = {class_.stroke_width!r})"
        polygon = escape(polygon)
        line = escape(f"{selected} and [mapnik::geometry_type] = linestring")
        styles.append(
            f'<Style name="{name}">'
            f"<Rule><Filter>{polygon}</Filter>"
            f'<PolygonSymbolizer fill="{class_.hex}" {gamma}/></Rule>'
            f"<Rule><Filter>{line}</Filter>"
            f'<LineSymbolizer stroke="{class_.hex}" stroke-width={quoteattr(repr(class_.stroke_width))} '
            f"{stroke_gamma}/></Rule>"
            "</Style>"
        )
    style_names = "".join(f"<StyleName>{name}</StyleName>" for name in names)
    return (
        f'<Map srs="epsg:3857" buffer-size="{buffer}">'
        + "".join(styles)
        # cache-features: the layer's styles share one query instead of one per class.
        + f'<Layer name="osm" srs="epsg:3857" cache-features="true">{style_names}</Layer>'
        + "</Map>"
    )


def features_geojson(
    features: Sequence, pixel: float, point_widths: Sequence[float] = (1.0,), keep: set[str] | None = None
) -> str:
    """A GeoJSON FeatureCollection (EPSG:3857 metres) of OSM features for mapnik.

    mapnik has no unantialiased point symbol, so each point becomes a square polygon, which
    the threshold gamma draws exactly: one square per distinct class stroke width, each
    carrying that width in the POINT_WIDTH property so that only the classes of that width
    draw it (see style_xml).

    Args:
        features: osmseg.osm Features (shapely geometry in EPSG:3857, tags dict).
        pixel: the size of one label pixel in metres.
        point_widths: the stroke widths (pixels) of the classes.
        keep: the tags to pass on (None: all).
    """
    import shapely

    widths = sorted(set(point_widths))
    geometries, tags = [], []
    for feature in features:
        kept = feature.tags if keep is None else {k: v for k, v in feature.tags.items() if k in keep}
        geometry = feature.geometry
        # mapnik types a GeometryCollection "collection", which neither the polygon nor the
        # line rule selects: hand over its parts, each with the feature's tags.
        parts = shapely.get_parts(geometry) if geometry.geom_type == "GeometryCollection" else [geometry]
        for part in parts:
            if not part.is_empty:
                geometries.append(part)
                tags.append(kept)
    geometries = np.array(geometries, dtype=object)
    # shapely's type ids: 0 Point, 4 MultiPoint.
    is_point = np.isin(shapely.get_type_id(geometries), (0, 4))
    texts = list(shapely.to_geojson(geometries[~is_point]))
    properties = [t for t, point in zip(tags, is_point) if not point]
    points = geometries[is_point]
    if len(points):
        point_tags = [t for t, point in zip(tags, is_point) if point]
        for width in widths:
            # One vectorised buffer per width: cap_style "square" makes each point a square.
            texts.extend(shapely.to_geojson(shapely.buffer(points, width * pixel / 2, cap_style="square")))
            properties.extend({**t, POINT_WIDTH: width} if len(widths) > 1 else t for t in point_tags)
    # After slimming, many features share their tags ({"building": "yes"}): encode each once.
    encoded: dict[tuple, str] = {}
    parts = []
    for text, props in zip(texts, properties):
        key = tuple(props.items())
        if key not in encoded:
            encoded[key] = json.dumps(props)
        parts.append(f'{{"type":"Feature","geometry":{text},"properties":{encoded[key]}}}')
    return EMPTY_COLLECTION.replace("[]", "[" + ",".join(parts) + "]")


class LabelRenderer:
    """Renders label tiles for one classes file with one mapnik Map, built once.

    Args:
        classes: the classes (their filters are checked by mapnik here).
        tile_size: label width and height in pixels.
        origin: how to name the classes file in messages.

    Raises:
        ClassesError: a filter that mapnik cannot parse, naming the class.
    """

    def __init__(self, classes: Classes, tile_size: int = DEFAULT_TILE_SIZE, origin: str = "classes file"):
        mapnik = import_mapnik()

        if tile_size <= 0:
            raise UserError(f"--tile-size {tile_size}: must be a positive number of pixels (e.g. 256)")
        check_filters(classes, origin)
        self.classes = classes
        self.tile_size = tile_size
        self.max_stroke_width = max(c.stroke_width for c in classes.classes)
        self.attributes = classes.filter_attributes()
        self._map = mapnik.Map(tile_size, tile_size)
        mapnik.load_map_from_string(self._map, style_xml(classes, tile_size))

    def margin(self, zoom: int) -> float:
        """How far beyond a tile (in metres) features can still paint into it."""
        return (self.max_stroke_width + 2) * metres_per_pixel(zoom, self.tile_size)

    def render(
        self, features: Sequence, tiles: Iterable[mercantile.Tile]
    ) -> Iterator[tuple[mercantile.Tile, np.ndarray]]:
        """Render the labels of `tiles` from `features`.

        The features are loaded into one mapnik datasource (with a spatial index), which
        every tile then queries: pass all features near a group of neighbouring tiles at once.

        Args:
            features: osmseg.osm Features in EPSG:3857 covering the tiles (and a margin).
            tiles: tiles, all at one zoom.

        Yields:
            (tile, RGB uint8 array (tile_size, tile_size, 3)), in the order of `tiles`.
        """
        import cv2
        mapnik = import_mapnik()

        tiles = list(tiles)
        if not tiles:
            return
        zooms = {tile.z for tile in tiles}
        if len(zooms) != 1:
            raise ValueError(f"render takes tiles at one zoom, got zooms {sorted(zooms)}")
        blank = np.zeros((self.tile_size, self.tile_size, 3), dtype=np.uint8)
        near = self._features_near(features, tiles)
        if not any(near):
            for tile in tiles:
                yield tile, blank.copy()
            return
        # Only the features near some tile go to mapnik: a sample is sparse, and serialising
        # a whole source tile's features for a few target tiles would dominate.
        used = sorted(set().union(*near))
        pixel = metres_per_pixel(tiles[0].z, self.tile_size)
        widths = [c.stroke_width for c in self.classes.classes]
        collection = features_geojson([features[i] for i in used], pixel, widths, self.attributes)
        if collection == EMPTY_COLLECTION:  # only empty geometries nearby; mapnik refuses it
            for tile in tiles:
                yield tile, blank.copy()
            return
        layer = self._map.layers[0]
        layer.datasource = mapnik.Datasource(type="geojson", inline=collection)
        try:
            for tile, nearby in zip(tiles, near):
                if not nearby:
                    yield tile, blank.copy()  # nothing within reach: no need to ask mapnik
                    continue
                self._map.zoom_to_box(mapnik.Box2d(*mercantile.xy_bounds(tile)))
                image = mapnik.Image(self.tile_size, self.tile_size)
                mapnik.render(self._map, image)
                rgba = np.frombuffer(image.to_string(), dtype=np.uint8).reshape(self.tile_size, self.tile_size, 4)
                # Untouched pixels are transparent (0, 0, 0, 0): their RGB is the background.
                # (cv2 drops the alpha channel some 50 times faster than a strided numpy copy.)
                yield tile, cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
        finally:
            # Free the features now rather than when the next group replaces them.
            layer.datasource = mapnik.MemoryDatasource()

    def _features_near(self, features: Sequence, tiles: Sequence[mercantile.Tile]) -> list[set[int]]:
        """For each tile, the indices of the features within its reach (tile plus margin)."""
        import shapely

        if not features:
            return [set() for _ in tiles]
        tree = shapely.STRtree([feature.geometry for feature in features])
        margin = self.margin(tiles[0].z)
        boxes = [shapely.box(*tiles_bounds([tile], margin)) for tile in tiles]
        tile_index, feature_index = tree.query(boxes, predicate="intersects")
        near: list[set[int]] = [set() for _ in tiles]
        for t, f in zip(tile_index.tolist(), feature_index.tolist()):
            near[t].add(f)
        return near


def group_tiles(tiles: Iterable[mercantile.Tile], source_zoom: int) -> dict[mercantile.Tile, list[mercantile.Tile]]:
    """Tiles grouped by their OSM source tile (and so by zoom), in first-seen order."""
    groups: dict[mercantile.Tile, list[mercantile.Tile]] = defaultdict(list)
    for tile in tiles:
        groups[ancestor(tile, source_zoom)].append(tile)
    return dict(groups)


def render_tiles(
    source, renderer: LabelRenderer, tiles: Iterable[mercantile.Tile]
) -> Iterator[tuple[mercantile.Tile, np.ndarray]]:
    """Render labels for `tiles` from an OSM source, one features query per source tile.

    Args:
        source: an osmseg.osm OsmSource (.zoom and .features(bounds_3857)).
        renderer: the LabelRenderer of the classes file.
        tiles: the tiles to render (any order; they are grouped by source tile).

    Yields:
        (tile, RGB uint8 label), grouped by source tile.
    """
    for group in group_tiles(tiles, source.zoom).values():
        bounds = tiles_bounds(group, renderer.margin(group[0].z))
        yield from renderer.render(source.features(bounds), group)


def write_label(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB uint8 label as a PNG, atomically (temporary name, then rename)."""
    import cv2

    with atomic.atomic_path(path) as tmp:
        # OpenCV writes BGR. Labels are flat runs of colour: the "up" filter with run-length
        # deflate encodes them about 4x faster than libpng's adaptive default, and smaller.
        params = [
            cv2.IMWRITE_PNG_COMPRESSION,
            1,
            cv2.IMWRITE_PNG_STRATEGY,
            cv2.IMWRITE_PNG_STRATEGY_RLE,
            cv2.IMWRITE_PNG_FILTER,
            cv2.IMWRITE_PNG_FILTER_UP,
        ]
        if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
            raise OSError(f"{path}: cannot write the label PNG")


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as RGB uint8 (H, W, 3).

    Raises:
        UserError: a missing or unreadable file, naming it.
    """
    if not Path(path).exists():
        raise UserError(f"{path}: no such label; run `make data/labels/color` (prepare.py labels) first")
    try:
        image = read_rgb(path)
    except NotEightBit:
        image = None
    if image is None:
        raise UserError(f"{path}: not a readable PNG; delete it and re-run `make data/labels/color`")
    return image


def count_labels(label_rgb: np.ndarray, classes: Classes) -> np.ndarray:
    """Pixels of each class in a label image.

    Args:
        label_rgb: RGB uint8 (H, W, 3) label.
        classes: the classes it was rendered with.

    Returns:
        int64 (num_classes,): the pixels of class 1..N in classes-file order, then the
        background's; they sum to H * W.

    Raises:
        ValueError: a pixel whose colour is no class's (a label made with other classes).
    """
    labels, unknown = classes.colors_to_labels(label_rgb)
    if unknown:
        raise ValueError(f"{unknown} pixels have colours that are not in the classes file")
    per_index = np.bincount(labels.ravel(), minlength=classes.num_classes).astype(np.int64)
    return np.concatenate([per_index[1:], per_index[:1]])


# --- Rendering many tiles over all cores ---------------------------------------------------

_worker: dict = {}


def _worker_init(source, classes_json: str, tile_size: int, out_dir: str) -> None:
    import pickle

    from osmseg.classes import parse_classes

    # A forked worker inherits the source itself (with whatever it has read: an OSM extract is
    # not copied); elsewhere it arrives pickled and reopens its files with empty caches.
    _worker["source"] = pickle.loads(source) if isinstance(source, bytes) else source
    _worker["renderer"] = LabelRenderer(parse_classes(classes_json), tile_size)
    _worker["out_dir"] = out_dir


def _worker_render(tiles: list[mercantile.Tile]) -> int:
    """Render and write one group's labels in a worker; returns how many were written."""
    written = 0
    for tile, rgb in render_tiles(_worker["source"], _worker["renderer"], tiles):
        write_label(datafiles.label_path(_worker["out_dir"], tile), rgb)
        written += 1
    return written


# Groups larger than this are split so that the work spreads evenly over the workers
# and the progress bar moves; each piece makes its own (smaller) features query.
_MAX_GROUP = 256


def _tasks(tiles: Iterable[mercantile.Tile], source_zoom: int) -> list[list[mercantile.Tile]]:
    tasks = []
    groups = group_tiles(tiles, source_zoom)
    # Source tiles in row order, so that consecutive tasks are neighbours (see render_labels).
    for key in sorted(groups, key=lambda t: (t.z, t.y, t.x)):
        # Sorting keeps each piece compact (neighbouring rows of tiles).
        group = sorted(groups[key], key=lambda t: (t.y, t.x))
        tasks.extend(group[i : i + _MAX_GROUP] for i in range(0, len(group), _MAX_GROUP))
    return tasks


def shard_tiles(tiles: Iterable[mercantile.Tile], shard, source_zoom: int) -> list[mercantile.Tile]:
    """Shard I/N's part of a labels run over `tiles` (prepare.py labels --shard, osmseg.shards).

    Whole tasks of one run over all the tiles (runs of up to _MAX_GROUP tiles of one source
    tile), so that every label is drawn in the same group as without shards: a label can
    differ by a pixel with its group, whose bounds the features are clipped to. render_labels
    given this part makes the same tasks again (whole source tiles, or pieces cut at the same
    multiples of _MAX_GROUP).
    """
    from osmseg import shards

    tasks = _tasks(dict.fromkeys(tiles), source_zoom)
    first, stop = shards.cut([len(task) for task in tasks], shard)
    return [tile for task in tasks[first:stop] for tile in task]


def render_labels(
    tiles: Iterable[mercantile.Tile],
    source,
    classes: Classes,
    out_dir: str | os.PathLike,
    tile_size: int = DEFAULT_TILE_SIZE,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Render and write the labels of `tiles` that do not exist yet (resumable).

    Args:
        tiles: the tiles to label.
        source: the osmseg.osm OsmSource to read features from (picklable: workers get a copy).
        classes: the classes to draw.
        out_dir: the labels folder ({z}-{x}-{y}.png inside).
        tile_size: label size in pixels.
        workers: processes to spread the work over (1: in this process).
        progress: show a progress bar on stderr.

    Returns:
        {"rendered": n written now, "skipped": n that already existed}.
    """
    from tqdm import tqdm

    check_filters(classes)  # here, not in the workers, so that a bad filter fails once
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unique = list(dict.fromkeys(tiles))
    todo = [tile for tile in unique if not datafiles.label_path(out_dir, tile).exists()]
    summary = {"rendered": 0, "skipped": len(unique) - len(todo)}
    if not todo:
        return summary
    tasks = _tasks(todo, source.zoom)
    if workers <= 1 or len(tasks) == 1:
        renderer = LabelRenderer(classes, tile_size)
        with tqdm(total=len(todo), desc="labels", unit="tile", disable=not progress, file=sys.stderr) as bar:
            for task in tasks:
                for tile, rgb in render_tiles(source, renderer, task):
                    write_label(datafiles.label_path(out_dir, tile), rgb)
                    summary["rendered"] += 1
                    bar.update()
        return summary
    import multiprocessing
    import pickle

    source.close()  # no open file handle may cross into the workers
    if "fork" in multiprocessing.get_all_start_methods():
        context, shared = multiprocessing.get_context("fork"), source
    else:
        context, shared = multiprocessing.get_context(), pickle.dumps(source)
    workers = min(workers, len(tasks))
    # Hand out runs of neighbouring tasks: a worker then decodes each source tile (and the
    # neighbours that features crossing its borders need) once, not every worker all of
    # them; four runs per worker still balance the load.
    chunk = max(1, len(tasks) // (4 * workers))
    # No helper thread may be running when the workers fork: tqdm's monitor is one.
    tqdm.monitor_interval = 0
    init = (shared, classes.to_json(), tile_size, str(out_dir))
    with (
        context.Pool(workers, _worker_init, init) as pool,
        tqdm(total=len(todo), desc="labels", unit="tile", disable=not progress, file=sys.stderr) as bar,
    ):
        for written in pool.imap_unordered(_worker_render, tasks, chunksize=chunk):
            summary["rendered"] += written
            bar.update(written)
    return summary


# --- prepare.py labels ---------------------------------------------------------------------


# --- prepare.py filter ---------------------------------------------------------------------


def labelled_share(counts: np.ndarray) -> float:
    """The share of a tile's pixels that belong to a class (counts from count_labels)."""
    total = int(counts.sum())
    return (total - int(counts[-1])) / total if total else 0.0


def count_columns(classes: Classes) -> list[str]:
    """The names of count_labels' values, the count columns of data/sample-filtered.txt."""
    return classes.names[1:] + ["Background"]


def label_stats(counts: Sequence[np.ndarray], classes: Classes) -> list[tuple[str, float, int]]:
    """(class, pixel frequency, tile count) per class and the background, over kept tiles."""
    names = count_columns(classes)
    if not counts:
        return [(name, 0.0, 0) for name in names]
    stacked = np.stack(counts)
    pixels = stacked.sum(axis=0)
    total = int(pixels.sum())
    present = (stacked > 0).sum(axis=0)
    return [(name, float(p) / total, int(n)) for name, p, n in zip(names, pixels, present)]


def stats_csv(rows: Sequence[tuple[str, float, int]]) -> str:
    """label-stats.csv's text."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class", "pixel_frequency", "tile_count"])
    for name, frequency, tiles_ in rows:
        writer.writerow([name, f"{frequency:.8g}", tiles_])
    return buffer.getvalue()


def filter_tiles(entries, counts_of, label_ratio: float, count: int, more=None, render=None):
    """Keep the first `count` tiles whose labelled share exceeds `label_ratio`.

    Sampling happens before filtering, so a sample can hold too few tiles that pass; then
    further tiles are drawn from `more` (the same random stream), labelled with `render`,
    and considered in turn, until `count` pass or the stream ends.

    Args:
        entries: the sample, [(source, Tile)], considered in order.
        counts_of: Tile -> count_labels() counts of its (existing) label.
        label_ratio: keep tiles whose labelled share of pixels is strictly above this.
        count: how many tiles to keep.
        more: an iterator of further (source, Tile), none of them in `entries`.
        render: called with a list of Tiles from `more` to make their labels.

    Returns:
        (kept, considered): kept is [(source, Tile, counts)] (len(kept) < count only when
        the sample and `more` ran out); considered is how many tiles were looked at.
    """
    kept: list = []
    considered = 0

    def consider(batch) -> None:
        nonlocal considered
        for source, tile in batch:
            if len(kept) == count:
                return
            considered += 1
            counts = counts_of(tile)
            if labelled_share(counts) > label_ratio:
                kept.append((source, tile, counts))

    consider(entries)
    while more is not None and len(kept) < count:
        # Draw about as many as the pass rate so far says are needed, with some slack.
        rate = max(len(kept) / considered, 0.05) if considered else 1.0
        wanted = min(max(int((count - len(kept)) / rate * 1.2) + 1, 16), 4096)
        batch = []
        for entry in more:
            batch.append(entry)
            if len(batch) == wanted:
                break
        if not batch:
            break
        if render is not None:
            render([tile for _, tile in batch])
        consider(batch)
    return kept, considered


