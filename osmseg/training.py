"""Training machinery for train.py: streaming metrics, class weights, checkpoints, resume state.

Keras is imported inside the functions that need it, so importing this module stays cheap.

Files written here (all through a temporary name and a rename, so an interruption never
leaves a half-written one):

training_log.csv
    One row per finished epoch, comma-separated, with a header: ``epoch`` (1-based),
    ``loss``, ``pixel_accuracy``, ``mean_iou`` (training, over the epoch), ``val_loss``,
    ``val_pixel_accuracy``, ``val_mean_iou``, ``val_iou_<class>`` for every class (background
    first), ``learning_rate`` and ``seconds`` (wall time of the epoch). A score that is
    undefined (a class neither in the truth nor in the prediction) is ``nan``. Without a
    validation split the ``val_`` columns are empty.

weights.state.h5 (beside the weights file: ``<weights stem>.state.h5``)
    The last finished epoch's full state, rewritten after every epoch, for ``--resume``:

    - group ``model``: one dataset per model variable (``model.weights``), named by its
      index ``00000``, ``00001``, ... in order, with attr ``path`` (the Keras variable path);
    - group ``optimizer``: likewise for the optimizer's variables (iteration count, learning
      rate, momenta or moments);
    - attrs: ``format`` = "osmseg-train-state", ``version`` = 1, ``epoch`` (epochs finished),
      ``best`` (best monitored score so far, NaN if none), ``best_epoch`` (0 if none),
      ``monitor`` (the log key compared), ``settings`` (JSON: every run setting that must
      match to resume), ``log`` (JSON list of the CSV rows so far), ``planned_epochs`` (the
      epoch count --time-budget fixed after the first epoch; -1 without a budget, or before).

The best weights by validation mean IoU (training mean IoU without a validation split) go
to the weights file itself through model.save; this module only decides when.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from osmseg.atomic import atomic_path, write_text_atomic
from osmseg.classes import IGNORE
from osmseg.errors import UserError
from osmseg.metrics import median_frequency_weights

STATE_FORMAT = "osmseg-train-state"
STATE_VERSION = 1
MONITOR = "val_mean_iou"


class TrainingError(UserError):
    """Training cannot go on (a diverged loss, a resume state from another run...)."""


def state_path(weights_path: str | Path) -> Path:
    """Where the resume state of a weights file lives: weights.hdf5 -> weights.state.h5."""
    weights_path = Path(weights_path)
    return weights_path.with_name(f"{weights_path.stem}.state.h5")


# --- Class weights ------------------------------------------------------------------


def _tile_class_counts(cache_path: str | Path, indices, num_classes: int, block: int):
    """Yield int64 (num_classes,) pixel counts per tile, in increasing index order (IGNORE left out)."""
    from osmseg.cache import iter_labels

    for chunk in iter_labels(cache_path, indices, batch_size=block):
        for tile in chunk:
            counts = np.bincount(tile.reshape(-1), minlength=256)
            counts[IGNORE] = 0
            if counts[num_classes:].any():
                raise TrainingError(
                    f"{cache_path}: labels hold class values above {num_classes - 1}, but the cache "
                    f"has {num_classes} classes; rebuild it (make data/training.hdf5)"
                )
            yield counts[:num_classes]


def class_pixel_statistics(cache_path: str | Path, indices, num_classes: int, block: int = 64):
    """Count label pixels per class, and the labelled pixels of the tiles holding each class.

    Streams the cache's ``labels`` dataset (uint8 (N, H, W)) in blocks; IGNORE pixels count
    for nothing.

    Returns:
        (histogram, present_pixels): int64 (C,) each. histogram[c] is the number of pixels of
        class c; present_pixels[c] the number of labelled pixels of the tiles where c occurs
        (the denominator of the SegNet paper's class frequency).
    """
    histogram = np.zeros(num_classes, dtype=np.int64)
    present_pixels = np.zeros(num_classes, dtype=np.int64)
    for tile_counts in _tile_class_counts(cache_path, indices, num_classes, block):
        histogram += tile_counts
        present_pixels[tile_counts > 0] += tile_counts.sum()
    return histogram, present_pixels


def tile_class_presence(cache_path: str | Path, indices, num_classes: int, block: int = 64) -> np.ndarray:
    """bool (len(indices), num_classes): whether each tile, in the order given, holds each class.

    IGNORE pixels hold no class. Streams the labels in blocks, as class_pixel_statistics does.
    """
    indices = np.asarray(indices, dtype=np.int64)
    order = np.argsort(indices, kind="stable")  # the counts come in increasing index order
    presence = np.zeros((len(indices), num_classes), dtype=bool)
    for row, tile_counts in zip(order, _tile_class_counts(cache_path, indices, num_classes, block)):
        presence[row] = tile_counts > 0
    return presence


def load_class_weights(path: str | Path, names: Sequence[str]) -> np.ndarray:
    """Read per-class loss weights from a file.

    Accepted forms: a JSON list of C numbers (background first); a JSON object
    {class name: weight} naming every class; a CSV with one ``name,weight`` row per class
    (a header row is allowed), or one number per line in class order.

    Raises:
        UserError: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise UserError(
            f"--class-weights {path}: cannot read it ({error.strerror}); pass none, median-frequency or a file"
        ) from None
    where = f"--class-weights {path}"
    values: list | dict
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        rows = [row for row in csv.reader(io.StringIO(text)) if row and any(cell.strip() for cell in row)]
        if rows and len(rows[0]) == 2 and rows[0][1].strip().lower() in ("weight", "weights"):
            rows = rows[1:]
        if rows and all(len(row) == 1 for row in rows):
            values = [row[0] for row in rows]
        elif rows and all(len(row) == 2 for row in rows):
            values = {row[0].strip(): row[1] for row in rows}
        else:
            raise UserError(f"{where}: expected a JSON list or object, or CSV rows of `name,weight`") from None
    if isinstance(values, dict):
        unknown = sorted(set(values) - set(names))
        missing = [name for name in names if name not in values]
        if unknown or missing:
            raise UserError(f"{where}: unknown class(es) {unknown}, missing {missing}; the classes are {list(names)}")
        values = [values[name] for name in names]
    if not isinstance(values, list) or len(values) != len(names):
        count = len(values) if isinstance(values, list) else "no list of"
        raise UserError(f"{where}: {count} weights for {len(names)} classes {list(names)}; give one per class")
    try:
        weights = np.array([float(value) for value in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{where}: every weight must be a number") from None
    if not np.isfinite(weights).all() or (weights < 0).any() or not weights.any():
        raise UserError(f"{where}: weights must be finite, non-negative and not all zero")
    return weights


def resolve_class_weights(choice: str, cache_path, indices, names: Sequence[str]):
    """Turn --class-weights into per-class weights (None for `none`).

    `median-frequency` uses the SegNet paper's definition on the training tiles (see
    osmseg.metrics.median_frequency_weights); anything else is a file (load_class_weights).
    """
    if choice == "none":
        return None
    if choice == "median-frequency":
        histogram, present_pixels = class_pixel_statistics(cache_path, indices, len(names))
        if not histogram.any():
            raise TrainingError(f"{cache_path}: the training tiles have no labelled pixels; check the labels")
        return median_frequency_weights(histogram, present_pixels)
    return load_class_weights(choice, names)


# --- Streaming metrics --------------------------------------------------------------


def streaming_metrics(names: Sequence[str]) -> list:
    """Keras metrics for training: mean IoU, pixel accuracy and the IoU of every class.

    One metric, ``mean_iou``, accumulates a float64 (C, C) confusion matrix (rows truth)
    over the epoch; the others (``pixel_accuracy``, ``iou_<class>``) are views that read it,
    so the matrix is counted once per batch. Compile them as ``weighted_metrics`` so that
    they see the sample weights: a pixel counts if its weight is > 0, whatever the weight
    (cache.make_batches gives IGNORE pixels weight 0). The counting is a histogram of
    truth × C + prediction (bincount), which XLA and tf.distribute (sum-aggregated, on-read
    variables) both handle: for a demo batch on 2 cores, 1.3 ms where one-hot matrices and
    their product took 4.8.
    """
    import keras
    from keras import ops

    num_classes = len(names)

    class ConfusionMeanIoU(keras.metrics.Metric):
        """Mean IoU over the classes whose IoU is defined, from a streaming confusion matrix."""

        def __init__(self, name="mean_iou"):
            super().__init__(name=name)
            self.confusion = self.add_variable(
                shape=(num_classes, num_classes), initializer="zeros", dtype="float64", name="confusion"
            )

        def update_state(self, y_true, y_pred, sample_weight=None):
            truth = ops.reshape(ops.cast(y_true, "int32"), (-1,))
            predicted = _first_maximum(ops.reshape(y_pred, (-1, num_classes)))
            counted = truth < num_classes  # a value beyond the classes counts nowhere
            if sample_weight is not None:
                counted = ops.logical_and(counted, ops.reshape(sample_weight, (-1,)) > 0)
            cells = ops.minimum(truth, num_classes - 1) * num_classes + predicted
            # float32 is exact per batch (< 2**24 pixels); the running sum is float64.
            batch = ops.bincount(cells, weights=ops.cast(counted, "float32"), minlength=num_classes * num_classes)
            self.confusion.assign_add(ops.cast(ops.reshape(batch, (num_classes, num_classes)), "float64"))

        def iou(self):
            confusion = ops.convert_to_tensor(self.confusion)
            true_positive = ops.diagonal(confusion)
            union = ops.sum(confusion, axis=0) + ops.sum(confusion, axis=1) - true_positive
            defined = union > 0
            return ops.where(defined, true_positive / ops.maximum(union, 1.0), float("nan")), defined

        def result(self):
            iou, defined = self.iou()
            count = ops.sum(ops.cast(defined, "float64"))
            total = ops.sum(ops.where(defined, iou, 0.0))
            return ops.cast(ops.where(count > 0, total / ops.maximum(count, 1.0), float("nan")), "float32")

        def reset_state(self):
            self.confusion.assign(ops.zeros((num_classes, num_classes), dtype="float64"))

    class ConfusionView(keras.metrics.Metric):
        """A score read from ConfusionMeanIoU's matrix; counts nothing itself."""

        def __init__(self, read, name):
            super().__init__(name=name)
            # A function, not the metric itself, so Keras does not track its variables twice.
            self._read = read

        def update_state(self, y_true, y_pred, sample_weight=None):
            return None

        def result(self):
            return ops.cast(self._read(), "float32")

        def reset_state(self):
            return None

    def _first_maximum(scores):
        """argmax over the last axis of (N, C) scores, the first of equal maxima: a running
        comparison class by class, 4.7 ms for a demo batch where TensorFlow's ArgMax, which
        handles a short last axis badly, took 17.6."""
        best, index = scores[:, 0], ops.zeros_like(scores[:, 0], dtype="int32")
        for c in range(1, num_classes):
            index = ops.where(scores[:, c] > best, c, index)
            best = ops.maximum(best, scores[:, c])
        return index

    mean_iou = ConfusionMeanIoU()

    def pixel_accuracy():
        confusion = ops.convert_to_tensor(mean_iou.confusion)
        total = ops.sum(confusion)
        return ops.where(total > 0, ops.sum(ops.diagonal(confusion)) / ops.maximum(total, 1.0), float("nan"))

    views = [ConfusionView(pixel_accuracy, "pixel_accuracy")]
    for index, class_name in enumerate(names):
        views.append(ConfusionView(lambda index=index: mean_iou.iou()[0][index], f"iou_{class_name}"))
    return [mean_iou] + views


# --- The log ------------------------------------------------------------------------


def log_columns(names: Sequence[str]) -> list[str]:
    """training_log.csv's columns, in order."""
    return (
        ["epoch", "loss", "pixel_accuracy", "mean_iou", "val_loss", "val_pixel_accuracy", "val_mean_iou"]
        + [f"val_iou_{name}" for name in names]
        + ["learning_rate", "seconds"]
    )


def log_row(epoch: int, logs: dict, names: Sequence[str], seconds: float, learning_rate: float) -> dict:
    """One CSV row from Keras's epoch logs (epoch is 1-based); absent values are None."""
    row: dict = {"epoch": epoch}
    for column in log_columns(names)[1:-2]:
        value = logs.get(column)
        row[column] = None if value is None else float(value)
    row["learning_rate"] = float(learning_rate)
    row["seconds"] = round(float(seconds), 3)
    return row


def log_csv_text(rows: Sequence[dict], names: Sequence[str]) -> str:
    """The text of training_log.csv for these rows (see the module docstring)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = log_columns(names)
    writer.writerow(columns)
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if value is None:
                cells.append("")
            elif isinstance(value, float):
                cells.append(f"{value:.6g}")
            else:
                cells.append(str(value))
        writer.writerow(cells)
    return buffer.getvalue()


# --- Resume state -------------------------------------------------------------------


@dataclass
class TrainState:
    """Where a run stands: epochs finished, the best score so far, the log rows."""

    settings: dict
    epoch: int = 0
    best: float = float("nan")
    best_epoch: int = 0
    monitor: str = MONITOR
    rows: list = field(default_factory=list)
    planned_epochs: int | None = None  # fixed by --time-budget after the first epoch


def _write_variables(group, variables) -> None:
    for index, variable in enumerate(variables):
        dataset = group.create_dataset(f"{index:05d}", data=np.asarray(variable.numpy()))
        dataset.attrs["path"] = str(getattr(variable, "path", variable.name))


def save_state(path: str | Path, state: TrainState, model, optimizer) -> None:
    """Write the full resume state atomically (see the module docstring for the layout)."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as file:
        file.attrs["format"] = STATE_FORMAT
        file.attrs["version"] = STATE_VERSION
        file.attrs["epoch"] = state.epoch
        file.attrs["best"] = state.best
        file.attrs["best_epoch"] = state.best_epoch
        file.attrs["monitor"] = state.monitor
        file.attrs["settings"] = json.dumps(state.settings, sort_keys=True)
        file.attrs["log"] = json.dumps(state.rows)
        file.attrs["planned_epochs"] = -1 if state.planned_epochs is None else state.planned_epochs
        _write_variables(file.create_group("model"), model.weights)
        _write_variables(file.create_group("optimizer"), optimizer.variables)


def read_state(path: str | Path) -> TrainState:
    """Read a resume state's bookkeeping (not its variables).

    Raises:
        TrainingError: the file is missing, unreadable or not a resume state.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise TrainingError(f"{path}: no resume state to continue from; train from scratch")
    try:
        with h5py.File(path, "r") as file:
            if file.attrs.get("format") != STATE_FORMAT:
                raise TrainingError(f"{path}: not an osmseg training state; delete it or pass another --weights")
            if int(file.attrs.get("version", 0)) != STATE_VERSION:
                raise TrainingError(f"{path}: state version {file.attrs.get('version')} is not {STATE_VERSION}")
            return TrainState(
                settings=json.loads(file.attrs["settings"]),
                epoch=int(file.attrs["epoch"]),
                best=float(file.attrs["best"]),
                best_epoch=int(file.attrs["best_epoch"]),
                monitor=str(file.attrs["monitor"]),
                rows=json.loads(file.attrs["log"]),
                planned_epochs=None if int(file.attrs.get("planned_epochs", -1)) < 0 else int(file.attrs["planned_epochs"]),
            )
    except (OSError, KeyError, ValueError) as error:
        raise TrainingError(f"{path}: corrupt resume state ({error}); delete it and train from scratch") from None


def check_resumable(state: TrainState, settings: dict, path) -> None:
    """Refuse to resume a run with other settings, naming each difference."""
    differences = [
        f"{key}: {state.settings.get(key)!r} then, {settings.get(key)!r} now"
        for key in sorted(set(state.settings) | set(settings))
        if state.settings.get(key) != settings.get(key)
    ]
    if differences:
        raise TrainingError(
            f"{path}: this state is from a run with other settings ({'; '.join(differences)}); "
            f"resume with the same flags, or delete {path} (or drop --resume) to train from scratch"
        )


def restore_variables(path: str | Path, model, optimizer) -> None:
    """Load a resume state's model and optimizer variables into built ones, by order and shape."""
    import h5py

    with h5py.File(path, "r") as file:
        for group_name, variables in (("model", model.weights), ("optimizer", optimizer.variables)):
            group = file[group_name]
            if len(group) != len(variables):
                raise TrainingError(
                    f"{path}: {len(group)} {group_name} variables saved, {len(variables)} now; "
                    "the state is from another model; train from scratch without --resume"
                )
            for index, variable in enumerate(variables):
                value = group[f"{index:05d}"][()]
                if tuple(value.shape) != tuple(variable.shape):
                    raise TrainingError(
                        f"{path}: {group_name} variable {group[f'{index:05d}'].attrs.get('path')} has shape "
                        f"{value.shape}, the model's {tuple(variable.shape)}; train from scratch without --resume"
                    )
                variable.assign(value)


# --- Callbacks ----------------------------------------------------------------------


PLOT_EVERY = 30.0  # seconds between drawings of the training curves during a run


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def checkpoint_callback(
    state: TrainState,
    *,
    names: Sequence[str],
    save_weights,
    state_file,
    log_file,
    plot_file,
    write_files: bool = True,
    plot_every: float = PLOT_EVERY,
):
    """A Keras callback that ends each epoch by recording it (see Checkpoint)."""
    import keras

    class Checkpoint(keras.callbacks.Callback):
        """After each epoch: log row, best weights, resume state and CSV; stop on NaN.

        A non-finite training loss stops the run at the batch where it appears; that epoch
        writes nothing, so the weights and state on disk stay those of the last good epoch.
        The PNG of the curves is drawn after an epoch when `plot_every` seconds have passed
        since it was last drawn (the first epoch's always), and at the end of training: a
        drawing takes 0.6 s, 7% of a demo epoch.
        """

        def __init__(self):
            super().__init__()
            self.diverged: tuple[int, int] | None = None
            self._epoch = 0
            self._started = 0.0
            self._plotted: tuple[int, float] | None = None  # (rows drawn, when)

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch
            self._started = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if logs and "loss" in logs and not _finite(logs["loss"]):
                self.diverged = (self._epoch + 1, batch + 1)
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            if self.diverged is not None or not _finite(logs.get("loss")):
                self.diverged = self.diverged or (epoch + 1, 0)
                self.model.stop_training = True
                return
            optimizer = self.model.optimizer
            learning_rate = float(np.asarray(optimizer.learning_rate))
            row = log_row(epoch + 1, logs, names, time.perf_counter() - self._started, learning_rate)
            state.rows.append(row)
            state.epoch = epoch + 1
            score = logs.get(state.monitor)
            if _finite(score) and not (float(score) <= state.best):  # NaN best: anything beats it
                state.best, state.best_epoch = float(score), epoch + 1
                if write_files:
                    save_weights(self.model, epoch + 1, float(score))
            if write_files:
                save_state(state_file, state, self.model, optimizer)
                write_text_atomic(log_file, log_csv_text(state.rows, names))
                if self._plotted is None or time.perf_counter() - self._plotted[1] >= plot_every:
                    self._plot()

        def on_train_end(self, logs=None):
            if write_files and state.rows and (self._plotted is None or self._plotted[0] < len(state.rows)):
                self._plot()

        def _plot(self):
            if plot_file is not None:
                from osmseg.plots import training_curves

                training_curves(state.rows, names, plot_file)
            self._plotted = (len(state.rows), time.perf_counter())

    return Checkpoint()


def progress_callback(stream=None):
    """A Keras callback showing tqdm progress bars with ETA for training and validation."""
    import sys

    import keras
    from tqdm import tqdm

    stream = stream or sys.stderr

    def postfix(logs, prefix=""):
        shown = {}
        for key, label in (("loss", "loss"), ("pixel_accuracy", "acc"), ("mean_iou", "mIoU")):
            if logs and key in logs:
                shown[prefix + label] = f"{float(logs[key]):.4f}"
        return shown

    class Progress(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.bar = None
            self.epoch = 0

        def _close(self):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            total = self.params.get("steps")
            epochs = self.params.get("epochs")
            self.bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", file=stream, leave=False)

        def on_train_batch_end(self, batch, logs=None):
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(postfix(logs), refresh=False)

        def on_test_begin(self, logs=None):
            self._close()
            self.bar = tqdm(desc=f"epoch {self.epoch + 1} validation", unit="batch", file=stream, leave=False)

        def on_test_batch_end(self, batch, logs=None):
            if self.bar is not None:
                self.bar.update(1)

        def on_epoch_end(self, epoch, logs=None):
            self._close()
            logs = logs or {}
            parts = [f"{key}={value}" for key, value in postfix(logs).items()]
            validation = {key[4:]: value for key, value in logs.items() if key.startswith("val_")}
            parts += [f"val_{key}={value}" for key, value in postfix(validation).items()]
            print(f"epoch {epoch + 1}/{self.params.get('epochs')}: " + " ".join(parts), file=stream, flush=True)

        def on_train_end(self, logs=None):
            self._close()

    return Progress()
