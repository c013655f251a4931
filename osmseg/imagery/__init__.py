"""Imagery tiles: where they come from (TileJSON, XYZ templates, local files) and a robust,
resumable downloader.

Files written (all under the output directory, default data/images/):

- ``{z}-{x}-{y}.{jpg|png|webp}``: one tile's image, the bytes exactly as the source served
  them; the extension comes from the bytes' signature (JPEG ``FF D8 FF``, PNG ``89 PNG``, WebP
  ``RIFF....WEBP``), never from the URL. Only accepted images are written here: each was
  decoded, is TILE_SIZE x TILE_SIZE and is not blank. Written under a temporary name and
  renamed, so a file with this name is always complete.
- ``rejected.txt``: one line per rejected tile, ``z-x-y<TAB>reason`` (corrupt, truncated,
  wrong size, blank...). Appended as tiles are rejected; a re-run skips the tiles listed
  here (delete a line, or pass --retry-rejected, to try one again).
- ``rejected/{z}-{x}-{y}.{ext}``: the rejected bytes, to look at; ``rejected/existing-*``:
  files found in the images directory that failed the checks (set aside, then fetched again).
- ``missing.txt``: ``z-x-y<TAB>reason`` for tiles the source does not have (HTTP 404/410/204,
  no such local file, outside the source's bounds). Rewritten at the end of every run;
  missing tiles are asked for again on a re-run.

Modules: ``sources`` (open_tile_source, TileSource), ``tokens`` (substitution, redaction),
``checks`` (what a downloaded tile must pass), ``download`` (download_tiles).

Secrets: IMAGE_TILES may carry an access token. Every URL that reaches a message, a log
record, an exception or a file goes through ``redact``, which masks ``access_token`` and any
query parameter whose name looks secret, and the literal token wherever it appears.
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
