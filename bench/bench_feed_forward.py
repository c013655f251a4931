#!/usr/bin/env python3
"""Benchmark: feed_forward's cost over the model, its memory on a huge scene, and its seams.

1. Overhead: a 4096 × 4096 scene (and a 2048 × 2048 one with the demo's model size) segmented with write_scene (windows, blending, mask.png,
   segments.png, heatmaps, counts) against the model alone run on the same number of
   windows in the same batches. Goal: total <= 1.2 × model alone.
2. Peak memory: feed_forward.py's main on a 20,000 × 20,000 GeoTIFF (tiled, deflate; read in
   windows) with --window 512 in a child process, which reports its own peak resident memory
   (VmHWM: Linux carries ru_maxrss over from the parent process) beside the same after the
   imports and the model load. Goal: < 2 GB.
3. Seams, on a 1024 × 1024 scene, for plain tiling (overlap 0, the seed's way) and for the
   blended overlaps, with the time each costs:
   - seam_ratio: the mean absolute difference of the probabilities between neighbouring
     pixels across window borders over the same between neighbours inside windows (1: no
     seam);
   - border_error_ratio: the mean absolute difference from a reference segmentation (overlap
     0.75: every pixel seen near a window's centre) within 8 pixels of window borders over
     the same farther than 32 pixels from them (1: borders are as good as the rest). An
     untrained model tends to output flatter probabilities near zero-padded edges rather than
     jumps, which the first figure misses and the second catches.

The model is a tiny SegNet-Basic (width 1/16, random weights, which still show the border
effects of zero padding) so that the whole run takes a few minutes on two busy cores; pass
--weights to measure a trained model instead. Scenes are synthetic: smooth random colour
fields with fine texture, made by code.

Usage: .venv/bin/python bench/bench_feed_forward.py [--weights W] [--memory-size 20000] [--only PART]
Writes bench/results/feed_forward.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np
from common import RESULTS, write_result

WINDOW = 256
BATCH_SIZE = 8
ROUNDS = 3  # alternating rounds of the model alone and the whole scene (overhead)
OVERLAPS = (0.0, 0.25, 0.5)
# The huge scene runs in windows of 512: a quarter as many model calls as at 256 for the same
# pixels, and twice the accumulator (512 rows × scene width × classes), the harder case.
MEMORY_WINDOW = 512


def tiny_weights(directory: Path, width: float = 0.0625) -> Path:
    """A randomly initialised SegNet-Basic of this width saved as our weights file, for
    classes/mine.json."""
    import model
    from osmseg.classes import load_classes

    classes = load_classes(ROOT / "classes" / "mine.json")
    network = model.build("segnet-basic", classes.num_classes, input_size=WINDOW, width=width, seed=0)
    path = directory / f"segnet-basic-{width}.hdf5"
    config = {
        "name": "segnet-basic", "width": width, "input_size": WINDOW,
        "num_classes": classes.num_classes, "classes": classes.to_json(), "mixed_precision": False,
    }  # fmt: skip
    model.save(network, path, config)
    return path


def smooth_scene(height: int, width: int, seed: int = 0, top: int = 0) -> np.ndarray:
    """RGB uint8 rows [top, top + height) of a smooth random colour field with fine texture.

    The field is a fixed function of (row, column) so that strips of one scene can be made
    separately (the 20,000² scene is written strip by strip).
    """
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8).astype(np.float32)
    rows = (top + np.arange(height, dtype=np.float32)) * (63 / 20000 * 7)
    cols = np.arange(width, dtype=np.float32) * (63 / 20000 * 7)
    map_x = np.ascontiguousarray(np.broadcast_to(cols[None, :], (height, width)))
    map_y = np.ascontiguousarray(np.broadcast_to(rows[:, None], (height, width)))
    field = cv2.remap(coarse, map_x, map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_WRAP)
    texture = ((np.arange(width)[None, :] * 7 + (top + np.arange(height))[:, None] * 13) % 23 - 11).astype(np.float32)
    return np.clip(field + texture[:, :, None], 0, 255).astype(np.uint8)


def load_predict(weights: Path):
    import model
    from osmseg import segment
    from osmseg.classes import parse_classes

    network, config = model.load(weights)
    classes = parse_classes(config["classes"], require_filters=False)
    return network, segment.model_predict(model.inference(network), BATCH_SIZE), classes, config


def model_alone(predict, windows: int, window: int) -> tuple[float, float]:
    """(wall, CPU) seconds the model takes on `windows` windows in batches of BATCH_SIZE
    (the same batches segment_strips makes: full ones, then one short one)."""
    rng = np.random.default_rng(1)
    batch = rng.uniform(0, 255, size=(BATCH_SIZE, window, window, 3)).astype(np.float32)
    predict(batch)
    predict(batch[: windows % BATCH_SIZE or BATCH_SIZE])  # warm up both shapes
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(windows // BATCH_SIZE):
        predict(batch)
    if windows % BATCH_SIZE:
        predict(batch[: windows % BATCH_SIZE])
    return time.perf_counter() - started, time.process_time() - cpu


def full_segnet_ms_per_window() -> float:
    """Milliseconds per 256 × 256 window of segnet at width 1 (random weights), batch 8."""
    import model

    network = model.build("segnet", 7, input_size=WINDOW, width=1.0, seed=0)
    batch = np.random.default_rng(2).uniform(0, 255, size=(BATCH_SIZE, WINDOW, WINDOW, 3)).astype(np.float32)
    network.predict_on_batch(batch)
    started = time.perf_counter()
    for _ in range(2):
        network.predict_on_batch(batch)
    return 1000 * (time.perf_counter() - started) / (2 * BATCH_SIZE)


def bench_overhead(weights: Path, workdir: Path, size: int = 4096, note: str = "goal <= 1.2") -> dict:
    from osmseg import rasters, scene, segment

    _, predict, classes, config = load_predict(weights)
    window = int(config["input_size"])
    image = smooth_scene(size, size)
    overlap = 0.25
    windows = segment.Windows(window, overlap, BATCH_SIZE)
    count = windows.count(size, size)
    figures = {}
    # The machine is shared and its speed drifts by 10-20% between runs of a few seconds:
    # the model alone and the whole scene alternate, and each keeps its fastest round.
    alones, totals = [], []
    for _ in range(ROUNDS):
        alones.append(model_alone(predict, count, window))
        started, cpu = time.perf_counter(), time.process_time()
        scene.write_scene(
            rasters.ArrayReader(image, "scene.png"), predict, classes, workdir / f"overhead-{size}", windows
        )
        totals.append((time.perf_counter() - started, time.process_time() - cpu))
    alone, alone_cpu = min(alones)
    total, total_cpu = min(totals)
    figures["scene"] = {"value": f"{size}x{size}", "unit": "pixels"}
    figures["windows"] = {"value": count, "unit": f"windows of {window}, overlap {overlap}"}
    figures["model_alone_s"] = {"value": round(alone, 2), "unit": "s"}
    figures["total_s"] = {"value": round(total, 2), "unit": "s"}
    figures["overhead_ratio"] = {"value": round(total / alone, 3), "unit": f"total / model alone, wall, fastest of {ROUNDS} ({note})"}
    figures["overhead_ratio_rounds"] = {"value": ", ".join(f"{t / a:.3f}" for (t, _), (a, _) in zip(totals, alones)),
                                        "unit": "total / model alone in each round"}
    figures["overhead_ratio_cpu"] = {"value": round(total_cpu / alone_cpu, 3), "unit": "total / model alone, CPU time"}
    figures["overhead_per_window_ms"] = {"value": round(1000 * (total - alone) / count, 1), "unit": "ms wall"}
    figures["model_per_window_ms"] = {"value": round(1000 * alone / count, 1), "unit": "ms wall"}
    return figures


_MEMORY_CHILD = """
import json, os, sys, time
sys.path.insert(0, {root!r})
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

def high_water_mb():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and
    # exec, so a child of a big bench process would report the parent's peak.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

import feed_forward, model
from osmseg import cli
model.load({weights!r})  # what the imports and one model cost, before any scene
baseline = high_water_mb()
started = time.perf_counter()
status = cli.run(feed_forward.main, [{weights!r}, {scene!r}, {out!r}, "--batch-size", "4", "--window", {window!r}])
print(json.dumps({{"status": status, "seconds": time.perf_counter() - started, "baseline_mb": baseline,
                   "peak_mb": high_water_mb()}}))
"""


def write_geotiff_scene(path: Path, size: int) -> None:
    """A size × size RGB GeoTIFF (EPSG:3857, 0.5 m pixels), tiled and compressed, written in strips."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = {
        "driver": "GTiff", "height": size, "width": size, "count": 3, "dtype": "uint8",
        "crs": "EPSG:3857", "transform": from_origin(-5000.0, 5000.0, 0.5, 0.5),
        "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate", "zlevel": 1,
    }  # fmt: skip
    with rasterio.Env(GDAL_CACHEMAX=256), rasterio.open(path, "w", **profile) as dst:
        for top in range(0, size, 1024):
            rows = min(1024, size - top)
            dst.write(np.moveaxis(smooth_scene(rows, size, top=top), -1, 0), window=Window(0, top, size, rows))


def write_png_scene(path: Path, size: int) -> None:
    """The same scene as a plain RGB PNG, written in strips by our own writer."""
    from osmseg import visualise

    with visualise.PngWriter(path, size, size) as writer:
        for top in range(0, size, 1024):
            writer.write(smooth_scene(min(1024, size - top), size, top=top))


def bench_memory(weights: Path, workdir: Path, size: int, kind: str = "tif") -> dict:
    from osmseg import segment

    scene = workdir / f"huge.{kind}"
    started = time.perf_counter()
    (write_geotiff_scene if kind == "tif" else write_png_scene)(scene, size)
    made = time.perf_counter() - started
    code = _MEMORY_CHILD.format(
        root=str(ROOT), weights=str(weights), scene=str(scene), out=str(workdir / "huge"), window=str(MEMORY_WINDOW)
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["status"] != 0:
        raise RuntimeError(f"feed_forward failed on the huge scene:\n{done.stderr[-3000:]}")
    outputs = {p.name: p.stat().st_size for p in (workdir / "huge").iterdir()}
    scene.unlink()
    shutil.rmtree(workdir / "huge")
    what = "GeoTIFF, read in windows" if kind == "tif" else "PNG, streamed in rows"
    return {
        "scene": {"value": f"{size}x{size}", "unit": f"pixels ({what})"},
        "windows": {"value": segment.Windows(MEMORY_WINDOW, 0.25).count(size, size),
                    "unit": f"windows of {MEMORY_WINDOW}, overlap 0.25"},
        "peak_rss_mb": {"value": round(report["peak_mb"]), "unit": "MiB (goal < 2048)"},
        "baseline_rss_mb": {"value": round(report["baseline_mb"]), "unit": "MiB after imports and model load"},
        "seconds": {"value": round(report["seconds"], 1), "unit": "s (feed_forward main)"},
        "scene_written_s": {"value": round(made, 1), "unit": "s (making the test scene)"},
        "output_mb": {"value": round(sum(outputs.values()) / 2**20), "unit": "MiB (all outputs)"},
    }


GRID = 32  # SegNet pools 4 or 5 times: its outputs have a 16- or 32-pixel structure


def seam_ratio(probabilities: np.ndarray, positions: np.ndarray, window: int) -> float:
    """Mean |p(x) - p(x - 1)| across window borders over the same inside windows, both axes.

    Borders are the first columns (rows) of windows and the columns (rows) just after their
    ends, the image's own edges left out. Pooling and unpooling make SegNet's outputs vary
    more within its pooling cells than between them, so borders (which lie on the 32-pixel
    grid) are compared with the other pairs on that grid, not with every pair.
    """
    length = probabilities.shape[1]
    if np.any(positions % GRID):
        raise ValueError(f"window positions {positions} are not on the {GRID}-pixel grid; pick another size")
    borders = np.zeros(length, dtype=bool)
    for start in positions:
        for edge in (start, start + window):
            if 0 < edge < length:
                borders[edge] = True
    on_grid = np.arange(length) % GRID == 0
    on_grid[0] = False
    across, inside = [], []
    for field in (probabilities, probabilities.transpose(1, 0, 2)):
        steps = np.abs(np.diff(field, axis=1)).mean(axis=(0, 2))  # steps[x - 1] = |p(x) - p(x - 1)|
        across.append(steps[borders[1:]])
        inside.append(steps[(on_grid & ~borders)[1:]])
    return float(np.concatenate(across).mean() / np.concatenate(inside).mean())


def border_distance(positions: np.ndarray, length: int, window: int) -> np.ndarray:
    """int (length,): each column's distance in pixels to the nearest window border
    (a pair of columns either side of it), the image's own edges not counting."""
    distance = np.full(length, length)
    columns = np.arange(length)
    for start in positions:
        for edge in (start, start + window):
            if 0 < edge < length:
                distance = np.minimum(distance, np.minimum(np.abs(columns - edge), np.abs(columns - edge + 1)))
    return distance


def bench_seams(weights: Path, size: int = 1024) -> dict:
    """Two seam figures per overlap (see the module docstring and below)."""
    from osmseg import segment

    _, predict, classes, config = load_predict(weights)
    window = int(config["input_size"])
    image = smooth_scene(size, size, seed=3)
    # The reference: windows every quarter window, so every pixel is seen near some
    # window's centre. Seams show as errors against it concentrated at window borders.
    reference = segment.segment_array(image, predict, classes.num_classes, segment.Windows(window, 0.75, BATCH_SIZE))
    figures = {}
    for overlap in OVERLAPS:
        started = time.perf_counter()
        probabilities = segment.segment_array(image, predict, classes.num_classes, segment.Windows(window, overlap, BATCH_SIZE))
        seconds = time.perf_counter() - started
        positions = segment.window_positions(size, window, segment.window_stride(window, overlap))
        distance = border_distance(positions, size, window)
        distance = np.minimum.outer(distance, distance)
        error = np.abs(probabilities - reference).mean(axis=2)
        figures[f"overlap_{overlap}"] = {
            "seam_ratio": {"value": round(seam_ratio(probabilities, positions, window), 3),
                           "unit": "neighbour difference across borders / inside (1 = no seam)"},
            "border_error_ratio": {"value": round(float(error[distance < 8].mean() / error[distance >= 32].mean()), 2),
                                   "unit": "error vs reference within 8 px of borders / beyond 32 px (1 = even)"},
            "mean_error": {"value": float(f"{error.mean():.3g}"), "unit": "mean |p - reference|"},
            "windows": {"value": len(positions) ** 2, "unit": "windows"},
            "seconds": {"value": round(seconds, 2), "unit": "s"},
        }  # fmt: skip
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="a trained weights file (default: a tiny random one)")
    parser.add_argument("--memory-size", type=int, default=20000, help="side of the huge scene")
    parser.add_argument("--only", choices=("seams", "overhead", "memory"), action="append",
                        help="run only these parts, keeping the other figures of the last results file")  # fmt: skip
    args = parser.parse_args()
    parts = set(args.only or ("seams", "overhead", "memory"))
    figures = {}
    previous = RESULTS / "feed_forward.json"
    if args.only and previous.exists():
        figures = json.loads(previous.read_text()).get("figures", {})
    with tempfile.TemporaryDirectory(prefix="bench-ff-") as tmp:
        workdir = Path(tmp)
        weights = args.weights or tiny_weights(workdir)
        figures.pop("model", None)  # once one figure for all parts; now each part's own
        model_name = "segnet-basic width 0.0625, random"
        if args.weights:
            import model

            config = model.read_config(args.weights)
            model_name = f"{config['name']} width {config['width']}, trained ({args.weights.name})"
        if "seams" in parts:
            print("seams...", flush=True)
            figures["seams_1024"] = bench_seams(weights)
            figures["seams_1024"]["model"] = {"value": model_name, "unit": ""}
            print(json.dumps(figures["seams_1024"]), flush=True)
        if "overhead" in parts:
            print("overhead...", flush=True)
            # A trained model's figures go beside the tiny random model's, not over them.
            name = "overhead_4096_trained" if args.weights else "overhead_4096"
            # The goal is for a real model; random tiny ones are stress cases, whose windows
            # cost the model a fraction of a trained demo model's (model_per_window_ms).
            note = "goal <= 1.2" if args.weights else "stress case: a random model 1/16 wide"
            figures[name] = bench_overhead(weights, workdir, note=note)
            figures[name]["model"] = {"value": model_name, "unit": ""}
            print(json.dumps(figures[name]), flush=True)
            if args.weights is None:
                # The demo's model (make demo trains segnet-basic at width 0.25): 16× the tiny
                # one's multiply-adds, on a smaller scene to keep the run short.
                print("overhead with the demo's model size...", flush=True)
                figures["overhead_2048_width_0.25"] = bench_overhead(
                    tiny_weights(workdir, 0.25), workdir, 2048, note="a quarter of the goal's scene, so fixed costs weigh 4x"
                )
                print(json.dumps(figures["overhead_2048_width_0.25"]), flush=True)
                # The full SegNet is too slow on this machine for a whole scene; its time per
                # window, with the overhead per window measured above, gives the ratio.
                model_ms = full_segnet_ms_per_window()
                overhead_ms = figures["overhead_4096"]["overhead_per_window_ms"]["value"]
                figures["segnet_width_1"] = {
                    "model_per_window_ms": {"value": round(model_ms, 1), "unit": "ms wall (2 batches of 8)"},
                    "projected_overhead_ratio": {"value": round((model_ms + overhead_ms) / model_ms, 3),
                                                 "unit": "(model + measured overhead per window) / model"},
                }  # fmt: skip
                print(json.dumps(figures["segnet_width_1"]), flush=True)
        if "memory" in parts:
            for kind, suffix in (("tif", ""), ("png", "_png")):
                print(f"memory on a {args.memory_size}² {kind}...", flush=True)
                name = f"memory_{args.memory_size}{suffix}"
                figures[name] = bench_memory(weights, workdir, args.memory_size, kind)
                figures[name]["model"] = {"value": model_name, "unit": ""}
                print(json.dumps(figures[name]), flush=True)
    path = write_result("feed_forward", figures, packages=("numpy", "keras", "tensorflow", "rasterio", "opencv-python-headless"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
