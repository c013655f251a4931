"""Tests for data preparation in shards: --shard I/N on labels, images and cache, and merge-cache.

The promise under test: N machines each running one shard, then one merge, give what one
machine gives (labels byte for byte, the caches row for row, the same held-back test set),
and a merge refuses shards that do not belong together.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import mercantile
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cache import CLASSES_TEXT, SIZE, make_world

import prepare
from osmseg import atomic, cli, datafiles, labels, shards
from osmseg.cache import merge
from osmseg.imagery import download
from osmseg.shards import Shard

# --- the split rule and --shard -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("2/2", "I must be from 0 to 1"),
        ("-1/4", "I must be from 0 to 3"),
        ("0/0", "N must be at least 1"),
        ("1", "is not I/N"),
        ("a/b", "is not I/N"),
        ("1/2/3", "is not I/N"),
        ("", "is not I/N"),
    ],
)
@pytest.mark.parametrize("stage", ["labels", "images", "cache"])
def test_bad_shards_exit_2_saying_how_to_write_one(stage, text, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        prepare.main([stage, f"--shard={text}", "--sample", str(tmp_path / "none.txt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --shard" in err and message in err
    assert not list(tmp_path.iterdir())


def test_shard_parse_and_file_names():
    assert Shard.parse(" 3 / 8 ") == Shard(3, 8) and str(Shard(3, 8)) == "3/8"
    assert shards.shard_path("data/training.hdf5", Shard(0, 2)).as_posix() == "data/training.shard-0-of-2.hdf5"
    assert [Shard(i, 3).bounds(7) for i in range(3)] == [(0, 2), (2, 4), (4, 7)]


_tiles = st.lists(
    st.builds(lambda x, y: mercantile.Tile(x, y, 17), st.integers(65000, 65600), st.integers(65000, 65600)),
    max_size=80,
)


@settings(max_examples=60, deadline=None)
@given(tiles=_tiles, count=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_shards_partition_any_list_evenly_whatever_its_order(tiles, count, seed):
    parts = [shards.pick(tiles, Shard(i, count)) for i in range(count)]
    unique = set(tiles)
    assert sorted(map(len, parts))[-1] - sorted(map(len, parts))[0] <= 1
    assert sum(map(len, parts)) == len(unique) and set().union(*map(set, parts)) == unique
    # The same parts from the list in another order: the rule depends on the tiles alone.
    shuffled = list(np.random.default_rng(seed).permutation(len(tiles))) if tiles else []
    assert [shards.pick([tiles[i] for i in shuffled], Shard(i, count)) for i in range(count)] == parts
    # Neighbours stay together: only the source tiles at the N - 1 cuts are in two parts.
    owners: dict = {}
    for index, part in enumerate(parts):
        for tile in part:
            owners.setdefault(mercantile.parent(tile, zoom=12), set()).add(index)
    assert sum(len(o) - 1 for o in owners.values()) <= count - 1


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), max_size=30), count=st.integers(1, 6))
def test_cuts_fall_between_units_near_the_even_shares(sizes, count):
    runs = [shards.cut(sizes, Shard(i, count)) for i in range(count)]
    assert runs[0][0] == 0 and runs[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))  # consecutive, every unit once
    total = sum(sizes)
    for first, stop in runs:  # each cut is within half a unit of where an even share ends
        assert abs(sum(sizes[first:stop]) - total / count) <= max(sizes, default=0)


def test_label_shards_draw_exactly_the_groups_of_one_run():
    # 600 tiles in one source tile (three groups of up to 256), 10 in another, 300 in a third.
    def block(x0, y0, n):
        return [mercantile.Tile(x0 + i % 32, y0 + i // 32, 17) for i in range(n)]

    tiles = block(65536, 65536, 600) + block(65536 + 32, 65536, 10) + block(65536, 65536 + 32, 300)
    tiles = [tiles[i] for i in np.random.default_rng(0).permutation(len(tiles))]
    one_run = {tuple(task) for task in labels._tasks(tiles, 12)}
    for count in (2, 3, 5):
        parts = [labels.shard_tiles(tiles, Shard(i, count), 12) for i in range(count)]
        assert sorted(t for part in parts for t in part) == sorted(tiles)
        for part in parts:  # render_labels, given a part, draws groups of the one run
            assert {tuple(task) for task in labels._tasks(part, 12)} <= one_run
        assert all(abs(len(part) - len(tiles) / count) <= 256 for part in parts)  # even to within a group


def test_the_split_is_the_same_in_another_process_with_another_hash_seed(tmp_path):
    tiles = [mercantile.Tile(65000 + 37 * i % 300, 65000 + 11 * i % 200, 17) for i in range(200)]
    script = (
        "import sys, mercantile; from osmseg import shards; "
        "tiles = [mercantile.Tile(65000 + 37 * i % 300, 65000 + 11 * i % 200, 17) for i in range(200)]; "
        "print([tuple(t) for t in shards.pick(tiles, shards.Shard(1, 3))])"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(prepare.__file__).rsplit("/", 1)[0])
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([tuple(t) for t in shards.pick(tiles, Shard(1, 3))])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2, reason="needs 2 cores")
def test_default_workers_follow_the_cores_a_job_was_given():
    # As when Slurm or Kubernetes confines a job to one core of a larger machine.
    script = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from osmseg.cache.build import default_workers; import prepare; "
        "p = prepare.options.parser(); prepare.labels.add_arguments(p); "
        "print(default_workers(), p.parse_args([]).workers)"
    )
    env = dict(os.environ, PYTHONPATH=str(prepare.__file__).rsplit("/", 1)[0])
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1"]


# --- cache shards and merge-cache (tiny PNG world, no mapnik) ---------------------------------


def _argv(world, where, command="cache", *extra):
    folder = world["root"] / where
    folder.mkdir(exist_ok=True)
    return [
        command, "--sample", str(world["sample"]), "--images", str(world["images"]),
        "--labels", str(world["labels"]), "--classes", str(world["classes"]), "--tile-size", str(SIZE),
        "--test-size", "3", "--seed", "7", "--test-list", str(folder / "test-sample-filtered.txt"),
        "--out", str(folder / "training.hdf5"), "--test-out", str(folder / "testing.hdf5"), *map(str, extra),
    ]


def _shard(world, index, count, *extra):
    assert cli.run(prepare.main, _argv(world, "sharded", "cache", "--shard", f"{index}/{count}", *extra)) == 0


def _merge(world, count, *extra):
    return cli.run(prepare.main, _argv(world, "sharded", "merge-cache", "--shards", count, *extra))


def _assert_same_cache(whole, merged):
    """merged equals whole as osmseg.cache.merge defines it."""
    with h5py.File(whole, "r") as a, h5py.File(merged, "r") as b:
        for name in ("images", "labels", "tiles", "sources"):
            x, y = a[name], b[name]
            assert (x.shape, x.dtype, x.chunks, x.compression) == (y.shape, y.dtype, y.chunks, y.compression), name
            np.testing.assert_array_equal(x[:], y[:], err_msg=name)
        for row in range(len(a["images"])):
            assert a["images"].id.read_direct_chunk((row, 0, 0, 0)) == b["images"].id.read_direct_chunk((row, 0, 0, 0))
            assert a["labels"].id.read_direct_chunk((row, 0, 0)) == b["labels"].id.read_direct_chunk((row, 0, 0))
        for key in ("classes", "tile_size", "schema_version"):
            assert a.attrs[key] == b.attrs[key], key
        whole_params, merged_params = json.loads(a.attrs["params"]), json.loads(b.attrs["params"])
    merged_from = merged_params.pop("merged_from")
    assert merged_params == whole_params
    return merged_from


@pytest.fixture
def world(tmp_path):
    return make_world(tmp_path)


@pytest.mark.parametrize("count, corrupt", [(2, False), (4, True)])
def test_merged_shards_equal_the_unsharded_caches_row_for_row(world, capsys, count, corrupt):
    if corrupt:  # a tile every build skips, in both ways of building
        (world["images"] / f"17-{world['tiles'][5][1].x}-200.png").write_bytes(b"not a png")
    root = world["root"]
    assert cli.run(prepare.main, _argv(world, "whole")) == 0
    for index in range(count):
        _shard(world, index, count)
    assert _merge(world, count) == 0
    for name in ("training", "testing"):
        merged_from = _assert_same_cache(root / "whole" / f"{name}.hdf5", root / "sharded" / f"{name}.hdf5")
        assert merged_from == {"shards": count, "files": [f"{name}.shard-{i}-of-{count}.hdf5" for i in range(count)]}
    # The held-back test set is the one drawn without shards.
    assert (root / "whole" / "test-sample-filtered.txt").read_text() == (
        root / "sharded" / "test-sample-filtered.txt"
    ).read_text()
    if count == 4:  # 3 test tiles over 4 shards: one shard holds none, and is still a shard
        with h5py.File(root / "sharded" / "testing.shard-0-of-4.hdf5", "r") as empty:
            assert empty["images"].shape[0] == 0
    capsys.readouterr()
    # An unsharded run finds the merged caches up to date: the same fingerprint.
    assert cli.run(prepare.main, _argv(world, "sharded")) == 0
    assert capsys.readouterr().out.count("up to date") == 2


def test_each_shard_and_the_merge_resume(world, capsys):
    root = world["root"] / "sharded"
    _shard(world, 0, 2)
    _shard(world, 1, 2)
    stamps = {p.name: p.stat().st_mtime_ns for p in root.glob("*.shard-*.hdf5")}
    capsys.readouterr()
    _shard(world, 1, 2)  # a re-run of a finished shard does nothing
    assert capsys.readouterr().out.count("up to date") == 2
    assert stamps == {p.name: p.stat().st_mtime_ns for p in root.glob("*.shard-*.hdf5")}
    assert _merge(world, 2) == 0
    merged = {p: p.stat().st_mtime_ns for p in (root / "training.hdf5", root / "testing.hdf5")}
    for shard_file in root.glob("*.shard-*.hdf5"):
        shard_file.unlink()
    capsys.readouterr()
    assert _merge(world, 2) == 0  # up to date: needs no shards any more
    assert capsys.readouterr().out.count("up to date, not merged again") == 2
    assert merged == {p: p.stat().st_mtime_ns for p in merged}
    # A label re-rendered: its shard is rebuilt, and the merge replaces the stale cache, saying why.
    _shard(world, 0, 2)
    _shard(world, 1, 2)
    label = datafiles.label_path(world["labels"], _tile_in(root / "training.shard-1-of-2.hdf5"))
    os.utime(label, ns=(1, 1))
    _shard(world, 1, 2)
    capsys.readouterr()
    assert _merge(world, 2) == 0
    out = capsys.readouterr().out
    assert "training.hdf5: rebuilding: image or label files changed" in out and "testing.hdf5: up to date" in out
    assert cli.run(prepare.main, _argv(world, "whole")) == 0
    _assert_same_cache(world["root"] / "whole" / "training.hdf5", root / "training.hdf5")


def _tile_in(path, row=0):
    with h5py.File(path, "r") as file:
        z, x, y = (int(v) for v in file["tiles"][row])
    return mercantile.Tile(x, y, z)


@pytest.mark.parametrize(
    "edit, message",
    [
        ("missing", "training.shard-1-of-2.hdf5: no such shard cache (shard 1/2 of"),
        ("duplicate", "training.shard-1-of-2.hdf5: holds shard 0/2, not 1/2"),
        ("count", "training.shard-0-of-3.hdf5: no such shard cache"),
        ("seed", "training.shard-1-of-2.hdf5: made with --seed 8, this merge 7"),
        ("test_size", "training.shard-1-of-2.hdf5: made with --test-size 4.0, this merge 3.0"),
        ("classes", "training.shard-1-of-2.hdf5: made with other classes"),
        ("tile_size", "training.shard-1-of-2.hdf5: made with --tile-size 16, this merge 32"),
        ("tile_list", "training.shard-0-of-2.hdf5: made from another split (9 training tiles, now 8)"),
        ("stale", "training.shard-1-of-2.hdf5: out of date: image or label files changed on disk"),
        ("not_a_shard", "training.shard-1-of-2.hdf5: not a shard cache"),
    ],
)
def test_merge_refuses_shards_that_do_not_belong_together(world, capsys, tmp_path, edit, message):
    root = world["root"] / "sharded"
    _shard(world, 0, 2)
    count = 2
    if edit in ("seed", "test_size", "tile_size"):
        value = {"seed": 8, "test_size": 4, "tile_size": 16}[edit]
        _shard(world, 1, 2, "--" + edit.replace("_", "-"), value)
    elif edit == "classes":
        other = tmp_path / "other-classes.json"
        other.write_text(CLASSES_TEXT.replace('"water"', '"lake"'))
        _shard(world, 1, 2, "--classes", other)
    else:
        _shard(world, 1, 2)
    shard1 = root / "training.shard-1-of-2.hdf5"
    if edit == "missing":
        shard1.unlink()
    elif edit == "duplicate":
        shutil.copy(root / "training.shard-0-of-2.hdf5", shard1)
    elif edit == "count":
        count = 3
    elif edit == "tile_list":
        lines = world["sample"].read_text().splitlines()
        world["sample"].write_text("\n".join(lines[:-1]) + "\n")
    elif edit == "stale":
        image = datafiles.find_image(world["images"], _tile_in(shard1))
        image.write_bytes(image.read_bytes())  # re-downloaded: the same bytes, a new file
        os.utime(image, ns=(1, 1))
    elif edit == "not_a_shard":
        shutil.copy(world["root"] / "sharded" / "training.shard-0-of-2.hdf5", shard1)
        with h5py.File(shard1, "r+") as file:
            params = json.loads(file.attrs["params"])
            del params["shard"]
            file.attrs["params"] = json.dumps(params)
    capsys.readouterr()
    assert _merge(world, count) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "prepare.py cache --shard" in err or "--shards" in err  # the fix
    assert not (root / "training.hdf5").exists() and not (root / "testing.hdf5").exists()
    assert not list(root.glob(".*partial*"))


def test_an_interrupted_merge_leaves_no_file(world, monkeypatch, capsys):
    _shard(world, 0, 2)
    _shard(world, 1, 2)
    calls = []

    def fail_on_the_fifth_row(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_append(self, *args)

    real_append = merge.Writer.append
    monkeypatch.setattr(merge.Writer, "append", fail_on_the_fifth_row)
    assert _merge(world, 2) == 130
    root = world["root"] / "sharded"
    assert not (root / "training.hdf5").exists() and not list(root.glob(".*partial*"))


def test_clearing_a_killed_builds_leftover_spares_a_shards_file_in_flight(world):
    # An unsharded build clears its own killed builds' leftovers, never a shard's temporary file.
    root = world["root"] / "sharded"
    root.mkdir()
    in_flight = root / ".training.shard-1-of-2.abcd_123.partial.hdf5"
    leftover = root / ".training.abcd_123.partial.hdf5"
    in_flight.write_bytes(b"being written")
    leftover.write_bytes(b"left by a kill")
    assert cli.run(prepare.main, _argv(world, "sharded")) == 0
    assert in_flight.exists() and not leftover.exists()


# --- labels, images and the whole chain on the demo world -----------------------------------

BBOX = "-0.006,-0.006,0.006,0.006"  # a corner of the demo world across the z12 borders at 0°E, 0°N


def _ok(argv):
    assert cli.run(prepare.main, [str(a) for a in argv]) == 0, argv


def _files(folder, pattern="*"):
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern)) if p.is_file()}


@pytest.mark.slow
def test_labels_images_and_cache_in_two_shards_equal_one_run_on_the_demo_world(tmp_path, classes_file, capsys):
    d = tmp_path
    osm = d / "osm" / "demo.mbtiles"
    _ok(["demo-world", "--out", osm])
    _ok(["all-tiles", "--osm-source", "qa-tiles", "--osm", osm, f"--bbox={BBOX}", "--out", d / "all_tiles.txt"])
    _ok(["sample", "--all-tiles", d / "all_tiles.txt", "--zoom", 17, "--count", 24, "--seed", 0,
         "--out", d / "sample.txt"])
    sample = datafiles.read_tile_list(d / "sample.txt")
    assert len({mercantile.parent(t, zoom=12) for t in sample.tiles}) == 4  # every source tile is used
    labels = ["labels", "--sample", d / "sample.txt", "--classes", classes_file, "--workers", 1]
    _ok([*labels, "--out", d / "whole" / "labels"])
    for index in range(2):
        _ok([*labels, "--out", d / "labels", "--shard", f"{index}/2"])
        if index == 0:
            first = set(_files(d / "labels"))
    whole = _files(d / "whole" / "labels")
    assert len(whole) == 24 and _files(d / "labels") == whole  # the same PNG bytes
    # The first shard took whole source tiles (11 tiles of two), the second the other two.
    parents = [{mercantile.parent(datafiles.parse_tile_stem(n[:-4]), zoom=12) for n in names}
               for names in (first, set(whole) - first)]
    assert len(first) == 11 and len(parents[0]) == len(parents[1]) == 2

    _ok(["filter", "--sample", d / "sample.txt", "--labels", d / "labels", "--classes", classes_file,
         "--out", d / "sample-filtered.txt", "--stats", d / "label-stats.csv"])
    filtered = datafiles.read_tile_list(d / "sample-filtered.txt")
    images = ["images", "--sample", d / "sample-filtered.txt", "--image-tiles", "demo", "--labels", d / "labels",
              "--out", d / "images", "--workers", 4]
    fetched = []
    for index in range(2):
        before = set(_files(d / "images", "17-*"))
        _ok([*images, "--shard", f"{index}/2"])
        fetched.append(set(_files(d / "images", "17-*")) - before)
        assert f"shard {index}/2: 12 of the 24 tiles" in capsys.readouterr().out
    assert not fetched[0] & fetched[1]
    assert {name.rsplit(".", 1)[0] for name in fetched[0] | fetched[1]} == {
        datafiles.tile_stem(t) for t in filtered.tiles
    }

    cache = ["--sample", d / "sample-filtered.txt", "--images", d / "images", "--labels", d / "labels",
             "--test-size", 5]
    _ok(["cache", *cache, "--test-list", d / "whole" / "test.txt",
         "--out", d / "whole" / "training.hdf5", "--test-out", d / "whole" / "testing.hdf5"])
    sharded = ["--test-list", d / "test.txt", "--out", d / "training.hdf5", "--test-out", d / "testing.hdf5"]
    for index in range(2):
        _ok(["cache", *cache, *sharded, "--shard", f"{index}/2", "--workers", 1])
    _ok(["merge-cache", *cache, *sharded, "--shards", 2])
    for name in ("training", "testing"):
        _assert_same_cache(d / "whole" / f"{name}.hdf5", d / f"{name}.hdf5")
    assert (d / "whole" / "test.txt").read_text() == (d / "test.txt").read_text()


# --- shards writing into one images folder at once -------------------------------------------


def test_an_image_shard_removes_only_its_own_tiles_leftovers(tmp_path):
    mine, theirs = mercantile.Tile(65536, 65536, 17), mercantile.Tile(65537, 65536, 17)
    (tmp_path / "rejected").mkdir()
    own = tmp_path / f".{datafiles.tile_stem(mine)}.x1y2z3ab.partial.jpg"
    other = tmp_path / f".{datafiles.tile_stem(theirs)}.x1y2z3ab.partial.jpg"
    other_rejected = tmp_path / "rejected" / f".{datafiles.tile_stem(theirs)}.q1w2e3r4.partial.bin"
    for path in (own, other, other_rejected):
        path.write_bytes(b"half")
    download._clean_partials(tmp_path, {datafiles.tile_stem(mine)})
    assert not own.exists() and other.exists() and other_rejected.exists()
    download._clean_partials(tmp_path)  # an unsharded run owns the folder
    assert not other.exists() and not other_rejected.exists()


def test_locked_makes_another_process_wait(tmp_path):
    lock = tmp_path / ".tile-logs.lock"
    probe = (
        "import fcntl, sys; handle = open(sys.argv[1], 'a')\n"
        "try:\n    fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n"
    )
    with atomic.locked(lock):
        held = subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode
    free = subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode
    assert (held, free) == (3, 0)
