"""Tests for data preparation in shards: --shard I/N on labels, images and cache, and merge-cache.

The promise under test: N machines each running one shard, then one merge, give what one
machine gives (labels byte for byte, the caches row for row, the same held-back test set),
and a merge refuses shards that do not belong together.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mercantile
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prepare
from osmseg import atomic, datafiles, labels, shards
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
@pytest.mark.parametrize("stage", ["labels", "images"])
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
