#!/usr/bin/env python3
"""Benchmark: multi-worker training over loopback, and its projection to 8 GPU hosts.

Two train workers on 127.0.0.1 (osmseg.distributed.fit under MultiWorkerMirroredStrategy,
configured by TF_CONFIG as train.py does), each with one CPU thread for TensorFlow so that
they do not fight over this machine's cores, train segnet-basic and segnet (width 1, 7
classes) on random tiles. Measured in each worker:

- the loop's step time (one on_train_batch_begin to the next, after warm-up steps): the
  model's work, the gradient all-reduce, the per-step sum of the metrics and the agreement on
  stop_training;
- the gradient exchange alone: the same all-reduce (one float32 pack the size of the
  trainable weights, as the Keras optimizer sends it) timed on its own; its share of the step;
- the same step in a one-worker "cluster" with the same per-worker batch: the step without
  another worker to wait for.

The projection to 8 GPU hosts is on paper: a ring all-reduce moves 2(n-1)/n × S bytes in and
out of every host per step (S = 4 bytes × trainable parameters), at the stated link speeds,
against a stated per-GPU compute time; this loop sends the gradients in one pack after the
backward pass, so nothing overlaps them.

Usage: .venv/bin/python bench/bench_distributed.py [--quick]
Writes bench/results/distributed.json (--quick: segnet-basic only, printed, not written).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

NUM_CLASSES = 7
TILE_SIZE = 64  # segnet needs a multiple of 32; small enough for a CPU step in about a second
PER_WORKER_BATCH = 2
WARMUP, TIMED = 2, 6  # steps: the first traces the step function
LINKS_GBIT = (10, 25, 100)  # Ethernet speeds of GPU clusters, bits per second ×1e9
HOSTS = 8
# Per-GPU compute for the projection: segnet's training step is about 3× its forward pass
# (84.8 GFLOP a 256² tile, model.flops_per_image), batch 16 a GPU, at a sustained 50 TFLOP/s
# (an assumption: half of an A100's dense bfloat16 rate on convolutions).
GPU_BATCH, GPU_TFLOPS, SEGNET_FORWARD_GFLOP = 16, 50.0, 84.8

WORKER = """
import json, sys, time
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
import keras
import model
from osmseg import cache, distributed, training
import os

name, data, batch_size, warmup, timed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cluster = distributed.parse_tf_config(os.environ["TF_CONFIG"])
strategy = distributed.make_strategy(cluster)
names = [f"class{i}" for i in range(%(classes)d)]
keras.utils.set_random_seed(0)
with strategy.scope():
    net = model.build(name, len(names), input_size=%(size)d)
    net.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras.losses.SparseCategoricalCrossentropy())

class Clock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.begins = []
    def on_train_batch_begin(self, batch, logs=None):
        self.begins.append(time.perf_counter())
    def on_epoch_end(self, epoch, logs=None):
        self.begins.append(time.perf_counter())

clock = Clock()
batches = cache.BatchReader(data, None, batch_size)
distributed.fit(net, strategy, cluster, batches, epochs=1, callbacks=[clock],
                make_metrics=lambda: training.streaming_metrics(names))
steps = np.diff(clock.begins)[warmup:warmup + timed]

# The gradient exchange alone: what the Keras optimizer all-reduces, one float32 pack.
gradients = [tf.zeros(v.shape, v.dtype) for v in net.trainable_variables]

@tf.function
def exchange():
    return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", [tf.identity(g) for g in gradients]))

for _ in range(2):
    exchange()
exchanges = []
for _ in range(timed):
    started = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), strategy.experimental_local_results(exchange()))
    exchanges.append(time.perf_counter() - started)

# One small collective (the loop's per-step sum of the metrics and its stop agreement are two).
flag = tf.constant(1.0)

@tf.function
def small():
    return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", tf.identity(flag)))

def timed_calls(function, fetch):
    for _ in range(2):
        fetch(function())
    seconds = []
    for _ in range(timed):
        started = time.perf_counter()
        fetch(function())
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))

small_s = timed_calls(small, lambda out: [t.numpy() for t in strategy.experimental_local_results(out)])

# The model's work alone (forward, loss, gradients) on this worker's tiles, with the other
# worker doing the same at the same time: what the step costs without any collective.
images, targets, weights = batches.read(0, slice(0, batch_size // cluster.workers))
images, targets, weights = tf.constant(images), tf.constant(targets), tf.constant(weights)

@tf.function
def compute():
    with tf.GradientTape() as tape:
        loss = net.compute_loss(images, targets, net(images, training=True), weights)
    return tape.gradient(loss, net.trainable_variables)

compute_s = timed_calls(compute, lambda out: [g.numpy() for g in out])
parameters = int(sum(np.prod(v.shape) for v in net.trainable_variables))
print(json.dumps({"step_s": float(np.median(steps)), "steps_s": steps.tolist(),
                  "exchange_s": float(np.median(exchanges)), "small_collective_s": small_s,
                  "compute_s": compute_s, "parameters": parameters}))
""" % {"classes": NUM_CLASSES, "size": TILE_SIZE}


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def make_cache(path: Path, tiles: int) -> None:
    """Random tiles in the cache schema (osmseg/cache.py); what they show does not matter here."""
    import h5py
    import numpy as np

    from osmseg import cache
    from osmseg.classes import parse_classes

    classes = parse_classes(
        json.dumps([{"name": f"class{i}", "color": f"#{i:02x}{i:02x}{i:02x}"} for i in range(1, NUM_CLASSES)]),
        require_filters=False,
    )
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as file:
        file["images"] = rng.integers(0, 256, (tiles, TILE_SIZE, TILE_SIZE, 3), dtype=np.uint8)
        file["labels"] = rng.integers(0, NUM_CLASSES, (tiles, TILE_SIZE, TILE_SIZE), dtype=np.uint8)
        file["tiles"] = np.stack([np.full(tiles, 17), np.arange(tiles), np.arange(tiles)], axis=1).astype(np.int32)
        file.create_dataset("sources", data=np.array(["bench"] * tiles, dtype=object), dtype=h5py.string_dtype())
        file.attrs["classes"] = classes.to_json()
        file.attrs["tile_size"] = TILE_SIZE
        file.attrs["schema_version"] = cache.SCHEMA_VERSION


def run_workers(name: str, data: Path, workers: int) -> list[dict]:
    """Run the bench worker as a cluster of `workers` processes on loopback; their results."""
    hosts = [f"127.0.0.1:{port}" for port in _free_ports(workers)]
    batch = PER_WORKER_BATCH * workers
    processes = []
    for index in range(workers):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
        command = [sys.executable, "-c", WORKER, name, str(data), str(batch), str(WARMUP), str(TIMED)]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for process in processes:
        out, err = process.communicate(timeout=1800)
        if process.returncode != 0:
            raise RuntimeError(f"bench worker failed ({process.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def measure(name: str, data: Path) -> dict:
    two = run_workers(name, data, 2)
    one = run_workers(name, data, 1)[0]
    step = max(result["step_s"] for result in two)  # the slower worker sets the pace
    exchange = max(result["exchange_s"] for result in two)
    size_mb = two[0]["parameters"] * 4 / 1e6
    compute = max(result["compute_s"] for result in two)
    small = max(result["small_collective_s"] for result in two)
    return {
        "parameters": {"value": two[0]["parameters"], "unit": "trainable"},
        "step_2_workers": {"value": round(step, 4), "unit": f"s ({PER_WORKER_BATCH} tiles a worker, {TILE_SIZE}²)"},
        "step_1_worker": {"value": round(one["step_s"], 4), "unit": "s (same batch a worker)"},
        "compute_2_workers": {"value": round(compute, 4), "unit": "s (forward+backward alone, both at once)"},
        "gradient_exchange": {"value": round(exchange, 4), "unit": f"s ({size_mb:.1f} MB all-reduce, loopback)"},
        "exchange_share": {"value": round(100 * exchange / step, 1), "unit": "% of the 2-worker step"},
        "small_collective": {"value": round(small, 5), "unit": "s (one scalar all-reduce; 2 a step)"},
        "loopback_bandwidth": {"value": round(size_mb / exchange / 1000, 3), "unit": "GB/s (S / exchange time, n=2)"},
    }


def projection(parameters: int) -> dict:
    """Ring all-reduce time and scaling efficiency for segnet on 8 GPU hosts, on paper."""
    size = 4 * parameters  # bytes of float32 gradients
    compute = 3 * SEGNET_FORWARD_GFLOP * GPU_BATCH / (GPU_TFLOPS * 1000)  # s per step per GPU
    moved = 2 * (HOSTS - 1) / HOSTS * size
    figures = {
        "moved_per_host": {"value": round(moved / 1e6, 1), "unit": f"MB a step (2(n-1)/n × {size / 1e6:.1f} MB, n={HOSTS})"},
        "gpu_compute": {"value": round(compute, 4), "unit": f"s a step (batch {GPU_BATCH} at {GPU_TFLOPS:g} TFLOP/s)"},
    }
    for gbit in LINKS_GBIT:
        exchange = moved / (gbit * 1e9 / 8)
        efficiency = compute / (compute + exchange)
        figures[f"link_{gbit}gbit"] = {
            "exchange": {"value": round(exchange, 4), "unit": "s a step"},
            "efficiency": {"value": round(100 * efficiency, 1), "unit": "% of the step computing"},
            "speedup_8_hosts": {"value": round(HOSTS * efficiency, 2), "unit": "x one host (same batch a GPU)"},
        }
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="segnet-basic only; print, do not write")
    args = parser.parse_args(argv)
    names = ["segnet-basic"] if args.quick else ["segnet-basic", "segnet"]
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "training.hdf5"
        # Enough global batches of 2 workers for warm-up, timed steps and the epoch's end.
        make_cache(data, PER_WORKER_BATCH * 2 * (WARMUP + TIMED + 1))
        for name in names:
            started = time.perf_counter()
            figures[name] = measure(name, data)
            print(f"{name}: {json.dumps(figures[name])} ({time.perf_counter() - started:.0f} s)", flush=True)
    if "segnet" in figures:
        figures["projection_segnet_8_hosts"] = projection(figures["segnet"]["parameters"]["value"])
    if args.quick:
        print(json.dumps(figures, indent=2))
        return 0
    from common import write_result

    notes = (
        "Two workers on 127.0.0.1, one TensorFlow thread each, float32, Adam, random tiles; medians of "
        f"{TIMED} steps after {WARMUP}. The exchange is timed alone, with the same all-reduce as the step's. "
        "The projection assumes a ring all-reduce of the float32 gradients, not overlapped with compute, "
        f"and {GPU_TFLOPS:g} TFLOP/s sustained a GPU."
    )
    print(write_result("distributed", figures, packages=("tensorflow", "keras"), notes=notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
