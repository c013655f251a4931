#!/usr/bin/env python3
"""Train a SegNet on the training cache: best weights, resume state, a log and its curves.

Reads data/training.hdf5 (prepare.py cache or import), holds back a seeded validation split,
streams batches from the cache, and after every epoch writes:

- weights.hdf5: the best weights so far by validation mean IoU (by training mean IoU with
  --validation 0; model.save's layout, with the model, classes and training settings in its
  attributes);
- weights.state.h5: the last epoch's full state (weights, optimizer, epoch, best score, log)
  for --resume (layout in osmseg/training.py);
- training_log.csv and training_log.png: per-epoch loss, pixel accuracy, mean IoU (training
  and validation) and the validation IoU of every class (columns in osmseg/training.py).

A NaN loss stops the run with exit status 1; the files above keep the last good epoch.

--distribute trains on every GPU of this machine with model.fit (MirroredStrategy); with
TF_CONFIG set it trains across machines with osmseg/distributed.py's loop (the README's
"More than one GPU"), where a lost worker also ends the run with exit status 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from osmseg import cli, distributed, recipe
from osmseg.commands import options
from osmseg.errors import UserError

# TensorFlow's C++ start-up chatter hides the progress bars; warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

OPTIMIZERS = ("sgd", "adam")

SGD_MOMENTUM = 0.9  # the seed's optimizer


def build_parser():
    import argparse

    from model import MODELS

    parser = options.parser(prog="train.py", description=__doc__)
    parser.add_argument("--data", default="data/training.hdf5", help="the training cache (prepare.py cache or import)")
    parser.add_argument(
        "--weights", default="weights.hdf5", help="where to write the best weights (the resume state goes beside it)"
    )
    parser.add_argument(
        "--log", default="training_log.csv", help="the per-epoch CSV log (its curves go beside it as .png)"
    )
    parser.add_argument("--model", default="segnet", choices=MODELS, help="architecture")
    parser.add_argument("--width", type=options.positive_float, default=1.0, help="width multiplier of every layer's filters")
    parser.add_argument(
        "--epochs",
        type=options.positive_int,
        default=10,
        help="epochs to train in total (a resumed run counts the finished ones)",
    )
    parser.add_argument("--batch-size", type=options.positive_int, default=16, help="tiles per batch (across all devices)")
    parser.add_argument("--learning-rate", type=options.positive_float, default=0.001, help="the optimizer's learning rate")
    parser.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help=f"sgd (momentum {SGD_MOMENTUM}) or adam")
    parser.add_argument(
        "--validation", type=options.fraction, default=0.2, help="share of the cache held back for validation (0: none)"
    )
    parser.add_argument(
        "--class-weights",
        default="none",
        metavar="none|median-frequency|FILE",
        help="loss weight per class: none, median-frequency (SegNet paper, from the training labels), "
        "or a file (JSON list or {class: weight}, or CSV name,weight)",
    )
    parser.add_argument(
        "--schedule",
        default="cosine",
        choices=recipe.SCHEDULES,
        help="learning rate over the run: cosine (linear warm-up to --learning-rate, then half a cosine down to "
        f"{recipe.FLOOR:g} of it at the last step) or constant (the seed's)",
    )
    parser.add_argument(
        "--warmup-epochs",
        type=options.non_negative_float,
        default=1.0,
        help="cosine: epochs of linear warm-up (fractions allowed)",
    )
    parser.add_argument(
        "--loss",
        default="ce+lovasz",
        choices=recipe.LOSSES,
        help="ce: cross-entropy weighted by the class weights (the seed's); +dice / +lovasz add a term that "
        "targets IoU (soft Dice, or Lovász-softmax), averaged over the classes present in a batch; dice and "
        "lovasz alone drop the cross-entropy. Pixels labelled 255 count in none",
    )
    parser.add_argument(
        "--background-weight",
        type=options.non_negative_float,
        default=1.0,
        help="multiply background's loss weight by this (below 1: an unlabelled OSM pixel is often an unmapped "
        "object, so calling it what the imagery shows costs less)",
    )
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random flips and 90° turns of training tiles, with --jitter colour changes",
    )
    parser.add_argument(
        "--jitter",
        type=options.fraction,
        default=0.1,
        help="with --augment: brightness, contrast and per-channel colour changes of up to this fraction "
        "(0: none); imagery providers and seasons differ in these",
    )
    parser.add_argument(
        "--repeat-threshold",
        type=options.fraction,
        default=0.0,
        metavar="SHARE",
        help="repeat-factor sampling (LVIS, Gupta et al. 2019): a class found in fewer than this share of "
        "the training tiles has its tiles drawn sqrt(SHARE / its share) times as often as the others, "
        "each epoch still reading as many tiles as there are (0: every tile once an epoch)",
    )
    parser.add_argument(
        "--bn-momentum",
        type=options.fraction,
        default=0.9,
        help="batch norm's running-average momentum (Keras's 0.99 needs hundreds of steps to settle; "
        "0.9 suits short runs)",
    )
    parser.add_argument(
        "--time-budget",
        type=options.positive_float,
        default=None,
        metavar="MINUTES",
        help="time the first epoch (with its validation), then train only as many epochs as fit (at most "
        "--epochs), the schedule planned to end with them; recorded in the state, so --resume keeps the plan",
    )
    parser.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="16-bit activations (float16 on GPUs, bfloat16 on CPUs)",
    )
    parser.add_argument(
        "--jit-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the training step with XLA (default: on where a GPU is present; on CPUs oneDNN is faster)",
    )
    parser.add_argument(
        "--encoder-weights", default="none", metavar="none|imagenet|FILE", help="initial encoder weights (segnet only)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights, data order and augmentation, and of the validation split unless "
        "--split-seed is given",
    )
    parser.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="seed of the validation split alone (default: --seed); fix it to compare training seeds on the same "
        "held-back tiles",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run recorded in the weights' state file, if any (same settings; --epochs may grow)",
    )
    parser.add_argument(
        "--distribute",
        action="store_true",
        help="train on all local GPUs (tf.distribute.MirroredStrategy), or across machines when TF_CONFIG is set",
    )
    parser.add_argument(
        "--peer-timeout",
        type=options.non_negative_float,
        default=distributed.PEER_TIMEOUT,
        metavar="SECONDS",
        help="across machines: stop with an error when the other workers do not answer for this long "
        f"(0: wait for ever); a dead worker is noticed within about {distributed.HEARTBEAT_TIMEOUT:g} s anyway",
    )
    parser.add_argument(
        "--workers",
        type=options.positive_int,
        default=2,
        help="threads loading batches from the cache (with 1, Keras reads through a tf.data generator "
        "that stalled the start of every second to fourth demo epoch by about 3 s)",
    )
    return parser


def distribution_strategy(tf_config: str | None, peer_timeout: float = distributed.PEER_TIMEOUT):
    """MultiWorkerMirroredStrategy when TF_CONFIG is set (trained by osmseg.distributed.fit:
    Keras 3's fit cannot run under it, keras-team/keras#20585), else MirroredStrategy over
    local GPUs (or CPUs)."""
    import tensorflow as tf

    if tf_config:
        return distributed.make_strategy(distributed.parse_tf_config(tf_config), peer_timeout)
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


def is_chief(tf_config: str | None) -> bool:
    """Whether this process writes the outputs: always, unless it is a non-chief multi-worker task."""
    return not tf_config or distributed.parse_tf_config(tf_config).is_chief


def _make_optimizer(name: str, learning_rate):
    import keras

    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=SGD_MOMENTUM)


def run_settings(args, info) -> dict:
    """Every setting that decides the result of a run: a resumed run must match all of them.

    The epoch count is not one of them (a finished run may be extended), nor are the speed
    knobs (--jit-compile, --workers, --distribute).
    """
    settings = {
        "data": os.path.normpath(args.data),  # as given, so that a moved checkout still resumes
        # A cache rebuilt in place holds other data: its build parameters (with the
        # fingerprint of its inputs) and its length tell.
        "cache": hashlib.sha1(json.dumps(info.attrs.get("params"), sort_keys=True, default=str).encode()).hexdigest()[
            :12
        ],
        "tiles": info.length,
        "model": args.model,
        "width": args.width,
        "tile_size": info.tile_size,
        "classes": [[c.name, c.hex] for c in info.classes.classes],
        "validation": args.validation,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "optimizer": args.optimizer,
        "class_weights": args.class_weights,
        "augment": args.augment,
        "jitter": args.jitter if args.augment else 0.0,
        "schedule": args.schedule,
        "warmup_epochs": args.warmup_epochs if args.schedule == "cosine" else None,
        "loss": args.loss,
        "background_weight": args.background_weight,
        "bn_momentum": args.bn_momentum,
        "time_budget": args.time_budget,
        "mixed_precision": args.mixed_precision,
        "encoder_weights": args.encoder_weights,
        "seed": args.seed,
    }
    # Only where they differ from their defaults, so that runs from before these flags still resume.
    if split_seed(args) != args.seed:
        settings["split_seed"] = args.split_seed
    if args.repeat_threshold:
        settings["repeat_threshold"] = args.repeat_threshold
    return settings


def split_seed(args) -> int:
    """The seed that picks the held-back tiles: --split-seed, or --seed."""
    return args.seed if args.split_seed is None else args.split_seed


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tf_config = os.environ.get("TF_CONFIG") if args.distribute else None
    cluster = distributed.parse_tf_config(tf_config) if tf_config else None

    from osmseg import cache, training

    info = cache.open_cache(args.data)
    if info.length == 0:
        raise UserError(f"{args.data}: the cache holds no tiles; rebuild it (make data/training.hdf5) with more tiles")
    names = info.classes.names
    train_indices, validation_indices = cache.split_indices(info.length, args.validation, split_seed(args))
    if args.validation > 0 and len(validation_indices) == 0:
        raise UserError(
            f"--validation {args.validation} of {info.length} tiles holds back none; "
            "raise it, use a bigger cache, or pass --validation 0"
        )
    if args.batch_size > len(train_indices):
        raise UserError(
            f"--batch-size {args.batch_size} is larger than the {len(train_indices)} training tiles of {args.data} "
            f"(after holding back {len(validation_indices)} for validation); pass --batch-size {len(train_indices)} or less"
        )
    encoder_weights = None if args.encoder_weights == "none" else args.encoder_weights

    settings = run_settings(args, info)
    state_file = training.state_path(args.weights)
    monitor = training.MONITOR if len(validation_indices) else "mean_iou"
    resuming = args.resume and state_file.exists()
    if resuming:
        state = training.read_state(state_file)
        training.check_resumable(state, settings, state_file)
        if state.epoch >= (state.planned_epochs or args.epochs):
            planned = f"the time budget's {state.planned_epochs}" if state.planned_epochs else f"--epochs {args.epochs}"
            print(f"{state_file}: {state.epoch} epochs already trained ({planned}); nothing to do")
            return 0
    else:
        state = training.TrainState(settings=settings, monitor=monitor)
        if args.resume:
            print(f"{state_file}: no run to resume; starting from epoch 1")
        elif state_file.exists():
            print(f"{state_file}: starting over (pass --resume to continue the run recorded there)", file=sys.stderr)

    class_weights = training.resolve_class_weights(args.class_weights, args.data, train_indices, names)
    class_weights = recipe.background_weights(class_weights, len(names), args.background_weight)
    if class_weights is not None:
        listed = ", ".join(f"{name} {weight:.3g}" for name, weight in zip(names, class_weights))
        background = f", background × {args.background_weight:g}" if args.background_weight != 1 else ""
        print(f"class weights ({args.class_weights}{background}): {listed}")
    if args.time_budget is not None and cluster is not None:
        raise UserError(
            "--time-budget across machines: each worker would plan its own epoch count; pass --epochs instead"
        )
    # The schedule runs over the epochs planned: --epochs, or what the time budget fixed.
    steps_per_epoch = -(-len(train_indices) // args.batch_size)
    planned_epochs = state.planned_epochs or args.epochs

    keras = cli.import_keras()  # without TensorFlow's start-up chatter

    import model as model_module

    # Before anything else touches TensorFlow: multi-worker collectives are configured when
    # the strategy is made, and TensorFlow refuses once its context is initialised.
    strategy = distribution_strategy(tf_config, args.peer_timeout) if args.distribute else None
    keras.backend.clear_session()
    keras.utils.set_random_seed(args.seed)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        try:
            net = model_module.build(
                args.model,
                info.classes.num_classes,
                input_size=info.tile_size,
                width=args.width,
                encoder_weights=encoder_weights,
                mixed_precision=args.mixed_precision,
                seed=args.seed,
                bn_momentum=args.bn_momentum,
            )
        except ValueError as error:
            raise UserError(f"cannot build {args.model} for {args.data}: {error}") from None
        if cluster is not None:  # its loop leaves out a last batch too small for every replica
            steps_per_epoch = distributed.steps_per_epoch(
                len(train_indices), args.batch_size, strategy.num_replicas_in_sync
            )
        learning_rate = recipe.learning_rate(
            args.schedule, args.learning_rate, steps_per_epoch, planned_epochs, args.warmup_epochs
        )
        optimizer = model_module.training_optimizer(_make_optimizer(args.optimizer, learning_rate), args.mixed_precision)
        jit_compile = model_module.jit_compile_default() if args.jit_compile is None else args.jit_compile
        net.compile(
            optimizer=optimizer,
            loss=recipe.segmentation_loss(args.loss, info.classes.num_classes),
            weighted_metrics=training.streaming_metrics(names),
            jit_compile=jit_compile,
        )
        if resuming:
            optimizer.build(net.trainable_variables)
            training.restore_variables(state_file, net, optimizer)
    if cluster is not None:
        role = "the chief, which writes the outputs" if cluster.is_chief else f"{cluster.name(0)} writes the outputs"
        print(
            f"training on {strategy.num_replicas_in_sync} replicas on {cluster.workers} workers "
            f"(MultiWorkerMirroredStrategy); this is {cluster.name()}, {role}"
        )
    elif strategy is not None:
        print(f"training on {strategy.num_replicas_in_sync} replicas ({type(strategy).__name__})")

    config = {
        "name": args.model,
        "width": args.width,
        "input_size": info.tile_size,
        "num_classes": info.classes.num_classes,
        "classes": info.classes.to_json(),
        "mixed_precision": args.mixed_precision,
        "bn_momentum": args.bn_momentum,
        "training": {key: value for key, value in settings.items() if key not in ("classes", "tile_size")}
        | {"class_weight_values": None if class_weights is None else [float(w) for w in class_weights]},
    }

    def save_weights(net, epoch, score):
        model_module.save(net, args.weights, config | {"epoch": epoch, monitor: score})

    log_file = Path(args.log)
    checkpoint = training.checkpoint_callback(
        state,
        names=names,
        save_weights=save_weights,
        state_file=state_file,
        log_file=log_file,
        plot_file=log_file.with_suffix(".png"),
        write_files=cluster is None or cluster.is_chief,
    )
    tile_weights = None
    if args.repeat_threshold:
        presence = training.tile_class_presence(args.data, train_indices, len(names))
        tile_weights, factors = recipe.repeat_factors(presence, args.repeat_threshold)
        shares = presence.mean(axis=0)
        repeated = [
            f"{name} ({share:.0%} of tiles) ×{factor:.2f}"
            for name, share, factor in zip(names, shares, factors)
            if factor > 1
        ]
        none = f"no class is in fewer than {args.repeat_threshold:.0%} of the tiles"
        print(f"repeat-factor sampling (--repeat-threshold {args.repeat_threshold:g}): {', '.join(repeated) or none}")
    loader = {"workers": args.workers, "use_multiprocessing": False}
    train_batches = cache.make_batches(
        args.data,
        train_indices,
        args.batch_size,
        shuffle=True,
        augment=args.augment,
        seed=args.seed,
        class_weights=class_weights,
        jitter=args.jitter,
        tile_weights=tile_weights,
        **loader,
    )
    validation_batches = None
    if len(validation_indices):
        validation_batches = cache.make_batches(
            args.data,
            validation_indices,
            args.batch_size,
            shuffle=False,
            augment=False,
            seed=args.seed,
            class_weights=class_weights,
            **loader,
        )
    # The order and augmentation of an epoch depend only on (seed, epoch): a resumed run
    # starts where the interrupted one stopped.
    train_batches.set_epoch(state.epoch)
    print(
        f"training {args.model} (width {args.width}) on {len(train_indices)} tiles, validating on "
        f"{len(validation_indices)}, epochs {state.epoch + 1}..{planned_epochs}"
    )
    callbacks = [training.progress_callback()]
    if args.time_budget is not None:
        schedule = learning_rate if args.schedule == "cosine" else None
        callbacks.append(
            recipe.budget_callback(state, args.time_budget * 60, args.epochs, steps_per_epoch, schedule)
        )
    callbacks.append(checkpoint)  # last: it saves what the others decided (the budget's plan)
    if cluster is None:
        net.fit(
            train_batches,
            validation_data=validation_batches,
            epochs=planned_epochs,
            initial_epoch=state.epoch,
            shuffle=False,  # the batches reshuffle themselves from (seed, epoch); fit's shuffle is unseeded
            callbacks=callbacks,
            verbose=0,
        )
    else:
        try:
            distributed.fit(
                net,
                strategy,
                cluster,
                train_batches,
                validation_batches,
                epochs=planned_epochs,
                initial_epoch=state.epoch,
                callbacks=callbacks,
                make_metrics=lambda: training.streaming_metrics(names),
                jit_compile=jit_compile,
                threads=args.workers,
                peer_timeout=args.peer_timeout,
            )
        except distributed.ClusterError as error:
            kept = f"{state_file} keeps epoch {state.epoch}" if state.epoch else "no epoch was finished"
            print(
                f"error: {error}. Stopped in epoch {error.epoch}, batch {error.batch}; {kept}: start every worker "
                "again with --resume to continue",
                file=sys.stderr,
            )
            return 1
    if checkpoint.diverged is not None:
        epoch, batch = checkpoint.diverged
        kept = f"{args.weights} keeps epoch {state.best_epoch}" if state.best_epoch else "this run wrote no weights"
        print(
            f"error: the loss became NaN in epoch {epoch} (batch {batch}); {kept}, and {state_file} epoch "
            f"{state.epoch}. Lower --learning-rate (now {args.learning_rate}) or try --no-mixed-precision, "
            "then train again",
            file=sys.stderr,
        )
        return 1
    best = f"{state.monitor} {state.best:.4f} at epoch {state.best_epoch}" if state.best_epoch else "no finite score"
    if cluster is not None and not cluster.is_chief:
        print(f"done: {best}; {cluster.name(0)}, the chief, wrote the outputs")
        return 0
    print(f"done: {best}; wrote {args.weights}, {log_file} and {log_file.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
