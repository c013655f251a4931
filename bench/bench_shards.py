#!/usr/bin/env python3
"""Benchmark: the labels and cache stages in one process against two shard processes side by side.

What `--shard I/N` buys on N machines, measured on this one: the same tiles of the demo world
(a seeded sample at z19, its labels drawn with classes/mine.json and its imagery fetched from
the demo server beforehand, not timed) go through

- labels: `prepare.py labels --workers 1` once, then `--shard 0/2` and `--shard 1/2` (each
  `--workers 1`) started together;
- cache: `prepare.py cache --workers 1` once, then its two shards together, then
  `prepare.py merge-cache --shards 2` (timed on its own: it runs after the shards).

One worker a process, so that the two shard processes on 2 cores stand for two one-core
machines, and one process for one of them. Each configuration runs in fresh processes, start-up
(imports, reading the list, the test split) included, since every shard pays it. Reported: wall
time and speed-up (one process / the pair's wall time), and per process the CPU time (user +
system from wait4): CPU(shards) / CPU(one) is the work sharding adds (each shard imports,
reads the whole list and, for labels, decodes the source tiles at its cuts), and CPU(one) /
max(CPU of a shard) is the speed-up two idle cores would give, which holds up when other jobs
share the machine and the wall-clock figure does not. The load average before and after is
recorded. The runs alternate (one, two, one, two...) and the medians are kept. The outputs are
checked: the shards' labels are the one run's byte for byte, the merged caches its rows.

Usage: .venv/bin/python bench/bench_shards.py [--tiles 7000] [--repeats 3] [--quick] [--note TEXT]
Writes bench/results/shards.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

DEMO_BBOX = "-0.0275,-0.0275,0.0275,0.0275"  # the Makefile's DEMO_BBOX: the whole demo world
ZOOM = 19  # 7,744 tiles in the demo world at z19: room for a sample of thousands
PREPARE = [sys.executable, str(ROOT / "prepare.py")]


def _run(argv, quiet=True):
    """Run prepare.py with these arguments; raise with its output if it fails."""
    done = subprocess.run(PREPARE + [str(a) for a in argv], cwd=ROOT, capture_output=quiet, text=True)
    if done.returncode:
        raise RuntimeError(f"prepare.py {' '.join(map(str, argv))} failed:\n{done.stdout}\n{done.stderr}")


def _timed(commands: list[list]) -> tuple[float, list[float]]:
    """Start these prepare.py commands together; (wall seconds until all end, CPU seconds of each)."""
    started = time.perf_counter()
    processes = [
        subprocess.Popen(PREPARE + [str(a) for a in argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for argv in commands
    ]
    cpu = {}
    while len(cpu) < len(processes):
        pid, status, usage = os.wait4(-1, 0)
        for process in processes:
            if process.pid == pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                cpu[pid] = usage.ru_utime + usage.ru_stime
    wall = time.perf_counter() - started
    for process, argv in zip(processes, commands):
        if process.returncode:
            raise RuntimeError(f"prepare.py {' '.join(map(str, argv))} failed:\n{process.stderr.read().decode()}")
        process.stderr.close()
    return wall, [cpu[p.pid] for p in processes]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _same_caches(a: Path, b: Path) -> bool:
    import h5py
    import numpy as np

    with h5py.File(a, "r") as x, h5py.File(b, "r") as y:
        if not all(np.array_equal(x[name][:], y[name][:]) for name in ("tiles", "sources")):
            return False
        return all(
            x["images"].id.read_direct_chunk((row, 0, 0, 0)) == y["images"].id.read_direct_chunk((row, 0, 0, 0))
            for row in range(len(x["images"]))
        )


def prepare_world(work: Path, tiles: int) -> dict:
    """The demo world, a sample of `tiles` z19 tiles, its labels and its imagery (not timed)."""
    osm = work / "osm" / "demo.mbtiles"
    _run(["demo-world", "--out", osm])
    _run(["all-tiles", "--osm-source", "qa-tiles", "--osm", osm, f"--bbox={DEMO_BBOX}",
          "--out", work / "all_tiles.txt"])
    _run(["sample", "--all-tiles", work / "all_tiles.txt", "--zoom", ZOOM, "--count", tiles, "--seed", 0,
          "--out", work / "sample.txt"])
    _run(["labels", "--sample", work / "sample.txt", "--out", work / "labels"])
    _run(["images", "--sample", work / "sample.txt", "--image-tiles", "demo", "--out", work / "images",
          "--labels", work / "labels", "--workers", 8])
    return {"sample": work / "sample.txt", "labels": work / "labels", "images": work / "images"}


def labels_round(work: Path, world: dict) -> dict:
    one, two = work / "labels-one", work / "labels-two"
    for folder in (one, two):
        shutil.rmtree(folder, ignore_errors=True)
    common = ["labels", "--sample", world["sample"], "--workers", 1]
    wall_one, (cpu_one,) = _timed([[*common, "--out", one]])
    wall_two, cpu_two = _timed([[*common, "--out", two, "--shard", f"{i}/2"] for i in range(2)])
    assert _files(one) == _files(two), "the shards' labels differ from one run's"
    return {"wall_one": wall_one, "wall_two": wall_two, "cpu_one": cpu_one, "cpu_two": cpu_two}


def cache_round(work: Path, world: dict) -> dict:
    one, two = work / "cache-one", work / "cache-two"
    for folder in (one, two):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()

    def argv(folder, command="cache"):
        return [command, "--sample", world["sample"], "--images", world["images"], "--labels", world["labels"],
                "--test-size", 0.1, "--test-list", folder / "test.txt",
                "--out", folder / "training.hdf5", "--test-out", folder / "testing.hdf5"]

    wall_one, (cpu_one,) = _timed([[*argv(one), "--workers", 1]])
    wall_two, cpu_two = _timed([[*argv(two), "--workers", 1, "--shard", f"{i}/2"] for i in range(2)])
    wall_merge, (cpu_merge,) = _timed([[*argv(two, "merge-cache"), "--shards", 2]])
    for name in ("training.hdf5", "testing.hdf5"):
        assert _same_caches(one / name, two / name), f"the merged {name} differs from one run's"
    return {"wall_one": wall_one, "wall_two": wall_two, "cpu_one": cpu_one, "cpu_two": cpu_two,
            "wall_merge": wall_merge, "cpu_merge": cpu_merge}


def summarise(rounds: list[dict], tiles: int) -> dict:
    def median(key, pick=lambda v: v):
        return statistics.median(pick(r[key]) for r in rounds)

    wall_one, wall_two = median("wall_one"), median("wall_two")
    cpu_one = median("cpu_one")
    cpu_total, cpu_slowest = median("cpu_two", sum), median("cpu_two", max)
    figures = {
        "one_process": {"value": round(wall_one, 2), "unit": f"s ({tiles} z{ZOOM} tiles, 1 worker)"},
        "two_shards": {"value": round(wall_two, 2), "unit": "s (both shards at once, 1 worker each)"},
        "speedup": {"value": round(wall_one / wall_two, 2), "unit": "x (wall clock; goal 1.8)"},
        "cpu_one_process": {"value": round(cpu_one, 2), "unit": "CPU s"},
        "cpu_two_shards": {"value": round(cpu_total, 2), "unit": "CPU s (both shards)"},
        "cpu_overhead": {"value": round(cpu_total / cpu_one, 3), "unit": "x (CPU of both shards / one process)"},
        "speedup_idle_cores": {"value": round(cpu_one / cpu_slowest, 2),
                               "unit": "x (CPU of one process / of the slower shard)"},
    }
    if "wall_merge" in rounds[0]:
        wall_merge = median("wall_merge")
        figures["merge"] = {"value": round(wall_merge, 2), "unit": "s (merge-cache, after the shards)"}
        figures["speedup_with_merge"] = {"value": round(wall_one / (wall_two + wall_merge), 2),
                                         "unit": "x (wall clock, shards then merge)"}
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", type=int, default=7000, help="z19 tiles in the sample (the demo world has 7,744)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each configuration (medians kept)")
    parser.add_argument("--quick", action="store_true", help="300 tiles, one round: a smoke test")
    parser.add_argument("--note", default="", help="added to the results' notes (how the machine was loaded)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tiles, args.repeats = 300, 1
    from common import write_result

    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        print(f"preparing {args.tiles} z{ZOOM} demo tiles (labels, imagery) in {work}", flush=True)
        world = prepare_world(work, args.tiles)
        load_before = os.getloadavg()
        labels_rounds, cache_rounds = [], []
        for round_ in range(args.repeats):
            labels_rounds.append(labels_round(work, world))
            cache_rounds.append(cache_round(work, world))
            print(f"round {round_ + 1}: labels {labels_rounds[-1]}, cache {cache_rounds[-1]}", flush=True)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = {
        "labels": summarise(labels_rounds, args.tiles),
        "cache": summarise(cache_rounds, args.tiles),
        "load_average": {"value": round((load_before[0] + load_after[0]) / 2, 2),
                         "unit": f"1-min load, mean of before/after ({os.cpu_count()} cores)"},
    }
    notes = (
        f"{args.tiles} z{ZOOM} demo-world tiles, {args.repeats} round{'s' if args.repeats > 1 else ''}, medians. One process against two shard "
        "processes started together, one worker each (2 cores stand for two one-core machines). Wall-clock "
        "speed-ups depend on what else the machine runs (see load_average); speedup_idle_cores (CPU of one "
        "process over the slower shard's) does much less." + (f" {args.note}" if args.note else "")
    )
    print(write_result("shards", figures, packages=("h5py", "mapnik"), notes=notes))
    for stage in ("labels", "cache"):
        print(stage, {k: v["value"] for k, v in figures[stage].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
