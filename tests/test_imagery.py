"""Tests for osmseg.imagery: every IMAGE_TILES form, faults, resume, redaction, rejection."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import cv2
import mercantile
import numpy as np
import pytest

import prepare
from osmseg import cli, datafiles, imagery, rasters
from osmseg.commands import options
from osmseg.errors import SourceError

TOKEN = "pk.SECRET-token-1234567890"
Z17 = [mercantile.Tile(65536 + dx, 65536 + dy, 17) for dx in range(4) for dy in range(3)]


def jpeg(seed: int = 0, size: int = 256) -> bytes:
    """A noisy, non-blank JPEG tile."""
    rng = np.random.default_rng(seed)
    image = rng.integers(40, 200, size=(size, size, 3), dtype=np.uint8)
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return data.tobytes()


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


class FakeServer:
    """A loopback HTTP server whose answers a test decides; it records every request.

    `respond(path, query, count)` returns (status, headers, body); `count` is how many times
    this path was asked for before, so a test can fail the first try and serve the second.
    """

    def __init__(self, respond):
        self.respond = respond
        self.requests: list[tuple[float, str, dict]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's name)
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                with outer.lock:
                    count = sum(1 for _, p, _ in outer.requests if p == parts.path)
                    outer.requests.append((time.monotonic(), parts.path, query))
                status, headers, body = outer.respond(parts.path, query, count)
                self.send_response(status)
                headers = {"Content-Length": str(len(body)), **headers}
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if int(headers["Content-Length"]) != len(body):
                    # A cut transfer: send what we have and drop the connection.
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def paths(self) -> list[str]:
        return [p for _, p, _ in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(respond):
        server = FakeServer(respond)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def tiles_ok(path, query, count):
    return 200, {"Content-Type": "image/jpeg"}, jpeg(hash(path) % 1000)


def fast(source, tiles, out, **options):
    """download_tiles with test-sized retry delays and no progress bar."""
    options = {"backoff": 0.01, "max_backoff": 0.05, "progress": False, "timeout": 5, **options}
    return imagery.download_tiles(tiles, source, out, **options)


def stems(directory: Path) -> set[str]:
    return {p.stem for p in directory.glob("*") if p.suffix in datafiles.IMAGE_SUFFIXES}


# --- IMAGE_TILES forms ----------------------------------------------------------------------


def test_xyz_template_fills_subdomains_tms_rows_and_quadkeys(serve, tmp_path):
    server = serve(tiles_ok)
    source = imagery.open_tile_source(server.url + "/{s}/{z}/{x}/{-y}.jpg")
    summary = fast(source, Z17, tmp_path / "a")
    assert summary.downloaded == len(Z17)
    expected_tails = {f"/{t.z}/{t.x}/{2**17 - 1 - t.y}.jpg" for t in Z17}
    assert {p[2:] for p in server.paths()} == expected_tails
    assert {p.split("/")[1] for p in server.paths()} == {"a", "b", "c"}

    source = imagery.open_tile_source(server.url + "/q/{q}.jpg")
    fast(source, Z17[:3], tmp_path / "b")
    assert {p for p in server.paths() if p.startswith("/q/")} == {f"/q/{mercantile.quadkey(t)}.jpg" for t in Z17[:3]}

    source = imagery.open_tile_source(server.url + "/{switch:one,two}/{z}/{x}/{y}.jpg")
    fast(source, Z17[:4], tmp_path / "c")
    assert {p.split("/")[1] for p in server.paths()[-4:]} == {"one", "two"}


def test_images_keep_the_served_bytes_and_take_the_extension_from_them(serve, tmp_path):
    served = png(np.random.default_rng(1).integers(50, 150, (256, 256, 3), dtype=np.uint8))
    server = serve(lambda path, query, count: (200, {"Content-Type": "image/jpeg"}, served))
    source = imagery.open_tile_source(server.url + "/{z}/{x}/{y}.jpg")  # the URL says jpg...
    fast(source, Z17[:1], tmp_path)
    (written,) = tmp_path.glob("*.png")  # ...the bytes say PNG
    assert written.name == "17-65536-65536.png"
    assert written.read_bytes() == served
    rgb = rasters.read_rgb(written)
    bgr = cv2.imdecode(np.frombuffer(served, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(rgb, bgr[..., ::-1])


def test_webp_and_png_signatures_and_end_markers():
    noise = np.random.default_rng(4).integers(40, 200, (256, 256, 3), dtype=np.uint8)
    ok, webp = cv2.imencode(".webp", noise)
    assert ok
    webp = webp.tobytes()
    assert imagery.check_image(webp, 256) == ("webp", None)
    assert imagery.check_image(png(noise), 256) == ("png", None)
    for cut in (webp[: len(webp) // 2], png(noise)[:-20], jpeg(4)[:-2]):
        kind, reason = imagery.check_image(cut, 256)
        assert kind in ("webp", "png", "jpg") and reason.startswith("truncated")
    assert imagery.check_image(b"<html>Forbidden</html>", 256)[1].startswith("not a JPEG, PNG or WebP")


def tilejson_server(serve, document: dict):
    def respond(path, query, count):
        if path.endswith(".json"):
            return 200, {"Content-Type": "application/json"}, json.dumps(document).encode()
        return tiles_ok(path, query, count)

    return serve(respond)


def test_tilejson_spreads_requests_over_its_templates_and_respects_zooms_and_bounds(serve, tmp_path):
    inside = mercantile.tile(0.001, 0.001, 17)
    outside = mercantile.tile(10.0, 10.0, 17)
    document = {"tilejson": "2.2.0", "tiles": ["/one/{z}/{x}/{y}.jpg", "/two/{z}/{x}/{y}.jpg"],
                "minzoom": 15, "maxzoom": 18, "bounds": [-0.05, -0.05, 0.05, 0.05]}
    server = tilejson_server(serve, document)
    for spec in (f"tilejson+{server.url}/sat.json", f"{server.url}/sat.json"):
        source = imagery.open_tile_source(spec)
        assert (source.minzoom, source.maxzoom) == (15, 18)
        out = tmp_path / spec[:4]
        neighbours = [mercantile.Tile(inside.x + i, inside.y, 17) for i in range(4)]
        summary = fast(source, neighbours + [outside], out)
        assert summary.downloaded == 4
        assert summary.missing == {datafiles.tile_stem(outside): "outside the source's bounds"}
    assert {p.split("/")[1] for p in server.paths() if not p.endswith(".json")} == {"one", "two"}

    with pytest.raises(SourceError, match="serves zooms 15-18.*zoom 19"):
        fast(source, [mercantile.Tile(0, 0, 19)], tmp_path / "z19")
    with pytest.raises(SourceError, match="bounds"):
        fast(source, [outside], tmp_path / "outside")


def test_tilejson_tms_scheme_flips_rows(serve, tmp_path):
    server = tilejson_server(serve, {"tiles": ["/t/{z}/{x}/{y}.jpg"], "scheme": "tms"})
    source = imagery.open_tile_source(server.url + "/tms.json")
    fast(source, Z17[:1], tmp_path)
    assert server.paths()[-1] == f"/t/17/{Z17[0].x}/{2**17 - 1 - Z17[0].y}.jpg"


def test_local_directory_in_both_layouts(tmp_path):
    flat, nested = tmp_path / "flat", tmp_path / "nested"
    flat.mkdir()
    (flat / "17-65536-65536.jpg").write_bytes(jpeg(1))
    (nested / "17" / "65536").mkdir(parents=True)
    (nested / "17" / "65536" / "65537.png").write_bytes(png(np.full((256, 256, 3), 99, np.uint8)))
    for directory in (flat, nested):
        source = imagery.open_tile_source(str(directory))
        out = tmp_path / f"out-{directory.name}"
        summary = fast(source, Z17[:2], out)
        assert summary.downloaded == 1 and len(summary.missing) == 1
    assert stems(tmp_path / "out-flat") == {"17-65536-65536"}
    assert (tmp_path / "out-nested" / "17-65536-65537.png").exists()


def test_real_portugal_tiles_through_a_file_template(portugal_dir, tmp_path):
    source = imagery.open_tile_source(f"file://{portugal_dir}/tiles/{{x}}-{{y}}-{{z}}.jpg")
    tiles = [mercantile.Tile(x, y, 17) for x in range(62092, 62095) for y in range(50162, 50165)]
    summary = fast(source, tiles, tmp_path)
    on_disk = {p.stem for p in (portugal_dir / "tiles").glob("*.jpg")}
    assert summary.downloaded == len(on_disk) == 8
    assert len(summary.missing) == 1 and not summary.rejected
    for tile in tiles:
        written = datafiles.find_image(tmp_path, tile)
        original = portugal_dir / "tiles" / f"{tile.x}-{tile.y}-{tile.z}.jpg"
        assert (written is None) == (not original.exists())
        if written:
            assert written.read_bytes() == original.read_bytes()
            image = rasters.read_rgb(written)
            assert image.shape == (256, 256, 3) and image.dtype == np.uint8 and image.std() > 5


@pytest.mark.parametrize(
    "spec, message",
    [
        ("http://127.0.0.1:9/{z}/{x}.jpg", r"lacks \{y\}"),
        ("https://host/{z}/{x}/{y}/{w}.jpg", r"unknown placeholder \{w\}"),
        ("ftp://host/{z}/{x}/{y}.jpg", "unsupported scheme"),
        ("no-such-directory-here", "neither a URL"),
        ("", "empty"),
        ("tilejson+host/name.json", "expected tilejson"),
        ("https://host/{z}/{x}/{y}.jpg?access_token=$(MapboxAccessToken)", "MapboxAccessToken=... or pass --token"),
    ],
)
def test_malformed_image_tiles_are_refused_by_name(spec, message):
    with pytest.raises(SourceError, match=message):
        imagery.open_tile_source(spec)


def test_tilejson_without_tiles_or_not_json(serve):
    server = serve(lambda path, query, count: (200, {}, b'{"name": "x"}' if "a" in path else b"<html>"))
    with pytest.raises(SourceError, match="no 'tiles' list"):
        imagery.open_tile_source(f"tilejson+{server.url}/a.json")
    with pytest.raises(SourceError, match="not JSON"):
        imagery.open_tile_source(f"{server.url}/b")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_host_is_one_clear_message(tmp_path):
    source = imagery.open_tile_source(f"http://127.0.0.1:{closed_port()}/{{z}}/{{x}}/{{y}}.jpg?key={TOKEN}")
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        fast(source, Z17, tmp_path, retries=2, workers=2)
    message = str(caught.value)
    assert "cannot reach" in message and "connection refused" in message and TOKEN not in message
    assert time.monotonic() - started < 5
    with pytest.raises(SourceError, match="cannot fetch it.*connection refused"):
        imagery.open_tile_source(f"tilejson+http://127.0.0.1:{closed_port()}/x.json")


# --- Faults --------------------------------------------------------------------------------------


def test_5xx_and_truncated_bodies_are_retried(serve, tmp_path):
    good = jpeg(3)

    def respond(path, query, count):
        if count == 0 and "/65536.jpg" in path:
            return 503, {}, b"busy"
        if count == 0:
            return 200, {"Content-Length": str(len(good))}, good[: len(good) // 2]
        return 200, {}, good

    server = serve(respond)
    source = imagery.open_tile_source(server.url + "/{z}/{x}/{y}.jpg")
    summary = fast(source, Z17[:6], tmp_path, workers=3)
    assert summary.downloaded == 6 and not summary.failed and not summary.rejected
    assert len(server.requests) == 12  # every tile failed once, then came whole
    assert all(p.read_bytes() == good for p in tmp_path.glob("*.jpg"))


def test_timeouts_are_retried(serve, tmp_path):
    def respond(path, query, count):
        if count == 0:
            time.sleep(1.0)  # the first answer comes too late
        return tiles_ok(path, query, count)

    server = serve(respond)
    source = imagery.open_tile_source(server.url + "/{z}/{x}/{y}.jpg")
    summary = fast(source, Z17[:2], tmp_path, timeout=0.3)
    assert summary.downloaded == 2 and summary.requests == 4


def test_retries_give_up_and_report_failed(serve, tmp_path):
    server = serve(lambda path, query, count: (500, {}, b"down"))
    source = imagery.open_tile_source(server.url + "/{z}/{x}/{y}.jpg")
    summary = fast(source, Z17[:2], tmp_path, retries=2)
    assert set(summary.failed) == {datafiles.tile_stem(t) for t in Z17[:2]}
    assert "HTTP 500" in next(iter(summary.failed.values()))
    assert len(server.requests) == 6 and not stems(tmp_path)


def test_429_waits_for_retry_after(serve, tmp_path):
    def respond(path, query, count):
        if count == 0:
            return 429, {"Retry-After": "1"}, b"slow down"
        return tiles_ok(path, query, count)

    server = serve(respond)
    source = imagery.open_tile_source(server.url + "/{z}/{x}/{y}.jpg")
    summary = fast(source, Z17[:2], tmp_path, workers=1, backoff=0.0)
    assert summary.downloaded == 2
    times = {}
    for when, path, _ in server.requests:
        times.setdefault(path, []).append(when)
    for first, second in times.values():
        assert second - first >= 0.95
    with pytest.raises(SourceError, match="asks to wait 3600 s"):
        server.respond = lambda path, query, count: (429, {"Retry-After": "3600"}, b"")
        fast(source, Z17[2:3], tmp_path, workers=1)


def test_404_is_missing_and_the_run_goes_on(serve, tmp_path):
    server = serve(lambda path, query, count: (404, {}, b"") if "65537.jpg" in path else tiles_ok(path, query, count))
    source = imagery.open_tile_source(server.url + "/{z}/{x}/{y}.jpg")
    summary = fast(source, Z17, tmp_path)
    assert len(summary.missing) == 4 and summary.downloaded == 8 and not summary.failed
    assert set(datafiles.read_tile_log(tmp_path / "missing.txt")) == set(summary.missing)


def token_server(serve):
    def respond(path, query, count):
        if "access_token" not in query:
            return 401, {}, b"Not Authorized - No Token"
        if query["access_token"] != TOKEN:
            return 403, {}, b"Forbidden"
        return tiles_ok(path, query, count)

    return serve(respond)


def test_401_and_403_stop_at_once_without_showing_the_token(serve, tmp_path):
    server = token_server(serve)
    tiles = [mercantile.Tile(65536 + i, 65536, 17) for i in range(60)]
    source = imagery.open_tile_source(server.url + "/{z}/{x}/{y}.jpg")
    with pytest.raises(SourceError, match="token is missing") as caught:
        fast(source, tiles, tmp_path, workers=4)
    assert len(server.requests) <= 8  # the workers' tiles in flight, then nothing more

    wrong = "pk.WRONG-token-0987654321"
    source = imagery.open_tile_source(server.url + "/{z}/{x}/{y}.jpg?access_token=$(MapboxAccessToken)", wrong)
    with pytest.raises(SourceError, match="token was refused") as caught:
        fast(source, tiles, tmp_path, workers=4)
    assert wrong not in str(caught.value) and "access_token=***" in str(caught.value)
    assert not stems(tmp_path)

    source = imagery.open_tile_source(server.url + "/{z}/{x}/{y}.jpg?access_token={token}", TOKEN)
    assert fast(source, tiles[:3], tmp_path).downloaded == 3


def test_tilejson_plus_form_carries_the_token_to_tile_urls(serve, tmp_path):
    def respond(path, query, count):
        if query.get("access_token") != TOKEN:
            return 401, {}, b""
        if path.endswith(".json"):
            return 200, {}, json.dumps({"tiles": ["/v4/sat/{z}/{x}/{y}.jpg"]}).encode()
        return tiles_ok(path, query, count)

    server = serve(respond)
    source = imagery.open_tile_source(f"tilejson+{server.url}/v4/sat.json?access_token=$(MapboxAccessToken)", TOKEN)
    assert TOKEN not in source.description
    assert fast(source, Z17[:3], tmp_path).downloaded == 3


def test_rate_limiter_spaces_requests_and_honours_retry_after():
    from osmseg.imagery.download import RateLimiter

    now = [100.0]
    starts = []

    def sleep(seconds):
        now[0] += seconds

    limiter = RateLimiter(4, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        limiter.acquire()
        starts.append(now[0])
    assert starts == pytest.approx([100.0, 100.25, 100.5, 100.75, 101.0])
    limiter.pause_until(110.0)  # a 429 said Retry-After: every later request waits for it
    limiter.acquire()
    assert now[0] == pytest.approx(110.0)
    unlimited = RateLimiter(None, clock=lambda: now[0], sleep=sleep)
    unlimited.acquire()
    unlimited.acquire()
    assert now[0] == pytest.approx(110.0)


def test_rps_limits_the_request_rate(serve, tmp_path):
    server = serve(tiles_ok)
    source = imagery.open_tile_source(server.url + "/{z}/{x}/{y}.jpg")
    started = time.monotonic()
    fast(source, Z17[:6], tmp_path, workers=6, rps=20)
    assert time.monotonic() - started >= 5 / 20 * 0.9
    # Arrival times at the server can bunch up on a loaded machine (the first request waits
    # longest for a connection); the spacing itself is checked with a fake clock above.
    times = sorted(t for t, _, _ in server.requests)
    assert times[-1] - times[0] >= 5 / 20 * 0.6


# --- Resume, rejection, redaction --------------------------------------------------------------


def test_resume_after_an_interruption_downloads_only_the_rest(serve, tmp_path):
    server = serve(tiles_ok)
    source = imagery.open_tile_source(server.url + "/{z}/{x}/{y}.jpg")
    seen = []

    def interrupt(tile, outcome):
        seen.append(tile)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fast(source, Z17, tmp_path, workers=2, on_tile=interrupt)
    first = stems(tmp_path)
    assert 5 <= len(first) < len(Z17)
    assert not list(tmp_path.rglob(".*partial*"))
    (tmp_path / ".17-65539-65538.abc123.partial.jpg").write_bytes(b"\xff\xd8\xff half")  # a killed run's
    spoiled = tmp_path / f"{sorted(first)[0]}.jpg"
    spoiled.write_bytes(spoiled.read_bytes()[:100])  # a file someone cut short, by hand
    first.remove(spoiled.stem)
    asked_before = len(server.requests)
    summary = fast(source, Z17, tmp_path, workers=2)
    assert summary.skipped == len(first) and summary.downloaded == len(Z17) - len(first)
    assert len(server.requests) - asked_before == len(Z17) - len(first)
    assert (tmp_path / "rejected" / f"existing-{spoiled.name}").stat().st_size == 100  # set aside, not lost
    assert stems(tmp_path) == {datafiles.tile_stem(t) for t in Z17}
    assert not list(tmp_path.rglob(".*partial*"))


def test_blank_corrupt_and_wrong_size_images_are_rejected(serve, tmp_path):
    noise = np.random.default_rng(2).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    mostly_white = noise.copy()
    mostly_white[:150] = 250
    bodies = {
        65536: png(np.full((256, 256, 3), 10, np.uint8)),          # black: no data
        65537: png(mostly_white),                                  # > 50% white
        65538: b"\xff\xd8\xff\xe0" + bytes(500) + b"\xff\xd9",     # JPEG-looking garbage
        65539: png(noise[:128]),                                   # 256 x 128
    }
    kept = png(noise)

    def respond(path, query, count):
        x = int(path.split("/")[2])
        return 200, {}, bodies.get(x, kept)

    server = serve(respond)
    source = imagery.open_tile_source(server.url + "/{z}/{x}/{y}.png")
    tiles = [mercantile.Tile(x, 65536, 17) for x in range(65536, 65541)]
    summary = fast(source, tiles, tmp_path)
    assert summary.downloaded == 1 and len(summary.rejected) == 4
    reasons = datafiles.read_tile_log(tmp_path / "rejected.txt")
    assert "black pixels" in reasons["17-65536-65536"]
    assert "white pixels" in reasons["17-65537-65536"]
    assert "corrupt" in reasons["17-65538-65536"]
    assert "size 256x128" in reasons["17-65539-65536"]
    assert stems(tmp_path) == {"17-65540-65536"}
    assert len(list((tmp_path / "rejected").iterdir())) == 4

    asked = len(server.requests)
    again = fast(source, tiles, tmp_path)
    assert again.rejected_before == 4 and again.skipped == 1 and len(server.requests) == asked
    assert len((tmp_path / "rejected.txt").read_text().splitlines()) == 4

    bodies[65536] = kept  # the provider fixed a tile: asked again on request, it leaves the list
    retried = fast(source, tiles, tmp_path, retry_rejected=True)
    assert retried.downloaded == 1 and len(retried.rejected) == 3
    assert "17-65536-65536" not in datafiles.read_tile_log(tmp_path / "rejected.txt")
    assert len((tmp_path / "rejected.txt").read_text().splitlines()) == 3  # rewritten: one line a tile


def test_blank_rule_thresholds():
    image = np.full((100, 100, 3), 100, np.uint8)
    image.reshape(-1, 3)[:9499] = 39
    assert imagery.blank_reason(image) is None  # 94.99% black
    image.reshape(-1, 3)[:9500] = 39
    assert "black" in imagery.blank_reason(image)
    image = np.full((100, 100, 3), 100, np.uint8)
    image.reshape(-1, 3)[:4999] = 221
    assert imagery.blank_reason(image) is None
    image.reshape(-1, 3)[:5000] = (221, 255, 230)
    assert "white" in imagery.blank_reason(image)


def test_redact_masks_secret_query_values_and_known_tokens():
    url = (f"https://h/v4/{TOKEN}/1/2/3.jpg?access_token={TOKEN}&style=x&api_key=k1&Signature=s2"
           "&sig=s3&password=p4&apikey=k5&secret=s6&token=t7&key=k8&subscription-key=k9&X-Amz-Credential=c1")
    redacted = imagery.redact(url, [TOKEN])
    for secret in (TOKEN, "k1", "s2", "s3", "p4", "k5", "s6", "t7", "k8", "k9", "c1"):
        assert f"={secret}" not in redacted and TOKEN not in redacted
    assert "style=x" in redacted and redacted.count("***") == 12
    assert imagery.redact("https://user:pass@host/x") == "https://***@host/x"


def test_token_never_appears_in_output_logs_exceptions_or_files(serve, tmp_path, capsys, caplog, monkeypatch):
    blank = png(np.zeros((256, 256, 3), np.uint8))

    def respond(path, query, count):
        if query.get("access_token") != TOKEN:
            return 403, {}, b""
        if "65536.jpg" in path:
            return 500, {}, f"error for {path}?access_token={TOKEN}".encode()
        if "65537.jpg" in path:
            return 404, {}, b""
        if "65538.jpg" in path:
            return 200, {}, blank
        return tiles_ok(path, query, count)

    server = serve(respond)
    sample = tmp_path / "sample-filtered.txt"
    sample.write_text("#source z x y a Background\n" + "".join(f"demo {t.z} {t.x} {t.y} 1 2\n" for t in Z17))
    monkeypatch.setenv("MapboxAccessToken", TOKEN)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    spec = server.url + "/{z}/{x}/{y}.jpg?access_token=$(MapboxAccessToken)"
    out = tmp_path / "images"
    args = ["images", "--sample", str(sample), "--image-tiles", spec, "--out", str(out),
            "--labels", str(tmp_path / "labels"), "--retries", "1", "--timeout", "5"]
    status = cli.run(prepare.main, args)
    assert status == 1  # the 500s failed
    texts = [capsys.readouterr(), caplog.text]
    # A wrong token, a refused connection: the errors' texts too.
    status_wrong = cli.run(prepare.main, args[:-4] + ["--token", "pk.other-wrong-token"])
    assert status_wrong == 2
    port = closed_port()
    try:
        imagery.download_tiles(Z17[:1], imagery.open_tile_source(
            f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.jpg?access_token={TOKEN}"), tmp_path / "x",
            retries=0, progress=False)
    except SourceError as error:
        texts.append(str(error) + repr(error))
    texts += [capsys.readouterr(), caplog.text]
    texts += [p.read_text() for p in out.glob("*.txt")]
    everything = "\n".join(map(str, texts))
    assert "17-65536-65536" in everything and "pk.other-wrong-token" not in everything
    assert "connection refused" in everything and "token was refused" in everything
    assert caplog.text and TOKEN not in everything
    assert TOKEN not in " ".join(p.name for p in tmp_path.rglob("*"))


# --- The command -------------------------------------------------------------------------


def test_images_command_reports_the_training_set(serve, tmp_path, capsys):
    server = serve(lambda path, query, count: (404, {}, b"") if "65538.jpg" in path else tiles_ok(path, query, count))
    sample = tmp_path / "sample-filtered.txt"
    sample.write_text("#source z x y a Background\n" + "".join(f"demo {t.z} {t.x} {t.y} 1 2\n" for t in Z17))
    labels = tmp_path / "labels"
    labels.mkdir()
    for tile in Z17[:10]:
        (labels / f"{datafiles.tile_stem(tile)}.png").write_bytes(b"")
    out = tmp_path / "images"
    args = ["images", "--sample", str(sample), "--image-tiles", server.url + "/{z}/{x}/{y}.jpg",
            "--out", str(out), "--labels", str(labels)]
    assert cli.run(prepare.main, args) == 0
    printed = capsys.readouterr().out
    assert "8 downloaded" in printed and "4 missing" in printed
    # Tiles 10 and 11 have no label; tiles 2, 5, 8 and 11 (y = 65538) no image.
    assert "training set: 7 of 12" in printed and "4 missing imagery" in printed and "1 without a label" in printed
    assert cli.run(prepare.main, args) == 0
    assert "8 skipped" in capsys.readouterr().out
    # With every tile there, the source is not even opened (here: nothing listens any more).
    sample.write_text("".join(f"demo {t.z} {t.x} {t.y}\n" for t in Z17 if "65538" not in str(t.y)))
    args[4] = f"http://127.0.0.1:{closed_port()}/{{z}}/{{x}}/{{y}}.jpg"
    assert cli.run(prepare.main, args) == 0
    assert "nothing to download" in capsys.readouterr().out


def test_images_command_bad_input_exits_2(tmp_path, capsys):
    assert cli.run(prepare.main, ["images", "--sample", str(tmp_path / "nope.txt")]) == 2
    assert "no such tile list" in capsys.readouterr().err
    sample = tmp_path / "s.txt"
    sample.write_text("demo 17 1 1\n")
    assert cli.run(prepare.main, ["images", "--sample", str(sample), "--image-tiles", "http://h/{z}/{y}"]) == 2
    assert "lacks {x}" in capsys.readouterr().err
    directory = tmp_path / "tiles"
    directory.mkdir()
    assert cli.run(prepare.main, ["images", "--sample", str(sample), "--image-tiles", str(directory),
                                  "--out", str(tmp_path / "images"), "--workers", "0"]) == 2
    assert "--workers 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare.main(["images", "--rps", "fast"])
    assert "not a number of requests per second" in capsys.readouterr().err


def test_a_source_with_none_of_the_tiles_is_an_error(serve, tmp_path, capsys):
    server = serve(lambda path, query, count: (404, {}, b""))
    sample = tmp_path / "sample.txt"
    sample.write_text("".join(f"demo {t.z} {t.x} {t.y}\n" for t in Z17[:3]))
    args = ["images", "--sample", str(sample), "--image-tiles", server.url + "/{z}/{x}/{y}.jpg",
            "--out", str(tmp_path / "images")]
    assert cli.run(prepare.main, args) == 2
    assert "has none of the 3 tiles (missing: HTTP 404): does it serve zoom 17" in capsys.readouterr().err


# --- The demo world's server (osmseg.demo.server), made to misbehave (tests/demo_faults.py) ----------------------------


@pytest.fixture(scope="module")
def demo_server():
    from demo_faults import FaultyTileServer

    from osmseg.demo import DEMO_BBOX

    with FaultyTileServer(seed=0) as server:
        west, south, east, north = DEMO_BBOX
        centre = mercantile.tile((west + east) / 2, (south + north) / 2, 17)
        server.demo_tiles = [mercantile.Tile(centre.x + i, centre.y + j, 17) for i in range(3) for j in range(2)]
        for tile in server.demo_tiles:
            server.tile_bytes(tile)  # drawn once here, so that tests time the transfer only
        yield server


@pytest.fixture
def demo(demo_server):
    demo_server.set_faults(latency=0.0, token=None, rate_limit_every=0, retry_after=1, error_every=0,
                           truncate_every=0)
    return demo_server


def assert_served_bytes(server, directory: Path):
    for tile in server.demo_tiles:
        assert (directory / f"{datafiles.tile_stem(tile)}.jpg").read_bytes() == server.tile_bytes(tile)


def test_demo_form_starts_and_stops_its_own_server(tmp_path, demo_server):
    source = options.open_imagery("demo")
    with source:
        url = source.templates[0].split("/{z}")[0]
        assert (source.minzoom, source.maxzoom) == (15, 19) and source.bounds is not None
        summary = fast(source, demo_server.demo_tiles[:2], tmp_path)
    assert summary.downloaded == 2
    with pytest.raises(OSError):
        socket.create_connection(urllib.parse.urlsplit(url)[1].split(":"), timeout=1).close()


def test_demo_server_latency_is_overlapped_by_workers(demo, tmp_path):
    demo.set_faults(latency=0.2)
    source = imagery.open_tile_source(demo.tilejson_url)
    started = time.monotonic()
    summary = fast(source, demo.demo_tiles, tmp_path, workers=6)
    elapsed = time.monotonic() - started
    assert summary.downloaded == 6 and 0.2 <= elapsed < 6 * 0.2 * 0.7
    assert_served_bytes(demo, tmp_path)


@pytest.mark.parametrize("fault", ["error_every", "truncate_every"])
def test_demo_server_5xx_and_truncation_are_retried(demo, tmp_path, fault):
    demo.set_faults(**{fault: 2})
    source = imagery.open_tile_source(demo.tilejson_url + "?x=1")  # ?x: the TileJSON may hit a fault too
    before = demo.request_count
    summary = fast(source, demo.demo_tiles, tmp_path, workers=2)
    assert summary.downloaded == 6 and not summary.failed and not summary.rejected
    assert summary.requests >= 6 + 2 and demo.request_count - before >= 8
    assert_served_bytes(demo, tmp_path)


def test_demo_server_429_retry_after_is_honoured(demo, tmp_path):
    demo.set_faults(rate_limit_every=5, retry_after=1)
    source = imagery.open_tile_source(demo.tilejson_url)
    started = time.monotonic()
    summary = fast(source, demo.demo_tiles, tmp_path, workers=2, backoff=0.0)
    assert summary.downloaded == 6
    assert time.monotonic() - started >= 0.95  # at least one full Retry-After wait
    assert_served_bytes(demo, tmp_path)


def test_demo_server_token_401_stops_at_once_and_never_shows_the_token(demo, tmp_path, capsys):
    demo.set_faults(token=TOKEN)
    with pytest.raises(SourceError, match="token is missing") as caught:
        imagery.open_tile_source(f"tilejson+{demo.tilejson_url}")
    spec = f"tilejson+{demo.tilejson_url}?access_token=$(MapboxAccessToken)"
    source = imagery.open_tile_source(spec, TOKEN)
    assert TOKEN in source.templates[0]  # carried from the TileJSON URL to the tiles
    demo.set_faults(token="pk.a-new-token-the-user-lacks")
    before = demo.request_count
    with pytest.raises(SourceError, match="token was refused") as caught:
        # The server refuses before drawing, so asking for many tiles costs nothing.
        many = [mercantile.Tile(t.x + 10 * k, t.y, t.z) for k in range(8) for t in demo.demo_tiles]
        fast(source, many, tmp_path, workers=2)
    assert demo.request_count - before <= 4
    assert TOKEN not in str(caught.value) + capsys.readouterr().err
    demo.set_faults(token=TOKEN)
    assert fast(source, demo.demo_tiles, tmp_path).downloaded == 6


def test_demo_form_takes_the_seed_of_the_world_it_serves(tmp_path):
    from osmseg.demo.server import DemoTileServer

    tile = mercantile.tile(0.001, 0.001, 17)
    with options.open_imagery("demo:3") as source:
        fast(source, [tile], tmp_path)
    served = (tmp_path / f"{datafiles.tile_stem(tile)}.jpg").read_bytes()
    with DemoTileServer(seed=3) as same, DemoTileServer(seed=0) as other:
        assert served == same.tile_bytes(tile) != other.tile_bytes(tile)
    with pytest.raises(SourceError, match="demo:<whole number>"):
        options.open_imagery("demo:x")
