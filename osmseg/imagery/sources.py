"""Imagery tile sources: TileJSON, XYZ templates and local files behind one TileSource."""

from __future__ import annotations

import dataclasses
import email.utils
import itertools
import json
import re
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Sequence

import mercantile

from osmseg.errors import SourceError

# Blank imagery, skynet-data's rule: mostly black (no data) or mostly white (clouds, no data).
from osmseg.imagery.tokens import TOKEN_ENV, carry_secrets, guard_logs, query_secrets, redact, substitute_token

DEFAULT_SUBDOMAINS = ("a", "b", "c")  # Leaflet's and OSM's convention for {s}


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


_KNOWN_PLACEHOLDERS = {"z", "x", "y", "-y", "q", "s", "r"}


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

    def on_close(self, closer: Callable[[], None]) -> None:
        """Call `closer` when the source is closed (e.g. to stop a server started for it)."""
        self._closers.append(closer)

    def close(self) -> None:
        """Stop what was started for the source (see on_close)."""
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
    spec, _ = substitute_token(spec, token)
    secrets = tuple(s for s in {token or "", *query_secrets(spec.removeprefix("tilejson+"))} if s)
    guard_logs(secrets)
    origin = "IMAGE_TILES"
    if spec.startswith("tilejson+"):
        url = spec[len("tilejson+"):]
        if not url.startswith(("http://", "https://", "file://")):
            raise SourceError(f"{origin}: {redact(spec, secrets)}: expected tilejson+https://host/name.json")
        return open_tilejson(url, secrets, timeout, session)
    if spec.startswith(("http://", "https://")):
        if _PLACEHOLDER.search(spec):
            _check_template(spec, origin)
            return TileSource("http", [spec], redact(spec, secrets), secrets=secrets)
        return open_tilejson(spec, secrets, timeout, session)
    if spec.startswith("file://"):
        path = spec[len("file://"):]
        path = path[len("localhost"):] if path.startswith("localhost/") else path
        path = urllib.parse.unquote(path)
        if path.endswith(".json") and not _PLACEHOLDER.search(path):
            return open_tilejson(spec, secrets, timeout, session)
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


def fetch_tilejson_text(url: str, secrets: Sequence[str], timeout: float, session) -> str:
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
            error_text = describe_request_error(error, secrets)
            wait = 0.2 * 2**attempt
            continue
        if response.status_code in (401, 403):
            raise SourceError(auth_message(response.status_code, shown))
        if response.status_code >= 500 or response.status_code == 429:
            error_text = f"HTTP {response.status_code}"
            wait = min(60.0, retry_after(response) or 0.2 * 2**attempt)
            continue
        if response.status_code != 200:
            raise SourceError(f"TileJSON {shown}: HTTP {response.status_code}; check the URL in IMAGE_TILES")
        return response.text
    raise SourceError(f"TileJSON {shown}: cannot fetch it ({error_text}); check the host in IMAGE_TILES and your network")


def open_tilejson(url: str, secrets: Sequence[str], timeout: float, session) -> TileSource:
    shown = redact(url, secrets)
    text = fetch_tilejson_text(url, secrets, timeout, session)
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
        template = carry_secrets(url, template)
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
    secrets = tuple(set(secrets) | {s for t in templates for s in query_secrets(t)})
    guard_logs(secrets)
    kind = "file" if templates[0].startswith("file://") else "http"
    if kind == "file":
        templates = [urllib.parse.unquote(t[len("file://"):]) for t in templates]
    name = document.get("name") if isinstance(document.get("name"), str) else None
    description = f"TileJSON {shown}" + (f" ({name})" if name else "")
    return TileSource(kind, templates, description, minzoom, maxzoom, bounds, secrets, scheme)


def retry_after(response) -> float | None:
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


def describe_request_error(error: Exception, secrets: Sequence[str]) -> str:
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


def auth_message(status: int, shown_url: str) -> str:
    if status == 401:
        why = (f"the access token is missing or not accepted (HTTP 401); set {TOKEN_ENV} "
               "or pass --token, and put $(MapboxAccessToken) in IMAGE_TILES")
    else:
        why = ("the access token was refused (HTTP 403): it is wrong, expired or lacks the scope "
               f"for these tiles; check {TOKEN_ENV} or --token")
    return f"imagery source {shown_url}: {why}. Nothing more was downloaded; re-run to resume."
