"""Imagery tiles: where they come from (TileJSON, XYZ templates, local files, the demo server)
and a robust, resumable downloader.

Files written (all under the output directory, default data/images/):

- ``{z}-{x}-{y}.{jpg|png|webp}``: one tile's image, the bytes exactly as the source served
  them; the extension comes from the bytes' signature (JPEG ``FF D8 FF``, PNG ``89 PNG``, WebP
  ``RIFF....WEBP``), never from the URL. Only accepted images are written here: each was
  decoded, is TILE_SIZE x TILE_SIZE and is not blank. Written under a temporary name and
  renamed, so a file with this name is always complete.
- ``rejected.txt``: one line per rejected tile, ``z-x-y<TAB>reason`` (corrupt, truncated,
  wrong size, blank...). Appended as tiles are rejected; a re-run skips the tiles listed
  here (delete a line, or pass --retry-rejected, to try one again).
- ``rejected/{z}-{x}-{y}.{ext}``: the rejected bytes, to look at; ``rejected/existing-*``:
  files found in the images directory that failed the checks (set aside, then fetched again).
- ``missing.txt``: ``z-x-y<TAB>reason`` for tiles the source does not have (HTTP 404/410/204,
  no such local file, outside the source's bounds). Rewritten at the end of every run;
  missing tiles are asked for again on a re-run.

Secrets: IMAGE_TILES may carry an access token. Every URL that reaches a message, a log
record, an exception or a file goes through ``redact``, which masks ``access_token`` and any
query parameter whose name looks secret, and the literal token wherever it appears.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import itertools
import json
import logging
import os
import random
import re
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Iterable, Sequence

import mercantile
import numpy as np

from osmseg import atomic
from osmseg.datafiles import MISSING, REJECTED, find_image, read_tile_log, tile_stem, write_tile_log
from osmseg.errors import SourceError, UserError

DEFAULT_SUBDOMAINS = ("a", "b", "c")  # Leaflet's and OSM's convention for {s}
TOKEN_ENV = "MapboxAccessToken"

# Ways to write "put the token here" in IMAGE_TILES: the seed's Makefile form first.
_TOKEN_PLACEHOLDERS = ("$(MapboxAccessToken)", "${MapboxAccessToken}", "$MapboxAccessToken",
                       "{token}", "{access_token}")
# Query keys whose values are secrets: any name ending in one of these words, case-insensitive
# (access_token, apiKey, subscription-key, X-Amz-Signature, X-Amz-Credential, sig, ...).
# Masking a harmless value is cheap; printing a token is not.
_SECRET_KEY = re.compile(
    r".*(token|key|secret|signature|sig|password|passwd|pwd|credential|auth|authorization|session)s?",
    re.IGNORECASE,
)
_QUERY_PAIR = re.compile(r"(?P<sep>[?&;])(?P<key>[^=&;#\s'\"]+)=(?P<value>[^&;#\s'\"]*)")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]+@")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_KNOWN_PLACEHOLDERS = {"z", "x", "y", "-y", "q", "s", "r"}

# Blank imagery, skynet-data's rule: mostly black (no data) or mostly white (clouds, no data).
BLACK_MAX, BLACK_FRACTION = 40, 0.95
WHITE_MIN, WHITE_FRACTION = 220, 0.50


# --- Redaction -----------------------------------------------------------------------


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask secrets in a URL, or in any text that contains URLs.

    Masks the values of query parameters whose names look secret (access_token, token, key,
    apikey, api_key, secret, signature, sig, password, ...), user:password@ in URLs, and
    every literal occurrence of the given secrets (a token may also sit in a URL's path).

    Args:
        text: a URL, a message or an exception's text.
        secrets: literal strings to mask wherever they occur.
    """
    text = str(text)
    for secret in secrets:
        # Very short strings would mask half of every message; tokens are long.
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
            quoted = urllib.parse.quote(secret, safe="")
            if quoted != secret:
                text = text.replace(quoted, "***")

    def mask(match: re.Match) -> str:
        key = match.group("key")
        if _SECRET_KEY.fullmatch(urllib.parse.unquote(key)) and match.group("value"):
            return f"{match.group('sep')}{key}=***"
        return match.group(0)

    text = _QUERY_PAIR.sub(mask, text)
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)


class _RedactingFilter(logging.Filter):
    """Redacts URLs in log records (urllib3 logs request lines, queries included, at DEBUG)."""

    secrets: tuple[str, ...] = ()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is logging's problem, not ours
            return True
        record.msg, record.args = redact(message, _RedactingFilter.secrets), None
        return True


_LOG_FILTER = _RedactingFilter()


def _guard_logs(secrets: Sequence[str]) -> None:
    _RedactingFilter.secrets = tuple(set(_RedactingFilter.secrets) | {s for s in secrets if s})
    for name in ("urllib3", "urllib3.connectionpool", "requests"):
        logger = logging.getLogger(name)
        if _LOG_FILTER not in logger.filters:
            logger.addFilter(_LOG_FILTER)


# --- Tile sources ----------------------------------------------------------------------


def substitute_token(spec: str, token: str | None) -> tuple[str, bool]:
    """Put the token where IMAGE_TILES asks for it ($(MapboxAccessToken), {token}, ...).

    Returns:
        The spec with the token in place, and whether it asked for one.
    """
    wanted = any(placeholder in spec for placeholder in _TOKEN_PLACEHOLDERS)
    if wanted and not token:
        raise SourceError(
            f"IMAGE_TILES asks for an access token ({redact(spec)}) but none is set: "
            f"export {TOKEN_ENV}=... or pass --token"
        )
    for placeholder in _TOKEN_PLACEHOLDERS:
        spec = spec.replace(placeholder, urllib.parse.quote(token or "", safe=""))
    return spec, wanted


def _query_secrets(url: str) -> list[str]:
    query = urllib.parse.urlsplit(url).query
    return [value for key, value in urllib.parse.parse_qsl(query) if _SECRET_KEY.fullmatch(key) and value]


def _check_template(template: str, origin: str) -> None:
    """Raise SourceError unless the template names a tile: {z}/{x}/{y}, {-y} or {q}."""
    names = set()
    for name in _PLACEHOLDER.findall(template):
        if name.startswith("switch:"):
            continue
        if name not in _KNOWN_PLACEHOLDERS:
            raise SourceError(
                f"{origin}: unknown placeholder {{{name}}} in {redact(template)}; "
                "use {z} {x} {y}, {-y} (TMS rows), {q} (quadkey), {s} or {switch:a,b,c} (subdomains)"
            )
        names.add(name)
    if "q" in names:
        return
    missing = [f"{{{n}}}" for n in ("z", "x", "y") if n not in names and not (n == "y" and "-y" in names)]
    if missing:
        raise SourceError(
            f"{origin}: template {redact(template)} lacks {' '.join(missing)}; a tile template "
            "needs {z}, {x} and {y} (or {-y} for TMS rows, or {q} for a quadkey)"
        )


def _fill(template: str, tile: mercantile.Tile, subdomain: str | None) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name == "z":
            return str(tile.z)
        if name == "x":
            return str(tile.x)
        if name == "y":
            return str(tile.y)
        if name == "-y":
            return str(2**tile.z - 1 - tile.y)
        if name == "q":
            return mercantile.quadkey(tile)
        if name == "r":  # Leaflet's retina suffix: we ask for the tile size we were told
            return ""
        if name == "s" or name.startswith("switch:"):
            return subdomain or ""
        return match.group(0)

    return _PLACEHOLDER.sub(value, template)


@dataclasses.dataclass
class TileSource:
    """Where imagery tiles come from: URL or file templates, the zooms and area they cover.

    Attributes:
        kind: "http" (templates are URLs) or "file" (templates are paths; a template ending
            in ".*" means any of .jpg/.jpeg/.png/.webp).
        templates: tile templates; HTTP requests go round-robin over them.
        description: how to name the source in messages (secrets redacted).
        minzoom, maxzoom: the zooms it serves.
        bounds: the area it covers (mercantile.LngLatBbox, degrees), or None for the world.
        secrets: literal secrets to mask in every message (the token).
        scheme: "xyz", or "tms" when a TileJSON says its {y} counts rows from the south.
    """

    kind: str
    templates: list[str]
    description: str
    minzoom: int = 0
    maxzoom: int = 30
    bounds: mercantile.LngLatBbox | None = None
    secrets: tuple[str, ...] = ()
    scheme: str = "xyz"
    _closers: list[Callable[[], None]] = dataclasses.field(default_factory=list, repr=False)
    _counter: itertools.count = dataclasses.field(default_factory=itertools.count, repr=False)

    def redact(self, text: str) -> str:
        """The text with this source's secrets and any secret-looking query values masked."""
        return redact(text, self.secrets)

    def serves_zoom(self, zoom: int) -> bool:
        return self.minzoom <= zoom <= self.maxzoom

    def covers(self, tile: mercantile.Tile) -> bool:
        """Whether the tile overlaps the source's bounds."""
        if self.bounds is None:
            return True
        west, south, east, north = mercantile.bounds(tile)
        b = self.bounds
        return west < b.east and east > b.west and south < b.north and north > b.south

    def locations(self, tile: mercantile.Tile) -> list[str]:
        """Where to get the tile: one URL (the next template, round-robin), or every file path."""
        if self.scheme == "tms":
            tile = mercantile.Tile(tile.x, 2**tile.z - 1 - tile.y, tile.z)
        if self.kind == "file":
            return [_fill(t, tile, None) for t in self.templates]
        # itertools.count's next() is atomic under the GIL, so threads share it safely.
        turn = next(self._counter)
        template = self.templates[turn % len(self.templates)]
        subdomains = _subdomains(template)
        subdomain = subdomains[(turn // len(self.templates)) % len(subdomains)] if subdomains else None
        return [_fill(template, tile, subdomain)]

    def close(self) -> None:
        """Stop what the source started (the demo server)."""
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> "TileSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _subdomains(template: str) -> list[str] | None:
    for name in _PLACEHOLDER.findall(template):
        if name == "s":
            return list(DEFAULT_SUBDOMAINS)
        if name.startswith("switch:"):
            return [s.strip() for s in name[len("switch:"):].split(",") if s.strip()]
    return None


def new_session(workers: int = 8):
    """A requests.Session whose connection pool holds a connection for every worker.

    Retries are ours (see download_tiles), so urllib3's own are off.
    """
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(workers, 10), max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "osmseg-imagery/1 (training data for OSM-labelled segmentation)"
    return session


def open_tile_source(spec: str, token: str | None = None, *, timeout: float = 30.0,
                     session=None) -> TileSource:
    """Open an IMAGE_TILES source.

    Forms:
        - ``demo``: start the demo world's loopback server (osmseg.tileserver) in this
          process; closing the source stops it.
        - ``tilejson+https://host/name.json?access_token=...`` (the seed's form), or a plain
          TileJSON URL (ending in .json, or answering JSON): its ``tiles`` templates,
          ``minzoom``/``maxzoom``, ``bounds`` and ``scheme`` are used.
        - ``https://host/{z}/{x}/{y}.jpg``: an XYZ template; ``{s}`` picks a, b or c (or the
          list in ``{switch:a,b}``), ``{-y}`` is the TMS row, ``{q}`` the quadkey.
        - ``file:///path/{z}-{x}-{y}.jpg``: a file template (same placeholders).
        - ``/path/to/dir``: a directory of ``{z}-{x}-{y}.*`` or ``{z}/{x}/{y}.*`` files.

    ``$(MapboxAccessToken)``, ``${MapboxAccessToken}`` or ``{token}`` in the spec are replaced
    by the token.

    Args:
        spec: the IMAGE_TILES text.
        token: the access token (from --token or the environment), if any.
        timeout: seconds to wait for a TileJSON document.
        session: a requests.Session to fetch TileJSON with (default: a new one).

    Raises:
        SourceError: malformed spec, missing token, TileJSON without tiles, unreachable host.
    """
    spec = (spec or "").strip()
    if not spec:
        raise SourceError("IMAGE_TILES is empty; give a TileJSON URL, an XYZ template, a directory or 'demo'")
    if spec == "demo" or spec.startswith("demo:"):
        # `demo:SEED` serves the town that `prepare.py demo-world --seed SEED` mapped.
        seed_text = spec.partition(":")[2] or "0"
        if not seed_text.isdigit():
            raise SourceError(f"IMAGE_TILES: {spec!r}: write the demo world's seed as demo:<whole number>")
        return _open_demo(int(seed_text), timeout=timeout, session=session)
    spec, _ = substitute_token(spec, token)
    secrets = tuple(s for s in {token or "", *_query_secrets(spec.removeprefix("tilejson+"))} if s)
    _guard_logs(secrets)
    origin = "IMAGE_TILES"
    if spec.startswith("tilejson+"):
        url = spec[len("tilejson+"):]
        if not url.startswith(("http://", "https://", "file://")):
            raise SourceError(f"{origin}: {redact(spec, secrets)}: expected tilejson+https://host/name.json")
        return _open_tilejson(url, secrets, timeout, session)
    if spec.startswith(("http://", "https://")):
        if _PLACEHOLDER.search(spec):
            _check_template(spec, origin)
            return TileSource("http", [spec], redact(spec, secrets), secrets=secrets)
        return _open_tilejson(spec, secrets, timeout, session)
    if spec.startswith("file://"):
        path = spec[len("file://"):]
        path = path[len("localhost"):] if path.startswith("localhost/") else path
        path = urllib.parse.unquote(path)
        if path.endswith(".json") and not _PLACEHOLDER.search(path):
            return _open_tilejson(spec, secrets, timeout, session)
        _check_template(path, origin)
        return TileSource("file", [path], spec, secrets=secrets)
    if "://" in spec:
        raise SourceError(
            f"{origin}: unsupported scheme in {redact(spec, secrets)}; use http(s)://, "
            "tilejson+https://, file://, a directory or 'demo'"
        )
    directory = Path(spec)
    if directory.is_dir():
        templates = [str(directory / "{z}-{x}-{y}.*"), str(directory / "{z}" / "{x}" / "{y}.*")]
        return TileSource("file", templates, f"directory {directory}", secrets=secrets)
    if _PLACEHOLDER.search(spec):
        _check_template(spec, origin)
        return TileSource("file", [spec], spec, secrets=secrets)
    raise SourceError(
        f"{origin}: {redact(spec, secrets)!r} is neither a URL, a file:// template, an existing "
        "directory nor 'demo'; for example tilejson+https://a.tiles.mapbox.com/v4/mapbox.satellite.json"
        "?access_token=$(MapboxAccessToken) or https://tile.example.com/{z}/{x}/{y}.jpg"
    )


def _open_demo(seed: int, timeout: float, session) -> TileSource:
    from osmseg.tileserver import DemoTileServer

    server = DemoTileServer(seed=seed)
    server.start()
    try:
        source = _open_tilejson(server.tilejson_url, (), timeout, session)
    except BaseException:
        server.close()
        raise
    source.description = f"the demo server ({server.url})"
    source._closers.append(server.close)
    return source


def _fetch_tilejson_text(url: str, secrets: Sequence[str], timeout: float, session) -> str:
    if url.startswith("file://"):
        path = Path(urllib.parse.unquote(url[len("file://"):]))
        try:
            return path.read_text()
        except OSError as error:
            raise SourceError(f"TileJSON {path}: cannot read it ({error.strerror})") from None
    import requests

    session = session or new_session(1)
    shown = redact(url, secrets)
    error_text, wait = "", 0.0
    for attempt in range(4):
        if attempt:
            time.sleep(wait)
        try:
            response = session.get(url, timeout=timeout)
        except requests.RequestException as error:
            error_text = _describe_request_error(error, secrets)
            wait = 0.2 * 2**attempt
            continue
        if response.status_code in (401, 403):
            raise SourceError(_auth_message(response.status_code, shown))
        if response.status_code >= 500 or response.status_code == 429:
            error_text = f"HTTP {response.status_code}"
            wait = min(60.0, _retry_after(response) or 0.2 * 2**attempt)
            continue
        if response.status_code != 200:
            raise SourceError(f"TileJSON {shown}: HTTP {response.status_code}; check the URL in IMAGE_TILES")
        return response.text
    raise SourceError(f"TileJSON {shown}: cannot fetch it ({error_text}); check the host in IMAGE_TILES and your network")


def _open_tilejson(url: str, secrets: Sequence[str], timeout: float, session) -> TileSource:
    shown = redact(url, secrets)
    text = _fetch_tilejson_text(url, secrets, timeout, session)
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        raise SourceError(
            f"IMAGE_TILES {shown} answered something that is not JSON: it is neither a TileJSON "
            "document nor a tile template (a template needs {z}, {x} and {y})"
        ) from None
    if not isinstance(document, dict):
        raise SourceError(f"TileJSON {shown}: expected a JSON object")
    tiles = document.get("tiles")
    if not isinstance(tiles, list) or not tiles or not all(isinstance(t, str) for t in tiles):
        raise SourceError(
            f"TileJSON {shown} has no 'tiles' list of URL templates; is it a TileJSON document? "
            "(https://github.com/mapbox/tilejson-spec)"
        )
    templates = []
    for template in tiles:
        template = urllib.parse.urljoin(url, template)
        template = _carry_secrets(url, template)
        _check_template(template, f"TileJSON {shown}")
        templates.append(template)
    minzoom, maxzoom = document.get("minzoom", 0), document.get("maxzoom", 30)
    if not all(isinstance(z, int) and 0 <= z <= 30 for z in (minzoom, maxzoom)) or minzoom > maxzoom:
        raise SourceError(f"TileJSON {shown}: minzoom/maxzoom {minzoom!r}/{maxzoom!r} are not zooms 0-30")
    bounds = document.get("bounds")
    if bounds is not None:
        if not (isinstance(bounds, list) and len(bounds) == 4 and all(isinstance(v, (int, float)) for v in bounds)):
            raise SourceError(f"TileJSON {shown}: 'bounds' must be [west, south, east, north]")
        bounds = mercantile.LngLatBbox(*map(float, bounds))
    scheme = document.get("scheme", "xyz")
    if scheme not in ("xyz", "tms"):
        raise SourceError(f"TileJSON {shown}: unknown scheme {scheme!r}; expected 'xyz' or 'tms'")
    secrets = tuple(set(secrets) | {s for t in templates for s in _query_secrets(t)})
    _guard_logs(secrets)
    kind = "file" if templates[0].startswith("file://") else "http"
    if kind == "file":
        templates = [urllib.parse.unquote(t[len("file://"):]) for t in templates]
    name = document.get("name") if isinstance(document.get("name"), str) else None
    description = f"TileJSON {shown}" + (f" ({name})" if name else "")
    return TileSource(kind, templates, description, minzoom, maxzoom, bounds, secrets, scheme)


def _carry_secrets(tilejson_url: str, template: str) -> str:
    """Give a tile template the TileJSON URL's secret query parameters when it lacks them.

    Mapbox's TileJSON repeats the access token in its tile URLs; other servers expect the
    client to add it again.
    """
    parts = urllib.parse.urlsplit(tilejson_url)
    have = {key for key, _ in urllib.parse.parse_qsl(urllib.parse.urlsplit(template).query)}
    extra = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if _SECRET_KEY.fullmatch(k) and k not in have]
    if not extra:
        return template
    joiner = "&" if "?" in template else "?"
    return template + joiner + urllib.parse.urlencode(extra)


# --- Image checks -------------------------------------------------------------------------


def image_kind(data: bytes) -> str | None:
    """The file extension for an image's bytes ("jpg", "png", "webp"), or None if neither."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _complete(data: bytes, kind: str) -> bool:
    """Whether the bytes reach their format's end: a cut transfer often still decodes."""
    if kind == "jpg":
        return data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if kind == "png":
        return data[-12:-8] == b"\x00\x00\x00\x00" and data[-8:-4] == b"IEND"
    if kind == "webp":
        return len(data) >= 12 and int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return False


def check_image(data: bytes, tile_size: int) -> tuple[str | None, str | None]:
    """Check an image tile's bytes.

    Returns:
        (extension, None) when the image is acceptable, else (extension or None, reason).
        Reasons start with "truncated" when the bytes were cut short (worth fetching again).
    """
    import cv2

    kind = image_kind(data)
    if kind is None:
        head = data[:16].decode("ascii", "replace").strip()
        return None, f"not a JPEG, PNG or WebP image ({len(data)} bytes starting {head[:16]!r})"
    if not _complete(data, kind):
        return kind, f"truncated {kind} ({len(data)} bytes, no end marker)"
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        return kind, f"corrupt {kind}: cannot decode it"
    height, width = image.shape[:2]
    if (height, width) != (tile_size, tile_size):
        return kind, f"size {width}x{height}, expected {tile_size}x{tile_size} (see --tile-size)"
    if image.ndim == 3 and image.shape[2] == 4:
        transparent = float((image[..., 3] < 128).mean())
        if transparent >= 0.5:
            return kind, f"blank: {transparent:.0%} transparent pixels"
        image = image[..., :3]
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8:  # 16-bit PNG
        image = (image >> 8).astype(np.uint8)
    reason = blank_reason(image)
    return kind, reason


def blank_reason(image: np.ndarray) -> str | None:
    """skynet-data's blank-tile rule on an (H, W, C) uint8 image; None when not blank.

    Blank: at least 95% of pixels with max(R, G, B) < 40 (black, no data), or at least 50% with
    min(R, G, B) > 220 (white: clouds or no data).
    """
    # Element-wise over channel planes: numpy's reductions along a length-3 axis are ~20x slower,
    # and this runs on every downloaded tile.
    channels = [image[..., c] for c in range(image.shape[2])]
    pixels = image.shape[0] * image.shape[1]
    black = np.count_nonzero(np.maximum.reduce(channels) < BLACK_MAX) / pixels
    if black >= BLACK_FRACTION:
        return f"blank: {black:.0%} black pixels (max(R,G,B) < {BLACK_MAX})"
    white = np.count_nonzero(np.minimum.reduce(channels) > WHITE_MIN) / pixels
    if white >= WHITE_FRACTION:
        return f"blank: {white:.0%} white pixels (min(R,G,B) > {WHITE_MIN})"
    return None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3) (OpenCV reads BGR; this converts).

    Raises:
        UserError: the file is missing or cannot be decoded.
    """
    import cv2

    path = Path(path)
    data = np.fromfile(path, dtype=np.uint8) if path.exists() else None
    if data is None:
        raise UserError(f"{path}: no such image file")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"{path}: cannot decode it as an image (JPEG, PNG or WebP); replace or delete it")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# --- Downloading -----------------------------------------------------------------------------


class RateLimiter:
    """Spaces requests at most `rate` per second across threads, and pauses them all on 429.

    A token bucket of depth one: each acquire() takes the next free slot 1/rate seconds after
    the previous one, so requests are evenly spread rather than sent in bursts.
    """

    def __init__(self, rate: float | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate is not None and rate <= 0:
            raise UserError(f"--rps {rate}: give a positive number of requests per second, or none")
        self.interval = 1.0 / rate if rate else 0.0
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock, self._sleep = clock, sleep

    def acquire(self, stop: threading.Event | None = None) -> None:
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        wait = slot - now
        if wait > 0:
            if stop is not None:
                stop.wait(wait)
            else:
                self._sleep(wait)

    def pause_until(self, when: float) -> None:
        """Hold every later request until `when` (clock seconds): a server said Retry-After."""
        with self._lock:
            self._next = max(self._next, when)


@dataclasses.dataclass
class DownloadSummary:
    """What a download run did. Counts are tiles; dicts map "z-x-y" to a reason."""

    requested: int = 0
    downloaded: int = 0
    skipped: int = 0
    missing: dict[str, str] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)
    rejected_before: int = 0
    requests: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rejected = f"{len(self.rejected)} rejected"
        if self.rejected_before:
            rejected += f" (+{self.rejected_before} rejected by an earlier run, not asked again)"
        return (
            f"images: {self.downloaded} downloaded, {self.skipped} skipped (already there), "
            f"{len(self.missing)} missing, {len(self.failed)} failed, {rejected} "
            f"of {self.requested} tiles; {self.requests} requests, {self.bytes / 1e6:.1f} MB "
            f"in {self.seconds:.1f} s"
        )


class _Fatal(Exception):
    """Stops the whole run (401/403, an unreachable host, an unreasonable Retry-After)."""


class _Stopped(Exception):
    """The run was interrupted; the tile is left for a re-run."""


def _retry_after(response) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), or None."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _describe_request_error(error: Exception, secrets: Sequence[str]) -> str:
    """A one-line description of a requests exception with every URL redacted.

    requests puts the full URL (token included) in its messages, so never print them raw.
    """
    import requests

    if isinstance(error, requests.ConnectionError) and "refused" in str(error).lower():
        what = "connection refused"
    elif isinstance(error, requests.Timeout):
        what = "timed out"
    elif isinstance(error, requests.ConnectionError) and (
        "Name or service not known" in str(error) or "nodename nor servname" in str(error)
        or "getaddrinfo failed" in str(error) or "Temporary failure in name resolution" in str(error)
    ):
        what = "unknown host name"
    elif isinstance(error, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        what = "transfer cut short"
    else:
        what = type(error).__name__
    detail = redact(str(error), secrets)
    # Keep messages short: the inner exception chain repeats itself.
    if len(detail) > 200:
        detail = detail[:200] + "..."
    return f"{what} ({detail})"


def _auth_message(status: int, shown_url: str) -> str:
    if status == 401:
        why = (f"the access token is missing or not accepted (HTTP 401); set {TOKEN_ENV} "
               "or pass --token, and put $(MapboxAccessToken) in IMAGE_TILES")
    else:
        why = ("the access token was refused (HTTP 403): it is wrong, expired or lacks the scope "
               f"for these tiles; check {TOKEN_ENV} or --token")
    return f"imagery source {shown_url}: {why}. Nothing more was downloaded; re-run to resume."


class _Downloader:
    """One download run: shared session, rate limiter, counters and log files."""

    def __init__(self, source: TileSource, out_dir: Path, workers: int, rps: float | None,
                 tile_size: int, timeout: float, retries: int, backoff: float, max_backoff: float,
                 max_retry_after: float, session):
        self.source, self.out_dir, self.tile_size = source, out_dir, tile_size
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.max_retry_after = max_retry_after
        self.limiter = RateLimiter(rps)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.summary = DownloadSummary()
        self.any_response = False
        self.finished: set[str] = set()
        self.session = None
        if source.kind == "http":
            self.session = session or new_session(workers)

    # One tile, from the existing file to the accepted one; returns what happened.
    def process(self, tile: mercantile.Tile) -> tuple[str, str]:
        if self.stop.is_set():
            raise _Stopped()
        existing = find_image(self.out_dir, tile)
        if existing is not None:
            _, reason = check_image(existing.read_bytes(), self.tile_size)
            if reason is None:
                return "skipped", ""
            # Not a file this downloader would have written (copied in by hand, another
            # --tile-size): set it aside, never delete it, and fetch the tile again.
            aside = self.out_dir / "rejected" / f"existing-{existing.name}"
            aside.parent.mkdir(exist_ok=True)
            os.replace(existing, aside)
        if not self.source.covers(tile):
            return "missing", "outside the source's bounds"
        data, reason = self.fetch(tile)
        if data is None:
            return ("missing" if reason.startswith("missing") else "failed"), reason
        kind, reason = check_image(data, self.tile_size)
        if reason is not None:
            self.keep_rejected(tile, data, kind)
            return "rejected", reason
        atomic.write_bytes_atomic(self.out_dir / f"{tile_stem(tile)}.{kind}", data)
        with self.lock:
            self.summary.bytes += len(data)
        return "downloaded", ""

    def keep_rejected(self, tile: mercantile.Tile, data: bytes, kind: str | None) -> None:
        atomic.write_bytes_atomic(self.out_dir / "rejected" / f"{tile_stem(tile)}.{kind or 'bin'}", data)

    def fetch(self, tile: mercantile.Tile) -> tuple[bytes | None, str]:
        if self.source.kind == "file":
            return self.fetch_file(tile)
        return self.fetch_http(tile)

    def fetch_file(self, tile: mercantile.Tile) -> tuple[bytes | None, str]:
        for location in self.source.locations(tile):
            candidates = [location]
            if location.endswith(".*"):
                candidates = [location[:-1] + ext for ext in ("jpg", "jpeg", "png", "webp")]
            for candidate in candidates:
                path = Path(candidate)
                if path.is_file():
                    try:
                        return path.read_bytes(), ""
                    except OSError as error:
                        return None, f"cannot read {path}: {error.strerror}"
        return None, "missing: no such file"

    def fetch_http(self, tile: mercantile.Tile) -> tuple[bytes | None, str]:
        import requests

        last = ""
        errors = rate_limited = 0
        refused_only = True
        while True:
            if self.stop.is_set():
                raise _Stopped()
            url = self.source.locations(tile)[0]
            self.limiter.acquire(self.stop)
            with self.lock:
                self.summary.requests += 1
            wait = None
            try:
                response = self.session.get(url, timeout=self.timeout)
                data = response.content
            except requests.RequestException as error:
                last = _describe_request_error(error, self.source.secrets)
                refused_only &= last.startswith(("connection refused", "unknown host"))
            else:
                refused_only = False
                self.any_response = True
                status = response.status_code
                if status == 200:
                    length = response.headers.get("Content-Length")
                    kind = image_kind(data)
                    if length is not None and length.isdigit() and int(length) != len(data):
                        last = f"truncated body ({len(data)} of {length} bytes)"
                    elif kind is not None and not _complete(data, kind):
                        last = f"truncated {kind} ({len(data)} bytes, no end marker)"
                    else:
                        return data, ""
                elif status in (404, 410, 204):
                    return None, f"missing: HTTP {status}"
                elif status in (401, 403):
                    raise _Fatal(_auth_message(status, self.source.description))
                elif status == 429:
                    rate_limited += 1
                    wait = _retry_after(response)
                    if wait is not None and wait > self.max_retry_after:
                        raise _Fatal(
                            f"imagery source {self.source.description} asks to wait {wait:.0f} s "
                            "(HTTP 429, rate limit); re-run later, or lower --rps"
                        )
                    last = "HTTP 429 (rate limited)"
                    if wait is not None:
                        # Everyone waits, not just this worker: the limit is the client's.
                        self.limiter.pause_until(time.monotonic() + wait)
                        if rate_limited <= 10:
                            continue
                elif status >= 500:
                    last = f"HTTP {status}"
                else:
                    return None, f"HTTP {status} ({response.reason}), not retried"
            errors += 1
            if errors > self.retries or rate_limited > 10:
                if refused_only and not self.any_response:
                    raise _Fatal(
                        f"cannot reach imagery source {self.source.description}: {last}, "
                        f"{errors} tries; check IMAGE_TILES and your network"
                    )
                return None, f"{last}, gave up after {errors} tries"
            # Exponential backoff with jitter, so that retrying workers do not move in step.
            delay = min(self.max_backoff, self.backoff * 2 ** (errors - 1))
            self.stop.wait(delay / 2 + random.uniform(0, delay / 2))


def _clean_partials(out_dir: Path) -> None:
    """Remove temporary files a killed run left behind (see osmseg.atomic.atomic_path)."""
    for folder in (out_dir, out_dir / "rejected"):
        if folder.is_dir():
            for path in folder.glob(".*.partial*"):
                path.unlink(missing_ok=True)


def download_tiles(tiles: Iterable[mercantile.Tile], source: TileSource, out_dir: str | os.PathLike,
                   workers: int = 8, rps: float | None = None, *, tile_size: int = 256,
                   timeout: float = 30.0, retries: int = 5, backoff: float = 0.5,
                   max_backoff: float = 30.0, max_retry_after: float = 300.0,
                   retry_rejected: bool = False, progress: bool = True, session=None,
                   on_tile: Callable[[mercantile.Tile, str], None] | None = None) -> DownloadSummary:
    """Download image tiles into out_dir/{z}-{x}-{y}.{ext}, resumably and politely.

    Tiles already there (and decodable) are skipped; tiles rejected by an earlier run (listed
    in rejected.txt) are not asked for again unless retry_rejected. Timeouts, connection
    errors, 5xx and cut-short bodies are retried with exponential backoff and jitter; 429
    waits for Retry-After (every worker waits); 404 marks the tile missing.

    Args:
        tiles: the tiles to fetch (duplicates are fetched once).
        source: from open_tile_source.
        out_dir: the images directory.
        workers: concurrent downloads.
        rps: at most this many requests per second (None: no limit).
        tile_size: the width and height every image must have.
        timeout: seconds to wait for a server before retrying.
        retries: retries per tile after the first try.
        backoff: first retry delay in seconds; doubles each retry up to max_backoff.
        max_retry_after: a longer Retry-After stops the run rather than waiting.
        retry_rejected: ask again for tiles listed in rejected.txt.
        progress: show a tqdm bar on stderr.
        session: a requests.Session to use (default: a pooled one sized for `workers`).
        on_tile: called with (tile, outcome) after each tile, in the calling thread.

    Returns:
        A DownloadSummary.

    Raises:
        SourceError: 401/403 (token missing or refused), an unreachable host, a zoom the source
            does not serve, no tile inside the source's bounds. Finished tiles are kept.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    if workers < 1:
        raise UserError(f"--workers {workers}: need at least one worker")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_partials(out_dir)
    ordered = list(dict.fromkeys(mercantile.Tile(*t) for t in tiles))
    zooms = sorted({t.z for t in ordered})
    bad = [z for z in zooms if not source.serves_zoom(z)]
    if bad:
        raise SourceError(
            f"{source.description} serves zooms {source.minzoom}-{source.maxzoom}, but the sample has "
            f"tiles at zoom {', '.join(map(str, bad))}; pick ZOOM_LEVEL in that range or another IMAGE_TILES"
        )
    if ordered and not any(source.covers(t) for t in ordered):
        b = source.bounds
        raise SourceError(
            f"none of the {len(ordered)} tiles lies within {source.description}'s bounds "
            f"({b.west}, {b.south}, {b.east}, {b.north}); check BBOX or IMAGE_TILES"
        )
    rejected_path, missing_path = out_dir / REJECTED, out_dir / MISSING
    rejected_before = {} if retry_rejected else read_tile_log(rejected_path)
    run = _Downloader(source, out_dir, workers, rps, tile_size, timeout, retries, backoff,
                      max_backoff, max_retry_after, session)
    summary = run.summary
    summary.requested = len(ordered)
    todo = []
    for tile in ordered:
        if tile_stem(tile) in rejected_before and find_image(out_dir, tile) is None:
            summary.rejected_before += 1
        else:
            todo.append(tile)
    bar = tqdm(total=len(todo), desc="images", unit="tile", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    fatal: str | None = None
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imagery")
    try:
        with open(rejected_path, "a") as rejected_log:
            futures = {pool.submit(run.process, tile): tile for tile in todo}
            for future in concurrent.futures.as_completed(futures):
                tile = futures[future]
                stem = tile_stem(tile)
                try:
                    outcome, reason = future.result()
                except _Stopped:
                    continue
                except _Fatal as error:
                    fatal = fatal or str(error)
                    run.stop.set()
                    continue
                if outcome == "downloaded":
                    summary.downloaded += 1
                elif outcome == "skipped":
                    summary.skipped += 1
                elif outcome == "missing":
                    summary.missing[stem] = reason
                elif outcome == "failed":
                    summary.failed[stem] = reason
                elif outcome == "rejected":
                    summary.rejected[stem] = reason
                    rejected_log.write(f"{stem}\t{reason}\n")
                    rejected_log.flush()
                run.finished.add(stem)
                bar.update(1)
                if outcome in ("missing", "failed", "rejected"):
                    bar.set_postfix_str(f"{len(summary.missing)} missing, {len(summary.failed)} failed, "
                                        f"{len(summary.rejected)} rejected", refresh=False)
                if on_tile is not None:
                    on_tile(tile, outcome)
    finally:
        # On Ctrl-C or a fatal error: no new tiles; tiles in flight finish or stop between
        # retries, and their temporary files are removed (atomic.atomic_path).
        run.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        _clean_partials(out_dir)
        # Tiles finished this run replace what an earlier run said about them.
        missing = {s: r for s, r in read_tile_log(missing_path).items() if s not in run.finished}
        missing.update(summary.missing)
        write_tile_log(missing_path, dict(sorted(missing.items())))
        # A tile rejected before and accepted now (--retry-rejected) leaves the rejected list.
        rejected = read_tile_log(rejected_path)
        accepted = {s for s in rejected if s in run.finished and s not in summary.rejected}
        if accepted:
            write_tile_log(rejected_path, {s: r for s, r in rejected.items() if s not in accepted})
        summary.seconds = time.perf_counter() - started
        if run.session is not None and session is None:
            run.session.close()
    if fatal:
        error = SourceError(source.redact(fatal))
        error.summary = summary  # what was done before the stop, for the caller's report
        raise error
    return summary


# --- prepare.py images --------------------------------------------------------------------


