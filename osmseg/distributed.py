"""Training across machines: a training loop of our own under tf.distribute.MultiWorkerMirroredStrategy.

train.py trains with model.fit on one process, and on every GPU of one machine through
MirroredStrategy. Across machines fit cannot be used: Keras 3's fit does not run under
MultiWorkerMirroredStrategy (keras-team/keras#20585; with Keras 3.15 it fails building the
metrics from a distributed batch, then reducing scalar logs along axis 0). So with TF_CONFIG
set, train.py calls fit() here instead. It drives the same Keras model, optimizer, compiled
loss, metrics and callbacks; only the loop is ours.

One step, on every replica (one per GPU of every worker; the CPU of a worker without one):

- the model runs on the replica's share of the global batch under strategy.run, and the
  compiled loss (model.compute_loss) is taken of it. Keras divides a replica's loss by the
  number of replicas (keras.src.losses.loss.scale_loss_for_distribution), which makes the
  summed gradients those of the global batch's mean when the shares are equal; a share of n
  of the step's N tiles on R replicas is weighted n·R/N besides, so that uneven shares (a last
  partial batch) are exact too;
- the Keras optimizer's apply_gradients sums the gradients of all replicas before updating
  (an all-reduce, in keras.src.backend.tensorflow.optimizer.TFOptimizer), so every replica
  makes the same update and the weights stay identical everywhere;
- the metrics (and a Mean of the loss, as fit keeps) count the replica's pixels in its own
  copy of their state; then one all-reduce sums every metric variable over all replicas into
  a second set of the same metrics on the host, which the logs are read from. So the logs
  count every worker's pixels, and every worker gets the same logs.

At the end of every epoch, before validation and checkpointing, the non-trainable float
variables (batch normalisation's moving mean and variance) are averaged over the replicas:
Keras 3 gives them no aggregation, so each replica's copy follows its own share of the data
(Keras 2 made them sync-on-read MEAN variables, which gave this average on reading). Then the
callbacks get what fit gives them: set_model and params (epochs, steps); on_train_begin/end;
on_epoch_begin/end with fit's keys (``loss``, every metric, and their ``val_`` versions);
on_train_batch_begin/end with the running logs; on_test_begin/end and on_test_batch_begin/end.
model.stop_training is agreed between the workers after every batch and every epoch: all stop
at the same step when any worker's callbacks ask (a time budget reads each host's clock).

Data: every worker computes the same epoch order (cache.BatchReader, from (seed, epoch)) and
reads only its replicas' rows of each global batch, shared between replicas as np.array_split
does. An epoch has the same number of steps on every worker, so collectives always pair up:
ceil(tiles / batch), less a last partial batch with fewer tiles than replicas, which that epoch
leaves out (no replica may train on an empty batch; the next epoch's order differs). Validation
batches are shared the same way, so every validation tile is counted once.

A worker that dies makes the others raise rather than hang, and fit() raises ClusterError
(train.py: a message and exit status 1):

- a killed process on a live host: its connections reset, and the next collective fails at
  once;
- a host that died, or a frozen process: TensorFlow's coordination service, led by the
  chief, misses its heartbeats for HEARTBEAT_TIMEOUT seconds and aborts every collective
  (a worker that loses the chief's heartbeat does the same);
- a worker that lives but stops taking part (a hung filesystem, say): any collective that
  waits longer than the peer timeout (--peer-timeout, default PEER_TIMEOUT, through
  tf.distribute.experimental.CommunicationOptions) fails.

Only the chief writes files (training.checkpoint_callback's write_files), after each epoch,
so every worker can be started again with --resume from the last finished epoch.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from osmseg.errors import UserError

# Seconds a collective waits for the other workers before failing (--peer-timeout's default).
# It must outlast the longest legitimate wait: the chief writing weights.hdf5 and the state
# file after an epoch (about 470 MB for segnet with Adam) while the others wait at the epoch's
# closing collective, or the slowest worker's first step (tracing, XLA compilation).
PEER_TIMEOUT = 300.0

# TensorFlow's coordination service declares a task dead after this many seconds without a
# heartbeat (kDefaultHeartbeatTimeoutMs in tsl's coordination_service.cc; measured here: 9-10 s).
HEARTBEAT_TIMEOUT = 10.0

TRAINING_JOBS = ("chief", "worker")


class ClusterError(Exception):
    """Another worker died or stopped answering, so this one cannot go on (exit status 1)."""

    def __init__(self, message: str, epoch: int, batch: int):
        super().__init__(message)
        self.epoch, self.batch = epoch, batch  # 1-based, where it stopped


@dataclass(frozen=True)
class Cluster:
    """This process's place among the training tasks that TF_CONFIG lists.

    Attributes:
        tasks: (job, index) of every training task in TensorFlow's order: the chief first,
            if the cluster lists one, then the workers by index (tensorflow's
            multi_worker_util.id_in_cluster numbers them so; replica ids follow it).
        addresses: host:port of each task, in the same order.
        index: this process's position in that order; 0 is the chief, which writes the outputs.
    """

    tasks: tuple[tuple[str, int], ...]
    addresses: tuple[str, ...]
    index: int

    @property
    def workers(self) -> int:
        return len(self.tasks)

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    def name(self, index: int | None = None) -> str:
        """'worker 1 (b.lan:12345)' for a position in the cluster (default: this process's)."""
        index = self.index if index is None else index
        return f"worker {index} ({self.addresses[index]})"


def parse_tf_config(text: str) -> Cluster:
    """Read TF_CONFIG: {"cluster": {"chief": [host:port], "worker": [host:port, ...]},
    "task": {"type": "chief" or "worker", "index": i}}; "chief" is optional.

    Raises:
        UserError: the text is not such a configuration, naming what is wrong.
    """
    where = "TF_CONFIG"
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{where} is not valid JSON ({error}); see the README's section 'More than one GPU'") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise UserError(f"{where} has no \"cluster\" object; see the README's section 'More than one GPU'")
    cluster = config["cluster"]
    others = sorted(set(cluster) - set(TRAINING_JOBS))
    if others:
        raise UserError(
            f"{where} lists {', '.join(others)} tasks; train.py runs only chief and worker tasks "
            "(MultiWorkerMirroredStrategy), so remove them"
        )
    tasks, addresses = [], []
    for job in TRAINING_JOBS:
        hosts = cluster.get(job, [])
        if not isinstance(hosts, list) or not all(isinstance(host, str) and ":" in host for host in hosts):
            raise UserError(f'{where}: cluster "{job}" must be a list of "host:port" strings')
        if job == "chief" and len(hosts) > 1:
            raise UserError(f'{where}: cluster "chief" lists {len(hosts)} hosts; a cluster has at most one chief')
        tasks += [(job, index) for index in range(len(hosts))]
        addresses += hosts
    if not tasks:
        raise UserError(f'{where}: the cluster lists no "worker" (or "chief") hosts')
    task = config.get("task", {})
    if not isinstance(task, dict) or task.get("type") not in TRAINING_JOBS:
        raise UserError(f'{where}: "task" must say {{"type": "worker" or "chief", "index": i}} for this process')
    job, index = task["type"], task.get("index", 0)
    if not isinstance(index, int) or (job, index) not in tasks:
        count = sum(1 for name, _ in tasks if name == job)
        raise UserError(f'{where}: task {job} {index!r} is not in the cluster, which lists {count} {job} hosts')
    return Cluster(tuple(tasks), tuple(addresses), tasks.index((job, index)))


def replica_offsets(tiles: int, replicas: int) -> np.ndarray:
    """Where each replica's rows of a batch of `tiles` start, then the end: int64 (replicas + 1,).

    np.array_split's shares: the first tiles % replicas replicas get one tile more.
    """
    sizes = np.full(replicas, tiles // replicas, dtype=np.int64)
    sizes[: tiles % replicas] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def steps_per_epoch(tiles: int, batch_size: int, replicas: int) -> int:
    """Training steps of an epoch: the global batches, less a last one too small to give every
    replica a tile."""
    steps, last = divmod(tiles, batch_size)
    return steps + (1 if last >= replicas else 0)


def make_strategy(cluster: Cluster, peer_timeout: float = PEER_TIMEOUT):
    """MultiWorkerMirroredStrategy over the cluster in TF_CONFIG (`cluster` is what it says
    of this process), whose collectives fail after waiting peer_timeout seconds for the other
    workers (0: wait for ever).

    Make it before anything else touches TensorFlow: the collectives are configured with the
    eager context, and TensorFlow refuses once that has started. It returns once every worker
    has joined.

    Raises:
        UserError: this process cannot listen at its address.
    """
    import tensorflow as tf

    timeout = peer_timeout if peer_timeout > 0 else None
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except tf.errors.UnknownError as error:
        # TensorFlow says only "Could not start gRPC server": the port is taken, or the host
        # name is not this machine's.
        raise UserError(
            f"TF_CONFIG: {cluster.name()} cannot listen at {cluster.addresses[cluster.index]} ({error.message}); "
            "give it a free port of this host in TF_CONFIG"
        ) from None


def _peer_errors() -> tuple[type[Exception], ...]:
    """The errors TensorFlow's collectives raise when a peer has gone: unreachable, timed out,
    aborted by the coordination service, or restarted (FailedPrecondition, as
    collective_all_reduce_strategy's health check notes)."""
    import tensorflow as tf

    errors = tf.errors
    return (
        errors.UnavailableError,
        errors.DeadlineExceededError,
        errors.CancelledError,
        errors.AbortedError,
        errors.FailedPreconditionError,
    )


def describe_failure(error: Exception, cluster: Cluster, peer_timeout: float) -> str:
    """One line on why the collectives failed, from TensorFlow's error text."""
    text = getattr(error, "message", None) or str(error)
    # TensorFlow names the peer as /job:worker/replica:0/task:1 where it knows it.
    peers = {(job, int(task)) for job, task in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", text)}
    lost = sorted(cluster.tasks.index(peer) for peer in peers if peer in cluster.tasks)
    lost = [index for index in lost if index != cluster.index]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in lines if "aborted by" in line or "timed out" in line), lines[0] if lines else "")
    if lost:
        what = f"lost {', '.join(cluster.name(index) for index in lost)}: it died, or its host or network is down"
    elif "timed out" in text:
        what = f"the other workers did not answer for {peer_timeout:g} s (--peer-timeout)"
    elif "heartbeat" in text.lower():
        what = f"lost the chief's coordination service ({cluster.name(0)}): no heartbeat for {HEARTBEAT_TIMEOUT:g} s"
    else:
        what = "lost contact with the other workers"
    return f"{cluster.name()}: {what} [{type(error).__name__}: {detail[:300]}]"


def _prefetched(read: Callable[[int], object], count: int, threads: int) -> Iterator:
    """read(0), ..., read(count - 1), in order, with up to `threads` + 1 reads started ahead."""
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="osmseg-read")
    pending: deque = deque()
    started = 0
    try:
        for _ in range(count):
            while started < count and len(pending) <= threads:
                pending.append(pool.submit(read, started))
                started += 1
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Replicas:
    """The compiled steps and the reductions of one run (see the module docstring)."""

    def __init__(self, net, strategy, cluster: Cluster, make_metrics: Callable[[], list], jit_compile: bool):
        import keras
        import tensorflow as tf

        self.net, self.strategy, self.cluster = net, strategy, cluster
        self.replicas = strategy.num_replicas_in_sync
        self.local = len(strategy.extended.worker_devices)
        # Replica r of the cluster lives on worker r // local (TensorFlow numbers them so:
        # collective_all_reduce_strategy's _experimental_distribute_values_from_function).
        # TensorFlow takes every worker to have as many devices as this one (its replica
        # count is local × workers), so every worker must have the same number of GPUs.
        self.first = cluster.index * self.local
        with strategy.scope():
            self.metrics = [keras.metrics.Mean(name="loss"), *make_metrics()]
        self.host_metrics = [keras.metrics.Mean(name="loss"), *make_metrics()]
        self.variables = [variable for metric in self.metrics for variable in metric.variables]
        self.host_variables = [variable for metric in self.host_metrics for variable in metric.variables]
        if [m.name for m in self.metrics] != [m.name for m in self.host_metrics] or [
            tuple(v.shape) for v in self.variables
        ] != [tuple(v.shape) for v in self.host_variables]:
            raise ValueError("make_metrics must return the same metrics every time it is called")
        self.averaged = [v for v in net.non_trainable_variables if "float" in str(v.dtype)]
        optimizer = net.optimizer
        loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        replicas = self.replicas

        def forward_backward(images, targets, weights, share):
            with tf.GradientTape() as tape:
                probabilities = net(images, training=True)
                loss = net.compute_loss(images, targets, probabilities, weights, training=True)
                scaled = optimizer.scale_loss(loss * share)
            return loss, probabilities, tape.gradient(scaled, net.trainable_variables)

        if jit_compile:
            # Only the model's own work goes to XLA; the all-reduce and the update stay outside.
            forward_backward = tf.function(forward_backward, jit_compile=True)

        def replica_train(images, targets, weights, global_tiles):
            context = tf.distribute.get_replica_context()
            tiles = tf.shape(images)[0]
            share = tf.cast(tiles * replicas, tf.float32) / tf.cast(global_tiles, tf.float32)
            loss, probabilities, gradients = forward_backward(images, targets, weights, share)
            if loss_scaling:
                # LossScaleOptimizer checks for inf/NaN on each replica's gradients before they
                # are summed (its _common_apply, under strategies without merge_call): replicas
                # that disagree would take different branches, one into the all-reduce and one
                # not, and wait for each other until the peer timeout. Agree first: all skip
                # the step (and lower the scale) if any replica's gradients overflowed.
                finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in gradients if g is not None])
                everywhere = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(finite, tf.float32)) >= replicas
                poison = tf.where(everywhere, 1.0, float("nan"))
                gradients = [None if g is None else g * tf.cast(poison, g.dtype) for g in gradients]
            optimizer.apply_gradients(zip(gradients, net.trainable_variables))
            self._count(loss, tiles, targets, probabilities, weights)
            return self._sum_metric_state(context)

        def replica_test(images, targets, weights):
            # A last validation batch smaller than the replicas leaves some with no tiles, and
            # they must not run the model: on some CPUs (this project's of 2026-12-04, with
            # AVX512-BF16) TensorFlow 2.21's convolution of an empty batch returns its input's
            # shape, not the convolution's, and the next layer fails.
            def count():
                probabilities = net(images, training=False)
                loss = net.compute_loss(images, targets, probabilities, weights, training=False)
                self._count(loss, tf.shape(images)[0], targets, probabilities, weights)
                return tf.constant(True)

            tf.cond(tf.shape(images)[0] > 0, count, lambda: tf.constant(False))

        def replica_sum():
            return self._sum_metric_state(tf.distribute.get_replica_context())

        def replica_average():
            values = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in self.averaged]
            )
            for variable, value in zip(self.averaged, values):
                variable.assign(value)

        def replica_gather(value):
            # Every replica's value, in replica order: a sum of one-hot rows (ReplicaContext's
            # all_gather refuses a value that is not per replica).
            context = tf.distribute.get_replica_context()
            row = tf.one_hot(context.replica_id_in_sync_group, replicas, dtype=tf.float32) * tf.cast(value, tf.float32)
            return context.all_reduce(tf.distribute.ReduceOp.SUM, row)

        def first(per_replica):
            return strategy.experimental_local_results(per_replica)[0]

        @tf.function
        def train_step(inputs, global_tiles):
            return self._publish(first(strategy.run(replica_train, args=(*inputs, global_tiles))))

        @tf.function
        def test_step(inputs):
            strategy.run(replica_test, args=inputs)

        @tf.function
        def metric_logs():
            return self._publish(first(strategy.run(replica_sum)))

        @tf.function
        def average_state():
            if self.averaged:
                strategy.run(replica_average)

        @tf.function
        def gather(value):
            return first(strategy.run(replica_gather, args=(value,)))

        self.train_step, self.test_step, self.metric_logs = train_step, test_step, metric_logs
        self.average_state, self.gather = average_state, gather

    def _count(self, loss, tiles, targets, probabilities, weights) -> None:
        import tensorflow as tf

        # As fit's loss tracker: the replica's own mean loss (Keras divided it by the replica
        # count: undo that), weighted by its tiles.
        self.metrics[0].update_state(loss * self.replicas, sample_weight=tf.cast(tiles, tf.float32))
        for metric in self.metrics[1:]:
            metric.update_state(targets, probabilities, weights)

    def _sum_metric_state(self, context):
        import tensorflow as tf

        # Read in a replica context, a sync-on-read variable gives this replica's own copy. All
        # in float64 (exact for float32 values), so that they travel in one all-reduce: one
        # pack holds one dtype. tf.identity places each on this replica's device (a bare read
        # has none, and the all-reduce needs one).
        values = [tf.identity(tf.cast(variable.value, tf.float64)) for variable in self.variables]
        return context.all_reduce(tf.distribute.ReduceOp.SUM, values)

    def _publish(self, totals) -> dict:
        import tensorflow as tf

        for variable, total in zip(self.host_variables, totals):
            variable.assign(tf.cast(total, variable.dtype))
        return {metric.name: metric.result() for metric in self.host_metrics}

    def reset(self) -> None:
        for metric in self.metrics:
            metric.reset_state()

    def agree(self, flag: bool) -> bool:
        """Whether any worker's flag is set (a collective: every worker must call it)."""
        import tensorflow as tf

        return bool(np.asarray(self.gather(tf.constant(1.0 if flag else 0.0))).any())

    def check_same_start(self, epoch: int) -> None:
        """Refuse to train unless every worker starts from the same epoch."""
        import tensorflow as tf

        epochs = np.asarray(self.gather(tf.constant(float(epoch)))).round().astype(int)[:: self.local]
        if len(set(epochs.tolist())) > 1:
            starts = ", ".join(f"{self.cluster.name(i)} at epoch {e + 1}" for i, e in enumerate(epochs))
            raise UserError(
                f"the workers would start at different epochs ({starts}): every worker must read the chief's "
                "resume state, so put --weights on a filesystem that all workers share, at the same path"
            )

    def share(self, batches, batch: int):
        """This worker's rows of global batch `batch` and where each local replica's begin.

        Returns:
            ((images, targets, weights), local offsets (local + 1,), tiles in the global batch).
        """
        tiles = min(batches.batch_size, len(batches.indices) - batch * batches.batch_size)
        offsets = replica_offsets(tiles, self.replicas)[self.first : self.first + self.local + 1]
        arrays = batches.read(batch, slice(int(offsets[0]), int(offsets[-1])))
        return arrays, offsets - offsets[0], tiles

    def distribute(self, arrays, offsets):
        """Per-replica tensors: local replica k gets rows offsets[k]:offsets[k + 1]."""
        import tensorflow as tf

        def value(context):
            k = context.replica_id_in_sync_group - self.first
            return tuple(tf.convert_to_tensor(array[offsets[k] : offsets[k + 1]]) for array in arrays)

        return self.strategy.experimental_distribute_values_from_function(value)


def _floats(logs) -> dict:
    return {key: float(value) for key, value in logs.items()}


def fit(
    net,
    strategy,
    cluster: Cluster,
    train_batches,
    validation_batches=None,
    *,
    epochs: int,
    initial_epoch: int = 0,
    callbacks: Sequence = (),
    make_metrics: Callable[[], list] = list,
    jit_compile: bool = False,
    threads: int = 1,
    peer_timeout: float = PEER_TIMEOUT,
) -> dict:
    """Train a compiled Keras model across the workers of `strategy`, as model.fit would.

    Every worker calls it with the same arguments (the same command on every host).

    Args:
        net: the model, built and compiled (loss, optimizer) under strategy.scope().
        strategy: from make_strategy().
        cluster: this process's place in it (parse_tf_config).
        train_batches: a cache.BatchReader of the training tiles with the GLOBAL batch size
            (shuffled); each worker reads only its share of every batch.
        validation_batches: likewise for the validation tiles, or None.
        epochs, initial_epoch: as model.fit's.
        callbacks: keras.callbacks.Callback objects, driven as fit drives them.
        make_metrics: returns a fresh list of the metrics to log (called twice: one set counts
            on the replicas, the other holds the sums the logs are read from), such as
            ``lambda: training.streaming_metrics(names)``.
        jit_compile: compile the model's forward and backward pass with XLA.
        threads: threads reading batches ahead from the cache.
        peer_timeout: the strategy's collective timeout, for messages.

    Returns:
        The last epoch's logs.

    Raises:
        ClusterError: another worker died or stopped answering.
        UserError: the workers do not start from the same epoch; too few tiles per replica.
    """
    import keras
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    if train_batches.batch_size < replicas:
        raise UserError(
            f"--batch-size {train_batches.batch_size} gives some of the {replicas} replicas (workers × GPUs) no "
            f"tiles; pass --batch-size {replicas} or more"
        )
    run = _Replicas(net, strategy, cluster, make_metrics, jit_compile)
    steps = steps_per_epoch(len(train_batches.indices), train_batches.batch_size, replicas)
    callback_list = keras.callbacks.CallbackList(list(callbacks), model=net, epochs=epochs, steps=steps, verbose=0)
    epoch, batch, logs = initial_epoch, 0, {}
    try:
        run.check_same_start(initial_epoch)
        net.stop_training = False
        callback_list.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            run.reset()
            train_batches.set_epoch(epoch)
            callback_list.on_epoch_begin(epoch)
            batch = 0
            for batch, (arrays, offsets, tiles) in enumerate(
                _prefetched(lambda b: run.share(train_batches, b), steps, threads)
            ):
                callback_list.on_train_batch_begin(batch)
                logs = _floats(run.train_step(run.distribute(arrays, offsets), tf.constant(tiles, tf.int32)))
                callback_list.on_train_batch_end(batch, logs)
                if run.agree(net.stop_training):
                    net.stop_training = True
                    break
            run.average_state()
            epoch_logs = dict(logs)
            if validation_batches is not None:
                validation = _evaluate(run, validation_batches, callback_list, threads)
                epoch_logs.update({f"val_{key}": value for key, value in validation.items()})
            callback_list.on_epoch_end(epoch, epoch_logs)
            logs = epoch_logs
            # Also the barrier that holds every worker until the chief has written its files.
            if run.agree(net.stop_training):
                net.stop_training = True
                break
        callback_list.on_train_end(logs)
    except _peer_errors() as error:
        raise ClusterError(describe_failure(error, cluster, peer_timeout), epoch + 1, batch + 1) from None
    return logs


def _evaluate(run: _Replicas, batches, callback_list, threads: int) -> dict:
    """The validation logs of every worker's share of `batches` (fit's evaluate, without the prefix)."""
    run.reset()
    callback_list.on_test_begin()
    for batch, (arrays, offsets, _) in enumerate(_prefetched(lambda b: run.share(batches, b), len(batches), threads)):
        callback_list.on_test_batch_begin(batch)
        # A worker may have no rows of a last small batch; the test step has no collective,
        # so it may skip it alone.
        if offsets[-1] > 0:
            run.test_step(run.distribute(arrays, offsets))
        callback_list.on_test_batch_end(batch)
    logs = _floats(run.metric_logs())
    callback_list.on_test_end(logs)
    return logs
