"""The files under data/ that stages hand each other: tile lists, tile file names, imagery logs.

Tile lists (``data/all_tiles.txt``, ``data/sample.txt``, ``data/sample-filtered.txt``,
``data/test-sample-filtered.txt``) are text, one tile per line, fields separated by one space::

    #source z x y [<column> ...]
    #made-by {"command": "sample", "bbox": "-0.0275,...", "zoom": 17, "seed": 0, ...}
    demo 17 65480 65472 [<count> ...]

- ``source``: the OSM source's name (``demo`` for data/osm/demo.mbtiles); ``z x y``: the tile
  in the XYZ scheme (y counts from the north), as mercantile.Tile(x, y, z).
- The first line names the columns. In the filtered lists the extra columns are the pixel
  count of every class of the classes file, in its order, then ``Background``: integers
  summing to TILE_SIZE squared.
- ``#made-by`` holds JSON: how the list was made (the command and its settings, with those of
  the lists it was made from), so that a later stage need not be told them again and can
  refuse a list made with other settings. Lists from before this line existed have none.
- Other lines starting with ``#`` and blank lines are ignored.

Tile files, named by the tile (``tile_stem``): ``data/labels/color/{z}-{x}-{y}.png`` (labels,
``label_path``) and ``data/images/{z}-{x}-{y}.{jpg,png,webp}`` (imagery as served,
``find_image``).

Imagery logs in data/images/ (``read_tile_log``): ``rejected.txt`` and ``missing.txt``, one
line per tile, ``z-x-y<TAB>reason``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import mercantile
import numpy as np

from osmseg import atomic
from osmseg.errors import UserError, read_user_file

HEADER = "#source z x y"
MADE_BY = "#made-by "
IMAGE_SUFFIXES = (".jpg", ".png", ".webp")  # imagery tiles, by the bytes' signature
REJECTED = "rejected.txt"
MISSING = "missing.txt"
_STEM = re.compile(r"^(\d{1,2})-(\d+)-(\d+)$")

Entry = tuple[str, mercantile.Tile]  # (source name, tile)


@dataclass
class TileList:
    """A tile list as read: its tiles, how it was made, and its count columns if any.

    Attributes:
        entries: (source name, Tile) in file order.
        made_by: the ``#made-by`` record ({} when the file has none).
        columns: the names of the columns after ``source z x y`` ([] for a plain list).
        counts: int64 (len(entries), len(columns)), or None for a plain list.
        lines: the tiles' lines as written, to copy a subset of a list unchanged.
    """

    entries: list[Entry]
    made_by: dict = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    counts: np.ndarray | None = None
    lines: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def tiles(self) -> list[mercantile.Tile]:
        return [tile for _, tile in self.entries]


def read_tile_list(path: str | os.PathLike, make_hint: str | None = None) -> TileList:
    """Read a tile list (see the module docstring).

    Args:
        path: the file.
        make_hint: how to make it, for the message when it is missing (default:
            ``make <path>``).

    Raises:
        UserError: a missing or unreadable file, a line that is not ``source z x y`` with a
            valid tile, or count columns that do not match the header (naming the line).
    """
    path = Path(path)
    text = read_user_file(path, "tile list", f"make it first ({make_hint or f'make {path}'})")
    result = TileList([])
    rows: list[list[int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith(MADE_BY):
            try:
                result.made_by = json.loads(stripped[len(MADE_BY) :])
            except json.JSONDecodeError:
                raise UserError(f"{path}:{number}: its #made-by record is not JSON; remake the file") from None
            continue
        if stripped.startswith(HEADER):
            result.columns = stripped[len(HEADER) :].split()
            continue
        if stripped.startswith("#"):
            continue
        fields = stripped.split()
        try:
            z, x, y = (int(value) for value in fields[1:4])
            if len(fields) < 4 or not 0 <= z <= 30 or not (0 <= x < 1 << z and 0 <= y < 1 << z):
                raise ValueError
        except ValueError:
            raise UserError(
                f"{path}:{number}: expected `source z x y` with a valid tile, got {stripped!r}; fix or remake the file"
            ) from None
        if result.columns:
            try:
                values = [int(value) for value in fields[4:]]
            except ValueError:
                raise UserError(f"{path}:{number}: counts must be whole numbers, got {stripped!r}") from None
            if len(values) != len(result.columns):
                raise UserError(
                    f"{path}:{number}: expected {4 + len(result.columns)} columns (source z x y "
                    f"{' '.join(result.columns)}), found {len(fields)}; remake the file"
                )
            rows.append(values)
        result.entries.append((fields[0], mercantile.Tile(x, y, z)))
        result.lines.append(stripped)
    if result.columns:
        result.counts = np.array(rows, dtype=np.int64).reshape(len(rows), len(result.columns))
    return result


def format_tile_list(
    entries, made_by: dict | None = None, columns=(), counts=None
) -> str:
    """The text of a tile list: the header, the #made-by record, one line per entry."""
    header = " ".join([HEADER, *columns])
    lines = [header]
    if made_by:
        lines.append(MADE_BY + json.dumps(made_by, sort_keys=True))
    for number, (source, tile) in enumerate(entries):
        line = f"{source} {tile.z} {tile.x} {tile.y}"
        if columns:
            line += " " + " ".join(str(int(value)) for value in counts[number])
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_tile_list(path: str | os.PathLike, entries, made_by: dict | None = None, columns=(), counts=None) -> None:
    """Write a tile list atomically (a temporary name, then a rename).

    Args:
        path: the file.
        entries: (source name, Tile) pairs.
        made_by: how the list was made (the #made-by record).
        columns: names of the count columns (none for a plain list).
        counts: one row of len(columns) integers per entry.
    """
    atomic.write_text_atomic(path, format_tile_list(entries, made_by, columns, counts))


def tile_stem(tile: mercantile.Tile) -> str:
    """A tile's file name without its suffix: ``{z}-{x}-{y}``."""
    return f"{tile.z}-{tile.x}-{tile.y}"


def parse_tile_stem(stem: str) -> mercantile.Tile | None:
    """The tile a ``{z}-{x}-{y}`` file-name stem names, or None if it names none."""
    match = _STEM.match(stem)
    if match is None:
        return None
    z, x, y = (int(value) for value in match.groups())
    if z > 30 or x >= 1 << z or y >= 1 << z:
        return None
    return mercantile.Tile(x, y, z)


def label_path(labels_dir: str | os.PathLike, tile: mercantile.Tile) -> Path:
    """Where the label of a tile lives: labels_dir/{z}-{x}-{y}.png."""
    return Path(labels_dir) / f"{tile_stem(tile)}.png"


def find_image(images_dir: str | os.PathLike, tile: mercantile.Tile, folder: str | None = None) -> Path | None:
    """The image of a tile in images_dir (or in its subfolder `folder`, e.g. "rejected"), or None."""
    directory = Path(images_dir) if folder is None else Path(images_dir) / folder
    for suffix in IMAGE_SUFFIXES:
        path = directory / f"{tile_stem(tile)}{suffix}"
        if path.is_file():
            return path
    return None


def read_tile_log(path: str | os.PathLike) -> dict[str, str]:
    """Read rejected.txt or missing.txt: {"z-x-y": reason} ({} when the file is absent)."""
    path = Path(path)
    entries: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            stem, _, reason = line.partition("\t")
            if stem.strip():
                entries[stem.strip()] = reason
    return entries


def write_tile_log(path: str | os.PathLike, entries: dict[str, str]) -> None:
    """Write rejected.txt or missing.txt atomically, one ``z-x-y<TAB>reason`` line per entry."""
    atomic.write_text_atomic(path, "".join(f"{stem}\t{reason}\n" for stem, reason in entries.items()))
