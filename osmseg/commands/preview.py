"""prepare.py preview: write data/preview.html and serve data/ on 127.0.0.1.

The page (osmseg.preview) shows each sampled tile's image and label; it needs only the labels,
so you can look before paying for imagery.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from osmseg.commands import options
from osmseg.datafiles import read_tile_list
from osmseg.preview import serve, write_preview

NAME = "preview"
HELP = "write data/preview.html and serve data/ on 127.0.0.1"


def add_arguments(parser) -> None:
    parser.add_argument("--data", type=Path, default=Path("data"),
                        help="the data directory (images/, labels/color/)")
    parser.add_argument("--sample", type=Path, default=Path("data/sample-filtered.txt"),
                        help="tiles to show, with their per-class pixel counts")
    parser.add_argument("--classes", type=Path, default=None,
                        help=f"the classes file {options.FROM_LIST}, else {options.DEFAULT_CLASSES}")
    parser.add_argument("--out", type=Path, default=Path("data/preview.html"), help="the page to write")
    parser.add_argument("--serve", action=argparse.BooleanOptionalAction, default=None,
                        help="serve the page on 127.0.0.1 until Ctrl-C (default: when stdout is a terminal)")
    parser.add_argument("--port", type=int, default=0, help="port to serve on (0: any free port)")
    parser.add_argument("--page-size", type=int, default=100, help="tiles per page")


def main(args) -> int:
    if args.classes is None and args.sample.exists():
        options.fill_from_record(args, read_tile_list(args.sample).made_by, classes=options.DEFAULT_CLASSES)
    args.classes = Path(args.classes or options.DEFAULT_CLASSES)
    data = write_preview(args.data, args.sample, args.classes, args.out, args.page_size)
    statuses: dict[str, int] = {}
    for tile in data["tiles"]:
        statuses[tile["status"]] = statuses.get(tile["status"], 0) + 1
    labelled = sum("label" in tile for tile in data["tiles"])
    described = ", ".join(f"{n} {status}" for status, n in statuses.items())
    print(f"preview: {args.out} shows {len(data['tiles'])} tiles ({labelled} with a label; images: {described})")
    serve_now = sys.stdout.isatty() if args.serve is None else args.serve
    if serve_now:
        page = args.out.resolve()
        root = Path(os.path.commonpath([page.parent, args.data.resolve()]))
        serve(root, page, args.port)
    else:
        print(f"open {args.out} in a browser, or run with --serve")
    return 0
