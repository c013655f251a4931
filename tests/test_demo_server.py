"""The demo world's loopback tile server: TileJSON, imagery, and each fault switch."""

from __future__ import annotations

import threading
import time

import cv2
import mercantile
import numpy as np
import pytest
import requests
import shapely
from demo_faults import FaultyTileServer
from hypothesis import given
from hypothesis import strategies as st

import prepare
from osmseg import cli
from osmseg.commands import serve_demo
from osmseg.demo import DEMO_BBOX, painter
from osmseg.demo.painter import draw_tile
from osmseg.demo.server import DemoTileServer
from osmseg.errors import SourceError


@pytest.fixture(scope="module")
def server():
    with DemoTileServer(seed=0) as running:
        yield running


@pytest.fixture(scope="module")
def world():
    return painter._painter(0).world


def _decode(body: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(body, dtype=np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a decodable image"
    return image[..., ::-1]  # BGR -> RGB


def _tile_of(geometry, zoom: int = 17) -> mercantile.Tile:
    point = geometry.representative_point()
    return mercantile.tile(*mercantile.lnglat(point.x, point.y), zoom)


def _pixel(tile: mercantile.Tile, x: float, y: float) -> tuple[int, int]:
    left, bottom, right, top = mercantile.xy_bounds(tile)
    return int((top - y) / (top - bottom) * 256), int((x - left) / (right - left) * 256)


def test_tilejson(server):
    response = requests.get(server.tilejson_url, timeout=10)
    assert response.status_code == 200
    document = response.json()
    assert document["tilejson"] == "2.2.0"
    assert document["tiles"] == [server.url + "/{z}/{x}/{y}.jpg"]
    assert (document["minzoom"], document["maxzoom"]) == (15, 19)
    assert document["bounds"] == pytest.approx(list(DEMO_BBOX))
    assert server.url.startswith("http://127.0.0.1:")


@pytest.mark.parametrize("zoom", [15, 17, 19])
def test_tiles_are_256_jpegs(server, zoom):
    tile = mercantile.tile(0.001, 0.001, zoom)
    response = requests.get(f"{server.url}/{zoom}/{tile.x}/{tile.y}.jpg", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/jpeg"
    assert response.content[:3] == b"\xff\xd8\xff"
    image = _decode(response.content)
    assert image.shape == (256, 256, 3)
    assert image.std() > 10  # something to learn, not a flat colour


@pytest.mark.parametrize(
    "path", ["/14/0/0.jpg", "/20/0/0.jpg", "/17/131072/0.jpg", "/17/1/-1.jpg", "/nothing", "/17/a/b.jpg"]
)
def test_outside_zoom_range_or_unknown_paths_are_404(server, path):
    assert requests.get(server.url + path, timeout=10).status_code == 404


def test_imagery_differs_between_classes(server, world):
    """Mean colours over a big roof, a forest and a field: a model has something to learn."""

    def mean_colour(feature, zoom=18):
        tile = _tile_of(feature.geometry, zoom)
        image = _decode(requests.get(f"{server.url}/{zoom}/{tile.x}/{tile.y}.jpg", timeout=10).content)
        left, bottom, right, top = mercantile.xy_bounds(tile)
        inner = feature.geometry.buffer(-2).intersection(shapely.box(left, bottom, right, top))
        rows, cols = np.mgrid[0:256, 0:256]
        xs = left + (cols + 0.5) * (right - left) / 256
        ys = top - (rows + 0.5) * (top - bottom) / 256
        inside = shapely.contains_xy(inner, xs, ys)
        assert inside.sum() > 50
        return image[inside].mean(axis=0)

    def biggest(predicate):
        return max((f for f in world.features if predicate(f.tags)), key=lambda f: f.geometry.area)

    roof = mean_colour(biggest(lambda t: t.get("building") in ("industrial", "warehouse")))
    forest = mean_colour(biggest(lambda t: t.get("landuse") == "forest"))
    water = mean_colour(biggest(lambda t: t.get("natural") == "water"))
    assert forest[1] > forest[0] and forest[1] > forest[2]  # green
    assert roof.mean() > forest.mean() + 40  # bright roof, dark trees
    assert water[2] > water[0] and water.mean() < roof.mean()
    assert np.abs(roof - forest).sum() > 60 and np.abs(water - forest).sum() > 30


def test_unmapped_buildings_are_in_the_imagery(world):
    """Noisy labels: a building missing from OSM still shows as a roof."""
    missing = max(
        (
            f
            for f in world.features
            if not f.mapped and f.tags.get("building") in ("industrial", "warehouse", "commercial", "retail", "office")
        ),
        key=lambda f: f.geometry.area,
    )
    tile = _tile_of(missing.geometry, 18)
    image = draw_tile(tile).astype(int)
    centre = missing.geometry.representative_point()
    row, col = _pixel(tile, centre.x, centre.y)
    roof = image[max(row - 2, 0) : row + 3, max(col - 2, 0) : col + 3].reshape(-1, 3).mean(axis=0)
    # Roofs are grey: channels close to each other, unlike grass, soil or trees.
    assert np.ptp(roof) < 25 and roof.mean() > 90


@pytest.mark.parametrize("zoom", [15, 17, 19])
def test_texture_is_continuous_across_tile_borders(zoom):
    # A tile whose east and south neighbours lie across the textures' period (4 tiles) too.
    near = mercantile.tile(0.012, -0.012, zoom)
    tile = mercantile.Tile(near.x - near.x % 4 + 3, near.y - near.y % 4 + 3, zoom)
    east = mercantile.Tile(tile.x + 1, tile.y, tile.z)
    south = mercantile.Tile(tile.x, tile.y + 1, tile.z)
    a, b, c = (draw_tile(t).astype(int) for t in (tile, east, south))
    step_inside = np.abs(a[:, -1] - a[:, -2]).mean()
    step_across = np.abs(b[:, 0] - a[:, -1]).mean()
    assert step_across < 1.5 * step_inside + 2
    assert np.abs(c[0] - a[-1]).mean() < 1.5 * np.abs(a[-1] - a[-2]).mean() + 2


def test_periodic_noise_wraps_smoothly():
    noise = painter._periodic_noise(256, 16.0, salt=3)
    assert noise.shape == (256, 256) and -1 <= noise.min() < noise.max() <= 1
    # Across the wrap, neighbouring pixels differ as little as neighbours inside do.
    inside = np.abs(np.diff(noise, axis=1)).max()
    assert np.abs(noise[:, 0] - noise[:, -1]).max() <= inside + 1e-6
    assert np.abs(noise[0] - noise[-1]).max() <= np.abs(np.diff(noise, axis=0)).max() + 1e-6


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 20)), max_size=20))
def test_ranges_concatenates_aranges(pairs):
    starts = np.array([s for s, _ in pairs], dtype=np.int64)
    ends = starts + np.array([n for _, n in pairs], dtype=np.int64)
    expected = [i for s, e in zip(starts, ends) for i in range(s, e)]
    assert painter._ranges(starts, ends).tolist() == expected


def test_port_in_use_is_a_clear_error(server):
    port = int(server.url.rsplit(":", 1)[1])
    with pytest.raises(SourceError, match=f"127.0.0.1:{port}.*pass another port"):
        DemoTileServer(port=port).start()


def test_same_seed_same_bytes(server):
    tile = mercantile.tile(-0.01, 0.02, 17)
    first = requests.get(f"{server.url}/17/{tile.x}/{tile.y}.jpg", timeout=10).content
    with DemoTileServer(seed=0) as other:
        second = requests.get(f"{other.url}/17/{tile.x}/{tile.y}.jpg", timeout=10).content
    assert first == second
    assert np.array_equal(draw_tile(tile, seed=0), draw_tile(tile, seed=0))


def test_latency_is_added_per_tile():
    with DemoTileServer(latency=0.3) as server:
        tile = mercantile.tile(0.0, 0.0, 17)
        start = time.perf_counter()
        assert requests.get(f"{server.url}/17/{tile.x}/{tile.y}.jpg", timeout=10).status_code == 200
        assert time.perf_counter() - start >= 0.3
        server.set_behaviour(latency=0.0)
        start = time.perf_counter()
        requests.get(f"{server.url}/17/{tile.x}/{tile.y}.jpg", timeout=10)
        assert time.perf_counter() - start < 0.3


def test_rate_limit_answers_429_with_retry_after():
    with FaultyTileServer(rate_limit_every=2, retry_after=7) as server:
        url = f"{server.url}/17/65536/65535.jpg"
        statuses = [requests.get(url, timeout=10) for _ in range(4)]
        assert [r.status_code for r in statuses] == [200, 429, 200, 429]
        assert statuses[1].headers["Retry-After"] == "7"
        assert server.request_count == 4


def test_server_errors_every_nth_request():
    with FaultyTileServer(error_every=3, error_status=502) as server:
        url = f"{server.url}/17/65536/65535.jpg"
        assert [requests.get(url, timeout=10).status_code for _ in range(6)] == [200, 200, 502, 200, 200, 502]
        server.set_faults(error_every=0)
        assert requests.get(url, timeout=10).status_code == 200


def test_truncated_bodies_are_detected_by_clients():
    with FaultyTileServer(truncate_every=2) as server:
        url = f"{server.url}/17/65536/65535.jpg"
        whole = requests.get(url, timeout=10)
        assert whole.status_code == 200 and len(whole.content) == int(whole.headers["Content-Length"])
        with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
            _ = requests.get(url, timeout=10).content
        assert requests.get(url, timeout=10).content == whole.content  # the 3rd is whole again


def test_token_required():
    with DemoTileServer(token="s3cret") as server:
        url = f"{server.url}/17/65536/65535.jpg"
        assert requests.get(url, timeout=10).status_code == 401
        assert requests.get(url, params={"access_token": "wrong"}, timeout=10).status_code == 403
        assert requests.get(url, params={"access_token": "s3cret"}, timeout=10).status_code == 200
        assert requests.get(server.tilejson_url, timeout=10).status_code == 401


def test_bad_fault_switches_are_refused():
    with pytest.raises(TypeError, match="unknown fault"):
        FaultyTileServer().set_faults(slow=True)
    with pytest.raises(ValueError, match="error_status"):
        FaultyTileServer(error_status=404)


def test_concurrent_clients(server):
    """Many pooled connections at once (the downloader's benchmark uses up to 32)."""
    tiles = list(mercantile.tiles(-0.004, -0.004, 0.004, 0.004, zooms=17))[:32]
    results = []

    def fetch(chunk):
        with requests.Session() as session:
            for tile in chunk:
                results.append(session.get(f"{server.url}/17/{tile.x}/{tile.y}.jpg", timeout=30).status_code)

    threads = [threading.Thread(target=fetch, args=(tiles[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * len(tiles)


def test_serve_demo_command_serves_until_interrupted(monkeypatch, capsys):
    seen = {}

    def wait(server):
        seen["status"] = requests.get(server.tilejson_url, timeout=10).status_code
        raise KeyboardInterrupt

    monkeypatch.setattr(serve_demo, "_wait_forever", wait)
    assert cli.run(prepare.main, ["serve-demo", "--port", "0", "--token", "abc"]) == 0
    assert seen["status"] == 401
    out, err = capsys.readouterr()
    assert out.strip().endswith("/demo.json")
    assert "abc" not in out + err  # the token is never printed


def test_serve_demo_command_rejects_bad_port(capsys):
    assert cli.run(prepare.main, ["serve-demo", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
