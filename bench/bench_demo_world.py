#!/usr/bin/env python3
"""The demo world: how fast it is built, written and drawn, and what its labels hold.

Figures:
- build_world and write_qa_tiles times (CPU seconds, the better of a few runs);
- the imagery painter's speed at z17, single-threaded: draw + JPEG encode, tiles per CPU
  second (textures warm), and the one-off texture set-up per zoom;
- the HTTP server's throughput with 8 client threads (server in a child process) and its CPU
  time per tile: tiles drawn on demand, then the same tiles again from its cache;
- class pixel shares over every z17 tile of DEMO_BBOX, labels rendered by osmseg.labels from
  the QA tiles (mapped features only), and label recall per class against labels rendered
  from every feature (mapped or not): how noisy the demo's labels are, by design.
"""

from __future__ import annotations

import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import mercantile
import numpy as np
from common import write_result

from osmseg import demo
from osmseg.demo.painter import _Painter
from osmseg.demo.server import DemoTileServer

ZOOM = 17
HTTP_TILES = 300
CLIENTS = 8


def _cpu(function, repeats: int = 3) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.process_time()
        result = function()
        best = min(best, time.process_time() - start)
    return best, result


def _serve(connection) -> None:
    """Child process: the server; answers "cpu" with its CPU seconds so far, stops on "done"."""
    with DemoTileServer(seed=0) as server:
        connection.send(server.url)
        while connection.recv() == "cpu":
            connection.send(time.process_time())


def _http_rate(url: str, tiles: list[mercantile.Tile]) -> float:
    import requests

    chunks = [tiles[i::CLIENTS] for i in range(CLIENTS)]
    failures = []

    def fetch(chunk):
        with requests.Session() as session:
            for tile in chunk:
                if session.get(f"{url}/{tile.z}/{tile.x}/{tile.y}.jpg", timeout=60).status_code != 200:
                    failures.append(tile)

    threads = [threading.Thread(target=fetch, args=(chunk,)) for chunk in chunks]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{len(failures)} tiles failed")
    return len(tiles) / elapsed


def _label_counts(mbtiles: Path, tiles: list[mercantile.Tile]):
    from osmseg import labels, osm
    from osmseg.classes import load_classes

    classes = load_classes(HERE.parent / "classes" / "mine.json")
    renderer = labels.LabelRenderer(classes)
    source = osm.open_source("qa-tiles", mbtiles)
    per_tile = {}
    for tile, rgb in labels.render_tiles(source, renderer, tiles):
        per_tile[tile] = classes.colors_to_labels(rgb)[0]
    return classes, per_tile


def main() -> None:
    figures: dict = {}
    build_s, world = _cpu(lambda: demo.build_world(0))
    figures["build_world"] = {"value": round(build_s, 3), "unit": "CPU s"}
    figures["features"] = {"value": len(world.features), "unit": "features"}
    buildings = [f for f in world.features if "building" in f.tags]
    figures["buildings_unmapped"] = {
        "value": round(100 * sum(not f.mapped for f in buildings) / len(buildings), 1),
        "unit": "% of buildings",
    }

    with tempfile.TemporaryDirectory() as scratch:
        mapped_path = Path(scratch) / "demo.mbtiles"
        write_s, _ = _cpu(lambda: demo.write_qa_tiles(world, mapped_path), repeats=1)
        figures["write_qa_tiles"] = {"value": round(write_s, 2), "unit": "CPU s"}
        figures["qa_tiles_size"] = {"value": round(mapped_path.stat().st_size / 2**20, 2), "unit": "MiB"}

        # The painter, single-threaded.
        painter = _Painter(world)
        setup_s, _ = _cpu(lambda: painter.textures(ZOOM), repeats=1)
        figures["texture_setup_per_zoom"] = {"value": round(setup_s, 3), "unit": "CPU s"}
        tiles = list(mercantile.tiles(*demo.DEMO_BBOX, zooms=ZOOM))
        start = time.process_time()
        for tile in tiles:
            painter.jpeg(tile)
        figures["painter_z17"] = {"value": round(len(tiles) / (time.process_time() - start), 1), "unit": "tiles/CPU s"}

        # The server over HTTP (a child process, so that clients and server do not share a GIL).
        parent, child = multiprocessing.Pipe()
        process = multiprocessing.Process(target=_serve, args=(child,), daemon=True)
        process.start()
        url = parent.recv()
        sample = tiles[:HTTP_TILES]
        for name in ("drawn", "cached"):
            parent.send("cpu")
            before = parent.recv()
            rate = _http_rate(url, sample)
            parent.send("cpu")
            cpu = parent.recv() - before
            figures[f"http_8_clients_{name}"] = {"value": round(rate, 1), "unit": "tiles/s"}
            figures[f"server_cpu_per_tile_{name}"] = {"value": round(1000 * cpu / len(sample), 2), "unit": "CPU ms"}
        parent.send("done")
        process.join(timeout=10)

        # Labels: shares, and recall against labels of every feature.
        classes, noisy = _label_counts(mapped_path, tiles)
        truth_path = Path(scratch) / "truth.mbtiles"
        demo.write_qa_tiles(world.fully_mapped(), truth_path)
        _, truth = _label_counts(truth_path, tiles)
    names = classes.names
    counts = np.zeros(len(names), dtype=np.int64)
    hits = np.zeros(len(names), dtype=np.int64)
    totals = np.zeros(len(names), dtype=np.int64)
    for tile, labels in noisy.items():
        counts += np.bincount(labels.ravel(), minlength=256)[: len(names)]
        true = truth[tile]
        totals += np.bincount(true.ravel(), minlength=256)[: len(names)]
        hits += np.bincount(true[labels == true].ravel(), minlength=256)[: len(names)]
    figures["z17_tiles"] = {"value": len(tiles), "unit": "tiles"}
    figures["class_share"] = {
        name: {"value": round(100 * counts[i] / counts.sum(), 2), "unit": "% of pixels"} for i, name in enumerate(names)
    }
    figures["label_recall"] = {
        name: {"value": round(100 * hits[i] / max(totals[i], 1), 1), "unit": "% of true pixels"}
        for i, name in enumerate(names)
    }
    path = write_result(
        "demo_world",
        figures,
        packages=("numpy", "shapely", "opencv-python-headless", "mapbox-vector-tile", "mapnik"),
        notes="class shares and recall from labels rendered by osmseg.labels at z17 over DEMO_BBOX",
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
