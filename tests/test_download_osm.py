"""osmseg.osm.download: QA tiles for a country, resumed with HTTP Range when a download breaks off."""

from __future__ import annotations

import gzip
import http.server
import json
import threading
from pathlib import Path

import mercantile
import pytest
from osm_fakes import LEFT, RIGHT, border_square, write_mbtiles

import prepare
from osmseg import osm
from osmseg.errors import SourceError
from osmseg.osm import download

# ---- download-osm --------------------------------------------------------------------------------


def _small_qa_tiles(tmp_path, tile: mercantile.Tile = LEFT) -> bytes:
    square = border_square()
    made = tmp_path / f"made-{tile.x}.mbtiles"
    path = write_mbtiles(made, {tile: [(square, {"@id": 1, "@type": "way", "building": "yes"})]})
    return gzip.compress(path.read_bytes())


def _broken_off(fake, out_dir) -> Path:
    """Download from fake with the connection dropped half way; return the kept .gz.partial."""
    fake.cut = len(fake.data) // 2
    with pytest.raises(SourceError, match="is kept: run the command again to resume"):
        download.download_qa_tiles("monaco", out_dir, fake.url)
    kept = out_dir / "monaco.mbtiles.gz.partial"
    assert kept.read_bytes() == fake.data[: len(fake.data) // 2]
    assert not (out_dir / "monaco.mbtiles").exists()
    return kept


def test_download_osm_streams_and_gunzips(server, tmp_path, capsys):
    data = _small_qa_tiles(tmp_path)
    fake = server({"/latest.country/monaco.mbtiles.gz": (200, data)})
    out_dir = tmp_path / "osm"
    argv = ["download-osm", "--name", "monaco", "--base-url", fake.url + "/latest.country/", "--out-dir", str(out_dir)]
    assert prepare.cli.run(prepare.main, argv) == 0
    path = out_dir / "monaco.mbtiles"
    assert path.read_bytes() == gzip.decompress(data)
    assert [p.name for p in out_dir.iterdir()] == ["monaco.mbtiles"]  # no partial left
    assert osm.open_source("qa-tiles", path).all_tiles() == [LEFT]
    # A file already there is used as it is: nothing is downloaded, and a download a run
    # stopped before cleaning up after is removed.
    (out_dir / "monaco.mbtiles.gz.partial").write_bytes(data)
    assert prepare.cli.run(prepare.main, argv) == 0
    assert [p.name for p in out_dir.iterdir()] == ["monaco.mbtiles"]
    assert len(fake.requests) == 1 and "using it as it is" in capsys.readouterr().err


def test_download_osm_resumes_where_it_broke_off(file_server, tmp_path, capsys):
    data = _small_qa_tiles(tmp_path)
    fake = file_server(data)
    out_dir = tmp_path / "osm"
    argv = ["download-osm", "--name", "monaco", "--base-url", fake.url, "--out-dir", str(out_dir)]
    fake.cut = len(data) // 2
    assert prepare.cli.run(prepare.main, argv) == 2
    assert "monaco.mbtiles.gz.partial is kept: run the command again to resume" in capsys.readouterr().err
    kept = out_dir / "monaco.mbtiles.gz.partial"
    assert kept.read_bytes() == data[: len(data) // 2] and not (out_dir / "monaco.mbtiles").exists()
    record = json.loads((out_dir / "monaco.mbtiles.gz.partial.json").read_text())
    assert record["etag"] == fake.etag and record["size"] == len(data) and record["url"].startswith(fake.url)

    assert prepare.cli.run(prepare.main, argv) == 0
    status, headers = fake.answers[-1]
    assert status == 206 and headers["Range"] == f"bytes={len(data) // 2}-" and headers["If-Range"] == fake.etag
    assert (out_dir / "monaco.mbtiles").read_bytes() == gzip.decompress(data)
    assert [p.name for p in out_dir.iterdir()] == ["monaco.mbtiles"]
    assert f"resuming at {len(data) // 2} bytes of {len(data)} bytes" in capsys.readouterr().err


def test_download_osm_starts_over_when_the_server_ignores_range(file_server, tmp_path, capsys):
    data = _small_qa_tiles(tmp_path)
    fake = file_server(data)
    _broken_off(fake, tmp_path)
    fake.ranges = False
    path = download.download_qa_tiles("monaco", tmp_path, fake.url)
    status, headers = fake.answers[-1]
    assert status == 200 and headers["Range"] == f"bytes={len(data) // 2}-"
    assert path.read_bytes() == gzip.decompress(data)
    assert "does not resume downloads); starting over" in capsys.readouterr().err


@pytest.mark.parametrize("if_range", [True, False], ids=["if-range", "range-only"])
def test_download_osm_starts_over_when_the_file_changed(file_server, tmp_path, capsys, if_range):
    fake = file_server(_small_qa_tiles(tmp_path, LEFT))
    _broken_off(fake, tmp_path / "osm")
    fake.data, fake.etag, fake.if_range = _small_qa_tiles(tmp_path, RIGHT), '"v2"', if_range
    path = download.download_qa_tiles("monaco", tmp_path / "osm", fake.url)
    # A server that checks If-Range answers 200 at once; one that does not answers 206 with the
    # new ETag, and the download asks again without Range.
    assert fake.answers[1][1]["If-Range"] == '"v1"'
    if if_range:
        assert [status for status, _ in fake.answers] == [200, 200]
    else:
        assert [status for status, _ in fake.answers] == [200, 206, 200] and "Range" not in fake.answers[2][1]
    assert path.read_bytes() == gzip.decompress(fake.data)
    assert osm.open_source("qa-tiles", path).all_tiles() == [RIGHT]
    assert "the server's file changed; starting over" in capsys.readouterr().err


def test_download_osm_interrupted_while_unpacking_does_not_download_again(file_server, tmp_path, monkeypatch, capsys):
    data = _small_qa_tiles(tmp_path)
    fake = file_server(data)
    out_dir = tmp_path / "osm"

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(download, "QaTilesSource", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            download.download_qa_tiles("monaco", out_dir, fake.url)
    assert (out_dir / "monaco.mbtiles.gz.partial").read_bytes() == data
    assert sorted(p.name for p in out_dir.iterdir()) == ["monaco.mbtiles.gz.partial", "monaco.mbtiles.gz.partial.json"]
    path = download.download_qa_tiles("monaco", out_dir, fake.url)
    assert [status for status, _ in fake.answers] == [200, 416]
    assert fake.answers[-1][1]["Range"] == f"bytes={len(data)}-"
    assert path.read_bytes() == gzip.decompress(data)
    assert [p.name for p in out_dir.iterdir()] == ["monaco.mbtiles"]
    assert "the download was already complete" in capsys.readouterr().err


def test_download_osm_notices_an_early_end_without_content_length(file_server, tmp_path):
    # Without Content-Length nothing below us can tell a dropped connection from the end of
    # the body; Content-Range's size still can.
    data = _small_qa_tiles(tmp_path)
    fake = file_server(data)
    kept = _broken_off(fake, tmp_path)
    fake.content_length, fake.cut = False, len(data) // 4
    with pytest.raises(SourceError, match="ended early at .* is kept: run the command again to resume"):
        download.download_qa_tiles("monaco", tmp_path, fake.url)
    assert fake.answers[-1][0] == 206 and kept.read_bytes() == data[: len(data) // 2 + len(data) // 4]
    path = download.download_qa_tiles("monaco", tmp_path, fake.url)
    assert path.read_bytes() == gzip.decompress(data)


def test_download_osm_without_its_record_starts_over(file_server, tmp_path, capsys):
    data = _small_qa_tiles(tmp_path)
    fake = file_server(data)
    _broken_off(fake, tmp_path).with_name("monaco.mbtiles.gz.partial.json").unlink()
    path = download.download_qa_tiles("monaco", tmp_path, fake.url)
    assert "Range" not in fake.answers[-1][1] and path.read_bytes() == gzip.decompress(data)
    assert "cannot resume (monaco.mbtiles.gz.partial.json does not say it came from" in capsys.readouterr().err


def test_download_osm_keeps_gzip_labelled_as_content_encoding(tmp_path):
    # Some hosts serve .gz files with Content-Encoding: gzip; the file must still be gunzipped once.
    data = _small_qa_tiles(tmp_path)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        path = download.download_qa_tiles("monaco", tmp_path / "osm", f"http://127.0.0.1:{httpd.server_address[1]}/")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert path.read_bytes() == gzip.decompress(data)


def test_download_osm_unknown_name(server, tmp_path, capsys):
    fake = server({})
    argv = ["download-osm", "--name", "atlantis", "--base-url", fake.url + "/", "--out-dir", str(tmp_path)]
    assert prepare.cli.run(prepare.main, argv) == 2
    err = capsys.readouterr().err
    assert "no QA tiles named 'atlantis' (HTTP 404)" in err and "lower case with underscores" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "broken, message",
    [
        ("not gzip", "not a gzip file"),
        ("cut short", "ended early"),
        ("a flipped byte", "broken or not a gzip file"),
        ("not QA tiles", "not OSM QA tiles"),
    ],
)
def test_download_osm_broken_file_leaves_nothing(server, tmp_path, capsys, broken, message):
    # Served whole, so resuming cannot mend them: the partial files are deleted.
    data = _small_qa_tiles(tmp_path)
    payload = {
        "not gzip": b"not gzip at all",
        "cut short": data[:-100],
        "a flipped byte": data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :],
        "not QA tiles": gzip.compress(b"<html>busy, try later</html>"),
    }[broken]
    fake = server({"/x/monaco.mbtiles.gz": (200, payload)})
    out_dir = tmp_path / "osm"
    with pytest.raises(SourceError, match=message) as raised:
        download.download_qa_tiles("monaco", out_dir, fake.url + "/x/")
    assert "deleted" in str(raised.value)
    assert list(out_dir.iterdir()) == []


def test_download_osm_rejects_odd_names(tmp_path):
    with pytest.raises(SourceError, match="lower case with underscores"):
        download.download_qa_tiles("United Kingdom", tmp_path, "http://127.0.0.1:9/")


def test_qa_tiles_urls():
    assert download.qa_tiles_url("united_kingdom") == download.QA_TILES_URL + "united_kingdom.mbtiles.gz"
    assert download.qa_tiles_url("planet") == (
        "https://s3.amazonaws.com/mapbox/osm-qa-tiles-production/latest.planet.mbtiles.gz"
    )


