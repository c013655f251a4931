"""The files stages hand each other: tile lists with their counts and #made-by record, tile names."""

from __future__ import annotations

import mercantile
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from osmseg import datafiles
from osmseg.errors import UserError


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["demo", "monaco"]),
            st.integers(0, 22),
            st.integers(0, 2**22 - 1),
            st.integers(0, 2**22 - 1),
        ),
        max_size=20,
    )
)
def test_tile_lists_round_trip(tmp_path_factory, rows):
    entries = [(s, mercantile.Tile(x % (1 << z), y % (1 << z), z)) for s, z, x, y in rows]
    path = tmp_path_factory.mktemp("lists") / "list.txt"
    datafiles.write_tile_list(path, entries)
    listed = datafiles.read_tile_list(path)
    assert listed.entries == entries
    assert listed.made_by == {} and listed.columns == [] and listed.counts is None


def test_counts_and_made_by_round_trip(tmp_path):
    path = tmp_path / "sample-filtered.txt"
    entries = [("demo", mercantile.Tile(5, 6, 17)), ("demo", mercantile.Tile(7, 8, 17))]
    made_by = {"command": "filter", "bbox": "-0.1,-0.1,0.1,0.1", "zoom": 17, "seed": 3}
    counts = np.array([[10, 65526], [0, 65536]])
    datafiles.write_tile_list(path, entries, made_by, ["building", "Background"], counts)
    text = path.read_text().splitlines()
    assert text[0] == "#source z x y building Background"
    assert text[1].startswith("#made-by {") and text[2] == "demo 17 5 6 10 65526"
    listed = datafiles.read_tile_list(path)
    assert listed.entries == entries and listed.made_by == made_by
    assert listed.columns == ["building", "Background"]
    assert listed.counts.dtype == np.int64 and listed.counts.tolist() == counts.tolist()
    assert listed.lines == ["demo 17 5 6 10 65526", "demo 17 7 8 0 65536"]


def test_read_tile_list_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("# a note\n\ndemo 17 5 6\n   \n")
    assert datafiles.read_tile_list(path).entries == [("demo", mercantile.Tile(5, 6, 17))]


@pytest.mark.parametrize("line", ["demo 17 5", "demo 17 x 6", "demo 17 131072 0", "demo 31 0 0"])
def test_read_tile_list_names_a_bad_line(tmp_path, line):
    path = tmp_path / "list.txt"
    path.write_text(f"demo 12 1 1\n{line}\n")
    with pytest.raises(UserError, match=r"list.txt:2: expected `source z x y`"):
        datafiles.read_tile_list(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [("demo 17 5 6 10", "expected 6 columns"), ("demo 17 5 6 10 x", "counts must be whole numbers")],
)
def test_counts_that_do_not_match_the_header_are_refused(tmp_path, line, message):
    path = tmp_path / "list.txt"
    path.write_text(f"#source z x y building Background\n{line}\n")
    with pytest.raises(UserError, match=rf"list.txt:2: {message}"):
        datafiles.read_tile_list(path)


def test_a_broken_made_by_record_is_named(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("#source z x y\n#made-by {not json\n")
    with pytest.raises(UserError, match=r"list.txt:2: its #made-by record is not JSON"):
        datafiles.read_tile_list(path)


def test_read_missing_tile_list_says_how_to_make_it(tmp_path):
    with pytest.raises(UserError, match=r"no such tile list; make it first \(make .*absent.txt\)"):
        datafiles.read_tile_list(tmp_path / "absent.txt")
    with pytest.raises(UserError, match=r"run `make data/sample.txt`"):
        datafiles.read_tile_list(tmp_path / "absent.txt", make_hint="run `make data/sample.txt`")


@given(st.integers(0, 22).flatmap(lambda z: st.tuples(st.just(z), st.integers(0, 2**z - 1), st.integers(0, 2**z - 1))))
def test_tile_stems_round_trip(zxy):
    z, x, y = zxy
    tile = mercantile.Tile(x, y, z)
    assert datafiles.tile_stem(tile) == f"{z}-{x}-{y}"
    assert datafiles.parse_tile_stem(datafiles.tile_stem(tile)) == tile


@pytest.mark.parametrize("stem", ["scene", "17-5", "17-5-6-7", "2-4-0", "17-a-6", "-17-5-6"])
def test_stems_that_name_no_tile(stem):
    assert datafiles.parse_tile_stem(stem) is None


def test_tile_files_are_found_by_name(tmp_path):
    tile = mercantile.Tile(5, 6, 17)
    assert datafiles.label_path(tmp_path, tile) == tmp_path / "17-5-6.png"
    assert datafiles.find_image(tmp_path, tile) is None
    (tmp_path / "rejected").mkdir()
    (tmp_path / "rejected" / "17-5-6.webp").write_bytes(b"x")
    assert datafiles.find_image(tmp_path, tile) is None
    assert datafiles.find_image(tmp_path, tile, folder="rejected") == tmp_path / "rejected" / "17-5-6.webp"
    (tmp_path / "17-5-6.png").write_bytes(b"x")
    assert datafiles.find_image(tmp_path, tile) == tmp_path / "17-5-6.png"


def test_tile_logs_round_trip(tmp_path):
    path = tmp_path / "missing.txt"
    assert datafiles.read_tile_log(path) == {}
    datafiles.write_tile_log(path, {"17-1-2": "HTTP 404", "17-3-4": "outside the source's bounds"})
    assert path.read_text() == "17-1-2\tHTTP 404\n17-3-4\toutside the source's bounds\n"
    assert datafiles.read_tile_log(path) == {"17-1-2": "HTTP 404", "17-3-4": "outside the source's bounds"}
