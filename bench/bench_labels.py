#!/usr/bin/env python3
"""Benchmark: label tiles per second at z17, with peak memory, beside two other ways to draw them.

On the demo world (osmseg.demo, when present) and on the real Monaco OSM QA tiles
(../shared/fixtures/osm-qa-monaco/monaco.mbtiles, when present), for one seeded random set of
z17 tiles inside the source's z12 tiles:

- pipeline: osmseg.labels.render_labels over all cores, PNGs written (what `make
  data/labels/color` does), and the same in one process without writing (render only);
- reference: a straightforward rasteriser (cv2.fillPoly / polylines, as robosat draws masks)
  over the same decoded features, in one process, with the classes' filters written out in
  Python (valid for classes/mine.json only);
- skynet-data: mapnik's `tiles` input plugin reading the MBTiles for every tile, one layer
  per class (skynet-data's way), in one process.

Each measurement runs in a fresh process so that its peak memory (ru_maxrss of the process
and its workers) is its own; the pipeline runs at two tile counts to show that memory does not
grow with the number of tiles. Writes bench/results/labels.json.

Usage: .venv/bin/python bench/bench_labels.py [--quick]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import mercantile
import numpy as np

MONACO = ROOT.parent / "shared" / "fixtures" / "osm-qa-monaco" / "monaco.mbtiles"
CLASSES = ROOT / "classes" / "mine.json"
ZOOM = 17
SIZE = 256


# --- The tiles to label ---------------------------------------------------------------------


def sample_tiles(mbtiles: Path, count: int, seed: int, bbox=None) -> list[mercantile.Tile]:
    """`count` distinct z17 tiles at random inside the source's z12 tiles (and bbox, if given)."""
    from osmseg import osm

    source = osm.open_source("qa-tiles", mbtiles)
    if bbox is None:
        # Where there is data: the z17 tiles that some feature of the file touches.
        import shapely

        geometries = [f.geometry for s in source.all_tiles() for f in source.features(mercantile.xy_bounds(s))]
        tree = shapely.STRtree(geometries)
        candidates = [
            t
            for s in source.all_tiles()
            for t in mercantile.children(s, zoom=ZOOM)
            if len(tree.query(shapely.box(*mercantile.xy_bounds(t))))
        ]
    else:
        candidates = list(mercantile.tiles(*bbox, zooms=[ZOOM]))
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
    return [candidates[i] for i in sorted(picked)]


# --- The three ways ---------------------------------------------------------------------------


def pipeline_way(mbtiles: Path, workers: int):
    """What `make data/labels/color` does: all cores, PNGs written (pool start-up included)."""
    from osmseg import labels, osm
    from osmseg.classes import load_classes

    classes = load_classes(CLASSES)
    source = osm.open_source("qa-tiles", mbtiles)
    # Removed when the process ends, after the timing: deleting files is not labelling.
    out = tempfile.mkdtemp(prefix="bench-labels-")
    atexit.register(shutil.rmtree, out, True)

    def draw(tiles):
        summary = labels.render_labels(tiles, source, classes, out, SIZE, workers, progress=False)
        assert summary["rendered"] == len(tiles), summary

    return draw


def ours_way(mbtiles: Path):
    """osmseg.labels in one process, render only (no PNGs)."""
    from osmseg import labels, osm
    from osmseg.classes import load_classes

    source = osm.open_source("qa-tiles", mbtiles)
    renderer = labels.LabelRenderer(load_classes(CLASSES), SIZE)
    return lambda tiles: dict(labels.render_tiles(source, renderer, tiles))


# classes/mine.json's filters written out in Python, for the reference rasteriser only.
_VEGETATION_NATURAL = {"wood", "tree_row", "tree", "scrub", "heath", "grassland"}
_VEGETATION_LANDUSE = {"forest", "orchard", "farmland", "allotments", "meadow", "vineyard"}
PREDICATES = {
    "residential": lambda t: t.get("landuse") == "residential",
    "commercial": lambda t: t.get("landuse") == "commercial",
    "industrial": lambda t: t.get("landuse") == "industrial",
    "vegetation": lambda t: (
        t.get("natural") in _VEGETATION_NATURAL
        or t.get("landuse") in _VEGETATION_LANDUSE
        or t.get("surface") == "grass"
    ),
    "building": lambda t: bool(t.get("building")),
    "brownfield": lambda t: t.get("landuse") == "brownfield",
}


def reference_way(mbtiles: Path):
    """cv2 rasterisation of the same features (sub-pixel vertices, no antialiasing)."""
    from osmseg import osm
    from osmseg.classes import load_classes

    classes = load_classes(CLASSES)
    assert [c.name for c in classes.classes] == list(PREDICATES), "the reference knows classes/mine.json only"
    source = osm.open_source("qa-tiles", mbtiles)
    return lambda tiles: _reference(source, classes, tiles)


def _reference(source, classes, tiles):
    import cv2
    import shapely

    from osmseg import labels
    from osmseg.tiles import metres_per_pixel, tiles_bounds

    predicates = list(PREDICATES.values())
    shift = 4  # cv2 takes fixed-point vertices: 4 fractional bits
    out = {}
    for group in labels.group_tiles(tiles, source.zoom).values():
        features = source.features(tiles_bounds(group, 5 * metres_per_pixel(ZOOM, SIZE)))
        drawn = []  # (class index, geometry) in class order
        for index, (class_, predicate) in enumerate(zip(classes.classes, predicates)):
            drawn.extend((index, class_, f.geometry) for f in features if predicate(f.tags))
        tree = shapely.STRtree([g for _, _, g in drawn]) if drawn else None
        for tile in group:
            left, bottom, right, top = mercantile.xy_bounds(tile)
            origin = np.array([left, top])
            scale = np.array([SIZE / (right - left), -SIZE / (top - bottom)])
            image = np.zeros((SIZE, SIZE, 3), np.uint8)
            hits = sorted(tree.query(shapely.box(left, bottom, right, top))) if tree is not None else []
            for hit in hits:
                _, class_, geometry = drawn[hit]
                color = tuple(int(c) for c in class_.color)
                for part in getattr(geometry, "geoms", [geometry]):
                    if part.geom_type == "Polygon":
                        rings = [part.exterior.coords, *(r.coords for r in part.interiors)]
                        rings = [_fixed_point(r, origin, scale, shift) for r in rings]
                        cv2.fillPoly(image, rings, color, lineType=cv2.LINE_8, shift=shift)
                    elif part.geom_type == "LineString":
                        width = max(round(class_.stroke_width), 1)
                        line = _fixed_point(part.coords, origin, scale, shift)
                        cv2.polylines(image, [line], False, color, width, cv2.LINE_8, shift)
                    elif part.geom_type == "Point":
                        ((x, y),) = (np.asarray(part.coords) - origin) * scale
                        half = class_.stroke_width / 2
                        x0, y0 = round(x - half), round(y - half)
                        size = round(class_.stroke_width)
                        image[max(y0, 0) : max(y0 + size, 0), max(x0, 0) : max(x0 + size, 0)] = color
            out[tile] = image
    return out


def _fixed_point(coords, origin, scale, shift: int) -> np.ndarray:
    """EPSG:3857 coordinates as cv2's fixed-point pixel vertices (pixel centres at .5)."""
    xy = (np.asarray(coords)[:, :2] - origin) * scale - 0.5
    return np.round(xy * (1 << shift)).astype(np.int32)


def skynet_way(mbtiles: Path):
    """skynet-data's way: mapnik's `tiles` plugin reads the MBTiles for every tile, a layer per class."""
    from osmseg.labels import import_mapnik

    mapnik = import_mapnik()

    from osmseg import labels
    from osmseg.classes import load_classes

    classes = load_classes(CLASSES)
    xml = labels.style_xml(classes, SIZE)
    # One layer per class, each with its own datasource and style, as skynet-data's style does.
    head, _, _ = xml.partition("<Layer ")
    layers = "".join(
        f'<Layer name="class{n}" srs="epsg:3857"><StyleName>class{n}</StyleName></Layer>'
        for n in range(1, classes.num_classes)
    )
    map_ = mapnik.Map(SIZE, SIZE)
    mapnik.load_map_from_string(map_, head + layers + "</Map>")
    for layer in map_.layers:
        layer.datasource = mapnik.Datasource(type="tiles", file=str(mbtiles), layer="osm")

    def draw(tiles):
        out = {}
        for tile in tiles:
            map_.zoom_to_box(mapnik.Box2d(*mercantile.xy_bounds(tile)))
            image = mapnik.Image(SIZE, SIZE)
            mapnik.render(map_, image)
            out[tile] = np.frombuffer(image.to_string(), np.uint8).reshape(SIZE, SIZE, 4)[..., :3].copy()
        return out

    return draw


# --- One measurement per process ----------------------------------------------------------------


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(way: str, mbtiles: Path, tiles, workers: int) -> dict:
    """Set a way up (imports, opening files: once per run, not timed), then time it on `tiles`."""
    if way == "pipeline":
        draw = pipeline_way(mbtiles, workers)
    else:
        draw = {"ours": ours_way, "reference": reference_way, "skynet": skynet_way}[way](mbtiles)
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    draw(tiles)
    seconds = time.perf_counter() - started
    # CPU time of this process and its workers: steadier than wall time on a shared machine.
    cpu = _cpu_seconds() - cpu_before
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "tiles": len(tiles),
        "seconds": seconds,
        "tiles_per_s": len(tiles) / seconds,
        "cpu_ms_per_tile": 1000 * cpu / len(tiles),
        "peak_rss_mb": max(own_peak_rss_mb(), children.ru_maxrss / 1024),
    }


def own_peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child started from a big
    parent would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    tiles = [mercantile.Tile(*t) for t in json.loads(Path(args.tiles).read_text())]
    print(json.dumps(measure(args.child, Path(args.mbtiles), tiles, args.workers)))


def in_process(way: str, mbtiles: Path, tiles, workers: int = 1) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump([list(t) for t in tiles], handle)
    try:
        command = [
            sys.executable,
            __file__,
            "--child",
            way,
            "--mbtiles",
            str(mbtiles),
            "--tiles",
            handle.name,
            "--workers",
            str(workers),
        ]
        run = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT)
        if run.returncode:
            raise SystemExit(f"{way} failed:\n{run.stderr}")
        output = run.stdout
    finally:
        os.unlink(handle.name)
    result = json.loads(output.strip().splitlines()[-1])
    print(
        f"  {way:<9} workers={workers} {result['tiles']:>5} tiles: {result['tiles_per_s']:7.1f} tiles/s, "
        f"{result['cpu_ms_per_tile']:6.2f} CPU ms/tile, peak {result['peak_rss_mb']:.0f} MiB",
        flush=True,
    )
    return result


def agreement(mbtiles: Path, tiles) -> float:
    """Share of pixels on which ours and the reference give the same colour."""
    ours, reference = ours_way(mbtiles)(tiles), reference_way(mbtiles)(tiles)
    same = sum(int((ours[t] == reference[t]).all(axis=2).sum()) for t in tiles)
    return same / (len(tiles) * SIZE * SIZE)


def world(name: str, mbtiles: Path, bbox, counts: tuple[int, int], compare: int) -> dict:
    print(f"{name}: {mbtiles}", flush=True)
    big = sample_tiles(mbtiles, counts[1], seed=0, bbox=bbox)
    small, compared = big[: counts[0]], big[:compare]
    cores = os.cpu_count() or 1
    pipeline_small = in_process("pipeline", mbtiles, small, cores)
    pipeline_big = in_process("pipeline", mbtiles, big, cores)
    ours = in_process("ours", mbtiles, compared)
    reference = in_process("reference", mbtiles, compared)
    skynet = in_process("skynet", mbtiles, compared)
    figures = {
        "pipeline_tiles_per_s": {
            "value": pipeline_big["tiles_per_s"],
            "unit": f"tiles/s ({cores} processes, PNGs written, {len(big)} tiles)",
        },
        "pipeline_peak_rss_small": {"value": pipeline_small["peak_rss_mb"], "unit": f"MiB ({len(small)} tiles)"},
        "pipeline_peak_rss_big": {"value": pipeline_big["peak_rss_mb"], "unit": f"MiB ({len(big)} tiles)"},
        "pipeline_cpu_ms_per_tile": {"value": pipeline_big["cpu_ms_per_tile"], "unit": "CPU ms/tile (all processes)"},
        # On a shared machine the wall clock measures the neighbours too; CPU time does not.
        "pipeline_tiles_per_s_idle_estimate": {
            "value": cores * 1000 / pipeline_big["cpu_ms_per_tile"],
            "unit": f"tiles/s (estimate: {cores} cores / CPU time per tile)",
        },
        "one_process_tiles_per_s": {
            "value": ours["tiles_per_s"],
            "unit": f"tiles/s (render only, {len(compared)} tiles)",
        },
        "one_process_cpu_ms_per_tile": {"value": ours["cpu_ms_per_tile"], "unit": "CPU ms/tile"},
        "reference_cpu_ms_per_tile": {"value": reference["cpu_ms_per_tile"], "unit": "CPU ms/tile"},
        "skynet_cpu_ms_per_tile": {"value": skynet["cpu_ms_per_tile"], "unit": "CPU ms/tile"},
        "reference_tiles_per_s": {"value": reference["tiles_per_s"], "unit": "tiles/s (cv2, one process, same tiles)"},
        "skynet_tiles_per_s": {
            "value": skynet["tiles_per_s"],
            "unit": "tiles/s (mapnik tiles plugin, one process, same tiles)",
        },
        # Ratios of CPU time per tile, one process each: robust to a busy machine.
        "speedup_vs_skynet": {
            "value": skynet["cpu_ms_per_tile"] / ours["cpu_ms_per_tile"],
            "unit": "x (skynet CPU time / ours, per tile)",
        },
        "speedup_vs_reference": {
            "value": reference["cpu_ms_per_tile"] / ours["cpu_ms_per_tile"],
            "unit": "x (reference CPU time / ours, per tile)",
        },
        "reference_peak_rss": {"value": reference["peak_rss_mb"], "unit": "MiB"},
        "skynet_peak_rss": {"value": skynet["peak_rss_mb"], "unit": "MiB"},
        "pixel_agreement_with_reference": {"value": agreement(mbtiles, compared), "unit": "share of pixels"},
    }
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tiles (a smoke run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mbtiles", help=argparse.SUPPRESS)
    parser.add_argument("--tiles", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    from common import write_result

    scale = 4 if args.quick else 1
    # The machine may be shared: say how busy it was, since wall-clock figures depend on it.
    load = os.getloadavg()[0]
    figures, notes = {}, [f"1-minute load average at the start: {load:.1f} on {os.cpu_count()} cores"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            from osmseg import demo
        except ImportError:
            demo = None
            notes.append("demo world skipped: osmseg.demo is not there yet")
        if demo is not None:
            path = Path(tmp) / "demo.mbtiles"
            demo.write_qa_tiles(demo.build_world(seed=0), path)
            bbox = demo.DEMO_BBOX
            figures["demo"] = world("demo", path, bbox, (100 // scale, 400 // scale), 400 // scale)
    if MONACO.exists():
        figures["monaco"] = world("monaco", MONACO, None, (300 // scale, 1200 // scale), 384 // scale)
    else:
        notes.append(f"Monaco skipped: {MONACO} is absent")
    path = write_result(
        "labels",
        figures,
        packages=("mapnik", "numpy", "opencv-python-headless", "shapely", "mapbox-vector-tile"),
        notes="; ".join(["z17 labels, 256 px, classes/mine.json", *notes]),
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
