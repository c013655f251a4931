"""Command-line options shared by the commands: one definition, one default, one help text each.

Every command's parser is made by `parser` (defaults shown in --help). The `add_*` functions
add the options several stages take, so that a default cannot drift between them; the
argument types turn bad values into argparse's usual usage error (exit status 2).
"""

from __future__ import annotations

import argparse
import math
import os

from osmseg import tiles
from osmseg.errors import SourceError, UserError
from osmseg.osm import KINDS as OSM_KINDS
from osmseg.osm.overpass import OVERPASS_URL

DEFAULT_BBOX = "-3.3843,51.2437,-2.3923,51.848"  # the seed's (skynet-data's) default: around Bristol
DEFAULT_OSM = "data/osm/united_kingdom.mbtiles"  # the Makefile's default QA_TILES
DEFAULT_CLASSES = "classes/mine.json"
DEFAULT_TILE_SIZE = 256
FROM_LIST = "(default: as recorded in the tile list)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults in --help and keeps the description's line breaks."""


def parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser that shows every default in --help."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


# --- Argument types --------------------------------------------------------------------------


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    value = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a number")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a number")
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} must be 0 or a positive number")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    value = _number(text, float, "a number")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be at least 0 and below 1")
    return value


def rps(text: str) -> float | None:
    """Requests per second: a positive number, or none (no limit)."""
    if text.strip().lower() in ("none", "", "0"):
        return None
    value = _number(text, float, "a number of requests per second (or none)")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number, or none")
    return value


# --- Options several stages share -----------------------------------------------------------


def add_bbox(parser, help_: str = "the area", default: str | None = DEFAULT_BBOX) -> None:
    parser.add_argument(
        "--bbox",
        default=default,
        help=f"{help_}: {tiles.BBOX_FORMAT}; write --bbox=-3.38,... (with =) when it starts with -",
    )


def add_osm_source(parser, default_osm: str | None = DEFAULT_OSM, from_list: bool = False) -> None:
    """--osm-source, --osm and the Overpass options (from_list: defaults come from the tile list)."""
    note = f" {FROM_LIST}" if from_list else ""
    parser.add_argument(
        "--osm-source", default=None if from_list else "qa-tiles", choices=OSM_KINDS, help=f"the kind of OSM source{note}"
    )
    parser.add_argument(
        "--osm",
        default=default_osm,
        help="qa-tiles: the .mbtiles; file: the .osm/.osm.pbf/.geojson; overpass: where the answer is saved "
        f"(data/osm/overpass.osm, or a folder){note}",
    )
    parser.add_argument(
        "--overpass-url", default=None if from_list else OVERPASS_URL, help=f"overpass only: the API endpoint{note}"
    )
    parser.add_argument(
        "--timeout",
        type=int,
        default=None if from_list else 180,
        help=f"overpass only: seconds to wait for the answer{note}",
    )


def add_image_tiles(parser, default: str = "demo") -> None:
    """--image-tiles (IMAGE_TILES) and --token."""
    from osmseg.imagery import TOKEN_ENV

    parser.add_argument(
        "--image-tiles",
        default=default,
        help="IMAGE_TILES: tilejson+https://.../name.json?access_token=$(MapboxAccessToken), a TileJSON URL, "
        "an XYZ template with {z} {x} {y} ({s} {-y} {q} too), file:///dir/{z}-{x}-{y}.jpg, a directory, "
        "or demo[:SEED] (the demo world's server, started here)",
    )
    parser.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help=f"access token put where IMAGE_TILES says $(MapboxAccessToken) or {{token}} "
        f"(default: the {TOKEN_ENV} environment variable; never printed)",
    )


def token(args) -> str | None:
    """The access token: --token, else the MapboxAccessToken environment variable."""
    from osmseg.imagery import TOKEN_ENV

    return getattr(args, "token", None) or os.environ.get(TOKEN_ENV) or None


def add_classes(parser, help_: str = "classes file (names, colours, filters)", default=DEFAULT_CLASSES) -> None:
    parser.add_argument("--classes", default=default, help=help_)


def add_tile_size(parser, help_: str = "label size in pixels", default=DEFAULT_TILE_SIZE) -> None:
    parser.add_argument("--tile-size", type=int, default=default, help=help_)


def add_tta(parser) -> None:
    """--tta: test-time augmentation (osmseg.segment.tta_predict), one of 1, 2, 4, 8."""
    from osmseg.segment import TTA_CHOICES

    parser.add_argument(
        "--tta", type=int, default=1, choices=TTA_CHOICES,
        help="test-time augmentation: average the model's probabilities over this many turned and mirrored "
        "copies of each window (1 off, 2 the mirror, 4 the quarter turns, 8 both); costs that many model calls",
    )  # fmt: skip


def add_workers(parser, help_: str, default: int | None = None) -> None:
    from osmseg.shards import usable_cores

    parser.add_argument("--workers", type=int, default=default or usable_cores(), help=help_)


def open_osm_source(args, bbox):
    """The OSM source --osm-source and --osm name (with the Overpass options), opened.

    Args:
        args: parsed options from add_osm_source (and --classes, for Overpass's keys).
        bbox: the mercantile.LngLatBbox that Overpass is asked about.
    """
    from osmseg import osm
    from osmseg.classes import Classes, load_classes

    if args.osm_source == "overpass":
        return osm.open_source(
            "overpass",
            args.osm,
            bbox=bbox,
            classes=args.classes if isinstance(args.classes, Classes) else load_classes(args.classes),
            endpoint=args.overpass_url,
            timeout=args.timeout,
        )
    return osm.open_source(args.osm_source, args.osm)


def check_tile_size(tile_size: int) -> None:
    if tile_size <= 0:
        raise UserError(f"--tile-size {tile_size}: must be a positive number of pixels (e.g. 256)")


# --- Settings recorded in tile lists -----------------------------------------------------------
# A tile list's #made-by record (osmseg.datafiles) holds the settings it was made with, keyed
# by option name (dest). Options that default to None take the recorded value, else their
# usual default; options that decide which tiles a stage sees must agree with the record.


def fill_from_record(args, made_by: dict, **defaults) -> None:
    """Set every option named in `defaults` that was left at None: the record's value, else the default."""
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, made_by.get(name, default))


def _same(name: str, given, recorded) -> bool:
    if name == "bbox":
        return tuple(tiles.parse_bbox(given)) == tuple(tiles.parse_bbox(recorded))
    if name in ("all_tiles", "sample", "osm", "labels", "classes"):
        return os.path.normpath(str(given)) == os.path.normpath(str(recorded))
    return given == recorded


def check_record(args, made_by: dict, path, names) -> None:
    """Refuse options given on the command line that differ from what the tile list was made with.

    Raises:
        UserError: naming the option, both values and the fix.
    """
    for name in names:
        given, recorded = getattr(args, name), made_by.get(name)
        if given is None or recorded is None or _same(name, given, recorded):
            continue
        flag = "--" + name.replace("_", "-")
        raise UserError(
            f"{flag} {given}: {path} was made with {flag} {recorded}; leave {flag} out to use that, "
            f"or remake {path} with the new value"
        )


def record(made_by: dict, command: str, args, names) -> dict:
    """The #made-by record of a new tile list: what it was made from, updated with this stage's options."""
    updated = dict(made_by)
    updated.update({name: _plain(getattr(args, name)) for name in names})
    updated["command"] = command
    return updated


def _plain(value):
    return str(value) if isinstance(value, os.PathLike) else value


def open_imagery(spec: str, token: str | None = None, timeout: float = 30.0):
    """The IMAGE_TILES source: osmseg.imagery.open_tile_source's forms, and ``demo[:SEED]``.

    ``demo:SEED`` starts the demo world's loopback server (osmseg.demo.server) in this
    process, serving the town that `prepare.py demo-world --seed SEED` mapped; closing the
    source stops it. Wired here, so that the imagery library knows nothing of the demo.

    Raises:
        SourceError: a malformed spec or an unreachable source (osmseg.imagery.open_tile_source).
    """
    from osmseg import imagery

    spec = (spec or "").strip()
    if spec != "demo" and not spec.startswith("demo:"):
        return imagery.open_tile_source(spec, token, timeout=timeout)
    seed_text = spec.partition(":")[2] or "0"
    if not seed_text.isdigit():
        raise SourceError(f"IMAGE_TILES: {spec!r}: write the demo world's seed as demo:<whole number>")
    from osmseg.demo.server import DemoTileServer

    server = DemoTileServer(seed=int(seed_text)).start()
    try:
        source = imagery.open_tilejson(server.tilejson_url, (), timeout, None)
    except BaseException:
        server.close()
        raise
    source.description = f"the demo server ({server.url})"
    source.on_close(server.close)
    return source


# --- Sharding: one machine's part of a stage (osmseg.shards) ------------------------------------


def shard(text: str):
    """``I/N``: part I (0..N-1) of N, as an osmseg.shards.Shard."""
    from osmseg.shards import Shard

    try:
        return Shard.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_shard(parser, what: str) -> None:
    """--shard I/N (the Makefile's SHARD=I SHARDS=N)."""
    parser.add_argument(
        "--shard",
        type=shard,
        default=None,
        metavar="I/N",
        help=f"do only part I of N (I from 0 to N-1) of {what}, for array jobs on many machines "
        "(the split is the same on every host; see the README's 'Preparing data on many machines'); "
        "none: all of it",
    )
