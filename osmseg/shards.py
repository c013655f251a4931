"""Shards: which part of a tile list one of N machines (`--shard I/N`) works on, and shard file names.

A stage run with ``--shard I/N`` does the I-th of N parts of its work (I counts from 0), so
that an array-job scheduler (Slurm job arrays, Kubernetes indexed jobs, GNU parallel over
ssh) can give each part to another machine by its index alone.

The split rule: the list's distinct tiles are put in *map order* (by zoom, then by the OSM
source tile holding them, z12 for QA tiles, in row order, then by row and column inside it:
the order `osmseg.labels.render_labels` works in) and cut into N runs of consecutive tiles
(`pick`, `cut`). Why this rule:

- it depends on nothing but the list and I/N: the same on every host, in any process (no
  salted ``hash()``, no clock, no file order) and whatever order the list has;
- it keeps the tiles of one OSM source tile together: the labels stage decodes each source
  tile (and its neighbours, for features crossing its borders) once per group of tiles it
  draws, so a shard touches about 1/N of the source tiles. A split by tile index modulo N,
  or by a hash of z/x/y, would make every shard decode nearly every source tile;
- the runs are as even as the cuts allow, which a split by source tile (a hash of the z12
  parent) is not when a box holds few source tiles (the demo world has four).

The imagery stage cuts anywhere (runs within one tile of each other). The labels stage cuts
only between the groups one run over the whole list would draw together
(`osmseg.labels.shard_tiles`: runs of up to 256 tiles of one source tile), because a label
can differ by a pixel with the group it is drawn in (the features are clipped to the
group's bounds, and a pixel covered by exactly half can fall either way): so a shard draws
every label exactly as one unsharded run does. Its runs are even to within a group.

The cache stage splits differently, because its rows have an order to keep: see
`osmseg.cache.merge`. Shard files are named by `shard_path`:
``data/training.hdf5`` -> ``data/training.shard-0-of-4.hdf5``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import mercantile

from osmseg.tiles import ancestor

# The zoom of OSM QA tiles: the source tiles whose tiles map order keeps together when the
# stage has no OSM source of its own to ask (the imagery stage).
GROUP_ZOOM = 12

_FORM = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Part `index` (0..count-1) of `count`."""

    index: int
    count: int

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"{self.index}/{self.count}: N must be at least 1 (I/N is part I of N)")
        if not 0 <= self.index < self.count:
            raise ValueError(
                f"{self.index}/{self.count}: I must be from 0 to {self.count - 1} (parts count from 0, as "
                "SLURM_ARRAY_TASK_ID and JOB_COMPLETION_INDEX do)"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` as a Shard.

        Raises:
            ValueError: not two whole numbers I/N with 0 <= I < N, saying how to write one.
        """
        match = _FORM.match(text or "")
        if match is None:
            raise ValueError(f"{text!r} is not I/N: write part I of N as two whole numbers, e.g. 0/4 (I from 0 to N-1)")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        """How shard files are named: ``shard-I-of-N``."""
        return f"shard-{self.index}-of-{self.count}"

    def bounds(self, length: int) -> tuple[int, int]:
        """[start, stop) of this part of `length` items: N consecutive runs, lengths within one."""
        return self.index * length // self.count, (self.index + 1) * length // self.count

    def take(self, items: list[T]) -> list[T]:
        """This part of a list: consecutive items, in their order."""
        start, stop = self.bounds(len(items))
        return items[start:stop]

    def record(self) -> dict:
        """The shard as recorded in files' provenance records."""
        return {"index": self.index, "count": self.count}


def map_order(tile: mercantile.Tile, group_zoom: int = GROUP_ZOOM) -> tuple[int, int, int, int, int]:
    """The sort key of map order: zoom, source tile (row, column), then row and column."""
    source = ancestor(tile, group_zoom)
    return tile.z, source.y, source.x, tile.y, tile.x


def pick(
    items: Iterable[T],
    shard: Shard | None,
    tile_of: Callable[[T], mercantile.Tile] = lambda item: item,
    group_zoom: int = GROUP_ZOOM,
) -> list[T]:
    """This shard's part of a list of tiles (or of items holding one), in map order.

    Args:
        items: tiles, or items from which `tile_of` gets one (tile list entries); an item
            whose tile comes again is dropped, as the stages do.
        shard: the part; None: every item, in the given order.
        tile_of: the item's tile.
        group_zoom: the zoom of the source tiles that map order keeps together.
    """
    seen: set = set()
    unique = []
    for item in items:
        tile = tile_of(item)
        if tile not in seen:
            seen.add(tile)
            unique.append(item)
    if shard is None:
        return unique
    return shard.take(sorted(unique, key=lambda item: map_order(tile_of(item), group_zoom)))


def cut(sizes: Sequence[int], shard: Shard) -> tuple[int, int]:
    """Which of consecutive units of these sizes shard I/N takes: [first, stop) of the units.

    The N - 1 cuts fall on the unit boundaries nearest to 1/N, 2/N... of the total size (the
    lower on a tie), so every unit goes to exactly one shard and the shards' totals are as
    even as whole units allow; a shard may get none when there are fewer units than shards.
    """
    ends = [0]
    for size in sizes:
        ends.append(ends[-1] + size)
    total = ends[-1]

    def boundary(k: int) -> int:
        if k <= 0:
            return 0
        if k >= shard.count:
            return len(sizes)
        target = k * total / shard.count
        return min(range(len(ends)), key=lambda i: (abs(ends[i] - target), i))

    return boundary(shard.index), boundary(shard.index + 1)


def shard_path(path: str | Path, shard: Shard) -> Path:
    """The file shard I/N of `path` is written to: ``training.hdf5`` -> ``training.shard-I-of-N.hdf5``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{shard.name}{path.suffix}")


def usable_cores() -> int:
    """The cores this process may run on: a scheduler's allocation, not the machine's count.

    Slurm (task/affinity, task/cgroup) and Kubernetes CPU managers confine a job to a CPU
    set, which the affinity mask shows; os.cpu_count() counts the whole node, and a stage
    that started a worker per core would run 64 processes on an 8-core allocation.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
