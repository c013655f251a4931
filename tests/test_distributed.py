"""Tests for multi-worker training (osmseg/distributed.py through train.py): two worker
processes on 127.0.0.1, their weights, their logs, a dead worker and a resumed run."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_train import _recomputed_scores, make_cache

import train
from osmseg import cache, distributed, training
from osmseg.cli import run
from osmseg.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
# 15 tiles: 3 held back for validation, 12 to train on in 3 global batches of 4 (2 a worker):
# no partial batch, so each worker traces its training step once.
TILES = 15
SETTINGS = [
    "--model", "segnet-basic", "--width", "0.0625", "--batch-size", "4", "--optimizer", "adam",
    "--learning-rate", "0.01", "--augment", "--class-weights", "median-frequency", "--seed", "3",
]  # fmt: skip
EPOCHS = 2
# A worker: train.py's main, and for the tests the final weights saved to a file (argv[1],
# '' for none) and a SIGKILL of itself when it is about to read training batch B of epoch E
# (argv[2] 'E,B', 0-based; '' for never).
WORKER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import train
    from osmseg import cache, distributed
    from osmseg.cli import run

    dump, die_at, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    if die_at:
        epoch, batch = map(int, die_at.split(","))
        read = cache.BatchReader.read

        def dying_read(self, index, rows=slice(None)):
            if self.shuffle and self.epoch == epoch and index == batch:
                os.kill(os.getpid(), signal.SIGKILL)
            return read(self, index, rows)

        cache.BatchReader.read = dying_read
    if dump:
        fit = distributed.fit

        def fit_and_dump(net, *args, **kwargs):
            logs = fit(net, *args, **kwargs)
            np.savez(dump, *[np.asarray(variable.numpy()) for variable in net.weights])
            return logs

        distributed.fit = fit_and_dump
    sys.exit(run(train.main, argv))
    """
)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _start_workers(argv, cwds, logs, dumps=("", ""), die_at=("", "")):
    """Start two train.py workers on loopback, in the given working directories; their
    output goes to logs/w0.out, w0.err, w1.out... (files: a full pipe would stall them)."""
    hosts = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
        command = [sys.executable, "-c", WORKER, str(dumps[index]), die_at[index], "--distribute", *map(str, argv)]
        with open(logs / f"w{index}.out", "w") as out, open(logs / f"w{index}.err", "w") as err:
            workers.append(subprocess.Popen(command, cwd=cwds[index], env=env, stdout=out, stderr=err, text=True))
    return workers


def _finish(workers, logs, timeout=240):
    """(status, stdout, stderr) of each worker, once all have ended; kills them all if one
    outlives the timeout."""
    deadline = time.monotonic() + timeout
    try:
        for worker in workers:
            worker.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    return [
        (worker.returncode, (logs / f"w{i}.out").read_text(), (logs / f"w{i}.err").read_text())
        for i, worker in enumerate(workers)
    ]


def _read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _dumped(path):
    with np.load(path) as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def _state_model(path):
    with h5py.File(path, "r") as file:
        return [file["model"][key][()] for key in sorted(file["model"])]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache") / "training.hdf5", n=TILES)


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory, tiny_cache):
    """Two workers, each in its own directory with the same relative output paths: the chief
    is killed as epoch 2 begins. Then both run the same command again (--resume) in the
    chief's directory, as on a shared filesystem, and finish."""
    path, _ = tiny_cache
    root = tmp_path_factory.mktemp("workers")
    cwds = [root / "w0", root / "w1"]
    for cwd in cwds:
        cwd.mkdir()
    argv = ["--data", path, "--epochs", EPOCHS, *SETTINGS, "--resume"]
    killed = _start_workers(argv, cwds, root, die_at=("1,1", ""))
    noticed = None
    try:
        killed[0].wait(timeout=240)
        died = time.monotonic()
        killed[1].wait(timeout=distributed.HEARTBEAT_TIMEOUT + 50)
        noticed = time.monotonic() - died
    finally:
        first = _finish(killed, root, timeout=1)
    written_then = {cwd.name: sorted(p.name for p in cwd.iterdir()) for cwd in cwds}
    state_then = training.read_state(cwds[0] / "weights.state.h5") if (cwds[0] / "weights.state.h5").exists() else None
    log_then = _read_csv(cwds[0] / "training_log.csv") if (cwds[0] / "training_log.csv").exists() else None
    dumps = [root / "w0.npz", root / "w1.npz"]
    second = _finish(_start_workers(argv, [cwds[0], cwds[0]], root, dumps=dumps), root)
    return {"cwd": cwds[0], "first": first, "noticed": noticed, "written": written_then, "state": state_then,
            "log_then": log_then, "second": second, "dumps": dumps}  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_cache):
    """The same run in one process (model.fit), the reference."""
    path, _ = tiny_cache
    out = tmp_path_factory.mktemp("one_process")
    argv = ["--data", path, "--epochs", EPOCHS, *SETTINGS, "--weights", out / "weights.hdf5", "--log", out / "log.csv"]
    assert run(train.main, [str(a) for a in argv]) == 0
    return out


# --- Pure parts -----------------------------------------------------------------------


def test_parse_tf_config_numbers_the_chief_first():
    hosts = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    worker = distributed.parse_tf_config(json.dumps({"cluster": hosts, "task": {"type": "worker", "index": 1}}))
    assert worker.index == 2 and worker.workers == 3 and not worker.is_chief
    assert worker.name() == "worker 2 (b:1)" and worker.name(0) == "worker 0 (c:1)"
    chief = distributed.parse_tf_config(json.dumps({"cluster": hosts, "task": {"type": "chief", "index": 0}}))
    assert chief.is_chief and chief.tasks == (("chief", 0), ("worker", 0), ("worker", 1))
    plain = distributed.parse_tf_config('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker"}}')
    assert plain.is_chief and plain.tasks == (("worker", 0), ("worker", 1))
    assert train.is_chief(None) and not train.is_chief(json.dumps({"cluster": hosts, "task": {"type": "worker"}}))


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ('{"task": {}}', 'no "cluster"'),
        ('{"cluster": {"worker": ["a:1"], "ps": ["p:1"]}, "task": {"type": "worker"}}', "ps tasks"),
        ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker"}}', "host:port"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "worker 1 is not in the cluster"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator"}}', '"task" must say'),
    ],
)
def test_bad_tf_config_is_a_user_error(text, message):
    with pytest.raises(UserError, match=message):
        distributed.parse_tf_config(text)


def test_train_refuses_a_bad_tf_config_before_starting(tmp_path, tiny_cache, monkeypatch, capsys):
    path, _ = tiny_cache
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}')
    assert run(train.main, ["--data", str(path), "--weights", str(tmp_path / "w.hdf5"), "--distribute"]) == 2
    assert "TF_CONFIG: task worker 3 is not in the cluster" in capsys.readouterr().err
    assert not (tmp_path / "w.hdf5").exists()


def test_an_address_it_cannot_listen_at_is_a_user_error(monkeypatch):
    """TensorFlow says only "Could not start gRPC server" (seen with a port in use)."""
    import tensorflow as tf

    def refuse(**kwargs):
        raise tf.errors.UnknownError(None, None, "Could not start gRPC server")

    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", refuse)
    cluster = distributed.Cluster((("worker", 0), ("worker", 1)), ("a:1", "b:2"), 1)
    with pytest.raises(UserError, match=r"worker 1 \(b:2\) cannot listen at b:2 .*free port"):
        distributed.make_strategy(cluster)


def test_replica_shares_and_steps():
    np.testing.assert_array_equal(distributed.replica_offsets(5, 2), [0, 3, 5])
    np.testing.assert_array_equal(distributed.replica_offsets(1, 3), [0, 1, 1, 1])
    for tiles, replicas in [(16, 4), (7, 3), (2, 5)]:
        offsets = distributed.replica_offsets(tiles, replicas)
        shares = [len(part) for part in np.array_split(np.arange(tiles), replicas)]
        np.testing.assert_array_equal(np.diff(offsets), shares)
    # 10 tiles in batches of 4: 4, 4, 2; the last batch trains only if every replica gets a tile.
    assert distributed.steps_per_epoch(10, 4, 2) == 3
    assert distributed.steps_per_epoch(10, 4, 3) == 2
    assert distributed.steps_per_epoch(12, 4, 4) == 3


def test_a_share_of_a_batch_is_those_rows_of_the_whole_batch(tiny_cache):
    """What a worker reads of a global batch is exactly those rows of what one process reads,
    augmentation and sample weights included."""
    path, _ = tiny_cache
    reader = cache.BatchReader(path, np.arange(TILES), 6, augment=True, seed=4, class_weights=[0.5, 2.0, 3.0])
    reader.set_epoch(3)
    for batch in range(len(reader)):
        whole = reader.read(batch)
        offsets = distributed.replica_offsets(len(whole[0]), 2)
        for start, end in zip(offsets[:-1], offsets[1:]):
            for part, full in zip(reader.read(batch, slice(int(start), int(end))), whole):
                np.testing.assert_array_equal(part, full[start:end])
        np.testing.assert_array_equal(reader[batch][0], whole[0])


# --- The loop against fit, in one process ------------------------------------------------

# Two logical CPUs under MirroredStrategy stand in for two workers: the same loop, with the
# same collectives, in one process. A model without batch normalisation (whose statistics
# are per replica) and plain SGD make the result independent of how a batch is shared.
AGAINST_FIT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from osmseg import cache, distributed, training

    path, names, stop_at = sys.argv[1], ["background", "building", "vegetation"], (1, 0)

    class Recorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.events = []
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            self.events.append(["batch", self.epoch, batch, dict(logs)])
            if (self.epoch, batch) == stop_at:
                self.model.stop_training = True
        def on_epoch_end(self, epoch, logs=None):
            self.events.append(["epoch", epoch, None, dict(logs)])

    def build(initial=None):
        inputs = keras.Input((32, 32, 3))
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
        net = keras.Model(inputs, keras.layers.Conv2D(3, 1, activation="softmax")(x))
        if initial is not None:
            net.set_weights(initial)
        schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=1, decay_rate=0.8)
        net.compile(optimizer=keras.optimizers.SGD(schedule), loss=keras.losses.SparseCategoricalCrossentropy(),
                    weighted_metrics=training.streaming_metrics(names))
        return net

    def batches(indices, shuffle):
        # 7 training tiles in batches of 4: the second batch (3) is shared 2 + 1.
        return cache.make_batches(path, indices, 4, shuffle=shuffle, augment=shuffle, seed=1,
                                  class_weights=[0.5, 2.0, 3.0])

    keras.utils.set_random_seed(0)
    one = build()
    initial = one.get_weights()
    fit_recorder = Recorder()
    one.fit(batches(np.arange(7), True), validation_data=batches(np.arange(7, 12), False), epochs=3,
            shuffle=False, callbacks=[fit_recorder], verbose=0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        two = build(initial)
    loop_recorder = Recorder()
    cluster = distributed.Cluster((("worker", 0),), ("localhost:0",), 0)
    distributed.fit(two, strategy, cluster, batches(np.arange(7), True), batches(np.arange(7, 12), False),
                    epochs=3, callbacks=[loop_recorder], make_metrics=lambda: training.streaming_metrics(names))
    np.savez(sys.argv[2], *one.get_weights(), *two.get_weights())

    # Resuming: one epoch, its state saved and restored into a fresh model, then the second,
    # against two epochs straight.
    def loop(net, **kwargs):
        distributed.fit(net, strategy, cluster, batches(np.arange(7), True), batches(np.arange(7, 12), False),
                        make_metrics=lambda: training.streaming_metrics(names), **kwargs)

    with strategy.scope():
        straight, first = build(initial), build(initial)
    loop(straight, epochs=2)
    loop(first, epochs=1)
    training.save_state(sys.argv[3], training.TrainState(settings={}), first, first.optimizer)
    with strategy.scope():
        resumed = build(initial)
        resumed.optimizer.build(resumed.trainable_variables)
        training.restore_variables(sys.argv[3], resumed, resumed.optimizer)
    loop(resumed, epochs=2, initial_epoch=1)
    np.savez(sys.argv[4], *straight.get_weights(), *resumed.get_weights())
    print(json.dumps([fit_recorder.events, loop_recorder.events]))
    """
)


@pytest.mark.slow
def test_the_loop_on_two_replicas_is_fit(tmp_path, tiny_cache):
    """Same weights, same callback calls with the same logs, the same stop, as model.fit on
    one device: the loss weighting (an uneven last batch included), the all-reduce, the
    learning-rate schedule, the summed metrics and the agreed stop_training. And a run
    resumed from a saved state after one epoch ends where two epochs straight do."""
    path, _ = tiny_cache
    result = subprocess.run(
        [sys.executable, "-c", AGAINST_FIT, str(path), *(str(tmp_path / f) for f in ("fit.npz", "state.h5", "resume.npz"))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fit_events, loop_events = json.loads(result.stdout.strip().splitlines()[-1])
    # Epoch 1: two batches; epoch 2 stops after its first batch, as asked; no epoch 3.
    assert [event[:3] for event in fit_events] == [
        ["batch", 0, 0], ["batch", 0, 1], ["epoch", 0, None], ["batch", 1, 0], ["epoch", 1, None],
    ]  # fmt: skip
    assert [event[:3] for event in loop_events] == [event[:3] for event in fit_events]
    assert "val_mean_iou" in fit_events[2][3] and "iou_building" in fit_events[0][3]
    for (*_, fit_logs), (*_, loop_logs) in zip(fit_events, loop_events):
        assert sorted(loop_logs) == sorted(fit_logs)
        for key, value in fit_logs.items():
            assert loop_logs[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for name in ("fit.npz", "resume.npz"):  # fit against the loop; straight against resumed
        weights = _dumped(tmp_path / name)
        half = len(weights) // 2
        for one, two in zip(weights[:half], weights[half:]):
            np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6, err_msg=name)


# --- Two workers ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_worker_stops_the_other_soon_with_a_message(killed_then_resumed):
    run_ = killed_then_resumed
    (chief_status, _, _), (status, out, err) = run_["first"]
    assert chief_status == -signal.SIGKILL
    assert status == 1, err[-3000:]
    assert "training on 2 replicas on 2 workers" in out
    assert "worker 1 (127.0.0.1:" in err and "lost worker 0 (127.0.0.1:" in err
    assert "Stopped in epoch 2" in err and "weights.state.h5 keeps epoch 1" in err and "--resume" in err
    # No hang: a killed process's connections reset, so the other notices at once; the
    # bound allows for a slow machine.
    assert run_["noticed"] is not None and run_["noticed"] < distributed.HEARTBEAT_TIMEOUT + 50
    # The chief alone wrote files, though both were given the same (relative) paths; they
    # hold the finished epoch.
    assert run_["written"]["w1"] == []
    assert {"weights.hdf5", "weights.state.h5", "training_log.csv", "training_log.png"} <= set(run_["written"]["w0"])
    assert run_["state"].epoch == 1 and len(run_["state"].rows) == 1


@pytest.mark.slow
def test_workers_started_again_resume_and_finish_alike(killed_then_resumed, one_process, tiny_cache):
    run_ = killed_then_resumed
    for index, (status, _, err) in enumerate(run_["second"]):
        assert status == 0, f"worker {index}:\n{err[-3000:]}"
    chief_out, worker_out = run_["second"][0][1], run_["second"][1][1]
    assert "epochs 2..2" in chief_out and "the chief, wrote the outputs" in worker_out
    # The same weights on both workers at the end, and those the chief recorded.
    chief, other = _dumped(run_["dumps"][0]), _dumped(run_["dumps"][1])
    assert len(chief) == len(other) > 0
    for a, b in zip(chief, other):
        np.testing.assert_array_equal(a, b)
    cwd = run_["cwd"]
    for a, b in zip(_state_model(cwd / "weights.state.h5"), chief, strict=True):
        np.testing.assert_array_equal(a, b)
    rows = _read_csv(cwd / "training_log.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert rows[0] == run_["log_then"][0]  # epoch 1 as the killed run recorded it
    # Validation counted both workers' pixels: the logged scores of the saved (best) weights
    # are those of all the held-back tiles, though worker 0 saw 2 of the 3 and worker 1 one.
    import model

    path, labels = tiny_cache
    best = model.read_config(cwd / "weights.hdf5")["epoch"]
    recomputed = _recomputed_scores(cwd / "weights.hdf5", path, labels)
    assert float(rows[best - 1]["val_pixel_accuracy"]) == pytest.approx(recomputed["pixel_accuracy"], abs=2e-3)
    assert float(rows[best - 1]["val_mean_iou"]) == pytest.approx(recomputed["mean_iou"], abs=2e-3)
    # The loss is the global batch's mean, as in one process with the same global batch; the
    # runs differ only in batch normalisation's statistics, over each worker's 2 tiles rather
    # than all 4 (without it they agree to 1e-5: test_the_loop_on_two_replicas_is_fit).
    # Measured: 1.4% and 1.9% apart in the two epochs' losses; allowed: 5%.
    reference = _read_csv(one_process / "log.csv")
    for row, ref in zip(rows, reference, strict=True):
        assert float(row["loss"]) == pytest.approx(float(ref["loss"]), rel=0.05)
