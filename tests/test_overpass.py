"""osmseg.osm.overpass: one query for a classes file's keys, saved and read as a file source."""

from __future__ import annotations

import mercantile
import pytest
from osm_fakes import OSM_XML, check_small_osm

import prepare
from osmseg import datafiles, osm
from osmseg.classes import load_classes
from osmseg.errors import SourceError

# ---- overpass ------------------------------------------------------------------------------------


def test_classes_tag_keys(classes_file):
    assert load_classes(classes_file).tag_keys() == ["building", "landuse", "natural", "surface"]


def test_overpass_queries_once_and_reads_the_answer(server, tmp_path, classes_file):
    fake = server({"/api/interpreter": (200, OSM_XML.encode())})
    bbox = mercantile.LngLatBbox(7.41, 43.72, 7.43, 43.74)
    options = {
        "bbox": bbox,
        "classes": load_classes(classes_file),
        "endpoint": fake.url + "/api/interpreter",
        "timeout": 25,
    }
    source = osm.open_source("overpass", tmp_path / "osm", **options)
    check_small_osm(source, highways=False)  # only the classes' keys are kept
    ((method, _, headers, body),) = fake.requests
    assert method == "POST" and "osmseg" in headers["User-Agent"]
    from urllib.parse import parse_qs

    query = parse_qs(body.decode())["data"][0]
    assert "[timeout:25]" in query and "[bbox:43.72,7.41,43.74,7.43]" in query
    for key in ("building", "landuse", "natural", "surface"):
        assert f'nwr["{key}"]' in query
    saved = list((tmp_path / "osm").glob("overpass-*.osm"))
    assert len(saved) == 1 and saved[0].read_text() == OSM_XML
    # A second open (as the labels stage does, with text options) reads the saved answer.
    again = dict(options, bbox="7.41,43.72,7.43,43.74", classes=str(classes_file))
    assert len(osm.open_source("overpass", tmp_path / "osm", **again)) == len(source)
    assert len(fake.requests) == 1
    with pytest.raises(SourceError, match="no saved Overpass answer"):
        osm.open_source("overpass", tmp_path / "osm")


def test_overpass_saves_to_a_named_file_that_later_stages_read(server, tmp_path, classes_file):
    fake = server({"/api/interpreter": (200, OSM_XML.encode())})
    path = tmp_path / "osm" / "overpass.osm"
    options = {"classes": str(classes_file), "endpoint": fake.url + "/api/interpreter"}
    first = osm.open_source("overpass", path, bbox="7.41,43.72,7.43,43.74", **options)
    assert (
        path.read_text() == OSM_XML
        and "[bbox:43.72,7.41,43.74,7.43]" in (tmp_path / "osm" / "overpass.osm.query").read_text()
    )
    # The labels stage opens it without bbox and classes: it reads the saved answer.
    later = osm.open_source("overpass", path)
    assert later.name == first.name == "overpass" and len(fake.requests) == 1
    # Same query: no new request; another box: asked again.
    osm.open_source("overpass", path, bbox="7.41,43.72,7.43,43.74", **options)
    assert len(fake.requests) == 1
    osm.open_source("overpass", path, bbox="7.40,43.72,7.43,43.74", **options)
    assert (
        len(fake.requests) == 2
        and "[bbox:43.72,7.4,43.74,7.43]" in (tmp_path / "osm" / "overpass.osm.query").read_text()
    )


@pytest.mark.parametrize(
    "status, body, message",
    [
        (429, b"rate limited", "HTTP 429.*retry.*smaller bounding box"),
        (504, b"gateway timeout", "HTTP 504.*retry later.*smaller bounding box"),
        (400, b"bad query", "HTTP 400"),
        (200, b"<html>oops</html>", "not OSM XML"),
        (200, b'<osm version="0.6"><remark> runtime error: Query timed out </remark></osm>', "runtime error"),
    ],
)
def test_overpass_errors_save_nothing(server, tmp_path, classes_file, status, body, message):
    fake = server({"/api/interpreter": (status, body)})
    with pytest.raises(SourceError, match=message):
        osm.open_source(
            "overpass",
            tmp_path,
            bbox=mercantile.LngLatBbox(7.41, 43.72, 7.43, 43.74),
            classes=load_classes(classes_file),
            endpoint=fake.url + "/api/interpreter",
        )
    assert list(tmp_path.iterdir()) == []


def test_overpass_unreachable(tmp_path, classes_file):
    with pytest.raises(SourceError, match="cannot connect"):
        osm.open_source(
            "overpass",
            tmp_path,
            bbox=mercantile.LngLatBbox(7.41, 43.72, 7.43, 43.74),
            classes=load_classes(classes_file),
            endpoint="http://127.0.0.1:9/api/interpreter",
        )


def test_all_tiles_from_overpass(server, tmp_path, classes_file, capsys):
    fake = server({"/api/interpreter": (200, OSM_XML.encode())})
    out = tmp_path / "all_tiles.txt"
    status = prepare.cli.run(
        prepare.main,
        [
            "all-tiles",
            "--osm-source",
            "overpass",
            "--osm",
            str(tmp_path / "osm"),
            "--bbox",
            "7.41,43.72,7.43,43.74",
            "--classes",
            str(classes_file),
            "--overpass-url",
            fake.url + "/api/interpreter",
            "--out",
            str(out),
        ],
    )
    assert status == 0, capsys.readouterr().err
    listed = datafiles.read_tile_list(out)
    assert listed.entries == [("overpass", mercantile.Tile(2132, 1493, 12))]
    assert listed.made_by["osm_source"] == "overpass" and listed.made_by["overpass_url"].startswith("http://127.0.0.1")


