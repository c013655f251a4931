#!/usr/bin/env python3
"""Prepare training data: sample tiles, render OSM labels, download imagery, cache to HDF5.

Each subcommand is one stage of the pipeline and reads and writes files under data/
(see the README's "Files" section). The Makefile's targets call these in order.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from osmseg import cli

# name: (module, help). A module implementing command `foo-bar` defines
# configure_foo_bar(parser) and run_foo_bar(args) -> exit status or None.
COMMANDS = {
    "demo-world": ("osmseg.demo", "write the offline demo world's OSM QA tiles (MBTiles)"),
    "serve-demo": ("osmseg.tileserver", "serve the demo world's imagery on 127.0.0.1"),
    "download-osm": ("osmseg.osm", "download OSM QA tiles for a country or the planet"),
    "all-tiles": ("osmseg.tiles", "list the OSM source tiles that intersect a bounding box"),
    "sample": ("osmseg.tiles", "draw a reproducible random sample of tiles in a bounding box"),
    "labels": ("osmseg.labels", "render one label PNG per sampled tile with mapnik"),
    "filter": ("osmseg.labels", "count label pixels per class and keep tiles above a ratio"),
    "images": ("osmseg.imagery", "download the imagery tiles of the filtered sample"),
    "preview": ("osmseg.preview", "write data/preview.html and serve data/ on 127.0.0.1"),
    "cache": ("osmseg.cache", "hold back a test set and cache images and labels to HDF5"),
    "import": ("osmseg.cache", "cache your own image/mask pairs to HDF5"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return (
        f"usage: prepare.py COMMAND [options]\n\n{__doc__}\ncommands:\n"
        + "\n".join(lines)
        + "\n\nRun `prepare.py COMMAND --help` for a command's options."
    )


def main(argv: Sequence[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    function = name.replace("-", "_")
    parser = cli.parser(prog=f"prepare.py {name}", description=help_)
    getattr(module, f"configure_{function}")(parser)
    args = parser.parse_args(rest)
    return getattr(module, f"run_{function}")(args)


if __name__ == "__main__":
    sys.exit(cli.run(main))
