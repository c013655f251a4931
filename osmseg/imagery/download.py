"""The imagery downloader: concurrent, polite, retrying and resumable.

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
- ``.tile-logs.lock``: an empty file, made only by runs told that others write into the same
  folder at once (shards: `prepare.py images --shard`); they lock it in turn to update the
  two logs (osmseg.atomic.locked).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import mercantile

from osmseg import atomic
from osmseg.datafiles import MISSING, REJECTED, find_image, read_tile_log, tile_stem, write_tile_log
from osmseg.errors import SourceError, UserError

# Blank imagery, skynet-data's rule: mostly black (no data) or mostly white (clouds, no data).
from osmseg.imagery.checks import check_image, image_kind, is_complete
from osmseg.imagery.sources import TileSource, auth_message, describe_request_error, new_session, retry_after


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
                last = describe_request_error(error, self.source.secrets)
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
                    elif kind is not None and not is_complete(data, kind):
                        last = f"truncated {kind} ({len(data)} bytes, no end marker)"
                    else:
                        return data, ""
                elif status in (404, 410, 204):
                    return None, f"missing: HTTP {status}"
                elif status in (401, 403):
                    raise _Fatal(auth_message(status, self.source.description))
                elif status == 429:
                    rate_limited += 1
                    wait = retry_after(response)
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


LOG_LOCK = ".tile-logs.lock"


def _clean_partials(out_dir: Path, stems: set[str] | None = None) -> None:
    """Remove temporary files a killed run left behind (see osmseg.atomic.atomic_path).

    Args:
        out_dir: the images directory.
        stems: remove only those of these tiles (``z-x-y``): other runs writing into the
            folder at the same time have theirs in flight. None: every one.
    """
    for folder in (out_dir, out_dir / "rejected"):
        if folder.is_dir():
            for path in folder.glob(".*.partial*"):
                # atomic_path names them .<stem>.<random>.partial<suffix>; the stem is z-x-y.
                if stems is None or path.name[1:].split(".", 1)[0] in stems:
                    path.unlink(missing_ok=True)


class _AppendLog:
    """rejected.txt, appended a line at a time: opened for each line, under the lock when shared.

    Opened afresh each time because a run that ends with --retry-rejected rewrites the file
    (a new inode): a handle held open would append to the old one. Rejections are rare.
    """

    def __init__(self, path: Path, lock: Callable):
        self.path, self.lock = path, lock
        with self.lock(), open(path, "a"):
            pass  # the file exists from the start of a run, as it always has

    def __enter__(self) -> _AppendLog:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def append(self, line: str) -> None:
        with self.lock(), open(self.path, "a") as log:
            log.write(line)


def download_tiles(tiles: Iterable[mercantile.Tile], source: TileSource, out_dir: str | os.PathLike,
                   workers: int = 8, rps: float | None = None, *, tile_size: int = 256,
                   timeout: float = 30.0, retries: int = 5, backoff: float = 0.5,
                   max_backoff: float = 30.0, max_retry_after: float = 300.0,
                   retry_rejected: bool = False, progress: bool = True, session=None,
                   on_tile: Callable[[mercantile.Tile, str], None] | None = None,
                   shared_folder: bool = False) -> DownloadSummary:
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
        shared_folder: other runs (shards of the list) write into out_dir at the same time:
            remove only this run's tiles' leftovers, and update rejected.txt and missing.txt
            holding out_dir/.tile-logs.lock.

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
    ordered = list(dict.fromkeys(mercantile.Tile(*t) for t in tiles))
    own = {tile_stem(t) for t in ordered} if shared_folder else None
    log_lock = (lambda: atomic.locked(out_dir / LOG_LOCK)) if shared_folder else contextlib.nullcontext
    _clean_partials(out_dir, own)
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
        with _AppendLog(rejected_path, log_lock) as rejected_log:
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
                    rejected_log.append(f"{stem}\t{reason}\n")
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
        _clean_partials(out_dir, own)
        with log_lock():
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
