"""Checks on downloaded image tiles: the format from the bytes, complete, decodable, the right size, not blank."""

from __future__ import annotations

import numpy as np

from osmseg.rasters import decode_unchanged

# Blank imagery, skynet-data's rule: mostly black (no data) or mostly white (clouds, no data).


# Blank imagery, skynet-data's rule: mostly black (no data) or mostly white (clouds, no data).
BLACK_MAX, BLACK_FRACTION = 40, 0.95
WHITE_MIN, WHITE_FRACTION = 220, 0.50


def image_kind(data: bytes) -> str | None:
    """The file extension for an image's bytes ("jpg", "png", "webp"), or None if neither."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def is_complete(data: bytes, kind: str) -> bool:
    """Whether the bytes reach their format's end: a cut transfer often still decodes."""
    if kind == "jpg":
        return data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if kind == "png":
        return data[-12:-8] == b"\x00\x00\x00\x00" and data[-8:-4] == b"IEND"
    if kind == "webp":
        return len(data) >= 12 and int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return False


def check_image(data: bytes, tile_size: int) -> tuple[str | None, str | None]:
    """Check an image tile's bytes.

    Returns:
        (extension, None) when the image is acceptable, else (extension or None, reason).
        Reasons start with "truncated" when the bytes were cut short (worth fetching again).
    """

    kind = image_kind(data)
    if kind is None:
        head = data[:16].decode("ascii", "replace").strip()
        return None, f"not a JPEG, PNG or WebP image ({len(data)} bytes starting {head[:16]!r})"
    if not is_complete(data, kind):
        return kind, f"truncated {kind} ({len(data)} bytes, no end marker)"
    image = decode_unchanged(data)
    if image is None:
        return kind, f"corrupt {kind}: cannot decode it"
    height, width = image.shape[:2]
    if (height, width) != (tile_size, tile_size):
        return kind, f"size {width}x{height}, expected {tile_size}x{tile_size} (see --tile-size)"
    if image.ndim == 3 and image.shape[2] == 4:
        transparent = float((image[..., 3] < 128).mean())
        if transparent >= 0.5:
            return kind, f"blank: {transparent:.0%} transparent pixels"
        image = image[..., :3]
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8:  # 16-bit PNG
        image = (image >> 8).astype(np.uint8)
    reason = blank_reason(image)
    return kind, reason


def blank_reason(image: np.ndarray) -> str | None:
    """skynet-data's blank-tile rule on an (H, W, C) uint8 image; None when not blank.

    Blank: at least 95% of pixels with max(R, G, B) < 40 (black, no data), or at least 50% with
    min(R, G, B) > 220 (white: clouds or no data).
    """
    # Element-wise over channel planes: numpy's reductions along a length-3 axis are ~20x slower,
    # and this runs on every downloaded tile.
    channels = [image[..., c] for c in range(image.shape[2])]
    pixels = image.shape[0] * image.shape[1]
    black = np.count_nonzero(np.maximum.reduce(channels) < BLACK_MAX) / pixels
    if black >= BLACK_FRACTION:
        return f"blank: {black:.0%} black pixels (max(R,G,B) < {BLACK_MAX})"
    white = np.count_nonzero(np.minimum.reduce(channels) > WHITE_MIN) / pixels
    if white >= WHITE_FRACTION:
        return f"blank: {white:.0%} white pixels (min(R,G,B) > {WHITE_MIN})"
    return None
