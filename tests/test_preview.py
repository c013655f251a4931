"""Tests for osmseg.preview: the page's data, its label colours, serving, and a real browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

import cv2
import mercantile
import numpy as np
import pytest

import prepare
from osmseg import cli, preview
from osmseg.classes import load_classes, parse_classes
from osmseg.errors import UserError

CLASSES = Path(__file__).resolve().parent.parent / "classes" / "mine.json"
TILES = [mercantile.Tile(65536 + i, 65536, 17) for i in range(6)]


def make_data(root: Path) -> Path:
    """A tiny data/ folder: 6 labelled tiles; images for 4, one rejected, one not downloaded.

    Tile i's label has a 160 x 160 square of class i + 1 and a 30-pixel band of class 5.
    """
    data = root / "data"
    (data / "labels" / "color").mkdir(parents=True)
    (data / "images" / "rejected").mkdir(parents=True)
    rng = np.random.default_rng(0)
    classes = load_classes(CLASSES)
    lines = ["#source z x y " + " ".join(c.name for c in classes.classes) + " Background"]
    for i, tile in enumerate(TILES):
        stem = f"{tile.z}-{tile.x}-{tile.y}"
        label = np.zeros((256, 256, 3), np.uint8)
        label[40:200, 40:200] = classes.palette[i + 1]
        label[:30] = classes.palette[5]
        cv2.imwrite(str(data / "labels" / "color" / f"{stem}.png"), label)
        labels, _ = classes.colors_to_labels(label)
        counts = np.bincount(labels.ravel(), minlength=classes.num_classes)
        noise = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        if i < 4:
            cv2.imwrite(str(data / "images" / f"{stem}.jpg"), noise)
        elif i == 4:
            cv2.imwrite(str(data / "images" / "rejected" / f"{stem}.png"), np.zeros_like(noise))
        lines.append(f"demo {tile.z} {tile.x} {tile.y} " + " ".join(map(str, [*counts[1:], counts[0]])))
    (data / "images" / "rejected.txt").write_text(f"{TILES[4].z}-{TILES[4].x}-{TILES[4].y}\tblank: 100% black pixels\n")
    (data / "sample-filtered.txt").write_text("\n".join(lines) + "\n")
    return data


def page_data(path: Path) -> dict:
    text = path.read_text()
    start = text.index('<script type="application/json" id="data">') + len('<script type="application/json" id="data">')
    return json.loads(text[start : text.index("</script>", start)])


def test_page_lists_every_tile_with_its_files_status_and_counts(tmp_path, capsys):
    data = make_data(tmp_path)
    out = data / "preview.html"
    args = ["preview", "--data", str(data), "--sample", str(data / "sample-filtered.txt"),
            "--classes", str(CLASSES), "--out", str(out)]
    assert cli.run(prepare.main, args) == 0  # stdout is not a terminal: no serving
    assert "shows 6 tiles (6 with a label; images: 4 ok, 1 rejected, 1 not downloaded)" in capsys.readouterr().out
    page = page_data(out)
    assert page["classes"][0] == "background" and len(page["colours"]) == 7
    by_stem = {t["stem"]: t for t in page["tiles"]}
    assert [t["status"] for t in page["tiles"]] == ["ok"] * 4 + ["rejected", "not downloaded"]
    assert by_stem["17-65540-65536"]["reason"] == "blank: 100% black pixels"
    for tile in page["tiles"]:
        for key in ("image", "label"):
            if key in tile:
                assert (out.parent / tile[key]).is_file()  # relative to the page
        assert sum(tile["counts"]) == 256 * 256
        assert tile["counts"][5] >= 30 * 256  # the band of class 5 (building)
    assert "image" not in by_stem["17-65541-65536"]
    assert os.stat(out).st_mode & 0o044  # readable by a web server, unlike a mkstemp file
    assert "http" not in out.read_text().replace("http://www.w3.org", "")  # nothing fetched from the network


def test_dark_label_colours_get_visible_display_colours_and_exact_lookup_tables():
    classes = load_classes(CLASSES)
    shown = preview.display_colours(classes)
    assert all(max(colour) >= preview.DARK for colour in shown) and len(set(shown)) == len(shown)
    tables = np.array(preview.channel_tables(classes, shown))
    # What the page's SVG filter does to each channel value, in numpy.
    labels = classes.labels_to_colors(np.arange(classes.num_classes, dtype=np.uint8)[None])
    recoloured = np.stack([tables[c][labels[..., c]] for c in range(3)], axis=-1)
    assert np.allclose(recoloured[0, 1:] * 255, shown)
    visible = parse_classes('[{"name": "a", "color": "#ff0000"}, {"name": "b", "color": "#00ff00"}]',
                            require_filters=False)
    assert preview.display_colours(visible) == [(255, 0, 0), (0, 255, 0)]


def test_a_sample_without_counts_and_mismatched_classes(tmp_path):
    data = make_data(tmp_path)
    plain = data / "sample.txt"
    plain.write_text("".join(f"demo {t.z} {t.x} {t.y}\n" for t in TILES))
    preview.write_preview(data, plain, CLASSES, data / "p.html")
    page = page_data(data / "p.html")
    assert page["hasCounts"] is False and all("counts" not in t for t in page["tiles"])
    other = tmp_path / "other.json"
    other.write_text('[{"name": "roads", "color": "#010101", "filter": "[highway]"}]')
    with pytest.raises(UserError, match="pass the --classes used by"):
        preview.write_preview(data, data / "sample-filtered.txt", other, data / "p.html")
    with pytest.raises(UserError, match="no such tile list"):
        preview.write_preview(data, data / "nope.txt", CLASSES, data / "p.html")
    with pytest.raises(UserError, match="page-size"):
        preview.write_preview(data, plain, CLASSES, data / "p.html", page_size=0)


def test_served_on_loopback(tmp_path):
    data = make_data(tmp_path)
    out = data / "preview.html"
    preview.write_preview(data, data / "sample-filtered.txt", CLASSES, out)
    server = preview.make_server(data)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        host, port = server.server_address
        assert host == "127.0.0.1"
        base = f"http://127.0.0.1:{port}/"
        assert b"osmseg preview" in urllib.request.urlopen(base + "preview.html", timeout=5).read()
        tile = page_data(out)["tiles"][0]
        image = urllib.request.urlopen(base + tile["image"], timeout=5).read()
        assert image == (out.parent / tile["image"]).read_bytes()
    finally:
        server.shutdown()
        server.server_close()


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium binary (apt-get install chromium)")


def screenshot(page: Path, fragment: str, tmp_path: Path) -> np.ndarray:
    shot = tmp_path / f"shot{len(list(tmp_path.glob('shot*')))}.png"
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
               "--hide-scrollbars", "--window-size=1200,1000", "--virtual-time-budget=5000",
               f"--screenshot={shot}", page.as_uri() + fragment]
    subprocess.run(command, capture_output=True, timeout=60, check=False)
    if not shot.exists():
        pytest.skip("chromium ran but wrote no screenshot")
    return cv2.cvtColor(cv2.imread(str(shot)), cv2.COLOR_BGR2RGB)


def count(image: np.ndarray, colour) -> int:
    return int((image == np.array(colour, np.uint8)).all(axis=-1).sum())


@pytest.mark.slow
def test_headless_chromium_shows_images_and_coloured_labels(tmp_path):
    data = make_data(tmp_path)
    out = data / "preview.html"
    preview.write_preview(data, data / "sample-filtered.txt", CLASSES, out)
    shown = preview.display_colours(load_classes(CLASSES))
    frame_grey = (0x33, 0x33, 0x33)

    side_by_side = screenshot(out, "", tmp_path)
    # Labels: the squares of classes 1-3 (tiles 0-2 fill the first rows) in display colours,
    # their background the frame's grey.
    for colour in shown[:3]:
        assert count(side_by_side, colour) >= 0.9 * 160 * 160
    assert count(side_by_side, frame_grey) >= 3 * (256 * 256 - 160 * 160 - 30 * 256) * 0.9
    # Images: noise has many distinct colours; the page's chrome has few.
    assert len(np.unique(side_by_side.reshape(-1, 3), axis=0)) > 20000

    overlay = screenshot(out, "#overlay=1&opacity=1", tmp_path)
    for colour in shown[:3]:
        assert count(overlay, colour) >= 0.9 * 160 * 160  # labels drawn over the images...
    assert count(overlay, frame_grey) < 0.2 * count(side_by_side, frame_grey)  # ...see-through around

    building = screenshot(out, "#class=building&status=rejected", tmp_path)
    assert count(building, shown[4]) >= 0.9 * 160 * 160  # the rejected tile (class 5 square)
    assert count(building, shown[0]) < 1000  # tile 0 is not rejected: filtered out (the legend's swatch stays)
