"""GeoTIFFs written in strips of rows: 2 × 2 reductions, Cloud-Optimized layout, round trips."""

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from osmseg import geotiff
from osmseg.geotiff import CogWriter, overview_shapes, reduce_mean, reduce_mode

TRANSFORM = Affine(1.2, 0, -3000.0, 0, -1.2, 3000.0)


def test_reduce_mean_rounds_half_up_and_averages_an_odd_last_column_with_itself():
    rows = np.array([[[0], [1], [10]], [[1], [1], [11]]], dtype=np.uint8)  # (2, 3, 1)
    # (0 + 1 + 1 + 1) / 4 = 0.75 -> 1; (10 + 10 + 11 + 11) / 4 = 10.5 -> 11
    assert reduce_mean(rows)[:, :, 0].tolist() == [[1, 11]]
    full = np.full((4, 4, 2), 255, dtype=np.uint8)
    assert (reduce_mean(full) == 255).all() and reduce_mean(full).shape == (2, 2, 2)


def test_reduce_mode_takes_the_majority_breaks_ties_in_reading_order_and_skips_nodata():
    cells = [
        ([[3, 5], [5, 1]], 5),  # a majority of two
        ([[3, 5], [5, 3]], 3),  # two pairs: the top-left's value
        ([[2, 4], [6, 7]], 2),  # all different: the top-left's
        ([[255, 255], [255, 4]], 4),  # nodata outvoted by any class
        ([[255, 255], [255, 255]], 255),  # nodata only where the cell has nothing else
    ]
    rows = np.concatenate([np.array(cell, dtype=np.uint8) for cell, _ in cells], axis=1)[..., None]
    assert reduce_mode(rows, nodata=255)[0, :, 0].tolist() == [mode for _, mode in cells]
    # Without nodata, 255 is a class like any other.
    assert reduce_mode(np.array([[[255], [255]], [[255], [4]]], dtype=np.uint8))[0, 0, 0] == 255


def test_overview_levels_halve_rounding_up_until_one_tile_holds_the_image():
    assert overview_shapes(1100, 700, 512) == [(550, 350), (275, 175)]
    assert overview_shapes(3584, 3584, 512) == [(1792, 1792), (896, 896), (448, 448)]
    assert overview_shapes(512, 300, 512) == []


def _image(height: int, width: int, bands: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = (np.sin(y / 37.0)[..., None] * np.cos(x[..., None] / 23.0 + np.arange(bands)) + 1) * 120
    return (smooth + rng.integers(0, 10, (height, width, bands))).astype(np.uint8)


def _write(path, image, strip, **options):
    height, width, bands = image.shape
    with CogWriter(path, height, width, bands, CRS.from_epsg(3857), TRANSFORM, block_size=256, **options) as cog:
        for top in range(0, height, strip):
            cog.write(top, image[top : top + strip])


@pytest.mark.parametrize("bigtiff", [False, True])
def test_cog_round_trip_overviews_and_layout(tmp_path, monkeypatch, bigtiff):
    if bigtiff:
        assemble = geotiff.assemble
        monkeypatch.setattr(geotiff, "assemble", lambda levels, out: assemble(levels, out, bigtiff=True))
    image = _image(1100, 700, 3)
    path = tmp_path / "out.tif"
    names = ["red", "green", "blue"]
    _write(path, image, strip=37, resampling="mean", descriptions=names)  # strips cross tile rows unevenly
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]  # the levels' files are gone
    with rasterio.open(path) as cog:
        assert cog.crs.to_epsg() == 3857 and cog.transform == TRANSFORM and list(cog.descriptions) == names
        assert cog.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and cog.block_shapes[0] == (256, 256)
        assert (np.moveaxis(cog.read(), 0, -1) == image).all()
        assert cog.overviews(1) == [2, 4, 8]  # 550, 275, 138 rows: 256-pixel tiles
        level1 = cog.read(out_shape=(3, 550, 350))  # GDAL reads the matching overview level
        assert (np.moveaxis(level1, 0, -1) == reduce_mean(image)).all()
        level2 = cog.read(out_shape=(3, 275, 175))
        assert (np.moveaxis(level2, 0, -1) == reduce_mean(reduce_mean(image))).all()
        # COG order (as GDAL's validate_cloud_optimized_geotiff.py checks it): every IFD in the
        # first bytes, in order, before any tile; the smallest overview's tiles first.
        levels = (None, 0, 1, 2)
        ifds = [int(cog.get_tag_item("IFD_OFFSET", "TIFF", bidx=1, ovr=level)) for level in levels]
        firsts = [int(cog.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1, ovr=level)) for level in levels]
        assert ifds[0] < 200 and ifds == sorted(ifds) and max(ifds) < min(firsts)
        assert firsts == sorted(firsts, reverse=True)
    with open(path, "rb") as raw:
        assert raw.read(4) == (b"II+\0" if bigtiff else b"II*\0")


def test_cog_mask_keeps_its_colour_table_and_nodata_and_votes_its_overviews(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.repeat(rng.integers(0, 4, (150, 200)), 4, axis=0), 4, axis=1).astype(np.uint8)
    labels[:100, :100] = 255
    labels[100:102, 100:102] = [[1, 255], [255, 255]]
    colormap = {0: (0, 0, 0, 255), 1: (200, 10, 10, 255), 2: (10, 200, 10, 255), 3: (10, 10, 200, 255)}
    path = tmp_path / "mask.tif"
    _write(path, labels[..., None], strip=64, resampling="mode", nodata=255, colormap=colormap)
    with rasterio.open(path) as mask:
        assert mask.nodata == 255 and mask.colormap(1)[2] == (10, 200, 10, 255)
        assert (mask.read(1) == labels).all()
        level1 = mask.read(1, out_shape=(300, 400))
        assert (level1 == reduce_mode(labels[..., None], 255)[..., 0]).all()
        assert level1[50, 50] == 1 and level1[0, 0] == 255


def test_cog_failure_or_missing_rows_leave_nothing(tmp_path):
    image = _image(600, 300, 1)
    with pytest.raises(RuntimeError):
        with CogWriter(tmp_path / "a.tif", 600, 300, 1, CRS.from_epsg(3857), TRANSFORM) as cog:
            cog.write(0, image[:100])
            raise RuntimeError("the model failed")
    with pytest.raises(ValueError, match="got 100 of 600 rows"):
        with CogWriter(tmp_path / "b.tif", 600, 300, 1, CRS.from_epsg(3857), TRANSFORM) as cog:
            cog.write(0, image[:100])
    with pytest.raises(ValueError, match="expected row 0"):
        with CogWriter(tmp_path / "c.tif", 600, 300, 1, CRS.from_epsg(3857), TRANSFORM) as cog:
            cog.write(10, image[:100])
    assert list(tmp_path.iterdir()) == []
