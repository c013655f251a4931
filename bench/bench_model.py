#!/usr/bin/env python3
"""Benchmark: SegNet training and inference images/s in Keras and in PyTorch, side by side.

For segnet and segnet-basic (model.py) at 256×256, batch 8, 7 classes, in float32 and in mixed
bfloat16, on the CPU:

- Keras 3 on TensorFlow (this project's model.build; Adam, sparse cross-entropy, train_on_batch),
- the same architecture written in PyTorch (the same channel table, Conv2d + BatchNorm + ReLU,
  MaxPool2d with return_indices and MaxUnpool2d; channels-last; torch.autocast for bfloat16),

and, in the same run, each framework's 2048×2048 matrix-multiply rate in both precisions: the
machine's peak is the better of the two. FLOPs per image are counted from the convolutions
(2 × multiply-adds, forward); a training step costs about 3× the forward pass. Figures: images/s
(wall) and images per CPU-second, achieved FLOP per CPU-second as a share of the matmul's, and the
Keras/PyTorch speed ratio both ways.

Every measurement runs in its own process (clean thread pools; the PyTorch ones in the bench
venv, see bench/requirements.txt, since torch must not go into .venv). Steps are few and the
warm-up (graph tracing, oneDNN kernel selection) is excluded; the best of the timed steps is
reported because the machine is shared.

Options: --where adds a profile of where Keras's segnet training time goes (parts swapped out,
at 128×128 batch 2); --keras-torch adds Keras 3 on its PyTorch backend (bench venv) as a third
column; --jit compiles the Keras model with XLA.

Usage: .venv/bin/python bench/bench_model.py [--quick] [--where] [--keras-torch] [--jit]
Writes bench/results/model.json (--quick prints a 128×128 segnet-basic smoke run instead).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import model

NUM_CLASSES = 7  # classes/mine.json: six classes and the background
PRECISIONS = ("float32", "bfloat16")


def forward_flops(name: str, size: int, num_classes: int) -> int:
    """Forward FLOPs per image counted from the channel table: 2 × the convolutions' MACs."""
    blocks = [(model.channels(f, 1.0), n) for f, n in model.ARCHITECTURES[name]]
    macs, previous, side = 0, 3, size
    for filters, convs in blocks:
        for _ in range(convs):
            macs += side * side * 9 * previous * filters
            previous = filters
        side //= 2
    for number in range(len(blocks), 0, -1):
        side *= 2
        filters, convs = blocks[number - 1]
        narrowed = blocks[number - 2][0] if number > 1 else filters
        for index in range(convs):
            out = narrowed if index == convs - 1 else filters
            macs += side * side * 9 * previous * out
            previous = out
    macs += side * side * previous * num_classes
    return 2 * macs


def _timed(step, warmup: int, steps: int) -> dict:
    """Wall and CPU seconds (all of this process's threads) of each timed step.

    CPU time is the fairer measure on a shared machine: waiting for a core costs wall time but
    no CPU time, while the work done (and threads spinning idle) costs both.
    """
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        started, started_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return {"wall": wall, "cpu": cpu}


# --- Workers: one measurement each, printed as one JSON line --------------------------------


def keras_worker(args) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    rng = np.random.RandomState(0)
    if args.task == "matmul":
        import tensorflow as tf

        result = {}
        for precision in PRECISIONS:
            a = tf.constant(rng.standard_normal((2048, 2048)).astype("float32"), dtype=precision)
            b = tf.constant(rng.standard_normal((2048, 2048)).astype("float32"), dtype=precision)
            matmul = tf.function(lambda a=a, b=b: tf.linalg.matmul(a, b))
            times = _timed(lambda matmul=matmul: matmul().numpy(), 2, 8)
            result[precision] = {kind: 2 * 2048**3 / min(seconds) for kind, seconds in times.items()}
        return result

    if args.task == "where":
        return keras_where(args)
    policy = "mixed_bfloat16" if args.precision == "bfloat16" else "float32"
    net = model.build(args.model, NUM_CLASSES, input_size=args.size, mixed_precision=policy, seed=0)
    def loss(y_true, y_pred):
        # Flattened to pixels: on the PyTorch backend Keras's loss on (B, H, W, C) fails backward.
        return keras.losses.sparse_categorical_crossentropy(
            keras.ops.reshape(y_true, (-1,)), keras.ops.reshape(y_pred, (-1, NUM_CLASSES))
        )

    net.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=args.jit)
    x = rng.uniform(0, 255, (args.batch, args.size, args.size, 3)).astype("float32")
    y = rng.randint(0, NUM_CLASSES, (args.batch, args.size, args.size)).astype("int32")
    train = _timed(lambda: net.train_on_batch(x, y), args.warmup, args.steps)
    infer = _timed(lambda: net.predict_on_batch(x), args.warmup, args.steps)
    return {"train_s": train, "infer_s": infer, "flops": model.flops_per_image(net)}


def keras_where(args) -> dict:
    """Where a Keras training step's time goes: CPU seconds with parts of the model swapped out.

    Variants: the model as built; pooling indices replaced by plain 2×2 max pooling and
    nearest-neighbour upsampling (what the indices cost); batch normalisation by Keras's own
    (what the fused kernel saves); batch normalisation removed (what normalising costs at all).
    """
    import keras
    import numpy as np
    from keras import layers, ops

    Pool, Unpool, FusedBatchNormalization = model._layers()
    original = (Pool.call, Unpool.call, FusedBatchNormalization.call)

    def plain_pool(self, inputs):
        return ops.max_pool(inputs, 2, 2), ops.zeros_like(inputs)

    def plain_unpool(self, inputs):
        return ops.repeat(ops.repeat(inputs[0], 2, axis=1), 2, axis=2)

    def keras_bn(self, inputs, training=None, mask=None):
        return layers.BatchNormalization.call(self, inputs, training=training, mask=mask)

    def no_bn(self, inputs, training=None, mask=None):
        return inputs

    variants = {
        "as built": original,
        "no pooling indices": (plain_pool, plain_unpool, original[2]),
        "keras batch norm": (original[0], original[1], keras_bn),
        "no batch norm": (original[0], original[1], no_bn),
    }
    rng = np.random.RandomState(0)
    x = rng.uniform(0, 255, (args.batch, args.size, args.size, 3)).astype("float32")
    y = rng.randint(0, NUM_CLASSES, (args.batch, args.size, args.size)).astype("int32")
    policy = "mixed_bfloat16" if args.precision == "bfloat16" else "float32"
    result = {}
    for label, (pool_call, unpool_call, bn_call) in variants.items():
        Pool.call, Unpool.call, FusedBatchNormalization.call = pool_call, unpool_call, bn_call
        keras.backend.clear_session()
        net = model.build(args.model, NUM_CLASSES, input_size=args.size, mixed_precision=policy, seed=0)
        net.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
        result[label] = _timed(lambda net=net: net.train_on_batch(x, y), args.warmup, args.steps)
    Pool.call, Unpool.call, FusedBatchNormalization.call = original
    return result


def _torch_segnet(name: str, num_classes: int):
    from torch import nn

    blocks = [(model.channels(f, 1.0), n) for f, n in model.ARCHITECTURES[name]]

    def conv_bn_relu(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, eps=1e-3), nn.ReLU(inplace=True)]

    class SegNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoders, self.decoders, previous = nn.ModuleList(), nn.ModuleList(), 3
            for filters, convs in blocks:
                layers = []
                for _ in range(convs):
                    layers += conv_bn_relu(previous, filters)
                    previous = filters
                self.encoders.append(nn.Sequential(*layers))
            for number in range(len(blocks), 0, -1):
                filters, convs = blocks[number - 1]
                narrowed = blocks[number - 2][0] if number > 1 else filters
                layers = []
                for index in range(convs):
                    out = narrowed if index == convs - 1 else filters
                    layers += conv_bn_relu(previous, out)
                    previous = out
                self.decoders.append(nn.Sequential(*layers))
            self.pool = nn.MaxPool2d(2, 2, return_indices=True)
            self.unpool = nn.MaxUnpool2d(2, 2)
            self.classifier = nn.Conv2d(previous, num_classes, 1)

        def forward(self, x):
            indices = []
            for encoder in self.encoders:
                x, index = self.pool(encoder(x))
                indices.append(index)
            for decoder, index in zip(self.decoders, reversed(indices)):
                x = decoder(self.unpool(x, index))
            return self.classifier(x)

    return SegNet()


def torch_worker(args) -> dict:
    import numpy as np
    import torch

    torch.manual_seed(0)
    rng = np.random.RandomState(0)
    if args.task == "matmul":
        result = {}
        for precision in PRECISIONS:
            dtype = getattr(torch, precision)
            a = torch.from_numpy(rng.standard_normal((2048, 2048)).astype("float32")).to(dtype)
            b = torch.from_numpy(rng.standard_normal((2048, 2048)).astype("float32")).to(dtype)
            times = _timed(lambda a=a, b=b: torch.mm(a, b), 2, 8)
            result[precision] = {kind: 2 * 2048**3 / min(seconds) for kind, seconds in times.items()}
        result["version"] = torch.__version__
        return result

    net = _torch_segnet(args.model, NUM_CLASSES).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.from_numpy(rng.uniform(0, 255, (args.batch, 3, args.size, args.size)).astype("float32"))
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(rng.randint(0, NUM_CLASSES, (args.batch, args.size, args.size)).astype("int64"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bfloat16")

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()

    def infer_step():
        with torch.inference_mode(), autocast:
            torch.softmax(net(x).float(), dim=1)

    net.train()
    train = _timed(train_step, args.warmup, args.steps)
    net.eval()
    infer = _timed(infer_step, args.warmup, args.steps)
    return {"train_s": train, "infer_s": infer, "threads": torch.get_num_threads()}


# --- The orchestrator -----------------------------------------------------------------------


def _run_worker(python: str, framework: str, task: str, args, **extra) -> dict:
    command = [python, __file__, "--worker", framework, "--task", task, "--batch", str(args.batch),
               "--size", str(args.size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    if args.jit and framework.startswith("keras"):
        command.append("--jit")
    # PyTorch's OpenMP threads spin while they wait; on a machine shared with other jobs that
    # made it up to 5× slower (measured), so they are asked to sleep instead.
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"} if framework != "keras" else None
    if framework == "keras-torch":
        env["KERAS_BACKEND"] = "torch"
        command[command.index("--worker") + 1] = "keras"
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    line = result.stdout.strip().splitlines()[-1]
    print(f"  {framework} {task} {extra}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return json.loads(line)


def _speed(times: dict, batch: int, flops_per_image: float, peak: dict) -> dict:
    """Figures for one framework and task from its step times and the matmul peak."""
    wall, cpu = min(times["wall"]), min(times["cpu"])
    return {
        "images_per_s": {"value": round(batch / wall, 3), "unit": "images/s"},
        "images_per_cpu_s": {"value": round(batch / cpu, 3), "unit": "images/CPU-s"},
        "gflops_per_cpu_s": {"value": round(batch * flops_per_image / cpu / 1e9, 1), "unit": "GFLOP/CPU-s"},
        "share_of_matmul_peak": {"value": round(batch * flops_per_image / cpu / peak["cpu"], 3), "unit": "fraction"},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128×128, batch 2, segnet-basic only; prints, writes nothing")
    parser.add_argument("--torch-python", default=str(ROOT / "bench" / ".venv" / "bin" / "python"))
    parser.add_argument("--models", nargs="+", default=list(model.MODELS), choices=model.MODELS)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--jit", action="store_true", help="compile the Keras model with XLA")
    parser.add_argument("--keras-torch", action="store_true", help="also time Keras on its PyTorch backend")
    parser.add_argument("--where", action="store_true", help="also time Keras segnet with parts swapped out (128², batch 2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", choices=("keras", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=("matmul", "model", "where"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="model", help="result name: writes bench/results/NAME.json")
    args = parser.parse_args(argv)

    if args.worker:
        result = (keras_worker if args.worker == "keras" else torch_worker)(args)
        print(json.dumps(result))
        return 0
    if args.quick:
        args.size, args.batch, args.models = 128, 2, ["segnet-basic"]
    if not Path(args.torch_python).exists():
        raise SystemExit(
            f"{args.torch_python}: no PyTorch venv; python3 -m venv bench/.venv && "
            "bench/.venv/bin/pip install -r bench/requirements.txt"
        )

    started = time.time()
    pythons = {"keras": sys.executable, "torch": args.torch_python}
    matmul = {fw: _run_worker(pythons[fw], fw, "matmul", args) for fw in pythons}
    if args.keras_torch:
        # Keras 3 on its PyTorch backend, in the bench venv: does another backend do better?
        pythons["keras-torch"] = args.torch_python
    peak = {p: {kind: max(matmul[fw][p][kind] for fw in matmul) for kind in ("wall", "cpu")} for p in args.precisions}
    figures = {
        "matmul_2048": {
            fw: {
                p: {
                    "gflops_per_s": {"value": round(matmul[fw][p]["wall"] / 1e9, 1), "unit": "GFLOP/s"},
                    "gflops_per_cpu_s": {"value": round(matmul[fw][p]["cpu"] / 1e9, 1), "unit": "GFLOP/CPU-s"},
                }
                for p in args.precisions
            }
            for fw in matmul
        }
    }
    for name in args.models:
        flops = forward_flops(name, args.size, NUM_CLASSES)
        figures[name] = {"forward_gflop_per_image": {"value": round(flops / 1e9, 2), "unit": "GFLOP"}}
        for precision in args.precisions:
            runs = {fw: _run_worker(pythons[fw], fw, "model", args, model=name, precision=precision)
                    for fw in pythons}
            assert runs["keras"]["flops"] == flops, (runs["keras"]["flops"], flops)
            entry = {}
            for task, factor in (("train", 3), ("infer", 1)):
                for fw in pythons:
                    entry[f"{task}_{fw}"] = _speed(runs[fw][f"{task}_s"], args.batch, factor * flops, peak[precision])
                for keras_run in [fw for fw in runs if fw.startswith("keras")]:
                    for kind in ("wall", "cpu"):
                        ratio = min(runs["torch"][f"{task}_s"][kind]) / min(runs[keras_run][f"{task}_s"][kind])
                        label = f"{task}_speed_{keras_run.replace('-', '_')}_over_torch_{kind}"
                        entry[label] = {"value": round(ratio, 3), "unit": "x"}
            figures[name][precision] = entry
            print(json.dumps({name: {precision: entry}}), file=sys.stderr, flush=True)

    if args.where:
        # At 128×128, batch 2: a profile of where the time goes, not a throughput figure.
        small = argparse.Namespace(**{**vars(args), "size": 128, "batch": 2, "steps": 3, "warmup": 1})
        figures["where_segnet_128_batch2"] = {}
        for precision in args.precisions:
            seconds = _run_worker(sys.executable, "keras", "where", small, model="segnet", precision=precision)
            figures["where_segnet_128_batch2"][precision] = {
                label.replace(" ", "_"): {"value": round(min(times["cpu"]), 3), "unit": "CPU-s/step"}
                for label, times in seconds.items()
            }
    if args.quick:
        print(json.dumps(figures, indent=1))
        return 0
    from common import write_result

    notes = (
        f"batch {args.batch}, {args.size}x{args.size}, {args.steps} timed steps after {args.warmup} warm-up, "
        "best step reported; images/s from wall time, images/CPU-s from the process's CPU time (the fair "
        "measure on a shared machine; x cores for an idle one); share of peak = achieved GFLOP/CPU-s "
        "(training counted as 3x forward) over the matmul's GFLOP/CPU-s; "
        f"Keras jit_compile={args.jit}; PyTorch with OMP_WAIT_POLICY=PASSIVE; peak = better of TF and torch "
        f"2048^2 matmul in the same precision; torch {matmul['torch']['version']} (CPU build, bench/.venv); wall time {time.time() - started:.0f} s. The 2 cores were shared "
        "with other engineers' jobs during the run: wall-time figures are low-biased; CPU-time ones are fairer."
    )
    path = write_result(args.out, figures, packages=("keras", "tensorflow", "numpy"), notes=notes)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
