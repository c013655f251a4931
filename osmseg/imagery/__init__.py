"""Imagery tiles: where they come from (TileJSON, XYZ templates, local files) and a robust,
resumable downloader.

Modules: ``sources`` (open_tile_source, TileSource), ``tokens`` (substituting access tokens
and redacting them from everything shown or written), ``checks`` (what a downloaded tile
must pass), ``download`` (download_tiles; it documents the files it writes in data/images/).
"""

from __future__ import annotations

from osmseg.imagery.checks import blank_reason, check_image, image_kind
from osmseg.imagery.download import DownloadSummary, download_tiles
from osmseg.imagery.sources import TileSource, open_tile_source, open_tilejson
from osmseg.imagery.tokens import TOKEN_ENV, redact, substitute_token

__all__ = [
    "TOKEN_ENV",
    "DownloadSummary",
    "TileSource",
    "blank_reason",
    "check_image",
    "download_tiles",
    "image_kind",
    "open_tile_source",
    "open_tilejson",
    "redact",
    "substitute_token",
]
