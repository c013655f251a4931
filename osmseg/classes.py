"""Classes files: the names, colours and OSM filters of the classes a model learns.

A classes file is a JSON list with one object per class, in the seed's (skynet-data's)
format::

    [{"name": "residential", "color": "#010101", "stroke-width": "1",
      "filter": "[landuse] = 'residential'", "sourceLayer": "osm"}, ...]

Class 0 is the background, #000000, and is never listed. The i-th entry is class i.
`filter` is a mapnik expression, checked by mapnik when labels are rendered
(osmseg.labels); a file used only to import your own masks needs just `name` and `color`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from osmseg.errors import ClassesError, read_user_file

BACKGROUND = "background"
IGNORE = 255  # label value for pixels that training and metrics skip
_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
_KEYS = {"name", "color", "stroke-width", "filter", "sourceLayer"}
_LABEL_KEYS = ("filter",)
_ATTRIBUTE = re.compile(r"\[([^\[\]]+)\]")  # [name] in a mapnik expression


@dataclass(frozen=True)
class Class:
    """One class: its name, its label colour (r, g, b) and how OSM features select it."""

    name: str
    color: tuple[int, int, int]
    stroke_width: float = 1.0
    filter: str | None = None
    source_layer: str = "osm"

    @property
    def hex(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.color)

    def to_json(self) -> dict:
        entry = {"name": self.name, "color": self.hex, "stroke-width": str(self.stroke_width)}
        if self.filter is not None:
            entry["filter"] = self.filter
        entry["sourceLayer"] = self.source_layer
        return entry


@dataclass(frozen=True)
class Classes:
    """The ordered classes of a classes file; index 0 is the background."""

    classes: tuple[Class, ...]

    @property
    def names(self) -> list[str]:
        """All class names with the background first: index i is label value i."""
        return [BACKGROUND] + [c.name for c in self.classes]

    @property
    def num_classes(self) -> int:
        """The number of model outputs: the listed classes plus the background."""
        return len(self.classes) + 1

    @property
    def palette(self) -> np.ndarray:
        """uint8 (num_classes, 3) RGB colours; row 0 is the background's #000000."""
        return np.array([(0, 0, 0)] + [c.color for c in self.classes], dtype=np.uint8)

    def to_json(self) -> str:
        """The canonical JSON text of these classes (what caches and weights store)."""
        return json.dumps([c.to_json() for c in self.classes], indent=1)

    def filter_attributes(self) -> set[str]:
        """The feature attributes ([name]s) the classes' filters read, mapnik's own left out.

        A plain scan of the filters' attribute names, not a parser: mapnik evaluates the
        filters when rendering (osmseg.labels); this only chooses what to hand it and what to
        download. QA tiles' own attributes (@id, @user...) count when a filter reads them.
        """
        names = {name for c in self.classes for name in _ATTRIBUTE.findall(c.filter or "")}
        return {name for name in names if not name.startswith("mapnik::")}

    def tag_keys(self) -> list[str]:
        """The OSM tag keys the filters read, sorted: filter_attributes without @id and friends."""
        keys = {name.strip() for name in self.filter_attributes()}
        return sorted(key for key in keys if key and not key.startswith(("mapnik::", "@")))

    def colors_to_labels(self, rgb: np.ndarray) -> tuple[np.ndarray, int]:
        """Turn an (H, W, 3) uint8 colour mask into (H, W) uint8 class indices.

        Colours no class lists become IGNORE (255).

        Returns:
            The labels and the number of pixels that became IGNORE.
        """
        rgb = np.asarray(rgb, dtype=np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) colour mask, got shape {rgb.shape}")
        key = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
        palette = self.palette.astype(np.uint32)
        palette_key = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
        order = np.argsort(palette_key)
        position = np.searchsorted(palette_key[order], key).clip(0, len(order) - 1)
        found = palette_key[order][position] == key
        labels = np.where(found, order[position], IGNORE).astype(np.uint8)
        return labels, int((~found).sum())

    def labels_to_colors(self, labels: np.ndarray) -> np.ndarray:
        """Turn (H, W) class indices into an (H, W, 3) uint8 colour mask (IGNORE: black)."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = self.palette
        return lut[np.asarray(labels, dtype=np.uint8)]


def parse_classes(text: str, origin: str = "classes file", require_filters: bool = True) -> Classes:
    """Parse and check the JSON text of a classes file.

    Args:
        text: the file's content.
        origin: how to name the file in messages (usually its path).
        require_filters: whether every class needs an OSM `filter` (False for imports).

    Raises:
        ClassesError: naming the class and the key that is wrong.
    """
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise ClassesError(f"{origin}: not valid JSON ({error}); fix the syntax") from None
    if not isinstance(entries, list) or not entries:
        raise ClassesError(f"{origin}: expected a non-empty JSON list of class objects")
    classes: list[Class] = []
    seen_colors: dict[tuple[int, int, int], str] = {}
    seen_names: set[str] = set()
    for number, entry in enumerate(entries, start=1):
        where = f"{origin}: class {number}"
        if not isinstance(entry, dict):
            raise ClassesError(f"{where}: expected an object with name, color, filter")
        if isinstance(entry.get("name"), str):
            where = f"{origin}: class {entry['name']!r}"
        unknown = set(entry) - _KEYS
        if unknown:
            raise ClassesError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
        required = ("name", "color") + (_LABEL_KEYS if require_filters else ())
        missing = [key for key in required if key not in entry]
        if missing:
            raise ClassesError(f"{where}: missing key(s) {missing}")
        name = entry["name"]
        if not isinstance(name, str) or not name.strip():
            raise ClassesError(f"{where}: 'name' must be a non-empty string")
        if name.lower() == BACKGROUND or name in seen_names:
            raise ClassesError(f"{where}: the name is reserved or used twice; pick another")
        color = entry["color"]
        if not isinstance(color, str) or not _COLOR.match(color):
            raise ClassesError(f"{where}: color {color!r} is not of the form #rrggbb")
        rgb = tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))
        if rgb == (0, 0, 0):
            raise ClassesError(f"{where}: #000000 is the background (class 0); give it another colour")
        if rgb in seen_colors:
            raise ClassesError(f"{where}: colour {color} is already used by {seen_colors[rgb]!r}")
        try:
            stroke_width = float(entry.get("stroke-width", 1))
        except (TypeError, ValueError):
            raise ClassesError(f"{where}: stroke-width {entry['stroke-width']!r} is not a number") from None
        if not stroke_width > 0:
            raise ClassesError(f"{where}: stroke-width must be positive")
        filter_ = entry.get("filter")
        if filter_ is not None and (not isinstance(filter_, str) or not filter_.strip()):
            raise ClassesError(f"{where}: 'filter' must be a non-empty mapnik expression")
        source_layer = entry.get("sourceLayer", "osm")
        if not isinstance(source_layer, str):
            raise ClassesError(f"{where}: 'sourceLayer' must be a string")
        seen_colors[rgb] = name
        seen_names.add(name)
        classes.append(Class(name, rgb, stroke_width, filter_, source_layer))
    return Classes(tuple(classes))


def load_classes(path: str | Path, require_filters: bool = True) -> Classes:
    """Read and check a classes file (see parse_classes)."""
    path = Path(path)
    text = read_user_file(path, "classes file", "pass an existing one (e.g. classes/mine.json)", ClassesError)
    return parse_classes(text, origin=str(path), require_filters=require_filters)
