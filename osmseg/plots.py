"""Pictures of training and evaluation: training curves and the confusion matrix (PNG).

Drawn with matplotlib's Agg canvas on a Figure of their own (no pyplot, no global state, no
display needed) and written through a temporary name and a rename.

training_log.png
    Three panels over epochs: loss, pixel accuracy and mean IoU (training solid, validation
    dashed), and the validation IoU of every class.

confusion.png
    The confusion matrix normalised by row (each truth class's pixels sum to 1), colour
    from 0 to 1, with class names on both axes (truth down, prediction across) and each
    cell's share written in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from osmseg.atomic import atomic_path


def _integer_epochs(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def _column(rows: Sequence[dict], key: str) -> np.ndarray:
    return np.array([np.nan if row.get(key) is None else float(row[key]) for row in rows], dtype=np.float64)


def training_curves(rows: Sequence[dict], names: Sequence[str], path: str | Path) -> None:
    """Plot training_log rows (see osmseg.training.log_columns) to a PNG.

    Args:
        rows: one dict per epoch with the log's columns (None or NaN where undefined).
        names: the class names, background first.
        path: the PNG to write.
    """
    figure = _figure(14, 4)
    epochs = _column(rows, "epoch")
    panels = figure.subplots(1, 4)
    for axis, key, title in zip(panels, ("loss", "pixel_accuracy", "mean_iou"), ("loss", "pixel accuracy", "mean IoU")):
        axis.plot(epochs, _column(rows, key), "o-", label="training")
        validation = _column(rows, f"val_{key}")
        if np.isfinite(validation).any():
            axis.plot(epochs, validation, "o--", label="validation")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        _integer_epochs(axis)
        axis.grid(alpha=0.3)
        axis.legend()
    per_class = panels[3]
    for name in names:
        values = _column(rows, f"val_iou_{name}")
        if np.isfinite(values).any():
            per_class.plot(epochs, values, "o-", label=name, markersize=3)
    per_class.set_title("validation IoU per class")
    per_class.set_xlabel("epoch")
    _integer_epochs(per_class)
    per_class.set_ylim(0, 1)
    per_class.grid(alpha=0.3)
    if per_class.lines:
        per_class.legend(fontsize="small")
    figure.tight_layout()
    _save(figure, path)


def confusion_picture(confusion, names: Sequence[str], path: str | Path) -> None:
    """Draw a confusion matrix (rows truth, columns prediction), normalised by row, to a PNG."""
    confusion = np.asarray(confusion, dtype=np.float64)
    support = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion, support, out=np.zeros_like(confusion), where=support > 0)
    size = 2.5 + 0.8 * len(names)
    figure = _figure(size + 1.5, size)
    axis = figure.subplots()
    image = axis.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axis, label="share of the truth class's pixels")
    ticks = np.arange(len(names))
    axis.set_xticks(ticks, labels=names, rotation=45, ha="right")
    axis.set_yticks(ticks, labels=[f"{name} ({int(n):,})" for name, n in zip(names, support[:, 0])])
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class (pixels)")
    axis.set_title("confusion matrix (rows sum to 1)")
    for row in range(len(names)):
        for column in range(len(names)):
            value = shares[row, column]
            axis.text(
                column,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize="small",
                color="white" if value > 0.5 else "black",
            )
    figure.tight_layout()
    _save(figure, path)
