#!/usr/bin/env python3
"""Mapping an area (prepare.py map) on the demo world's tile server: throughput, memory, the OSM diff.

Figures:
- throughput: `map` on a box of the demo town from a fresh tile cache, against the sum of the
  two stages it replaces, measured side by side on the same tiles and pixels: downloading the
  tiles (imagery.download_tiles, 8 workers) plus segmenting their mosaic as one image with
  feed_forward's writer (scene.write_scene, with its GeoTIFF outputs), with the server's
  tiles drawn beforehand so both sides fetch at transfer speed. Goal (issue 14):
  map <= 1.3 × (download + segment). Both sides without the OSM comparison, then map with it
  for its cost. The server runs in a child process, as a real one is elsewhere.
- memory: `prepare.py map` in a child process on a 10 km × 10 km box at z17 near 51° N
  (about 13,000 × 13,000 pixels; the demo server serves bare ground outside its town, as a
  real provider covers the planet): peak resident memory (goal < 2 GB) and time.
- diff: on the whole demo town with its OSM QA tiles, the share of the buildings the map
  leaves out (the demo world knows which it dropped) that a "missing in OSM" building polygon
  covers by at least half (goal >= 70%), and the share of those polygons that lie on no
  dropped building (at least half of the polygon's area off them counts as false; goal <=
  30%), at map's default --min-confidence and at a few others (the trade-off a mapper
  chooses), and at the default with make demo's 8-fold test-time augmentation. Needs a
  trained model (--weights, e.g. the one `make demo` writes).

    .venv/bin/python bench/bench_map.py --weights weights.hdf5 [--only throughput|memory|diff]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from common import RESULTS, write_result  # noqa: E402

THROUGHPUT_BOX = "-0.0165,-0.0165,0.0165,0.0165"  # 13 × 13 z17 tiles of the demo town
MEMORY_BOX = "-2.67,51.405,-2.527,51.495"  # 10 km × 10 km west of Bristol
BATCH_SIZE = 8


def _serve(connection) -> None:
    from osmseg.demo.server import DemoTileServer

    with DemoTileServer(seed=0) as server:
        connection.send(server.tilejson_url)
        connection.recv()


class Server:
    """The demo tile server in a child process (its painting does not share our GIL)."""

    def __enter__(self):
        self.parent, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        self.url = self.parent.recv()
        return self

    def __exit__(self, *exc):
        self.parent.send("done")
        self.process.join(10)


def _predict(weights: Path):
    import model
    from osmseg import cli, segment
    from osmseg.classes import parse_classes

    cli.import_keras()
    network, config = model.load(weights)
    classes = parse_classes(config["classes"], require_filters=False)
    predict = segment.model_predict(model.inference(network), BATCH_SIZE)
    return predict, classes, int(config["input_size"])


def bench_throughput(weights: Path, workdir: Path, demo_osm: Path) -> dict:
    from osmseg import areamap, imagery, rasters, scene, segment, tiles
    from osmseg.commands.map_area import RowDownloads
    from osmseg.mosaic import MosaicReader
    from osmseg.osm import open_source

    predict, classes, window = _predict(weights)
    windows = segment.Windows(window, 0.25, BATCH_SIZE)
    block = tiles.TileBlock.of_bbox(tiles.parse_bbox(THROUGHPUT_BOX), 17)
    predict(np.zeros((BATCH_SIZE, window, window, 3), np.float32))  # traced once, for both sides
    figures = {"tiles": {"value": len(block), "unit": f"z17 tiles ({block.columns} × {block.rows})"}}

    class Args:
        workers, rps, tile_size, retries = 8, None, 256, 5

    with Server() as server:
        # The server draws a tile once and caches it: draw them all first, so that both sides
        # fetch at the same (transfer) speed.
        source = imagery.open_tile_source(server.url)
        imagery.download_tiles(block.tiles(), source, workdir / "warm-up", workers=8, progress=False)
        # The two stages it replaces: download, then segment the stitched mosaic as one image.
        started = time.perf_counter()
        imagery.download_tiles(block.tiles(), source, workdir / "stages", workers=8, progress=False)
        download_s = time.perf_counter() - started
        source.close()
        stitched = MosaicReader(block, workdir / "stages")
        image = stitched.read(0, stitched.height)
        georeference = stitched.georeference
        stitched.close()
        whole = rasters.ArrayReader(image, workdir / "mosaic.png")
        whole.georeference = georeference
        started = time.perf_counter()
        scene.write_scene(whole, predict, classes, workdir / "segmented", windows)
        segment_s = time.perf_counter() - started
        # map, from a fresh tile cache, without and with the OSM comparison.
        runs = {}
        for name, with_osm in (("map", False), ("map_with_osm", True)):
            source = imagery.open_tile_source(server.url)
            folder = workdir / f"cache-{name}"
            started = time.perf_counter()
            downloads = RowDownloads(block, source, folder, Args).start()
            reader = MosaicReader(block, folder, ready=downloads.ready)
            osm_labels = None
            if with_osm:
                osm_labels = areamap.OsmLabelRows(block, open_source("qa-tiles", demo_osm), classes)
            areamap.map_area(reader, predict, classes, workdir / name, areamap.MapOptions(windows, osm_labels))
            runs[name] = time.perf_counter() - started
            reader.close()
            downloads.close()
            source.close()
    stages = download_s + segment_s
    figures["download_s"] = {"value": round(download_s, 2), "unit": "s (8 workers)"}
    figures["segment_s"] = {"value": round(segment_s, 2), "unit": f"s ({image.shape[1]}x{image.shape[0]} as one image)"}
    figures["map_s"] = {"value": round(runs["map"], 2), "unit": "s"}
    figures["ratio"] = {"value": round(runs["map"] / stages, 3), "unit": "map / (download + segment), goal <= 1.3"}
    figures["map_with_osm_s"] = {"value": round(runs["map_with_osm"], 2), "unit": "s (OSM labels and diff too)"}
    figures["ratio_with_osm"] = {"value": round(runs["map_with_osm"] / stages, 3), "unit": "with OSM / (download + segment)"}
    return figures


_MEMORY_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})

def high_water_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

import prepare
from osmseg import cli
started = time.perf_counter()
status = cli.run(prepare.main, ["map", "--weights", {weights!r}, "--bbox={bbox}", "--image-tiles", {url!r},
                                "--tiles", {tiles!r}, "--out", {out!r}, "--heatmap-size", "512"])
print(json.dumps({{"status": status, "seconds": time.perf_counter() - started, "peak_mb": high_water_mb()}}))
"""


def bench_memory(weights: Path, workdir: Path) -> dict:
    from osmseg import tiles

    block = tiles.TileBlock.of_bbox(tiles.parse_bbox(MEMORY_BOX), 17)
    with Server() as server:
        # The demo's TileJSON bounds its town; its tiles, bare ground outside the town, come
        # from everywhere, so the 10 km box is fetched by XYZ address, without bounds.
        xyz = server.url.rsplit("/", 1)[0] + "/{z}/{x}/{y}.jpg"
        code = _MEMORY_CHILD.format(root=str(ROOT), weights=str(weights), bbox=MEMORY_BOX, url=xyz,
                                    tiles=str(workdir / "memory-tiles"), out=str(workdir / "memory-map"))  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if done.returncode != 0 or result.get("status") != 0:
        raise SystemExit(f"the memory child failed ({done.returncode}, map {result.get('status')}): {done.stderr[-2000:]}")
    width, height = block.columns * 256, block.rows * 256
    return {
        "box": {"value": MEMORY_BOX, "unit": "degrees (10 km × 10 km)"},
        "pixels": {"value": f"{width}x{height}", "unit": f"{len(block)} z17 tiles"},
        "peak_mb": {"value": round(result["peak_mb"]), "unit": "MiB (VmHWM of the process), goal < 2048"},
        "seconds": {"value": round(result["seconds"], 1), "unit": "s, tiles fetched and mapped"},
    }


SWEEP = (0.4, 0.5, 0.7)  # --min-confidence values tried beside the default
TTA = 8  # and the default with make demo's test-time augmentation


def bench_diff(weights: Path, workdir: Path, demo_osm: Path) -> dict:
    """The diff's recall and false share at the default --min-confidence, and at SWEEP's."""
    import argparse

    import prepare
    from osmseg import cli, demo
    from osmseg.commands import map_area

    parser = argparse.ArgumentParser()
    map_area.add_arguments(parser)
    default = parser.get_default("min_confidence")
    world = demo.build_world(0)
    dropped = [f.geometry for f in world.features if not f.mapped and "building" in f.tags]
    figures, sweep = {}, {}
    with Server() as server:
        # The default, the other thresholds, then the default with make demo's test-time augmentation.
        for confidence, tta in [(default, 1), *((c, 1) for c in SWEEP), (default, TTA)]:
            out = workdir / f"demo-map-{confidence:g}-tta{tta}"
            argv = ["map", "--weights", str(weights), f"--bbox={','.join(map(str, demo.DEMO_BBOX))}", "--image-tiles",
                    server.url, "--tiles", str(workdir / "demo-tiles"), "--osm", str(demo_osm), "--out", str(out),
                    "--min-confidence", str(confidence), "--tta", str(tta)]  # fmt: skip
            started = time.perf_counter()
            if cli.run(prepare.main, argv) != 0:
                raise SystemExit("map failed on the demo town")
            seconds = time.perf_counter() - started
            scores = diff_scores(out, dropped)
            brief = f"recall {scores['recall']['value']}, false share {scores['false_share']['value']}"
            if (confidence, tta) == (default, 1):
                figures = scores | {"seconds": {"value": round(seconds, 1), "unit": "s, map of the town"}}
            elif tta == 1:
                sweep[f"{confidence:g}"] = {
                    "value": brief,
                    "unit": f"--min-confidence {confidence:g} (default {default:g})",
                }
            else:
                figures[f"tta{tta}"] = {
                    "value": f"{brief}, building IoU vs OSM {scores['building_iou_vs_osm']['value']}, {seconds:.0f} s",
                    "unit": f"--tta {tta} (make demo's TTA), default --min-confidence",
                }
    return figures | {"min_confidence": {"value": default, "unit": "prepare.py map's default"}, "sweep": sweep}


def diff_scores(out: Path, dropped: list) -> dict:
    """Recall of the dropped buildings and false share of "missing in OSM" building polygons."""
    import shapely

    from osmseg import tiles

    collection = json.loads((out / "osm-diff.geojson").read_text())
    found = []
    for item in collection["features"]:
        props = item["properties"]
        if props["kind"] != "missing in OSM" or props["class"] != "building":
            continue
        found.append(shapely.transform(shapely.geometry.shape(item["geometry"]),
                                       lambda xy: np.column_stack(tiles.lnglat_to_xy(xy[:, 0], xy[:, 1]))))  # fmt: skip
    tree = shapely.STRtree(found) if found else None
    covered = 0
    for building in dropped:
        hits = [found[i] for i in tree.query(building)] if tree is not None else []
        overlap = shapely.union_all(hits).intersection(building).area if hits else 0.0
        covered += overlap >= 0.5 * building.area
    dropped_tree = shapely.STRtree(dropped)
    false = 0
    for polygon in found:
        hits = [dropped[i] for i in dropped_tree.query(polygon)]
        on = shapely.union_all(hits).intersection(polygon).area if hits else 0.0
        false += on < 0.5 * polygon.area
    counts = json.loads((out / "counts.json").read_text())
    return {
        "dropped_buildings": {"value": len(dropped), "unit": "buildings the demo map leaves out"},
        "missing_building_polygons": {"value": len(found), "unit": "'missing in OSM' building polygons"},
        "recall": {"value": round(covered / len(dropped), 3) if dropped else None,
                   "unit": "dropped buildings at least half covered, goal >= 0.7"},
        "false_share": {"value": round(false / len(found), 3) if found else None,
                        "unit": "polygons at least half off dropped buildings, goal <= 0.3"},
        "building_iou_vs_osm": {"value": counts["agreement"]["building"]["iou"], "unit": "over the town"},
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=ROOT / "weights.hdf5", help="a trained weights file")
    parser.add_argument("--only", choices=("throughput", "memory", "diff"), action="append")
    args = parser.parse_args()
    if not args.weights.is_file():
        raise SystemExit(f"{args.weights}: no weights; run `make demo` first or pass --weights")
    parts = set(args.only or ("throughput", "memory", "diff"))
    previous = RESULTS / "map.json"
    figures = json.loads(previous.read_text())["figures"] if args.only and previous.exists() else {}
    import model

    config = model.read_config(args.weights)
    with tempfile.TemporaryDirectory(prefix="bench-map-") as tmp:
        workdir = Path(tmp)
        demo_osm = workdir / "demo.mbtiles"
        import prepare
        from osmseg import cli

        cli.run(prepare.main, ["demo-world", "--out", str(demo_osm)])
        name = f"{config['name']} width {config['width']} ({args.weights.name})"
        for part, run in (("throughput", lambda: bench_throughput(args.weights, workdir, demo_osm)),
                          ("memory", lambda: bench_memory(args.weights, workdir)),
                          ("diff", lambda: bench_diff(args.weights, workdir, demo_osm))):  # fmt: skip
            if part in parts:
                print(f"{part}...", flush=True)
                figures[part] = run()
                figures[part]["model"] = {"value": name, "unit": ""}
                print(json.dumps(figures[part]), flush=True)
    path = write_result("map", figures, packages=("numpy", "keras", "tensorflow", "rasterio", "shapely"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
