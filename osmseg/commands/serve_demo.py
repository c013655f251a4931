"""prepare.py serve-demo: serve the demo world's imagery on 127.0.0.1 until Ctrl-C.

Prints the TileJSON address first (osmseg.demo.server describes what is served).
"""

from __future__ import annotations

import sys
import threading

from osmseg.demo.server import DemoTileServer
from osmseg.errors import SourceError

NAME = "serve-demo"
HELP = "serve the demo world's imagery on 127.0.0.1"


def add_arguments(parser) -> None:
    parser.add_argument("--port", type=int, default=8765, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--seed", type=int, default=0, help="the demo world's random seed")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds to wait before answering each tile")
    parser.add_argument("--token", default=None, help="require ?access_token=TOKEN on every request")


def _wait_forever(server: DemoTileServer) -> None:
    """Block until Ctrl-C (a separate function so that tests can stand in for the user)."""
    threading.Event().wait()


def main(args) -> int:
    if not 0 <= args.port <= 65535:
        raise SourceError(f"--port {args.port} is not a TCP port; pass 0-65535 (0: any free port)")
    if args.latency < 0:
        raise SourceError(f"--latency {args.latency} is negative; pass seconds >= 0")
    server = DemoTileServer(args.seed, latency=args.latency, token=args.token, port=args.port)
    with server:
        print(server.tilejson_url, flush=True)
        note = " (requests need ?access_token=<the --token value>)" if args.token else ""
        print(
            f"serving the demo world's imagery at {server.url}/{{z}}/{{x}}/{{y}}.jpg{note}; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        try:
            _wait_forever(server)
        except KeyboardInterrupt:
            print(f"stopped after {server.request_count} requests", file=sys.stderr)
    return 0
