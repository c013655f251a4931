"""prepare.py map: segment a bounding box straight from a tile source into a georeferenced map.

Fetches the box's imagery tiles at ZOOM (any IMAGE_TILES source, with the downloader's
retries and token hygiene) into a cache folder, segments them as one seamless mosaic while
the rest download, and writes into OUT: mask.tif and probabilities.tif (Cloud-Optimized
GeoTIFFs in EPSG:3857 on the tile grid), counts.json (pixels and square metres per class),
segments.geojson (WGS84), segments.png, heatmap-<class>.png and index.html; with --osm also
osm-diff.geojson, the places where OSM and the model disagree, and their agreement in
counts.json. osmseg.areamap describes each file.

A re-run skips a map made from the same inputs (--force redoes it); an interrupted one keeps
the tiles it fetched and fetches only the rest. Tiles that failed to download (after the
downloader's retries) are counted in counts.json as failed_tiles, and a re-run retries them
and maps again.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from pathlib import Path

from osmseg import atomic, datafiles, tiles
from osmseg.commands import options
from osmseg.errors import SourceError, UserError

NAME = "map"
HELP = "segment a bounding box from a tile source into a georeferenced map, and diff it with OSM"
MAX_TILES = 1_000_000  # a box past this asks for --yes (about 65 GB of imagery at z17)
DOWNLOAD_ROWS = 2  # tile rows fetched at a time, ahead of the segmentation


def add_arguments(parser) -> None:
    parser.add_argument("--weights", type=Path, default=Path("weights.hdf5"), help="the trained model (train.py)")
    options.add_bbox(parser, "the area to map")
    parser.add_argument("--zoom", type=int, default=17, help="the imagery's zoom (ZOOM_LEVEL; 17 is about 1 m a pixel)")
    options.add_image_tiles(parser)
    parser.add_argument(
        "--tiles", type=Path, default=None,
        help="where fetched tiles are kept, and reused by later runs (default: data/map-tiles/<the source's name>)",
    )  # fmt: skip
    parser.add_argument("--tile-size", type=int, default=256, help="the imagery tiles' width and height in pixels")
    parser.add_argument("--workers", type=int, default=8, help="concurrent downloads")
    parser.add_argument("--rps", type=options.rps, default=None, help="at most this many requests per second")
    parser.add_argument("--retries", type=int, default=5, help="retries per tile (timeouts, 5xx, cut transfers)")
    parser.add_argument(
        "--osm", default=None,
        help="an OSM source to compare with (as for prepare.py labels; default: none, and no osm-diff.geojson)",
    )  # fmt: skip
    parser.add_argument("--osm-source", default="qa-tiles", choices=options.OSM_KINDS, help="the kind of --osm")
    parser.add_argument("--overpass-url", default=options.OVERPASS_URL, help="overpass only: the API endpoint")
    parser.add_argument("--timeout", type=int, default=180, help="overpass only: seconds to wait for the answer")
    options.add_classes(
        parser, "the classes file whose filters draw the OSM labels (default: the one in the weights)", None
    )
    parser.add_argument("--overlap", type=float, default=0.25, help="fraction of a window shared with its neighbour")
    options.add_tta(parser)
    parser.add_argument("--batch-size", type=options.positive_int, default=8, help="windows per model call")
    parser.add_argument("--simplify", type=float, default=1.0, help="polygon simplification tolerance, in pixels")
    parser.add_argument("--min-area", type=float, default=20.0, help="segments.geojson leaves out polygons below this many m²")
    parser.add_argument(
        "--diff-min-area", type=float, default=50.0, help="osm-diff.geojson leaves out places below this many m²"
    )
    parser.add_argument(
        "--min-confidence", type=float, default=0.6,
        help="'missing in OSM' needs the model's mean probability at least this",
    )  # fmt: skip
    parser.add_argument(
        "--max-agreement", type=float, default=0.25,
        help="'check in OSM' needs the model to agree on at most this share of what OSM maps",
    )  # fmt: skip
    parser.add_argument("--heatmap-size", type=options.positive_int, default=1024, help="longest side of the heatmaps")
    parser.add_argument("--yes", action="store_true", help=f"map a box of more than {MAX_TILES:,} tiles")
    parser.add_argument("--force", action="store_true", help="redo a map whose outputs are complete")
    parser.add_argument("--out", type=Path, default=Path("output/map"), help="the folder of the map's outputs")


def _source_name(spec: str) -> str:
    """A folder name for a tile source, with no secret in it."""
    from osmseg.imagery import redact

    spec = spec.strip()
    if spec == "demo" or spec.startswith("demo:"):
        return "demo-" + (spec.partition(":")[2] or "0")
    return "source-" + hashlib.sha1(redact(spec).encode()).hexdigest()[:12]


def _check(args, block: tiles.TileBlock) -> None:
    if len(block) > MAX_TILES and not args.yes:
        raise UserError(
            f"--bbox {args.bbox} at z{block.z} is {len(block):,} tiles (more than {MAX_TILES:,}: tens of GB of "
            "imagery and hours of work); pass --yes to map it anyway, or pick a smaller box or a lower --zoom"
        )
    if not 0 <= args.overlap < 1:
        raise UserError(f"--overlap {args.overlap}: use a fraction in [0, 1), e.g. 0.25")
    if args.tile_size < 1 or min(args.simplify, args.min_area, args.diff_min_area, args.retries) < 0:
        raise UserError("--tile-size must be positive, --simplify, --min-area, --diff-min-area and --retries at least 0")
    for name in ("min_confidence", "max_agreement"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: use a fraction in [0, 1]")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"{args.out}: exists and is not a folder; pass a folder for the map's outputs")


def _stamp(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _finished(out: Path, inputs: dict) -> dict | None:
    try:
        record = json.loads((out / "counts.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("inputs") != inputs or not all((out / name).is_file() for name in record.get("files", [])):
        return None
    if record.get("failed_tiles"):  # mapped with holes that a re-run may fill
        return None
    return record


class RowDownloads:
    """Fetches a block's tiles a few rows at a time on a thread of its own, ahead of the reader.

    `ready(row)` (osmseg.mosaic.MosaicReader's hook) waits until that tile row is in the
    folder, and raises what stopped the downloads, if anything did.
    """

    def __init__(self, block, source, folder: Path, args):
        self.block, self.source, self.folder, self.args = block, source, folder, args
        self.done = -1  # the last tile row fetched
        self.error: BaseException | None = None
        self.summaries: list = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="map-downloads", daemon=True)

    def start(self) -> RowDownloads:
        self._thread.start()
        return self

    def _run(self) -> None:
        from osmseg.imagery import download_tiles
        from osmseg.imagery.sources import new_session

        session = new_session(self.args.workers)  # one pool of connections for every row
        try:
            for first in range(0, self.block.rows, DOWNLOAD_ROWS):
                if self._stop.is_set():
                    return
                rows = range(first, min(first + DOWNLOAD_ROWS, self.block.rows))
                wanted = [tile for row in rows for tile in self.block.row(row)]
                self.summaries.append(
                    download_tiles(
                        wanted, self.source, self.folder, workers=self.args.workers, rps=self.args.rps,
                        tile_size=self.args.tile_size, retries=self.args.retries, progress=False, session=session,
                    )
                )  # fmt: skip
                with self._changed:
                    self.done = rows[-1]
                    self._changed.notify_all()
        except BaseException as error:  # handed to the reader, which raises it in the main thread
            with self._changed:
                self.error = error
                self._changed.notify_all()
        finally:
            session.close()

    def ready(self, row: int) -> None:
        with self._changed:
            while self.done < row and self.error is None:
                self._changed.wait(0.5)
            if self.error is not None:
                raise self.error

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def failed(self) -> int:
        return sum(len(s.failed) for s in self.summaries)

    def line(self) -> str:
        fetched = sum(s.downloaded for s in self.summaries)
        kept = sum(s.skipped for s in self.summaries)
        missing = sum(len(s.missing) for s in self.summaries)
        failed = sum(len(s.failed) + len(s.rejected) for s in self.summaries)
        return f"tiles: {fetched} fetched, {kept} already here, {missing} missing at the source, {failed} failed or rejected"


def main(args) -> int:
    bbox = tiles.parse_bbox(args.bbox)
    zoom = tiles.check_zoom(args.zoom, "--zoom")
    block = tiles.TileBlock.of_bbox(bbox, zoom)
    _check(args, block)
    if not args.weights.is_file():
        raise UserError(f"{args.weights}: no such weights file; train one (make train) or pass --weights")
    folder = args.tiles or Path("data/map-tiles") / _source_name(args.image_tiles)
    inputs = {
        "weights": _stamp(args.weights),
        "bbox": list(bbox),
        "zoom": zoom,
        "image_tiles": _source_name(args.image_tiles),
        "tile_size": args.tile_size,
        "osm": None if args.osm is None else [args.osm_source, str(args.osm)],
        "overlap": args.overlap,
        "tta": args.tta,
        "simplify": args.simplify,
        "min_area": args.min_area,
        "diff_min_area": args.diff_min_area,
        "min_confidence": args.min_confidence,
        "max_agreement": args.max_agreement,
        "heatmap_size": args.heatmap_size,
        "title": f"osmseg map of {args.bbox} at z{zoom}",
    }
    record = None if args.force else _finished(args.out, inputs)
    if record is not None:
        print(f"{args.out}: already mapped from the same inputs (--force redoes it)", file=sys.stderr)
        _print_summary(record["counts"], record["square_metres"], record.get("agreement"), args.out)
        return 0
    print(f"map: {len(block)} z{zoom} tiles ({block.columns} × {block.rows}) into {folder}", file=sys.stderr)

    from osmseg import cli

    cli.import_keras()  # without TensorFlow's start-up chatter
    import model as segnet
    from osmseg import areamap, segment
    from osmseg.classes import load_classes, parse_classes
    from osmseg.mosaic import MosaicReader

    keras_model, config = segnet.load(args.weights)
    classes = parse_classes(config["classes"], origin=f"{args.weights} (classes)", require_filters=False)
    windows = segment.Windows(int(config["input_size"]), args.overlap, args.batch_size)
    predict = segment.tta_predict(segment.model_predict(segnet.inference(keras_model), args.batch_size), args.tta)

    osm_labels, osm_source = None, None
    if args.osm is not None:
        drawing = load_classes(args.classes) if args.classes else classes
        if [c.name for c in drawing.classes] != [c.name for c in classes.classes]:
            raise UserError(f"{args.classes}: its classes {drawing.names} are not the model's {classes.names}")
        if any(c.filter is None for c in drawing.classes):
            raise UserError(f"{args.weights}: its classes have no OSM filters to draw labels with; pass --classes")
        osm_source = options.open_osm_source(argparse_namespace(args, drawing), bbox)
        osm_labels = areamap.OsmLabelRows(block, osm_source, drawing, args.tile_size)

    have = sum(datafiles.find_image(folder, tile) is not None for tile in block.tiles())
    downloads = None
    source = None
    try:
        if have < len(block):
            source = options.open_imagery(args.image_tiles, options.token(args))
            downloads = RowDownloads(block, source, folder, args).start()
        reader = MosaicReader(block, folder, args.tile_size, ready=downloads.ready if downloads else None)
        try:
            settings = areamap.MapOptions(
                windows, osm_labels, areamap.DiffOptions(args.diff_min_area, args.min_confidence, args.max_agreement),
                args.min_area, args.simplify, args.heatmap_size, inputs, progress=True,
            )  # fmt: skip
            result = areamap.map_area(reader, predict, classes, args.out, settings)
        finally:
            reader.close()
    finally:
        if downloads is not None:
            downloads.close()
            print(downloads.line(), file=sys.stderr)
        if source is not None:
            source.close()
        if osm_source is not None:
            osm_source.close()
    if result.no_imagery == result.width * result.height:
        raise SourceError(
            f"{args.image_tiles!r} had none of the box's {len(block)} tiles at z{zoom}; check --bbox, --zoom "
            "and the source"
        )
    if downloads is not None and downloads.failed:
        # Kept in counts.json, so that a re-run retries those tiles and maps again.
        record = json.loads((args.out / "counts.json").read_text())
        record["failed_tiles"] = downloads.failed
        atomic.write_text_atomic(args.out / "counts.json", json.dumps(record, indent=1) + "\n")
        print(f"{downloads.failed} tiles failed to download (no imagery there); run again to retry them",
              file=sys.stderr)
    _print_summary(result.counts, result.square_metres, result.agreement, args.out)
    if result.no_imagery:
        print(f"note: {len(reader.missing)} tiles had no imagery; their pixels are nodata (255) in mask.tif")
    return 0


def argparse_namespace(args, classes):
    """args, with --classes as a loaded Classes (what open_osm_source reads for Overpass)."""
    import argparse

    copy = argparse.Namespace(**vars(args))
    copy.classes = classes
    return copy


def _print_summary(counts: dict, square_metres: dict, agreement: dict | None, out: Path) -> None:
    total = sum(counts.values())
    width = max(map(len, counts)) + 2
    for name, pixels in counts.items():
        share = 100 * pixels / total if total else 0.0
        iou = "" if not agreement or agreement[name]["iou"] is None else f"  IoU vs OSM {agreement[name]['iou']:.2f}"
        print(f"  {name:<{width}}{pixels:>12} px {square_metres[name] / 1e4:>10.2f} ha {share:6.2f}%{iou}")
    print(f"  -> {out}/ (open {out / 'index.html'})")
