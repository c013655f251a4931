#!/usr/bin/env python3
"""Evaluate trained weights on the held-back test cache: per-class scores and predictions.

Streams data/testing.hdf5 through the model a batch at a time and writes, in --out-dir:

- metrics.json: {"loss", "pixel_accuracy", "mean_iou", "frequency_weighted_iou",
  "per_class": {class: {"iou", "precision", "recall", "f1", "support"}}, "classes" (names,
  background first), "confusion" (rows truth, columns prediction, pixel counts), "tiles",
  "pixels", "weights", "data", "tta"}. loss is the mean cross-entropy over labelled pixels (no class
  weights); an undefined score (a class absent from truth and prediction) is null.
- confusion.csv: the confusion matrix in pixels, a header row `truth\\predicted,<classes...>`
  then one row per true class.
- confusion.png: the same, normalised by row, with labelled axes.
- predictions.hdf5: ``probabilities`` float16 (N, H, W, C) softmax outputs in the cache's
  order, chunked one tile per chunk, shuffled and gzip level 1; ``tiles`` int32 (N, 3)
  z x y (-1 for imported tiles) and ``sources`` (N,) strings copied from the cache;
  ``indices`` int64 (N,) row numbers in the cache; attrs ``classes`` (Classes.to_json()
  text), ``weights``, ``data``, ``tta``. Written as it goes under a temporary name, renamed when
  complete.

Pixels whose label is 255 (ignore) count in no score. With --tta N each tile's probabilities
are the mean over N turned and mirrored copies of it (osmseg.segment.tta_predict), at N times
the model's time.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from osmseg import atomic, cli, segment
from osmseg.commands import options
from osmseg.errors import UserError

# TensorFlow's C++ start-up chatter hides the output; warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EPSILON = 1e-7  # probabilities are clipped here before the log, as Keras's cross-entropy does


def build_parser():
    parser = options.parser(prog="validate.py", description=__doc__)
    parser.add_argument("--weights", default="weights.hdf5", help="the weights to evaluate (train.py's output)")
    parser.add_argument("--data", default="data/testing.hdf5", help="the cache to evaluate on")
    parser.add_argument("--batch-size", type=int, default=16, help="tiles per batch")
    options.add_tta(parser)
    parser.add_argument("--out-dir", default=".", help="where metrics.json, confusion.csv/.png and predictions.hdf5 go")
    parser.add_argument(
        "--predictions",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write predictions.hdf5 (float16 probabilities of every pixel)",
    )
    return parser


def confusion_csv_text(confusion: np.ndarray, names: Sequence[str]) -> str:
    """confusion.csv's text: a header of predicted classes, then one row per true class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["truth\\predicted", *names])
    for name, row in zip(names, confusion):
        writer.writerow([name, *(int(value) for value in row)])
    return buffer.getvalue()


def score_table(result: dict) -> str:
    """The per-class table validate.py prints."""

    def cell(value, width=9):
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.4f}"

    names = list(result["per_class"])
    width = max(12, *(len(name) for name in names))
    lines = [f"{'class':<{width}} {'IoU':>9} {'precision':>9} {'recall':>9} {'F1':>9} {'support':>12}"]
    for name in names:
        scores = result["per_class"][name]
        lines.append(
            f"{name:<{width}} {cell(scores['iou'])} {cell(scores['precision'])} {cell(scores['recall'])} "
            f"{cell(scores['f1'])} {scores['support']:>12,}"
        )
    return "\n".join(lines)


def _summary_line(label: str, value) -> str:
    return f"{label:<24} {'-' if value is None else f'{value:.4f}'}"


def evaluate(predict, data_path, info, batch_size: int, predictions_path=None, attrs: dict | None = None):
    """Run predict (model.inference: a batch of images -> probabilities) over a cache;
    return (confusion int64 (C, C), mean loss, tiles seen).

    Writes predictions to `predictions_path` as it goes when given (see the module docstring).
    """
    import h5py
    from tqdm import tqdm

    from osmseg import cache
    from osmseg.metrics import confusion_matrix

    num_classes = info.classes.num_classes
    size = info.tile_size
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum, labelled = 0.0, 0
    with h5py.File(info.path, "r") as source:
        tiles, sources = source["tiles"][()], source["sources"][()]
    output = None
    destination = atomic.atomic_path(predictions_path) if predictions_path else _nothing()
    with destination as tmp:
        if tmp is not None:
            output = h5py.File(tmp, "w")
            probabilities = output.create_dataset(
                "probabilities",
                shape=(info.length, size, size, num_classes),
                dtype="float16",
                chunks=(1, size, size, num_classes),
                compression="gzip",
                compression_opts=1,
                # Bytes grouped by significance before gzip: 10% smaller and 20% faster on
                # the demo's predictions; HDF5's own filter, so every reader undoes it.
                shuffle=True,
            )
            output.create_dataset("tiles", data=tiles.astype(np.int32))
            output.create_dataset("sources", data=sources, dtype=h5py.string_dtype())
            output.create_dataset("indices", data=np.arange(info.length, dtype=np.int64))
            for key, value in (attrs or {}).items():
                output.attrs[key] = value
        try:
            done = 0
            with tqdm(total=info.length, desc="validating", unit="tile", file=sys.stderr) as bar:
                for indices, images, labels in cache.iter_tiles(data_path, batch_size=batch_size):
                    predicted = np.asarray(predict(images.astype(np.float32)), dtype=np.float32)
                    counted = labels != 255
                    truth = np.where(counted, labels, 0).astype(np.int64)
                    chosen = np.take_along_axis(predicted, truth[..., None], axis=-1)[..., 0]
                    loss_sum += float(-np.log(np.clip(chosen[counted], EPSILON, 1.0)).sum(dtype=np.float64))
                    labelled += int(counted.sum())
                    confusion += confusion_matrix(labels, predicted.argmax(axis=-1), num_classes)
                    if output is not None:
                        probabilities[done : done + len(indices)] = predicted.astype(np.float16)
                    done += len(indices)
                    bar.update(len(indices))
        finally:
            if output is not None:
                output.close()
    loss = loss_sum / labelled if labelled else None
    return confusion, loss, done


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")

    cli.import_keras()  # without TensorFlow's start-up chatter
    import model as model_module
    from osmseg import cache, plots
    from osmseg.metrics import scores

    info = cache.open_cache(args.data)
    if info.length == 0:
        raise UserError(f"{args.data}: the cache holds no tiles; rebuild it (make data/testing.hdf5)")
    try:
        net, config = model_module.load(args.weights, input_size=info.tile_size, expect={"classes": info.classes})
    except ValueError as error:  # an input size the architecture cannot take
        raise UserError(f"{args.weights} on {args.data}: {error}") from None
    names = info.classes.names
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"evaluating {args.weights} ({config['name']}, width {config['width']}) on {info.length} tiles of {args.data}"
        + (f", averaging {args.tta} turned and mirrored copies of each" if args.tta > 1 else "")
    )
    confusion, loss, count = evaluate(
        segment.tta_predict(model_module.inference(net), args.tta),
        args.data,
        info,
        args.batch_size,
        predictions_path=out_dir / "predictions.hdf5" if args.predictions else None,
        attrs={
            "classes": info.classes.to_json(),
            "weights": str(args.weights),
            "data": str(args.data),
            "tta": args.tta,
        },
    )
    result = scores(confusion, names)
    report = {
        "loss": loss,
        "pixel_accuracy": result["pixel_accuracy"],
        "mean_iou": result["mean_iou"],
        "frequency_weighted_iou": result["frequency_weighted_iou"],
        "per_class": result["per_class"],
        "classes": names,
        "confusion": confusion.tolist(),
        "tiles": count,
        "pixels": int(confusion.sum()),
        "weights": str(args.weights),
        "data": str(args.data),
        "tta": args.tta,
    }
    atomic.write_text_atomic(out_dir / "metrics.json", json.dumps(report, indent=1, allow_nan=False) + "\n")
    atomic.write_text_atomic(out_dir / "confusion.csv", confusion_csv_text(confusion, names))
    plots.confusion_picture(confusion, names, out_dir / "confusion.png")

    print(_summary_line("loss", loss))
    print(_summary_line("pixel accuracy", result["pixel_accuracy"]))
    print(_summary_line("mean IoU", result["mean_iou"]))
    print(_summary_line("frequency-weighted IoU", result["frequency_weighted_iou"]))
    print()
    print(score_table(result))
    written = ["metrics.json", "confusion.csv", "confusion.png"] + (["predictions.hdf5"] if args.predictions else [])
    print(f"\nwrote {', '.join(str(out_dir / name) for name in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
