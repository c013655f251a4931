#!/usr/bin/env python3
"""Segment an image of any size (or a directory of images) with a trained model.

    python3 feed_forward.py weights.hdf5 image.png output/
    python3 feed_forward.py weights.hdf5 scene.tif output/ --geojson
    python3 feed_forward.py weights.hdf5 images/ output/      # output/<stem>/... per image

Prints the pixel count of every class (zeros included; they sum to the image's pixel count)
and writes into the output directory: counts.json, heatmap-<class>.png per class,
segments.png, mask.png, and for georeferenced input (a GeoTIFF, a PNG or JPEG with a world
file, or a tile named {z}-{x}-{y}.jpg as data/images/ holds them: EPSG:3857 over the tile)
mask.tif and probabilities.tif in the input's CRS; segments.geojson with --geojson.
osmseg.scene's docstring describes each file. Images larger than the model's
input are segmented in overlapping windows blended without seams, in strips; TIFFs and
images over 4096 × 4096 pixels are read from disk a strip at a time, so memory stays
bounded whatever the size.

Re-running skips an image whose counts.json says it was made from the same image, weights
and options (--force redoes it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from osmseg import cli, datafiles, rasters, scene, segment
from osmseg.commands import options
from osmseg.errors import UserError

# Chosen with bench/bench_feed_forward.py's seam check: see the README's feed_forward section.
DEFAULT_OVERLAP = 0.25


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", type=Path, help="weights file written by train.py (weights.hdf5)")
    parser.add_argument("image", type=Path, help="image file (PNG, JPEG, WebP, BMP, TIFF, GeoTIFF) or directory of them")
    parser.add_argument("outdir", type=Path, help="output directory (created if missing)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per model call")
    parser.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP,
                        help="fraction of a window shared with its neighbour, in [0, 1)")  # fmt: skip
    parser.add_argument("--window", type=int, default=None,
                        help="window size in pixels (default: the model's input size)")  # fmt: skip
    parser.add_argument("--geojson", action="store_true",
                        help="also write segments.geojson (polygons per class; holds the label image, 1 byte a pixel)")  # fmt: skip
    parser.add_argument("--min-area", type=float, default=16.0, help="--geojson: drop polygons below this many pixels")
    parser.add_argument("--simplify", type=float, default=1.0, help="--geojson: simplification tolerance in pixels")
    parser.add_argument("--heatmap-size", type=int, default=scene.HEATMAP_SIZE, help="longest side of the heatmaps, at most")
    options.add_tta(parser)
    parser.add_argument("--force", action="store_true", help="redo images whose outputs are already complete")


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.overlap < 1:
        raise UserError(f"--overlap {args.overlap}: use a fraction in [0, 1), e.g. 0.25")
    for name in ("batch_size", "heatmap_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: use a positive number")
    if args.window is not None and args.window < 1:
        raise UserError(f"--window {args.window}: use a positive size such as 256")
    if args.min_area < 0 or args.simplify < 0:
        raise UserError("--min-area and --simplify: use numbers >= 0")
    if args.outdir.exists() and not args.outdir.is_dir():
        raise UserError(f"{args.outdir}: exists and is not a directory; pass a directory for the outputs")


def list_images(image: Path, outdir: Path) -> list[tuple[Path, Path]]:
    """(image, its output directory) pairs: one for a file, one per image in a directory.

    Raises:
        UserError: the path is missing, the directory holds no images, or two images in it
            would share an output directory.
    """
    if not image.exists():
        raise UserError(f"{image}: no such image or directory; pass an existing image file or directory")
    if not image.is_dir():
        return [(image, outdir)]
    files = sorted(p for p in image.iterdir() if p.is_file() and p.suffix.lower() in rasters.READABLE_SUFFIXES)
    if not files:
        raise UserError(f"{image}: no images in this directory (looked for {', '.join(rasters.READABLE_SUFFIXES)})")
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise UserError(
                f"{image}: {by_stem[path.stem].name} and {path.name} would share {outdir / path.stem}; rename one"
            )
        by_stem[path.stem] = path
    return [(path, outdir / path.stem) for path in files]


def open_scene(path: Path) -> rasters.ImageReader:
    """Open an image to segment; one named like the pipeline's tiles ({z}-{x}-{y}.jpg) and not
    otherwise georeferenced gets its tile's place: EPSG:3857 over the tile's bounds."""
    reader = rasters.open_image(path)
    tile = datafiles.parse_tile_stem(path.stem)
    if reader.georeference is None and tile is not None:
        reader.georeference = rasters.Georeference.of_tile(tile, reader.width, reader.height)
    return reader


def _stamp(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _finished(outdir: Path, inputs: dict) -> dict | None:
    """counts.json's record if outdir holds a complete result made from these inputs."""
    try:
        record = json.loads((outdir / "counts.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("inputs") != inputs or not all((outdir / name).is_file() for name in record.get("files", [])):
        return None
    return record


def _print_counts(name: str, width: int, height: int, counts: dict[str, int], notes: list[str]) -> None:
    for note in notes:
        print(f"note: {name}: {note}", file=sys.stderr)
    print(f"{name}: {width}×{height} = {width * height} pixels")
    column = max(map(len, counts)) + 2
    total = sum(counts.values())
    for class_name, count in counts.items():
        share = 100 * count / total if total else 0.0
        print(f"  {class_name:<{column}}{count:>12}  {share:6.2f}%")


def main(argv: Sequence[str] | None = None) -> int:
    parser = options.parser(prog="feed_forward.py", description=__doc__)
    configure(parser)
    args = parser.parse_args(argv)
    _check_args(args)
    jobs = list_images(args.image, args.outdir)
    # One image: read it before the (slower) model load, so that a bad image fails at once.
    opened = {jobs[0][0]: open_scene(jobs[0][0])} if len(jobs) == 1 else {}
    try:
        return _segment_all(args, jobs, opened)
    finally:
        for reader in opened.values():
            reader.close()


def _segment_all(args: argparse.Namespace, jobs: list[tuple[Path, Path]], opened: dict) -> int:
    cli.import_keras()  # without TensorFlow's start-up chatter
    import model as segnet
    from osmseg.classes import parse_classes

    config = segnet.read_config(args.weights)
    window = args.window or int(config["input_size"])
    try:
        keras_model, config = segnet.load(args.weights, input_size=window)
    except ValueError as error:  # an input size the architecture cannot take
        raise UserError(f"--window {window}: {error}") from None
    classes = parse_classes(config["classes"], origin=f"{args.weights} (classes)", require_filters=False)

    predict = segment.tta_predict(segment.model_predict(segnet.inference(keras_model), args.batch_size), args.tta)
    windows = segment.Windows(window, args.overlap, args.batch_size)

    failed: list[str] = []
    for image_path, outdir in jobs:
        inputs = {
            "image": _stamp(image_path),
            "weights": _stamp(args.weights),
            "window": window,
            "overlap": args.overlap,
            "tta": args.tta,
            "geojson": args.geojson,
            "min_area": args.min_area,
            "simplify": args.simplify,
            "heatmap_size": args.heatmap_size,
        }
        record = None if args.force else _finished(outdir, inputs)
        if record is not None:
            print(f"{image_path}: already done in {outdir} (--force redoes it)", file=sys.stderr)
            _print_counts(str(image_path), record["width"], record["height"], record["counts"], record["notes"])
            opened.pop(image_path, None)
            continue
        try:
            reader = opened.pop(image_path, None) or open_scene(image_path)
        except UserError as error:  # in a directory: skip it, say so, carry on
            print(f"skipped: {error}", file=sys.stderr)
            failed.append(image_path.name)
            continue
        try:
            result = scene.write_scene(
                reader, predict, classes, outdir, windows, geojson=args.geojson, simplify=args.simplify,
                min_area=args.min_area, heatmap_size=args.heatmap_size, inputs=inputs,
                progress=windows.count(reader.height, reader.width) > 16,
            )  # fmt: skip
        except UserError as error:  # a large image found damaged part way through reading it
            if len(jobs) == 1:
                raise
            print(f"skipped: {error}", file=sys.stderr)
            failed.append(image_path.name)
            continue
        finally:
            reader.close()
        _print_counts(str(image_path), result.width, result.height, result.counts, result.notes)
        print(f"  -> {outdir}/", file=sys.stderr)
    if failed:
        raise UserError(
            f"{args.image}: {len(failed)} of {len(jobs)} images could not be read ({', '.join(failed[:5])}"
            f"{', ...' if len(failed) > 5 else ''}); fix or remove them and re-run (finished ones are kept)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
