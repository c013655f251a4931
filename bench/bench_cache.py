#!/usr/bin/env python3
"""Benchmark of the HDF5 cache: build time and peak memory, bytes per tile, read throughput.

What is measured, and how:
- build: `osmseg.build.build_cache` over 1,000 and 10,000 synthetic 256-pixel tiles, from
  files on disk as the pipeline has them (JPEG imagery, colour PNG labels). Generating 10,000
  distinct JPEGs would take longer than the build, so 500 distinct tiles are generated and
  hard-linked under 10,000 tile names: every tile is still read, decoded, converted and
  compressed, but file reads come from the page cache (as they do right after
  `prepare.py images`). The imagery is blurred random colour blocks plus noise, JPEG q85:
  random, compressible about as much as decoded satellite imagery (compared in the results with
  the 8 real satellite tiles of the fixtures, when present).
- time: wall clock and CPU time (all threads of the process). The development machine is
  shared, so wall-clock rates vary with its load; rates per CPU-second do much less.
- memory: each measurement runs in a child process and reports its own peak resident set
  (ru_maxrss), which includes Python, numpy, h5py and OpenCV (about 100 MB before any work).
- read: augmented, shuffled batches of 16 from BatchReader (what make_batches wraps) by
  1 and 2 threads (tiles/s); train: a segnet-basic train step at the demo's settings (width 0.25,
  batch 8, 256 px, CPU), tiles/s, if model.py is importable. Their ratio is the headroom.

Usage: .venv/bin/python bench/bench_cache.py [--sizes 1000 10000]
Writes bench/results/cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

TILE_SIZE = 256
DISTINCT = 500
ZOOM = 18


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synthetic_image(rng, size: int = TILE_SIZE):
    """Blurred random 16x16 colour blocks plus noise: after JPEG q85 and decoding, gzip 1
    shrinks it about as much as real satellite tiles (about 0.8 against 0.84 of raw)."""
    import cv2
    import numpy as np

    coarse = rng.integers(40, 200, (16, 16, 3), dtype=np.uint8)
    blocks = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_NEAREST)
    smooth = cv2.GaussianBlur(blocks, (5, 5), 0).astype(np.int16)
    noisy = smooth + rng.normal(0, 3, smooth.shape).astype(np.int16)
    return noisy.clip(0, 255).astype(np.uint8)


def _synthetic_label(rng, classes, size: int = TILE_SIZE):
    import cv2
    import numpy as np

    labels = np.zeros((size, size), np.uint8)
    for _ in range(8):
        points = rng.integers(-size // 4, size + size // 4, (5, 2)).astype(np.int32)
        cv2.fillPoly(labels, [points], int(rng.integers(1, classes.num_classes)))
    return classes.labels_to_colors(labels)


def make_world(folder: Path, count: int, classes) -> list:
    """Write `count` tiles' images and labels under folder (DISTINCT real files, the rest links)."""
    import cv2
    import mercantile
    import numpy as np

    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    side = int(np.ceil(np.sqrt(count)))
    for i in range(count):
        tile = mercantile.Tile(100_000 + i % side, 100_000 + i // side, ZOOM)
        stem = f"{tile.z}-{tile.x}-{tile.y}"
        image_path, label_path = images / f"{stem}.jpg", labels / f"{stem}.png"
        if not image_path.exists():
            if i < DISTINCT:
                image = _synthetic_image(rng)
                cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
                cv2.imwrite(str(label_path), cv2.cvtColor(_synthetic_label(rng, classes), cv2.COLOR_RGB2BGR))
            else:
                first = entries[i % DISTINCT][1]
                first_stem = f"{first.z}-{first.x}-{first.y}"
                os.link(images / f"{first_stem}.jpg", image_path)
                os.link(labels / f"{first_stem}.png", label_path)
        entries.append(("bench", tile))
    return entries


# --- Child processes: one measurement each, so that ru_maxrss is that measurement's ---------


def child_build(folder: str, count: int, out: str) -> dict:
    from osmseg.cache import build
    from osmseg.classes import load_classes

    classes = load_classes(ROOT / "classes" / "mine.json")
    entries = make_world(Path(folder), count, classes)
    baseline = _peak_mb()
    started, cpu = time.perf_counter(), time.process_time()
    summary = build.build_cache(entries, Path(folder) / "images", Path(folder) / "labels", classes, out, TILE_SIZE,
                                log=lambda _: None)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert summary.written == count, summary.skipped
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": _peak_mb(), "baseline_rss_mb": baseline,
            "bytes_per_tile": os.path.getsize(out) / count}


def child_read(out: str, seconds: float, threads: int) -> dict:
    """Augmented batches of 16 from BatchReader (make_batches' logic without Keras, whose
    import alone costs about 550 MiB), read by `threads` threads as fit's workers would."""
    from concurrent.futures import ThreadPoolExecutor

    from osmseg import cache

    reader = cache.BatchReader(out, None, 16, shuffle=True, augment=True, seed=0)
    tiles, started, cpu, batch = 0, time.perf_counter(), time.process_time(), 0
    with ThreadPoolExecutor(threads) as pool:
        while time.perf_counter() - started < seconds:
            batches = [(batch + i) % len(reader) for i in range(4 * threads)]
            for images, labels, weights in pool.map(reader.__getitem__, batches):
                tiles += len(images)
            batch += len(batches)
    return {"tiles_per_s": tiles / (time.perf_counter() - started),
            "tiles_per_cpu_s": tiles / (time.process_time() - cpu), "peak_rss_mb": _peak_mb()}


def child_train(steps: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    import model

    net = model.build("segnet-basic", 7, input_size=TILE_SIZE, width=0.25)
    net.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, TILE_SIZE, TILE_SIZE, 3)).astype("float32")
    labels = rng.integers(0, 7, (8, TILE_SIZE, TILE_SIZE)).astype("int32")
    net.train_on_batch(images, labels)  # compile and warm up
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        net.train_on_batch(images, labels)
    return {"tiles_per_s": steps * 8 / (time.perf_counter() - started),
            "tiles_per_cpu_s": steps * 8 / (time.process_time() - cpu), "peak_rss_mb": _peak_mb()}


def real_imagery_bytes_per_tile() -> float | None:
    """gzip-1 bytes of the fixtures' real satellite tiles, decoded, per 256-pixel tile image."""
    import h5py

    from osmseg.cache.schema import COMPRESSION, COMPRESSION_LEVEL
    from osmseg.rasters import read_rgb

    folder = ROOT.parent / "shared" / "fixtures" / "portugal-z17" / "tiles"
    paths = sorted(folder.glob("*.jpg"))
    if not paths:
        return None
    with tempfile.TemporaryDirectory() as tmp, h5py.File(Path(tmp) / "real.hdf5", "w") as file:
        dataset = file.create_dataset("images", (len(paths), TILE_SIZE, TILE_SIZE, 3), "uint8",
                                      chunks=(1, TILE_SIZE, TILE_SIZE, 3), compression=COMPRESSION,
                                      compression_opts=COMPRESSION_LEVEL)
        for i, path in enumerate(paths):
            dataset[i] = read_rgb(path)
        file.flush()
        return dataset.id.get_storage_size() / len(paths)


def synthetic_image_bytes_per_tile(out: str) -> float:
    import h5py

    with h5py.File(out, "r") as file:
        return file["images"].id.get_storage_size() / len(file["images"])


def _run_child(*args: str) -> dict:
    command = [sys.executable, __file__, "--child", *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if result.returncode:
        raise SystemExit(f"child {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--read-seconds", type=float, default=8.0)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            result = child_build(rest[0], int(rest[1]), rest[2])
        elif kind == "read":
            result = child_read(rest[0], float(rest[1]), int(rest[2]))
        else:
            result = child_train(int(rest[0]))
        print(json.dumps(result))
        return 0

    from common import write_result

    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        for count in args.sizes:
            out = f"{tmp}/cache-{count}.hdf5"
            print(f"building {count} tiles...", flush=True)
            build = _run_child("build", f"{tmp}/world", str(count), out)
            print(f"  {build}", flush=True)
            read = _run_child("read", out, str(args.read_seconds), "1")
            read2 = _run_child("read", out, str(args.read_seconds), "2")
            print(f"  read {read}, 2 threads {read2}", flush=True)
            figures[f"build_{count}"] = {
                "tiles_per_s": {"value": round(count / build["seconds"], 1), "unit": "tiles/s"},
                "tiles_per_cpu_s": {"value": round(count / build["cpu_seconds"], 1), "unit": "tiles/CPU-s"},
                "seconds": {"value": round(build["seconds"], 1), "unit": "s"},
                "peak_rss": {"value": round(build["peak_rss_mb"]), "unit": "MiB"},
                "bytes_per_tile": {"value": round(build["bytes_per_tile"]), "unit": "B"},
            }
            figures[f"read_{count}"] = {
                "tiles_per_s": {"value": round(read["tiles_per_s"], 1), "unit": "tiles/s (augmented, 1 thread)"},
                "tiles_per_s_2_threads": {"value": round(read2["tiles_per_s"], 1), "unit": "tiles/s (augmented)"},
                "tiles_per_cpu_s": {"value": round(read["tiles_per_cpu_s"], 1), "unit": "tiles/CPU-s (augmented)"},
                "peak_rss": {"value": round(max(read["peak_rss_mb"], read2["peak_rss_mb"])), "unit": "MiB"},
            }
            synthetic = synthetic_image_bytes_per_tile(out)
        figures["image_bytes_per_tile"] = {
            "synthetic": {"value": round(synthetic), "unit": "B (gzip 1; raw 196608)"},
        }
        real = real_imagery_bytes_per_tile()
        if real is not None:
            figures["image_bytes_per_tile"]["real_satellite"] = {"value": round(real), "unit": "B (gzip 1; 8 fixture tiles)"}
        try:
            train = _run_child("train", str(args.train_steps))
        except SystemExit as error:
            print(f"train step not measured: {error}", file=sys.stderr)
            train = None
        if train:
            print(f"  train {train}", flush=True)
            slowest_read = min(figures[f"read_{count}"]["tiles_per_s"]["value"] for count in args.sizes)
            slowest_cpu = min(figures[f"read_{count}"]["tiles_per_cpu_s"]["value"] for count in args.sizes)
            figures["train_step"] = {
                "tiles_per_s": {"value": round(train["tiles_per_s"], 1), "unit": "tiles/s (segnet-basic w0.25, CPU)"},
                "tiles_per_cpu_s": {"value": round(train["tiles_per_cpu_s"], 1), "unit": "tiles/CPU-s"},
                "read_to_train_ratio": {"value": round(slowest_read / train["tiles_per_s"], 1), "unit": "x (wall clock)"},
                "read_to_train_ratio_cpu": {
                    "value": round(slowest_cpu / train["tiles_per_cpu_s"], 1), "unit": "x (per CPU-second)",
                },
            }
    notes = (
        "Synthetic 256 px tiles: 500 distinct JPEG/PNG pairs hard-linked to N names (reads hit the page "
        "cache). Peak RSS per child process includes ~100 MiB of Python/numpy/h5py/OpenCV. Read: "
        "BatchReader (make_batches without Keras), batches of 16, shuffle and augmentation on. "
        f"Load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores."
    )
    path = write_result("cache", figures, packages=("h5py", "numpy", "opencv-python-headless", "keras"), notes=notes)
    print(json.dumps(figures, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
