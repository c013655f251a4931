"""prepare.py download-osm: download OSM QA tiles for a country or the planet.

Writes data/osm/<name>.mbtiles, resuming a download that broke off (osmseg.osm describes the
partial files).
"""

from __future__ import annotations

from osmseg.osm.download import QA_TILES_URL, download_qa_tiles

NAME = "download-osm"
HELP = "download OSM QA tiles for a country or the planet"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--name", default="united_kingdom", help="QA_TILES: a country in lower case with underscores, or 'planet'"
    )
    parser.add_argument("--base-url", default=QA_TILES_URL, help="where <name>.mbtiles.gz files live")
    parser.add_argument("--out-dir", default="data/osm", help="the folder for <name>.mbtiles")


def main(args) -> int:
    download_qa_tiles(args.name, args.out_dir, args.base_url)
    return 0
