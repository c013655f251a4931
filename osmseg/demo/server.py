"""The demo world's imagery: a loopback HTTP tile server that behaves like a real one.

`DemoTileServer` serves, on 127.0.0.1 and a free port, in a background thread:

* `GET /demo.json` -- a TileJSON 2.2.0 document: `tiles` ["<url>/{z}/{x}/{y}.jpg"],
  `minzoom` 15, `maxzoom` 19, `bounds` [w, s, e, n] (the demo world's, degrees), `center`.
* `GET /{z}/{x}/{y}.jpg` -- a 256×256 RGB JPEG (quality 85) of that XYZ tile (y from the
  north, as in Google/OSM tiles), drawn by osmseg.demo.painter from every feature of the
  demo world, mapped or not. Zoom levels outside 15-19 or x, y outside the zoom's range
  answer 404. Drawn tiles are cached (CACHE_TILES), so a second download of the same tiles
  is served at HTTP speed.

Like a real service it can be slow and want a token (`set_behaviour`, or the constructor):

* `latency` seconds slept before answering each tile request;
* `token`: requests need `?access_token=<token>`: none answers 401, a wrong one 403.

Tests make it misbehave in other ways (429s, 5xx, cut-off bodies) by overriding `fault`,
which may answer any request in place of the server (tests/demo_faults.py).
`prepare.py serve-demo` runs the server until Ctrl-C.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

import mercantile

from osmseg.demo.painter import _painter
from osmseg.errors import SourceError

MIN_ZOOM = 15
MAX_ZOOM = 19
CACHE_TILES = 4096  # about 60 MB of JPEG bytes at most



class Fault(NamedTuple):
    """An answer given in place of the server's: a status with a JSON body, or a cut-off body."""

    status: int | None = None  # answer this status with `document`; None: answer as usual
    document: dict | None = None
    headers: dict | None = None
    truncate: bool = False  # send the usual answer's headers and half its body, then hang up


class DemoTileServer:
    """The demo world's imagery over HTTP on 127.0.0.1 (see the module docstring).

    Use as a context manager, or call start() and close(). `latency` and `token` are as
    set_behaviour's; `port=0` picks a free port.
    """

    def __init__(self, seed: int = 0, *, latency: float = 0.0, token: str | None = None, port: int = 0):
        self.seed = seed
        self.port = port
        self._painter = _painter(seed)
        self.latency, self.token = 0.0, None
        self.set_behaviour(latency=latency, token=token)
        self._count = 0
        self._count_lock = threading.Lock()
        self._cache: dict[tuple[int, int, int], bytes] = {}
        self._cache_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- behaviour and counters

    def set_behaviour(self, *, latency: float | None = None, token: str | None = ..., **unknown) -> None:
        """Change the latency (seconds per tile) or the token (None: none needed) while running."""
        if unknown:
            raise TypeError(f"unknown setting(s) {sorted(unknown)}; the demo server has latency and token")
        if latency is not None:
            if not latency >= 0:
                raise ValueError(f"latency must be >= 0 seconds, got {latency!r}")
            self.latency = float(latency)
        if token is not ...:
            self.token = token

    def fault(self, number: int, path: str) -> Fault | None:
        """How to answer request `number` (counting from 1) for `path` instead, or None (as usual).

        The demo server never misbehaves; tests override this (tests/demo_faults.py).
        """
        return None

    @property
    def request_count(self) -> int:
        """How many requests the server has received (all paths, all answers)."""
        return self._count

    def _next_request(self) -> int:
        with self._count_lock:
            self._count += 1
            return self._count

    # -- addresses

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the demo tile server is not started; call start() or use `with`")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def tilejson_url(self) -> str:
        return self.url + "/demo.json"

    def tilejson(self) -> dict:
        bbox = self._painter.world.bbox
        return {
            "tilejson": "2.2.0",
            "name": "osmseg demo world",
            "description": f"synthetic imagery of the osmseg demo world, seed {self.seed}",
            "attribution": "osmseg demo world (synthetic)",
            "scheme": "xyz",
            "format": "jpg",
            "tiles": [self.url + "/{z}/{x}/{y}.jpg"],
            "minzoom": MIN_ZOOM,
            "maxzoom": MAX_ZOOM,
            "bounds": [bbox.west, bbox.south, bbox.east, bbox.north],
            "center": [(bbox.west + bbox.east) / 2, (bbox.south + bbox.north) / 2, 17],
        }

    # -- tiles

    def tile_bytes(self, tile: mercantile.Tile) -> bytes:
        """The JPEG bytes of one tile, drawn once and then cached."""
        key = (tile.z, tile.x, tile.y)
        data = self._cache.get(key)
        if data is None:
            data = self._painter.jpeg(tile)
            with self._cache_lock:
                if len(self._cache) >= CACHE_TILES:
                    self._cache.pop(next(iter(self._cache)))  # oldest first
                self._cache[key] = data
        return data

    # -- lifecycle

    def start(self) -> DemoTileServer:
        if self._server is not None:
            return self
        owner = self

        class Handler(_Handler):
            server_owner = owner

        try:
            server = _Server(("127.0.0.1", self.port), Handler)
        except OSError as error:
            raise SourceError(
                f"cannot listen on 127.0.0.1:{self.port} ({error.strerror}); pass another port, or 0 for a free one"
            ) from None
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="demo-tile-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> DemoTileServer:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # benchmarks open dozens of connections at once

    def handle_error(self, request, client_address):
        # A client that hangs up mid-answer (as downloaders under test do) is not news;
        # anything else is a bug worth its traceback.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so that clients can pool connections
    # Send headers and body at once: with Nagle's algorithm the body of a kept-alive
    # connection waits ~40 ms for the client's delayed ACK of the headers.
    disable_nagle_algorithm = True
    server_owner: DemoTileServer

    def log_message(self, format, *args):  # quiet: tests and benchmarks read stderr
        pass

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None, truncate: bool = False):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if truncate:
            # The promised length, half the bytes, then hang up: a dropped connection.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _send_json(self, status: int, document: dict, headers: dict | None = None, truncate: bool = False):
        self._send(status, json.dumps(document).encode(), "application/json", headers, truncate)

    def do_GET(self):
        owner = self.server_owner
        number = owner._next_request()
        parsed = urllib.parse.urlsplit(self.path)
        parts = parsed.path.strip("/").split("/")
        is_tile = len(parts) == 3 and parts[2].endswith(".jpg")
        if is_tile and owner.latency:
            time.sleep(owner.latency)

        token = owner.token
        if token is not None:
            given = urllib.parse.parse_qs(parsed.query).get("access_token")
            if not given:
                return self._send_json(401, {"message": "Not Authorized - No Token"})
            if given[0] != token:
                return self._send_json(403, {"message": "Not Authorized - Invalid Token"})

        fault = owner.fault(number, parsed.path)
        if fault is not None and fault.status is not None:
            return self._send_json(fault.status, fault.document or {}, fault.headers)
        truncate = fault is not None and fault.truncate

        if parsed.path == "/demo.json":
            return self._send_json(200, owner.tilejson(), truncate=truncate)
        if is_tile:
            try:
                z, x, y = int(parts[0]), int(parts[1]), int(parts[2][: -len(".jpg")])
            except ValueError:
                return self._send_json(404, {"message": f"Not Found: {parsed.path}"})
            if not (MIN_ZOOM <= z <= MAX_ZOOM and 0 <= x < 2**z and 0 <= y < 2**z):
                return self._send_json(
                    404, {"message": f"Tile {z}/{x}/{y} does not exist (zoom {MIN_ZOOM}-{MAX_ZOOM})"}
                )
            body = owner.tile_bytes(mercantile.Tile(x, y, z))
            return self._send(200, body, "image/jpeg", {"Cache-Control": "max-age=3600"}, truncate=truncate)
        return self._send_json(404, {"message": f"Not Found: {parsed.path}"})


