"""The Overpass API as an OSM source: one query for a classes file's keys in a box, saved and read as a file.

The answer (OSM XML) is saved, atomically, at the given ``.osm`` path (e.g.
``data/osm/overpass.osm``, the query text beside it in ``overpass.osm.query``) or in the
given folder as ``overpass-<hash of the query>.osm``, and read as a ``file`` source.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import mercantile

from osmseg import atomic, tiles
from osmseg.errors import SourceError
from osmseg.osm.files import FileSource
from osmseg.osm.source import USER_AGENT

OVERPASS_URL = "https://overpass-api.de/api/interpreter"


def overpass_query(bbox: mercantile.LngLatBbox, keys: list[str], timeout: int = 180) -> str:
    """One Overpass QL query for every node, way and relation with any of these keys in bbox.

    `(._;>;);` adds the ways' nodes and the relations' members so that geometries can be
    built from the answer; `out body` answers in OSM XML (a .osm file).
    """
    west, south, east, north = bbox
    selectors = "".join(f'  nwr["{key}"];\n' for key in keys)
    return (
        f"[out:xml][timeout:{int(timeout)}][bbox:{south},{west},{north},{east}];\n"
        f"(\n{selectors});\n(._;>;);\nout body;\n"
    )


def overpass_source(
    location, *, bbox=None, classes=None, endpoint: str = OVERPASS_URL, timeout: int = 180, name: str | None = None
) -> FileSource:
    """Query Overpass once for the classes' keys in bbox, save the answer, and read it.

    Where the answer goes: if location ends in ``.osm``, that file (e.g.
    data/osm/overpass.osm, with the query beside it in ``<file>.query``); otherwise the
    folder location, as ``overpass-<hash of the query>.osm``. A saved answer to the same
    query is read instead of asking again, and later stages (labels, filter) may open the
    ``.osm`` location without bbox and classes to read what all-tiles saved.

    Args:
        location: a ``.osm`` file, or a folder (data/osm).
        bbox: the area, a mercantile.LngLatBbox or its "west,south,east,north" text.
        classes: the classes (a Classes, or the path of a classes file) whose keys to ask for.
        endpoint: the Overpass API interpreter URL.
        timeout: seconds the server may spend (sent in the query) and we wait beyond that.
        name: the name written in tile lists (default "overpass").

    Raises:
        SourceError: 429 (rate limited) and 504 (busy or box too large) with what to do,
            other HTTP errors, network errors and answers that report a runtime error.
    """
    from osmseg.classes import load_classes

    location = Path(location)
    name = name or "overpass"
    if bbox is None or classes is None:
        if location.suffix == ".osm" and location.is_file():
            return FileSource(location, name=name)
        raise SourceError(
            f"{location}: no saved Overpass answer; run `prepare.py all-tiles --osm-source overpass` "
            "(make data/all_tiles.txt) first, or pass the bounding box and the classes file"
        )
    bbox = tiles.parse_bbox(bbox) if isinstance(bbox, str) else mercantile.LngLatBbox(*bbox)
    classes = load_classes(classes) if isinstance(classes, (str, Path)) else classes
    keys = classes.tag_keys()
    if not keys:
        raise SourceError("the classes file's filters name no OSM keys ([key]); nothing to ask Overpass for")
    query = overpass_query(bbox, keys, timeout)
    if location.suffix == ".osm":
        path, saved_query = location, location.with_name(location.name + ".query")
        if path.is_file() and saved_query.is_file() and saved_query.read_text() == query:
            return FileSource(path, name=name, keys=keys)
        if path.exists():
            print(f"{path}: saved for another box or classes; asking Overpass again", file=sys.stderr)
        fetch_overpass(endpoint, query, path, timeout)

        atomic.write_text_atomic(saved_query, query)
    else:
        path = location / f"overpass-{hashlib.sha1(query.encode()).hexdigest()[:12]}.osm"
        if not path.exists():
            fetch_overpass(endpoint, query, path, timeout)
    return FileSource(path, name=name, keys=keys)


def fetch_overpass(endpoint: str, query: str, path: Path, timeout: int) -> None:
    """POST one query and save the OSM XML answer at path (atomically), or raise SourceError."""
    import requests


    print(f"asking the Overpass API at {endpoint} (up to {timeout} s)", file=sys.stderr)
    try:
        response = requests.post(
            endpoint, data={"data": query}, headers={"User-Agent": USER_AGENT}, timeout=(30, timeout + 30), stream=True
        )
    except requests.RequestException as error:
        raise SourceError(
            f"Overpass API at {endpoint}: cannot connect ({error}); check the endpoint or retry later"
        ) from None
    with response:
        if response.status_code == 429:
            raise SourceError(
                f"Overpass API at {endpoint}: too many requests (HTTP 429); wait a few minutes and retry, "
                "or use a smaller bounding box"
            )
        if response.status_code == 504:
            raise SourceError(
                f"Overpass API at {endpoint}: the server timed out (HTTP 504, busy or the box is too big); "
                "retry later, use a smaller bounding box, or download an extract and use --osm-source file"
            )
        if response.status_code != 200:
            raise SourceError(
                f"Overpass API at {endpoint}: HTTP {response.status_code} {response.reason}; check the endpoint "
                "and the bounding box"
            )
        with atomic.atomic_path(path) as tmp:
            try:
                with open(tmp, "wb") as out:
                    out.writelines(response.iter_content(1 << 16))
            except requests.RequestException as error:
                raise SourceError(f"Overpass API at {endpoint}: the answer broke off ({error}); retry") from None
            with open(tmp, "rb") as handle:
                head = handle.read(4096).decode("utf-8", "replace")
            if "<osm" not in head:
                raise SourceError(f"Overpass API at {endpoint}: the answer is not OSM XML; check the endpoint")
            # Overpass reports a query that ran out of time or memory inside a 200 answer.
            remark = re.search(r"<remark>(.*?)</remark>", head + tail_text(tmp), re.DOTALL)
            if remark and "error" in remark.group(1).lower():
                raise SourceError(
                    f"Overpass API at {endpoint}: {remark.group(1).strip()}; retry later or use a smaller bounding box"
                )


def tail_text(path: Path, size: int = 4096) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        handle.seek(max(0, handle.tell() - size))
        return handle.read().decode("utf-8", "replace")
