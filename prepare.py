#!/usr/bin/env python3
"""Prepare training data (sample tiles, render OSM labels, download imagery, cache to HDF5),
and map an area with a trained model.

Each subcommand is one stage of the pipeline and reads and writes files under data/
(see the README's "Files" section). The Makefile's targets call these in order.
"""

from __future__ import annotations

import sys
from typing import Sequence

from osmseg import cli
from osmseg.commands import (
    all_tiles,
    cache,
    demo_world,
    download_osm,
    filter_tiles,
    images,
    import_masks,
    labels,
    map_area,
    merge_cache,
    options,
    preview,
    sample,
    serve_demo,
)

# In pipeline order. Each module has NAME, HELP, add_arguments(parser) and main(args).
COMMANDS = {
    module.NAME: module
    for module in (
        demo_world,
        serve_demo,
        download_osm,
        all_tiles,
        sample,
        labels,
        filter_tiles,
        images,
        preview,
        cache,
        merge_cache,
        import_masks,
        map_area,
    )
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {module.HELP}" for name, module in COMMANDS.items()]
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
    command = COMMANDS[name]
    parser = options.parser(prog=f"prepare.py {name}", description=command.__doc__)
    command.add_arguments(parser)
    return command.main(parser.parse_args(rest))


if __name__ == "__main__":
    sys.exit(cli.run(main))
