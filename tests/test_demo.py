"""The demo world: its layout, its OSM QA tiles, and the `prepare.py demo-world` command."""

from __future__ import annotations

import functools
import gzip
import json
import re
import sqlite3

import mapbox_vector_tile
import mercantile
import numpy as np
import pytest
import shapely
from hypothesis import given
from hypothesis import strategies as st
from shapely.geometry import LineString, Point, Polygon, shape

import prepare
from osmseg import cli, demo
from osmseg.classes import load_classes
from osmseg.demo import qatiles
from osmseg.demo import world as world_module

# A 2 km × 2 km corner of the town around (0, 0) keeps the CLI tests fast.
SMALL_BBOX = mercantile.LngLatBbox(-0.009, -0.009, 0.009, 0.009)


@functools.cache
def built(seed: int) -> demo.World:
    """Worlds shared by tests that only read them (building one takes about a second)."""
    return demo.build_world(seed)


@pytest.fixture(scope="module")
def world() -> demo.World:
    return built(0)


@pytest.fixture(scope="module")
def mbtiles(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo.mbtiles"
    demo.write_qa_tiles(world, path)
    return path


@pytest.fixture(scope="module")
def decoded(mbtiles) -> dict[mercantile.Tile, dict]:
    return _tiles(mbtiles)


def _tiles(path) -> dict[mercantile.Tile, dict]:
    """Decoded tiles by XYZ tile (TMS rows turned back)."""
    connection = sqlite3.connect(path)
    rows = connection.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles").fetchall()
    connection.close()
    return {
        mercantile.Tile(x, 2**z - 1 - row, z): mapbox_vector_tile.decode(gzip.decompress(data))
        for z, x, row, data in rows
    }


def test_bbox_straddles_z12_borders_and_holds_400_z17_tiles():
    assert demo.DEMO_BBOX.west < 0 < demo.DEMO_BBOX.east
    assert demo.DEMO_BBOX.south < 0 < demo.DEMO_BBOX.north
    assert len(list(mercantile.tiles(*demo.DEMO_BBOX, zooms=17))) >= 400


def test_metadata_is_what_mapnik_and_tippecanoe_readers_expect(mbtiles, world):
    connection = sqlite3.connect(mbtiles)
    metadata = dict(connection.execute("SELECT name, value FROM metadata"))
    connection.close()
    assert metadata["format"] == "pbf"
    assert metadata["minzoom"] == metadata["maxzoom"] == "12"
    west, south, east, north = map(float, metadata["bounds"].split(","))
    assert (west, south, east, north) == pytest.approx(tuple(demo.DEMO_BBOX), abs=1e-6)
    lon, lat, zoom = metadata["center"].split(",")
    assert (float(lon), float(lat), zoom) == (0.0, 0.0, "12")
    layers = json.loads(metadata["json"])["vector_layers"]
    assert [layer["id"] for layer in layers] == ["osm"]
    fields = layers[0]["fields"]
    for key in ("landuse", "building", "natural", "highway", "railway", "waterway", "surface"):
        assert fields[key] == "String"
    assert fields["@id"] == "Number"
    assert metadata["demo_seed"] == "0"


def test_tiles_are_gzipped_mvt_at_z12_with_one_osm_layer(decoded):
    tiles = decoded
    # The town straddles lon 0 and lat 0: the four z12 tiles around (0, 0).
    assert set(tiles) == {mercantile.Tile(x, y, 12) for x in (2047, 2048) for y in (2047, 2048)}
    for layers in tiles.values():
        assert list(layers) == ["osm"]
        assert layers["osm"]["extent"] == world_module.EXTENT
        types = {f["geometry"]["type"] for f in layers["osm"]["features"]}
        assert {"Polygon", "LineString", "Point"} <= types


def test_tms_rows_put_features_where_they_are(decoded, world):
    by_id = {f.id: f for f in world.features}
    for tile, layers in decoded.items():
        left, bottom, right, top = mercantile.xy_bounds(tile)
        scale = np.array([(right - left) / world_module.EXTENT, (top - bottom) / world_module.EXTENT])
        origin = np.array([left, bottom])
        features = layers["osm"]["features"]
        for feature in features[:: max(1, len(features) // 200)]:
            # Decoded coordinates are tile units with y up; back to metres.
            geometry = shapely.transform(shape(feature["geometry"]), lambda c, s=scale, o=origin: c * s + o)
            original = by_id[feature["properties"]["@id"]]
            assert original.mapped
            assert original.geometry.buffer(0.05).contains(geometry.representative_point())
            assert feature["properties"]["@type"] == original.osm_type
            for key, value in original.tags.items():
                assert feature["properties"][key] == value


def test_every_class_filter_tag_is_in_the_qa_tiles(decoded, classes_file):
    properties = [f["properties"] for d in decoded.values() for f in d["osm"]["features"]]
    present = {(key, value) for p in properties for key, value in p.items()}
    for cls in load_classes(classes_file).classes:
        if cls.name == "building":
            values = {p["building"] for p in properties if "building" in p}
            assert len(values) >= 5, values  # several building=* values
            continue
        for key, value in re.findall(r"\[([\w:]+)\]\s*=\s*'([^']+)'", cls.filter):
            assert (key, value) in present, f"{cls.name}: no feature tagged {key}={value}"
    # ... and features of no class.
    for key in ("highway", "railway", "waterway"):
        assert any(key in p for p in properties)
    assert ("natural", "water") in present


def test_some_features_are_missing_from_osm(world, decoded):
    buildings = [f for f in world.features if "building" in f.tags]
    unmapped = [f for f in buildings if not f.mapped]
    assert 0.10 <= len(unmapped) / len(buildings) <= 0.20
    landuse = [f for f in world.features if "landuse" in f.tags]
    assert 0 < sum(not f.mapped for f in landuse) < 0.2 * len(landuse)
    ids = {f["properties"]["@id"] for d in decoded.values() for f in d["osm"]["features"]}
    assert not ids & {f.id for f in world.features if not f.mapped}
    assert {f.id for f in world.features if f.mapped} <= ids


def test_features_cross_z12_borders_with_one_id(decoded, world):
    tiles_of: dict[int, set] = {}
    for tile, layers in decoded.items():
        for feature in layers["osm"]["features"]:
            tiles_of.setdefault(feature["properties"]["@id"], set()).add(tile)
    by_id = {f.id: f for f in world.features}
    crossing = {by_id[i].tags.get("building", by_id[i].tags.get("landuse")) for i, t in tiles_of.items() if len(t) > 1}
    assert "townhall" in crossing  # the building at (0, 0) lies in all four tiles
    assert "commercial" in crossing and "residential" in crossing
    town_hall = next(f for f in world.features if f.tags.get("building") == "townhall")
    assert len(tiles_of[town_hall.id]) == 4


def test_areas_are_polygons_inside_their_tiles(decoded):
    for layers in decoded.values():
        for feature in layers["osm"]["features"]:
            props, geometry = feature["properties"], feature["geometry"]
            if "building" in props or "landuse" in props:
                assert geometry["type"] in ("Polygon", "MultiPolygon")
            x0, y0, x1, y1 = shape(geometry).bounds
            assert 0 <= x0 and 0 <= y0 and x1 <= world_module.EXTENT and y1 <= world_module.EXTENT  # clipped, no buffer


def test_same_seed_same_world_and_bytes(world, tmp_path):
    again = demo.build_world(0)
    assert [(f.id, f.tags, f.mapped) for f in again.features] == [(f.id, f.tags, f.mapped) for f in world.features]
    assert all(shapely.equals_exact(a.geometry, b.geometry, 0) for a, b in zip(again.features, world.features))
    demo.write_qa_tiles(world.crop(SMALL_BBOX), tmp_path / "one.mbtiles")
    demo.write_qa_tiles(again.crop(SMALL_BBOX), tmp_path / "two.mbtiles")
    assert _blobs(tmp_path / "one.mbtiles") == _blobs(tmp_path / "two.mbtiles")
    other = built(1)
    assert [f.geometry.wkb for f in other.features[:50]] != [f.geometry.wkb for f in world.features[:50]]


def _blobs(path):
    connection = sqlite3.connect(path)
    rows = connection.execute("SELECT * FROM tiles ORDER BY zoom_level, tile_column, tile_row").fetchall()
    connection.close()
    return rows


@given(
    st.floats(100, 300),
    st.floats(100, 300),
    st.lists(st.floats(-12, 12), min_size=8, max_size=8),
    st.lists(st.floats(2, 20), min_size=4, max_size=4),
)
def test_inset_quad_moves_each_street_edge_by_its_own_distance(width, height, jitter, insets):
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=float)
    corners += np.array(jitter).reshape(4, 2)
    inset = world_module._inset_quad(corners, np.array(insets))
    outer, inner = Polygon(corners), Polygon(inset)
    assert inner.is_valid and outer.contains(inner)
    for k in range(4):
        edge = LineString([corners[k], corners[(k + 1) % 4]])
        # Both ends of the inset edge k lie `insets[k]` from the street's edge line.
        for point in (inset[k], inset[(k + 1) % 4]):
            direction = corners[(k + 1) % 4] - corners[k]
            offset = point - corners[k]
            distance = abs(direction[0] * offset[1] - direction[1] * offset[0]) / np.hypot(*direction)
            assert distance == pytest.approx(insets[k], abs=1e-6)
        assert edge.distance(Point(inset[k])) >= insets[k] - 1e-6


def test_a_smaller_bbox_crops_the_same_town(world):
    small = demo.build_world(0, SMALL_BBOX)
    assert 0 < len(small.features) < len(world.features) / 5
    by_id = {f.id: f for f in world.features}
    for feature in small.features:
        assert feature.tags == by_id[feature.id].tags and feature.mapped == by_id[feature.id].mapped
        assert shapely.equals_exact(feature.geometry, by_id[feature.id].geometry, 0)
    assert qatiles.qa_tiles_of(small) == qatiles.qa_tiles_of(world)  # still the four around (0, 0)
    corner = demo.build_world(0, mercantile.LngLatBbox(0.02, 0.02, 0.025, 0.025))
    assert qatiles.qa_tiles_of(corner) == [mercantile.Tile(2048, 2047, 12)]


def test_fully_mapped_maps_every_feature_and_leaves_the_world_as_it_was(world):
    unmapped = sum(not f.mapped for f in world.features)
    assert unmapped > 0
    everything = world.fully_mapped()
    assert all(f.mapped for f in everything.features)
    assert [f._replace(mapped=True) for f in world.features] == everything.features
    assert everything.bbox == world.bbox and everything.seed == world.seed
    assert sum(not f.mapped for f in world.features) == unmapped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_seed_gives_valid_simple_geometries(seed):
    seeded = built(seed)
    kinds = {f.geometry.geom_type for f in seeded.features}
    assert kinds <= {"Point", "LineString", "MultiLineString", "Polygon", "MultiPolygon"}
    assert all(f.geometry.is_valid and not f.geometry.is_empty for f in seeded.features)
    assert len({f.id for f in seeded.features}) == len(seeded.features)


def test_query_finds_by_area(world):
    # How fast build_world is, is measured in bench/bench_demo_world.py, not here.
    square = mercantile.Bbox(-10, -10, 10, 10)
    assert any(f.tags.get("building") == "townhall" for f in world.query(square))
    assert all(f.mapped for f in world.query(mercantile.Bbox(-500, -500, 500, 500), mapped_only=True))


def test_mapnik_tiles_plugin_reads_and_filters_it(mbtiles, world):
    from osmseg.labels import import_mapnik

    mapnik = import_mapnik()
    datasource = mapnik.Datasource(type="tiles", file=str(mbtiles), layer="osm")
    assert "landuse" in datasource.fields()
    xml = f"""<Map srs="epsg:3857" background-color="#000000">
      <Style name="labels">
        <Rule><Filter>[landuse] = 'residential'</Filter><PolygonSymbolizer fill="#010101" gamma="0"/></Rule>
        <Rule><Filter>[building].match('.+')</Filter><PolygonSymbolizer fill="#050505" gamma="0"/></Rule>
      </Style>
      <Layer name="osm" srs="epsg:3857"><StyleName>labels</StyleName>
        <Datasource>
          <Parameter name="type">tiles</Parameter><Parameter name="file">{mbtiles}</Parameter>
          <Parameter name="layer">osm</Parameter>
        </Datasource>
      </Layer>
    </Map>"""
    residential = max(
        (f for f in world.features if f.mapped and f.tags.get("landuse") == "residential"),
        key=lambda f: f.geometry.area,
    )
    point = residential.geometry.representative_point()
    tile = mercantile.tile(*mercantile.lnglat(point.x, point.y), 17)
    m = mapnik.Map(256, 256)
    mapnik.load_map_from_string(m, xml)
    frame = shapely.box(*mercantile.xy_bounds(tile))
    m.zoom_to_box(mapnik.Box2d(*frame.bounds))
    image = mapnik.Image(256, 256)
    mapnik.render(m, image)
    red = np.frombuffer(image.to_string(), dtype=np.uint8).reshape(256, 256, 4)[..., 0]
    assert set(np.unique(red)) <= {0, 1, 5}
    # The shares of pixels match the areas of the mapped features. (gamma="0" fills every
    # pixel an edge touches, so small houses come out up to a pixel wider all round.)
    near = world.query(mercantile.xy_bounds(tile), mapped_only=True)
    buildings = shapely.union_all([f.geometry for f in near if "building" in f.tags]).intersection(frame)
    homes = shapely.union_all([f.geometry for f in near if f.tags.get("landuse") == "residential"]).intersection(frame)
    assert buildings.area / frame.area <= (red == 5).mean() <= 1.4 * buildings.area / frame.area
    labelled = homes.union(buildings).area / frame.area
    assert np.isin(red, (1, 5)).mean() == pytest.approx(labelled, abs=0.02)
    assert (red == 1).mean() > 0.1


def test_the_project_reader_joins_areas_cut_by_z12_borders(mbtiles, world):
    osm = pytest.importorskip("osmseg.osm")
    source = osm.open_source("qa-tiles", mbtiles)
    assert source.zoom == 12
    assert len(source.source_tiles(demo.DEMO_BBOX)) == 4
    read = source.features(mercantile.Bbox(-100, -100, 100, 100))
    town_hall = next(f for f in world.features if f.tags.get("building") == "townhall")
    whole = [f for f in read if f.tags.get("building") == "townhall"]
    assert len(whole) == 1 and whole[0].geometry.geom_type == "Polygon"
    assert whole[0].geometry.symmetric_difference(town_hall.geometry).area < 1.0  # m², quantisation only


# --------------------------------------------------------------------------- prepare.py demo-world


@pytest.fixture
def small_world(monkeypatch):
    monkeypatch.setattr(demo, "build_world", lambda seed: built(seed).crop(SMALL_BBOX))


def test_demo_world_command_writes_then_skips_then_rebuilds(small_world, tmp_path, capsys):
    out = tmp_path / "osm" / "demo.mbtiles"
    assert cli.run(prepare.main, ["demo-world", "--out", str(out), "--seed", "0"]) == 0
    first = out.stat().st_mtime_ns
    assert demo.read_metadata(out)["demo_seed"] == "0"
    assert cli.run(prepare.main, ["demo-world", "--out", str(out)]) == 0
    assert out.stat().st_mtime_ns == first
    assert "skipping" in capsys.readouterr().err
    assert cli.run(prepare.main, ["demo-world", "--out", str(out), "--seed", "1"]) == 0
    assert demo.read_metadata(out)["demo_seed"] == "1"
    assert not [p for p in out.parent.iterdir() if p.name != "demo.mbtiles"]  # no temporary left


def test_demo_world_command_refuses_a_directory(tmp_path, capsys):
    assert cli.run(prepare.main, ["demo-world", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_demo_world_command_never_clobbers_other_files(tmp_path, capsys):
    out = tmp_path / "demo.mbtiles"
    out.write_text("my own notes")
    assert cli.run(prepare.main, ["demo-world", "--out", str(out)]) == 2
    assert "is not a demo world" in capsys.readouterr().err
    assert out.read_text() == "my own notes"
