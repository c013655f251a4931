"""Labels (mapnik) and GeoTIFF outputs (rasterio) share one process without breaking CRSs."""

import subprocess
import sys


def test_rasterio_finds_crs_after_mapnik_was_imported_for_labels():
    # A fresh interpreter: the import order is the point, and the test session may already
    # have imported either package.
    code = (
        "from osmseg.labels import import_mapnik; import_mapnik().Expression(\"[a] = 'b'\");"
        "import rasterio.crs; print(rasterio.crs.CRS.from_epsg(3857).to_epsg())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3857"
