"""The training recipe's parts: learning-rate schedule, losses, background weight, time budget.

- `warmup_cosine`: the learning rate climbs linearly from near 0 to its peak over the warm-up
  steps, then falls along half a cosine to FLOOR × the peak at the run's last step. The
  warm-up keeps the first updates, made while batch norm's statistics and Adam's moment
  estimates are still settling, from throwing the weights far; the cosine spends most steps
  at a high rate and ends with small ones, so the last epochs refine rather than jump about
  (with a constant rate the demo's validation mean IoU swung by 0.15 between its last
  epochs). Its total step count is a variable, so a time budget can re-plan it after the
  first epoch.
- `segmentation_loss`: cross-entropy weighted per pixel (class weights, 0 for pixels labelled
  255), optionally plus a term that targets IoU directly: soft Dice or Lovász-softmax (Berman,
  Triki & Blaschko, CVPR 2018, the convex surrogate of the Jaccard loss), both averaged over
  the classes present in a batch's labels and blind to pixels of weight 0. Cross-entropy
  counts pixels, so large classes dominate it; the IoU terms weigh every class alike, as the
  mean IoU does.
- `background_weights`: class 0's loss weight multiplied by a factor. In OSM an unlabelled
  pixel is often an object nobody mapped, not true background; a factor below 1 makes the
  model pay less for calling such a pixel what the imagery shows.
- `repeat_factors`: repeat-factor sampling (Gupta, Dollár & Girshick, "LVIS", CVPR 2019).
  A class found in few training tiles is seen in few batches, however the loss weighs its
  pixels; drawing the tiles that hold it more often gives the model more views of it (each
  one flipped, turned and jittered anew) without weighting any pixel's loss, which made the
  demo's rare classes worse (median-frequency weights, bench/README.md).
- `plan_epochs` and `budget_callback`: `train.py --time-budget` times the first epoch and
  fixes the run's epoch count from it.

Keras is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

SCHEDULES = ("cosine", "constant")
LOSSES = ("ce", "ce+dice", "ce+lovasz", "dice", "lovasz")
FLOOR = 0.01  # the cosine's last learning rate, as a share of the peak
LOVASZ_LEVELS = 4096  # error bins of lovasz_softmax's counting sort
CLOCK = time.perf_counter  # what the time budget reads (tests put a fake clock here)


_SCHEDULE_CLASS = None


def _schedule_class():
    """WarmupCosine, defined (and registered for Keras's deserialisation) on first use, so
    that importing this module never imports Keras."""
    global _SCHEDULE_CLASS
    if _SCHEDULE_CLASS is not None:
        return _SCHEDULE_CLASS
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="osmseg")
    class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
        """Linear warm-up to `peak`, then half a cosine down to floor × peak (see warmup_cosine)."""

        def __init__(self, peak, warmup_steps, total_steps, floor=FLOOR):
            self.peak, self.warmup_steps, self.floor = float(peak), int(warmup_steps), float(floor)
            self.total_steps = keras.Variable(
                float(total_steps), dtype="float32", trainable=False, name="schedule_total_steps"
            )

        def __call__(self, step):
            step = ops.cast(step, "float32")
            warmup = float(max(self.warmup_steps, 0))
            # Step s of the warm-up trains at (s + 1) / warmup of the peak: never at 0.
            rising = self.peak * (step + 1.0) / max(warmup, 1.0)
            span = ops.maximum(ops.convert_to_tensor(self.total_steps) - warmup, 1.0)
            progress = ops.clip((step - warmup) / span, 0.0, 1.0)
            low = self.peak * self.floor
            falling = low + (self.peak - low) * 0.5 * (1.0 + ops.cos(math.pi * progress))
            return ops.where(step < warmup, rising, falling)

        def get_config(self):
            return {
                "peak": self.peak,
                "warmup_steps": self.warmup_steps,
                "total_steps": float(np.asarray(self.total_steps)),
                "floor": self.floor,
            }

    _SCHEDULE_CLASS = WarmupCosine
    return WarmupCosine


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, floor: float = FLOOR):
    """A keras LearningRateSchedule: linear warm-up over `warmup_steps`, then cosine decay to
    `floor` × `peak` at `total_steps` (and there after). `schedule.total_steps` is a Keras
    variable: assign it to re-plan the run. Registered as osmseg>WarmupCosine, so
    keras.optimizers.schedules.deserialize (and an optimizer's from_config) rebuilds it."""
    return _schedule_class()(peak, warmup_steps, total_steps, floor)


def learning_rate(name: str, peak: float, steps_per_epoch: int, epochs: int, warmup_epochs: float):
    """The optimizer's learning rate for --schedule `name`: a float (constant) or a schedule."""
    if name == "constant":
        return peak
    if name != "cosine":
        raise ValueError(f"schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    warmup = round(warmup_epochs * steps_per_epoch)
    return warmup_cosine(peak, warmup, max(epochs * steps_per_epoch, warmup + 1))


# --- Losses ---------------------------------------------------------------------------


EPSILON = 1e-7  # keras.backend.epsilon(): cross-entropy clips probabilities to [EPSILON, 1 - EPSILON]


def _flat(y_true, y_pred, sample_weight, num_classes):
    """(probabilities (N, C) float32, one-hot truth (N, C), mask (N, 1): 1 where counted).

    The truth is one-hot for every pixel, counted or not: the terms multiply by the mask
    where it matters.
    """
    from keras import ops

    probabilities = ops.reshape(ops.cast(y_pred, "float32"), (-1, num_classes))
    truth = ops.one_hot(ops.reshape(ops.cast(y_true, "int32"), (-1,)), num_classes, dtype="float32")
    if sample_weight is None:
        mask = ops.ones_like(truth[:, :1])
    else:
        mask = ops.cast(ops.reshape(sample_weight, (-1, 1)) > 0, "float32")
    return probabilities, truth, mask


def _weights(sample_weight, probabilities):
    """Sample weights flat (N,), ones where there are none."""
    from keras import ops

    if sample_weight is None:
        return ops.ones_like(probabilities[:, 0])
    return ops.reshape(ops.cast(sample_weight, "float32"), (-1,))


def _cross_entropy(probabilities, truth, weights):
    from keras import ops

    picked = ops.sum(probabilities * truth, axis=1)
    losses = -ops.log(ops.clip(picked, EPSILON, 1.0 - EPSILON))
    return ops.sum(losses * weights) / ops.cast(ops.shape(weights)[0], "float32")


def cross_entropy(y_true, y_pred, sample_weight=None, num_classes: int | None = None):
    """Cross-entropy of softmax probabilities, each pixel's weighted, summed over the pixel count.

    The value of Keras's SparseCategoricalCrossentropy (probabilities clipped to [1e-7, 1 - 1e-7],
    weight-0 pixels in the count), computed as -log p[label] from the one-hot truth. Keras takes
    the log of every class's probability and hands them to TensorFlow's softmax cross-entropy
    kernel, which took 41 ms of CPU time in a demo training step (2 cores, about 400 ms of CPU
    in all); with this and the Lovász term's bincount, the whole loss went from 135 to 70 ms.
    """
    num_classes = num_classes or y_pred.shape[-1]
    probabilities, truth, _ = _flat(y_true, y_pred, sample_weight, num_classes)
    return _cross_entropy(probabilities, truth, _weights(sample_weight, probabilities))


def _soft_dice(probabilities, truth, mask):
    from keras import ops

    truth = truth * mask
    probabilities = probabilities * mask
    overlap = ops.sum(probabilities * truth, axis=0)
    sizes = ops.sum(probabilities, axis=0) + ops.sum(truth, axis=0)
    present = ops.cast(ops.sum(truth, axis=0) > 0, "float32")
    dice = 1.0 - 2.0 * overlap / ops.maximum(sizes, 1e-6)
    return ops.sum(dice * present) / ops.maximum(ops.sum(present), 1.0)


def soft_dice(y_true, y_pred, sample_weight=None, num_classes: int | None = None):
    """1 - the soft Dice coefficient, averaged over the classes present in the counted truth.

    Per class c over the counted pixels: 1 - 2·Σ p_c·y_c / (Σ p_c + Σ y_c), with p the
    probabilities and y the one-hot truth. 0 for a perfect, certain prediction.
    """
    num_classes = num_classes or y_pred.shape[-1]
    return _soft_dice(*_flat(y_true, y_pred, sample_weight, num_classes))


def _lovasz(probabilities, truth, mask):
    from keras import ops

    num_classes = probabilities.shape[-1]
    truth = truth * mask
    errors = ops.abs(truth - probabilities)  # (N, C)
    levels = LOVASZ_LEVELS
    level = ops.cast(ops.round(ops.clip(ops.stop_gradient(errors), 0.0, 1.0) * (levels - 1)), "int32")
    # Bin b of class c, in decreasing error order, foreground (even) before background (odd).
    bins = (levels - 1 - level) * 2 + (1 - ops.cast(truth, "int32"))
    bins = bins + ops.arange(num_classes, dtype="int32")[None, :] * (2 * levels)
    counted = ops.broadcast_to(mask, ops.shape(errors))
    # A histogram (bincount), not a segment sum: the same counts, 3 ms instead of 52 for a
    # demo batch on the CPU.
    counts = ops.bincount(ops.reshape(bins, (-1,)), weights=ops.reshape(counted, (-1,)), minlength=num_classes * 2 * levels)
    counts = ops.reshape(counts, (num_classes, levels, 2))
    foreground = ops.cumsum(counts[:, :, 0], axis=1)
    background = ops.cumsum(counts[:, :, 1], axis=1)
    size = foreground[:, -1:]
    # The Jaccard loss after each (level, fg) and each (level, bg) bin, in order.
    after_fg = 1.0 - (size - foreground) / ops.maximum(size + ops.pad(background[:, :-1], ((0, 0), (1, 0))), 1e-6)
    after_bg = 1.0 - (size - foreground) / ops.maximum(size + background, 1e-6)
    after = ops.reshape(ops.stack([after_fg, after_bg], axis=-1), (num_classes, 2 * levels))
    before = ops.pad(after[:, :-1], ((0, 0), (1, 0)))
    increments = (after - before) / ops.maximum(ops.reshape(counts, (num_classes, 2 * levels)), 1.0)
    gradient = ops.take(ops.reshape(increments, (-1,)), bins)  # (N, C): each pixel's bin's
    losses = ops.sum(errors * counted * ops.stop_gradient(gradient), axis=0)
    present = ops.cast(size[:, 0] > 0, "float32")
    return ops.sum(losses * present) / ops.maximum(ops.sum(present), 1.0)


def lovasz_softmax(y_true, y_pred, sample_weight=None, num_classes: int | None = None):
    """The Lovász-softmax loss (Berman et al. 2018), averaged over the classes present.

    Per class c: the pixels' errors e = |y_c - p_c| in decreasing order, dotted with the
    Lovász extension's gradient of the Jaccard loss at that order (the increments of
    1 - |intersection| / |union| as pixels are added one by one). Pixels of weight 0 count
    in neither intersection nor union, and carry no loss, so they change nothing.

    The order comes from a counting sort rather than a sort: errors are binned into
    LOVASZ_LEVELS levels (foreground before background within a level), the Jaccard
    increments are taken per bin from cumulative counts, and each pixel gets its bin's mean
    increment. That is the exact loss wherever the errors fall in distinct bins (ties within
    a bin only reorder equal-error pixels, to within 1/LOVASZ_LEVELS of the error), and costs
    O(pixels): sorting a batch of 8 tiles of 256 px for 7 classes took 0.7 s on 2 cores, the
    counting 0.05 s. As in the paper the increments are constants to the gradient, which
    flows through the errors.
    """
    num_classes = num_classes or y_pred.shape[-1]
    return _lovasz(*_flat(y_true, y_pred, sample_weight, num_classes))


def segmentation_loss(name: str, num_classes: int):
    """The Keras loss for --loss `name` (see LOSSES and the module docstring).

    Called as loss(y_true, y_pred, sample_weight): cross-entropy takes the sample weights as
    Keras's SparseCategoricalCrossentropy does (the sum of weighted pixel losses over the
    pixel count), the IoU terms only which pixels count. The terms share one flattening and
    one-hot truth.
    """
    import keras

    if name not in LOSSES:
        raise ValueError(f"loss {name!r}: choose one of {', '.join(LOSSES)}")
    parts = name.split("+")
    terms = {"dice": _soft_dice, "lovasz": _lovasz}

    class SegmentationLoss(keras.losses.Loss):
        def __init__(self):
            super().__init__(name=name.replace("+", "_"))

        def __call__(self, y_true, y_pred, sample_weight=None):
            probabilities, truth, mask = _flat(y_true, y_pred, sample_weight, num_classes)
            value = 0.0
            for part in parts:
                if part == "ce":
                    term = _cross_entropy(probabilities, truth, _weights(sample_weight, probabilities))
                else:
                    term = terms[part](probabilities, truth, mask)
                value = value + replica_share(term)
            return value

        def call(self, y_true, y_pred):  # only __call__ is used: these losses are not per pixel
            raise NotImplementedError

    return SegmentationLoss()


def replica_share(value):
    """A replica's share of a loss value under tf.distribute: value / replicas in sync.

    Keras's own losses divide so (keras.src.losses.loss.scale_loss_for_distribution), and
    fit and osmseg/distributed.py multiply the logged loss back and sum the replicas'
    gradients; a term that skipped the division would count once per replica. Each replica's
    IoU term is of its own share of the batch (a set measure, not a mean of pixels), so the
    sum is the replicas' average of it.
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            return value / replicas
    return value


def background_weights(class_weights: Sequence[float] | None, num_classes: int, factor: float):
    """Class weights with background's (class 0) multiplied by `factor` (None stays None at 1)."""
    if factor == 1:
        return class_weights
    weights = np.ones(num_classes, np.float32) if class_weights is None else np.array(class_weights, np.float32)
    weights[0] *= factor
    return weights


# --- Repeat-factor sampling -------------------------------------------------------------


def repeat_factors(presence, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """How often to draw each training tile, relative to a tile of common classes only.

    Class c, found in a share f_c of the tiles, gets r_c = max(1, sqrt(threshold / f_c)); a
    tile gets the largest r_c of the classes it holds (1 if it holds none). Classes found in at
    least `threshold` of the tiles are not repeated; the square root is LVIS's compromise
    between drawing a rare class's tiles as often as they come and as often as a common one's.

    Args:
        presence: bool (N, C): whether tile n holds class c.
        threshold: a share of tiles in (0, 1].

    Returns:
        (tile factors float64 (N,) >= 1, class factors float64 (C,) >= 1; 1 for a class in no tile).
    """
    presence = np.asarray(presence, dtype=bool)
    if presence.ndim != 2 or not len(presence):
        raise ValueError(f"presence: need a (tiles, classes) array with at least one tile, got shape {presence.shape}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold {threshold!r}: use a share of tiles in (0, 1]")
    share = presence.mean(axis=0)
    with np.errstate(divide="ignore"):
        classes = np.where(share > 0, np.sqrt(threshold / np.maximum(share, 1e-300)), 1.0)
    classes = np.maximum(classes, 1.0)
    tiles = np.where(presence, classes, 1.0).max(axis=1)
    return tiles, classes


# --- Time budget ----------------------------------------------------------------------


def plan_epochs(budget_seconds: float, first_epoch_seconds: float, most: int) -> int:
    """How many epochs fit a budget, from the first epoch's time (at least 1, at most `most`).

    The first epoch includes tracing the model, so later ones are a little faster and the
    plan errs on the side of finishing early.
    """
    if first_epoch_seconds <= 0:
        return most
    return max(1, min(most, int(budget_seconds // first_epoch_seconds)))


def budget_callback(state, budget_seconds: float, max_epochs: int, steps_per_epoch: int, schedule=None, log=print):
    """A Keras callback for --time-budget: after the run's first epoch it fixes the epoch count
    (state.planned_epochs, saved with the resume state), re-plans the schedule's total steps
    to end with it, and stops training once that many epochs are done. A resumed run keeps
    the recorded plan, so it ends where an uninterrupted run would."""
    import keras

    class Budget(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = CLOCK()

        def on_epoch_end(self, epoch, logs=None):
            if state.planned_epochs is None:
                seconds = CLOCK() - self.started
                state.planned_epochs = plan_epochs(budget_seconds, seconds, max_epochs)
                if schedule is not None:
                    schedule.total_steps.assign(float(state.planned_epochs * steps_per_epoch))
                short = " (the budget is shorter than one epoch)" if seconds > budget_seconds else ""
                log(
                    f"time budget {budget_seconds / 60:g} min: epoch 1 took {seconds:.0f} s, "
                    f"so the run trains {state.planned_epochs} epochs{short}"
                )
            if epoch + 1 >= state.planned_epochs:
                self.model.stop_training = True

    return Budget()
