"""Segmentation metrics: confusion matrices, IoU, precision/recall/F1, and class weights.

Everything here is pure numpy: functions from arrays to arrays or plain values. The Keras
streaming versions that train.py compiles into the model live in osmseg.training.

Conventions:
    - A confusion matrix is int64 (C, C), rows = truth, columns = prediction, C = number of
      classes including the background (class 0). Pixels whose truth is IGNORE (255) are
      never counted.
    - A score that is undefined (a class that is neither in the truth nor in the
      prediction has no IoU) is None, so that it survives JSON and is never mistaken for 0.
    - Mean IoU averages the classes whose IoU is defined, as Keras's MeanIoU and the
      PASCAL VOC evaluation do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from osmseg.classes import IGNORE


def confusion_matrix(y_true, y_pred, num_classes: int, ignore: int | None = IGNORE) -> np.ndarray:
    """Count (truth, prediction) pairs of class indices.

    Args:
        y_true: integer labels of any shape; pixels equal to `ignore` are skipped.
        y_pred: integer predictions of the same shape (class indices, not probabilities).
        num_classes: C, the number of classes including the background.
        ignore: the truth value to skip (None: skip nothing).

    Returns:
        int64 (C, C), rows = truth, columns = prediction.

    Raises:
        ValueError: shapes differ, or a value (other than `ignore`) is outside 0..C-1.
    """
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"truth and prediction differ in size: {y_true.size} vs {y_pred.size}")
    if ignore is not None:
        keep = y_true != ignore
        y_true, y_pred = y_true[keep], y_pred[keep]
    y_true = y_true.astype(np.int64)
    y_pred = y_pred.astype(np.int64)
    for what, values in (("truth", y_true), ("prediction", y_pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{what} holds class indices outside 0..{num_classes - 1}")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> list[float | None]:
    """Element-wise numerator/denominator, None where the denominator is 0."""
    return [float(n) / float(d) if d > 0 else None for n, d in zip(numerator, denominator)]


def scores(confusion, names: Sequence[str]) -> dict:
    """Pixel accuracy, mean and frequency-weighted IoU, and per-class scores.

    Args:
        confusion: (C, C) counts, rows = truth, columns = prediction.
        names: the C class names, background first.

    Returns:
        A dict with pixel_accuracy, mean_iou, frequency_weighted_iou (floats, or None when
        the matrix is empty) and per_class: {name: {iou, precision, recall, f1, support}},
        where support is the number of truth pixels of the class and an undefined score is
        None.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {confusion.shape}")
    if len(names) != confusion.shape[0]:
        raise ValueError(f"{len(names)} class names for a {confusion.shape[0]}-class confusion matrix")
    true_positive = np.diag(confusion)
    support = confusion.sum(axis=1)  # truth pixels per class
    predicted = confusion.sum(axis=0)  # predicted pixels per class
    union = support + predicted - true_positive
    total = int(confusion.sum())

    iou = _ratio(true_positive, union)
    precision = _ratio(true_positive, predicted)
    recall = _ratio(true_positive, support)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (support + predicted): defined whenever either is.
    f1 = _ratio(2 * true_positive, support + predicted)

    defined = [value for value in iou if value is not None]
    per_class = {
        name: {
            "iou": iou[c],
            "precision": precision[c],
            "recall": recall[c],
            "f1": f1[c],
            "support": int(support[c]),
        }
        for c, name in enumerate(names)
    }
    if total == 0:
        return {"pixel_accuracy": None, "mean_iou": None, "frequency_weighted_iou": None, "per_class": per_class}
    # Frequency-weighted IoU (Long et al. 2015, FCN, section 5): sum_c (n_c / n) IoU_c;
    # classes with support have a defined IoU.
    frequency_weighted = sum(support[c] / total * iou[c] for c in range(len(names)) if support[c] > 0)
    return {
        "pixel_accuracy": float(true_positive.sum()) / total,
        "mean_iou": float(np.mean(defined)) if defined else None,
        "frequency_weighted_iou": float(frequency_weighted),
        "per_class": per_class,
    }


def median_frequency_weights(histogram, present_pixels=None) -> np.ndarray:
    """Median-frequency class balancing weights (Eigen & Fergus 2015; SegNet, Badrinarayanan et al. 2017).

    weight_c = median(freq) / freq_c. The papers define freq_c as the pixels of class c
    divided by the total pixels of the images where c is present; pass those totals as
    `present_pixels` to get exactly that. Without them, freq_c is the pixels of c divided
    by all labelled pixels (the simpler variant many implementations use); the two agree
    when every class appears in every tile.

    Classes with no pixels get weight 0: no pixel carries their weight, so any value would
    be inert, and leaving them out of the median keeps it a median of real frequencies.

    Args:
        histogram: (C,) labelled pixel counts per class (ignore excluded).
        present_pixels: optional (C,) labelled pixel totals of the tiles where each class
            is present.

    Returns:
        float64 (C,) weights; all zeros if the histogram is empty.
    """
    histogram = np.asarray(histogram, dtype=np.float64)
    if histogram.ndim != 1 or (histogram < 0).any():
        raise ValueError("the histogram must be a 1-D array of non-negative pixel counts")
    if present_pixels is None:
        denominator = np.full_like(histogram, histogram.sum())
    else:
        denominator = np.asarray(present_pixels, dtype=np.float64)
        if denominator.shape != histogram.shape:
            raise ValueError("present_pixels must have the histogram's shape")
        if (denominator < histogram).any():
            raise ValueError("present_pixels cannot be smaller than the class's own pixel count")
    present = histogram > 0
    weights = np.zeros_like(histogram)
    if not present.any():
        return weights
    frequency = histogram[present] / denominator[present]
    weights[present] = np.median(frequency) / frequency
    return weights
