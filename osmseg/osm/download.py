"""Downloading OSM QA tiles for a country or the planet, resuming a download that broke off.

Files, in the output folder (data/osm/):

- ``<name>.mbtiles``: the QA tiles, there only when complete and readable as QA tiles.
- ``<name>.mbtiles.gz.partial``: the compressed bytes as served, while downloading, with
  ``<name>.mbtiles.gz.partial.json`` beside it (JSON: the ``url``, ``etag``,
  ``last_modified`` and ``size`` in bytes of the response they came from). A re-run after an
  interruption asks for the rest with an HTTP Range request (and If-Range), or starts over
  if the server's file changed.
- ``<name>.mbtiles.partial``: the whole ``.gz`` gunzipped, renamed once it opens as QA
  tiles; then the ``.gz`` is deleted.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
import zlib
from pathlib import Path

from osmseg import atomic
from osmseg.errors import SourceError
from osmseg.osm.qatiles import QaTilesSource
from osmseg.osm.source import USER_AGENT

QA_TILES_URL = "https://s3.amazonaws.com/mapbox/osm-qa-tiles-production/latest.country/"


QA_TILES_LIST = "https://osmlab.github.io/osm-qa-tiles/country.html"




def qa_tiles_url(name: str, base_url: str = QA_TILES_URL) -> str:
    """Where OSM QA tiles for a country (or "planet") live under base_url."""
    if name == "planet":
        if base_url.rstrip("/").endswith("latest.country"):
            return base_url.rstrip("/")[: -len("latest.country")] + "latest.planet.mbtiles.gz"
        return base_url + "latest.planet.mbtiles.gz"
    return base_url + f"{name}.mbtiles.gz"


def download_qa_tiles(name: str, out_dir, base_url: str = QA_TILES_URL, timeout: float = 60) -> Path:
    """Download and gunzip OSM QA tiles to out_dir/<name>.mbtiles, unless that file exists.

    The compressed bytes are kept in ``<name>.mbtiles.gz.partial``, with a record of the
    response they came from beside it (``.gz.partial.json``), so that a download that breaks
    off resumes where it stopped when called again. The whole ``.gz`` is then gunzipped into
    ``<name>.mbtiles.partial``, which is renamed once it opens as vector MBTiles, and the
    ``.gz`` is deleted. The disk needs room for both the ``.gz`` and the ``.mbtiles``.

    Raises:
        SourceError: an unknown name (HTTP 404), other HTTP or network errors (the partial
            download is kept), a broken gzip or a file that is not QA tiles (it is deleted).
    """
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise SourceError(
            f"QA tiles name {name!r}: names are country names in lower case with underscores "
            f"(e.g. united_kingdom) or 'planet'; see {QA_TILES_LIST}"
        )
    path = Path(out_dir) / f"{name}.mbtiles"
    compressed = path.with_name(path.name + ".gz.partial")
    record = compressed.with_name(compressed.name + ".json")
    if path.exists():
        print(f"{path}: already here, using it as it is (delete it to download again)", file=sys.stderr)
        # A run stopped between the rename and the clean-up leaves the download behind.
        for leftover in (compressed, record):
            leftover.unlink(missing_ok=True)
        return path
    url = qa_tiles_url(name, base_url)
    path.parent.mkdir(parents=True, exist_ok=True)
    _download_resumably(url, compressed, record, name, timeout)
    _gunzip_qa_tiles(url, compressed, record, path)
    compressed.unlink()
    record.unlink()
    print(f"{path}: downloaded from {url}", file=sys.stderr)
    return path


def _download_resumably(url: str, partial: Path, record: Path, name: str, timeout: float) -> None:
    """Download url's bytes, as served, into partial, carrying on from the bytes already there.

    record (JSON: url, etag, last_modified, size) describes the response that the kept bytes
    came from. A resumed request sends ``Range`` with ``If-Range`` (RFC 9110, 13.1.5), so that
    a server whose file changed sends the whole new file instead of the rest of the old one.

    Raises:
        SourceError: HTTP errors, or the download broke off (partial and record are kept).
    """
    import requests
    import urllib3


    kept, previous = _kept_download(url, partial, record)
    # identity: ranges then count the bytes as stored, not those of a compression made on the fly.
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if kept:
        headers.update({"Range": f"bytes={kept}-", "If-Range": _if_range(previous)})
    resume = f"; {partial} is kept: run the command again to resume"
    try:
        response = requests.get(url, stream=True, timeout=timeout, headers=headers)
    except requests.RequestException as error:
        hint = resume if kept else ""
        raise SourceError(f"{url}: cannot connect ({error}); check --base-url and the network{hint}") from None
    with response:
        status = response.status_code
        if status == 404:
            raise SourceError(
                f"{url}: no QA tiles named {name!r} (HTTP 404); names are country names in lower case with "
                f"underscores (e.g. united_kingdom, new_zealand), listed at {QA_TILES_LIST}"
            )
        if status != 200 and not (kept and status in (206, 416)):
            hint = resume if kept else ""
            raise SourceError(f"{url}: HTTP {status} {response.reason}; retry later or check --base-url{hint}")
        action, size, note = _resume_plan(status, response.headers, kept, previous)
        if note:
            print(f"{partial}: {note}", file=sys.stderr)
        if action in ("fresh", "append"):
            try:
                with (
                    open(partial, "wb" if action == "fresh" else "ab") as out,
                    _byte_progress(size, f"{name}.mbtiles.gz", initial=0 if action == "fresh" else kept) as progress,
                ):
                    if action == "fresh":  # once the old bytes are gone, so that it never describes them
                        atomic.write_text_atomic(
                            record, json.dumps({"url": url, **_validators(response.headers), "size": size})
                        )
                    # The bytes as served: some hosts label .gz files Content-Encoding: gzip,
                    # which requests would otherwise undo before we gunzip.
                    for chunk in response.raw.stream(1 << 20, decode_content=False):
                        out.write(chunk)
                        progress.update(len(chunk))
            except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
                got = _size_text(partial.stat().st_size, size)
                raise SourceError(f"{url}: the download broke off at {got} ({error}){resume}") from None
    if action == "restart":
        partial.unlink()
        record.unlink(missing_ok=True)
        _download_resumably(url, partial, record, name, timeout)  # nothing kept now: a plain request
    elif size is not None and partial.stat().st_size < size:
        got = _size_text(partial.stat().st_size, size)
        raise SourceError(f"{url}: the download ended early at {got}{resume}")


def _kept_download(url: str, partial: Path, record: Path) -> tuple[int, dict]:
    """How many bytes of url a previous run left in partial, and its record; (0, {}) if none usable."""
    if not partial.exists():
        return 0, {}
    try:
        previous = json.loads(record.read_text())
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict) or previous.get("url") != url:
        why = f"{record.name} does not say it came from {url}"
    elif not _if_range(previous):
        why = "the server gave no ETag or Last-Modified to check it against"
    else:
        return partial.stat().st_size, previous
    print(f"{partial}: cannot resume ({why}); starting over", file=sys.stderr)
    return 0, {}


def _resume_plan(status: int, headers, kept: int, previous: dict) -> tuple[str, int | None, str]:
    """What to do with the answer (200, 206 or 416) to a request that had `kept` bytes already.

    Args:
        status: the HTTP status; 206 and 416 only come after a Range request (kept > 0).
        headers: the response's headers.
        kept: bytes already downloaded (0: a plain request).
        previous: the record of the response the kept bytes came from.

    Returns:
        (action, size, note): action is "fresh" (write the body from byte 0), "append" (add
        the body to the kept bytes), "done" (the kept bytes are the whole file) or "restart"
        (drop the kept bytes and ask again); size is the whole file's bytes where known; note
        is what to tell the user, or "".
    """
    if status == 200:
        size = int(headers.get("Content-Length") or 0) or None
        if not kept:
            return "fresh", size, ""
        if _changed(_validators(headers), previous):
            return "fresh", size, "the server's file changed; starting over"
        return "fresh", size, "the server sent the whole file again (it does not resume downloads); starting over"
    first, size = _content_range(headers.get("Content-Range", ""))
    size = size or previous.get("size")
    if status == 416:  # nothing past the kept bytes
        if size in (None, kept):
            return "done", kept, f"the download was already complete ({_size_text(kept)})"
        return "restart", size, f"cannot resume ({_size_text(kept)} kept of {_size_text(size)}); starting over"
    if _changed(_validators(headers), previous):  # a server that honours Range but not If-Range
        return "restart", size, "the server's file changed; starting over"
    if first != kept:
        return "restart", size, f"cannot resume (the server sent bytes from {first}, not {kept}); starting over"
    return "append", size, f"resuming at {_size_text(kept, size)}"


def _validators(headers) -> dict:
    """A response's ETag and Last-Modified, as the download record stores them."""
    return {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}


def _if_range(validators: dict) -> str | None:
    """The If-Range value: a strong ETag, else the Last-Modified date (RFC 9110, 13.1.5)."""
    etag = validators.get("etag")
    return etag if etag and not etag.startswith("W/") else validators.get("last_modified")


def _changed(validators: dict, previous: dict) -> bool:
    """Whether an ETag or Last-Modified that both sides have differs."""
    return any(validators.get(key) and previous.get(key) and validators[key] != previous[key] for key in validators)


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(first byte, whole size) from a Content-Range like "bytes 100-199/1000" or "bytes */1000"."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value)
    if match is None:
        return None, None
    first, size = match.groups()
    return (int(first) if first else None), (int(size) if size != "*" else None)


def _size_text(done: int, size: int | None = None) -> str:
    """Byte counts for people: "312 MB", or "312 MB of 1.2 GB" (decimal units)."""

    def text(count: float) -> str:
        units = ("bytes", "kB", "MB", "GB", "TB")
        scale = 0
        while count >= 999.5 and scale < len(units) - 1:
            count, scale = count / 1000, scale + 1
        return f"{count:.3g} {units[scale]}" if scale else f"{count} bytes"

    return text(done) if size is None else f"{text(done)} of {text(size)}"


def _gunzip_qa_tiles(url: str, compressed: Path, record: Path, path: Path) -> None:
    """Gunzip a downloaded .gz to path (through ``<path>.partial``) and check it opens as QA tiles.

    A .gz that is not a whole gzip file, or that holds no QA tiles, is deleted with its record:
    resuming it cannot help.

    Raises:
        SourceError: a broken gzip, or not QA tiles.
    """

    partial = path.with_name(path.name + ".partial")
    try:
        with (
            open(compressed, "rb") as raw,
            gzip.GzipFile(fileobj=raw) as unpacked,
            open(partial, "wb") as out,
            _byte_progress(compressed.stat().st_size, f"gunzip {compressed.name}") as progress,
        ):
            while chunk := unpacked.read(1 << 20):
                out.write(chunk)
                progress.update(raw.tell() - progress.n)
        QaTilesSource(partial, name=path.stem).close()
        partial.replace(path)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        compressed.unlink()
        record.unlink(missing_ok=True)
        if isinstance(error, EOFError):
            what = "ended early, inside its gzip stream"
        else:
            what = f"is broken or not a gzip file ({error})"
        raise SourceError(
            f"{url}: the downloaded .gz {what}; deleted it: check --base-url, or run the command again "
            "to download it afresh"
        ) from None
    except SourceError as error:
        compressed.unlink()
        record.unlink(missing_ok=True)
        raise SourceError(f"{url}: not OSM QA tiles ({error}); deleted the download; check --base-url") from None
    finally:
        partial.unlink(missing_ok=True)


def _byte_progress(total: int | None, description: str, initial: int = 0):
    """A progress bar of bytes on stderr (hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=description, file=sys.stderr, disable=None)
