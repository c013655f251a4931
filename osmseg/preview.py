"""The preview page: every sampled tile's image beside (or under) its label, before training.

``prepare.py preview`` writes one self-contained HTML file (default data/preview.html): inline
CSS and JavaScript, no map library, no token, no network. The page refers to the tiles' files
by paths relative to itself (images/{z}-{x}-{y}.jpg, labels/color/{z}-{x}-{y}.png,
images/rejected/...), so it works opened from disk and when served. Its data (the tiles, their
per-class pixel counts from sample-filtered.txt, each image's status, the class names and
display colours) sits in the page as one JSON block.

Labels on disk colour class i #0i0i0i, which is all but black on screen. The page recolours
them without reading their pixels (a file:// page may not): an inline SVG filter makes the
background transparent (alpha = 255 x (R + G + B), clipped) and maps each channel value to the
class's display colour through 256-entry discrete lookup tables (feComponentTransfer), so the
overlay shows imagery where there is no class.

With --serve (the default when stdout is a terminal) the folder holding the page is served
on 127.0.0.1 until Ctrl-C.
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import os
import sys
import urllib.parse
from pathlib import Path

import mercantile

from osmseg import datafiles
from osmseg.atomic import write_bytes_atomic
from osmseg.classes import Classes, load_classes
from osmseg.errors import UserError
from osmseg.visualise import display_palette

DARK = 64  # class colours whose channels are all below this are invisible on screen


def display_colours(classes: Classes) -> list[tuple[int, int, int]]:
    """Colours to show classes 1..N in: the file's own if visible, else the display colours
    that predictions are drawn in (osmseg.visualise), so the preview and segments.png agree."""
    colours = [c.color for c in classes.classes]
    if all(max(colour) >= DARK for colour in colours):
        return colours
    return [tuple(int(v) for v in row) for row in display_palette(classes.num_classes)[1:]]


def channel_tables(classes: Classes, shown: list[tuple[int, int, int]]) -> list[list[float]] | None:
    """Per-channel lookup tables (256 values in 0..1) that turn label colours into shown ones.

    Returns None when a channel value belongs to two classes shown in different colours: one
    table per channel cannot separate them, and the labels are shown as they are.
    """
    tables = [[v / 255 for v in range(256)] for _ in range(3)]
    owner: list[dict[int, tuple[int, int, int]]] = [{}, {}, {}]
    for cls, colour in zip(classes.classes, shown):
        for channel in range(3):
            value = cls.color[channel]
            if owner[channel].get(value, colour)[channel] != colour[channel]:
                return None
            owner[channel][value] = colour
            tables[channel][value] = colour[channel] / 255
    return tables


def read_counts(sample: datafiles.TileList, path: Path, classes: Classes) -> dict[str, list[int]] | None:
    """Per-tile pixel counts of a filtered tile list: {"z-x-y": [background, class 1, ...]}.

    The list's columns are `<class 1> ... <class N> Background` (osmseg.datafiles). Returns
    None when it carries no counts (a plain `source z x y` list).

    Raises:
        UserError: the columns name other classes than the classes file.
    """
    if sample.counts is None:
        return None
    expected = [c.name for c in classes.classes] + ["Background"]
    if [n.lower() for n in sample.columns] != [n.lower() for n in expected]:
        raise UserError(
            f"{path}: its header names the classes {sample.columns}, but the classes file has "
            f"{expected}; pass the --classes used by `prepare.py labels`"
        )
    return {
        datafiles.tile_stem(tile): [int(row[-1])] + [int(v) for v in row[:-1]]
        for (_, tile), row in zip(sample.entries, sample.counts)
    }


def _href(target: Path, page_dir: Path) -> str:
    relative = os.path.relpath(target, page_dir).replace(os.sep, "/")
    return urllib.parse.quote(relative)


def collect(data_dir: Path, sample: Path, classes: Classes, page_dir: Path) -> dict:
    """The page's data: classes, display colours and one record per sampled tile."""
    listed = datafiles.read_tile_list(sample, make_hint="run `make data/sample-filtered.txt`")
    counts = read_counts(listed, sample, classes)
    images, labels = data_dir / "images", data_dir / "labels" / "color"
    rejected = datafiles.read_tile_log(images / datafiles.REJECTED)
    missing = datafiles.read_tile_log(images / datafiles.MISSING)
    shown = display_colours(classes)
    tiles = []
    for source, tile in dict.fromkeys(listed.entries):
        stem = datafiles.tile_stem(tile)
        record = {"stem": stem, "source": source}
        image = datafiles.find_image(images, tile)
        if image is not None:
            record["image"], record["status"] = _href(image, page_dir), "ok"
        elif stem in rejected:
            record["status"], record["reason"] = "rejected", rejected[stem]
            kept = datafiles.find_image(images, tile, folder="rejected")
            if kept is not None:
                record["image"] = _href(kept, page_dir)
        elif stem in missing:
            record["status"], record["reason"] = "missing", missing[stem]
        else:
            record["status"] = "not downloaded"
        label = datafiles.label_path(labels, tile)
        if label.is_file():
            record["label"] = _href(label, page_dir)
        if counts is not None and stem in counts:
            record["counts"] = counts[stem]
        record["lnglat"] = [round(v, 5) for v in mercantile.ul(tile)]
        tiles.append(record)
    return {
        "classes": classes.names,
        "colours": ["#{:02x}{:02x}{:02x}".format(*c) for c in [(0, 0, 0)] + list(shown)],
        "tiles": tiles,
        "hasCounts": counts is not None,
    }


def _filter_svg(tables: list[list[float]] | None) -> str:
    if tables is None:
        return ""
    # A quarter level up: the browser turns 255 x value into a byte, rounding or truncating.
    funcs = "".join(
        f'<feFunc{channel} type="discrete" tableValues="{" ".join(f"{min(1.0, v + 0.25 / 255):.5f}" for v in table)}"/>'
        for channel, table in zip("RGB", tables)
    )
    # Alpha = 255 (R + G + B), clipped to 1: background (#000000) becomes transparent.
    return (
        '<svg width="0" height="0" style="position:absolute" aria-hidden="true">'
        '<filter id="labelColours" color-interpolation-filters="sRGB" x="0" y="0" width="1" height="1">'
        '<feColorMatrix type="matrix" values="1 0 0 0 0 0 1 0 0 0 0 0 1 0 0 255 255 255 0 0"/>'
        f"<feComponentTransfer>{funcs}</feComponentTransfer></filter></svg>"
    )


def render_page(data: dict, tables: list[list[float]] | None, page_size: int, title: str) -> str:
    """The HTML text of the preview page."""
    payload = json.dumps({**data, "pageSize": page_size}, separators=(",", ":"))
    payload = payload.replace("</", "<\\/")  # a "</script>" in a reason must not end the block
    return (
        _PAGE.replace("@TITLE@", html.escape(title))
        .replace("@FILTER@", _filter_svg(tables))
        .replace("@LABELCSS@", "filter: url(#labelColours);" if tables is not None else "")
        .replace("@DATA@", payload)
    )


def write_preview(data_dir: Path, sample: Path, classes_path: Path, out: Path, page_size: int = 100) -> dict:
    """Write the preview page; returns its data (the tiles and their status)."""
    if not sample.exists():
        raise UserError(f"{sample}: no such tile list; run `make data/sample-filtered.txt` first")
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such data directory; pass --data")
    if page_size < 1:
        raise UserError(f"--page-size {page_size}: give a positive number of tiles per page")
    classes = load_classes(classes_path, require_filters=False)
    data = collect(data_dir, sample, classes, out.resolve().parent)
    tables = channel_tables(classes, display_colours(classes))
    page = render_page(data, tables, page_size, f"osmseg preview: {sample.name}")
    write_bytes_atomic(out, page.encode())
    return data


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def make_server(root: Path, port: int = 0) -> http.server.ThreadingHTTPServer:
    """An HTTP server for the files under `root`, listening on 127.0.0.1 only (not started)."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as error:
        raise UserError(f"--port {port}: cannot listen on 127.0.0.1 ({error.strerror}); pick another port or 0") from None


def serve(root: Path, page: Path, port: int = 0) -> None:
    """Serve `root` on 127.0.0.1 until Ctrl-C, printing the page's address."""
    server = make_server(root, port)
    address = f"http://127.0.0.1:{server.server_address[1]}/{_href(page, root)}"
    print(f"serving {root} at {address}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped serving", file=sys.stderr)
    finally:
        server.server_close()


_PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@TITLE@</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f4f4f2; color: #222; }
  header { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid #ccc;
           padding: 8px 16px; display: flex; flex-wrap: wrap; gap: 8px 24px; align-items: center; }
  h1 { font-size: 16px; margin: 0; }
  .controls label { margin-right: 12px; white-space: nowrap; }
  button { font: inherit; padding: 2px 10px; }
  #legend { display: flex; flex-wrap: wrap; gap: 4px 14px; padding: 8px 16px; background: #fff;
            border-bottom: 1px solid #ddd; }
  .legend-entry { cursor: pointer; user-select: none; white-space: nowrap; }
  .legend-entry.active { font-weight: bold; text-decoration: underline; }
  .swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #0006;
            vertical-align: -1px; margin-right: 4px; }
  #grid { display: flex; flex-wrap: wrap; gap: 12px; padding: 12px 16px; }
  .card { background: #fff; border: 1px solid #ccc; padding: 6px; width: min-content; }
  .card.rejected { border-color: #c00; } .card.missing, .card.none { border-color: #999; border-style: dashed; }
  .pair { display: flex; gap: 4px; }
  .frame { position: relative; width: 256px; height: 256px; background: #333; overflow: hidden; }
  .frame img { position: absolute; inset: 0; width: 100%; height: 100%; }
  .frame .label { @LABELCSS@ image-rendering: pixelated; }
  .frame .empty { position: absolute; inset: 0; display: flex; align-items: center; justify-content: center;
                  color: #bbb; font-size: 13px; text-align: center; padding: 8px; }
  .caption { font-size: 12px; margin-top: 4px; }
  .caption .reason { color: #b00; }
  .counts span { margin-right: 8px; white-space: nowrap; }
  footer { padding: 8px 16px 24px; }
</style>
</head>
<body>
@FILTER@
<header>
  <h1>@TITLE@</h1>
  <div class="controls">
    <label>class <select id="class"></select></label>
    <label>images <select id="status">
      <option value="all">all tiles</option><option value="ok">with an accepted image</option>
      <option value="rejected">rejected</option><option value="missing">missing</option>
      <option value="not downloaded">not downloaded</option></select></label>
    <label><input type="checkbox" id="overlay"> overlay labels on images</label>
    <label>opacity <input type="range" id="opacity" min="0" max="100" value="60"></label>
  </div>
  <div class="pager"><button id="prev">&larr;</button> <span id="page"></span> <button id="next">&rarr;</button></div>
</header>
<div id="legend"></div>
<div id="grid"></div>
<footer class="pager-info" id="summary"></footer>
<script type="application/json" id="data">@DATA@</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const state = { cls: -1, status: "all", page: 0, overlay: false, opacity: 0.6 };
const pixels = (t) => (t.counts || []).reduce((a, b) => a + b, 0);

// Per-class totals over the whole sample: tiles that contain the class, and its pixel share.
const totals = DATA.classes.map((name, i) => {
  let tiles = 0, count = 0, all = 0;
  for (const t of DATA.tiles) {
    if (!t.counts) continue;
    all += pixels(t); count += t.counts[i]; if (t.counts[i] > 0) tiles++;
  }
  return { name, tiles, share: all ? count / all : 0 };
});

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children || []) node.appendChild(child);
  return node;
}

function buildControls() {
  const select = $("class");
  select.appendChild(el("option", { value: -1, text: "any" }));
  DATA.classes.forEach((name, i) => select.appendChild(el("option", { value: i, text: name })));
  const legend = $("legend");
  DATA.classes.forEach((name, i) => {
    const t = totals[i];
    const text = DATA.hasCounts ? ` ${name}: ${t.tiles} tile${t.tiles === 1 ? "" : "s"}, ${(100 * t.share).toFixed(1)}% of pixels` : ` ${name}`;
    const entry = el("span", { class: "legend-entry", "data-class": i, title: "show tiles with this class" },
      [el("span", { class: "swatch", style: `background:${DATA.colours[i]}` }), document.createTextNode(text)]);
    entry.addEventListener("click", () => { state.cls = state.cls === i ? -1 : i; state.page = 0; update(); });
    legend.appendChild(entry);
  });
  select.addEventListener("change", () => { state.cls = +select.value; state.page = 0; update(); });
  $("status").addEventListener("change", (e) => { state.status = e.target.value; state.page = 0; update(); });
  $("overlay").addEventListener("change", (e) => { state.overlay = e.target.checked; update(); });
  $("opacity").addEventListener("input", (e) => { state.opacity = e.target.value / 100; update(); });
  $("prev").addEventListener("click", () => { state.page--; update(); });
  $("next").addEventListener("click", () => { state.page++; update(); });
}

function selected() {
  let tiles = DATA.tiles.filter((t) => state.status === "all" || t.status === state.status);
  if (state.cls >= 0) {
    tiles = tiles.filter((t) => t.counts && t.counts[state.cls] > 0);
    tiles.sort((a, b) => b.counts[state.cls] / pixels(b) - a.counts[state.cls] / pixels(a));
  }
  return tiles;
}

function frame(children, empty) {
  return el("div", { class: "frame" }, children.length ? children : [el("div", { class: "empty", text: empty })]);
}

function card(t) {
  const photo = t.image ? [el("img", { class: "photo", src: t.image, alt: "image " + t.stem, loading: "lazy" })] : [];
  const label = t.label ? el("img", { class: "label", src: t.label, alt: "label " + t.stem, loading: "lazy" }) : null;
  let pair;
  if (state.overlay) {
    if (label) label.style.opacity = state.opacity;
    pair = [frame(photo.concat(label ? [label] : []), "no image")];
  } else {
    pair = [frame(photo, t.status === "ok" ? "" : "no image (" + t.status + ")"),
            frame(label ? [label] : [], "no label")];
  }
  const caption = el("div", { class: "caption" }, [
    el("div", { text: `${t.stem}  ·  ${t.source}  ·  ${t.lnglat[1]}, ${t.lnglat[0]}` })]);
  if (t.reason) caption.appendChild(el("div", { class: "reason", text: `${t.status}: ${t.reason}` }));
  if (t.counts) {
    const total = pixels(t) || 1;
    const parts = t.counts.map((c, i) => [c, i]).filter(([c]) => c > 0).sort((a, b) => b[0] - a[0]);
    caption.appendChild(el("div", { class: "counts" }, parts.map(([c, i]) => el("span", {}, [
      el("span", { class: "swatch", style: `background:${DATA.colours[i]}` }),
      document.createTextNode(`${DATA.classes[i]} ${(100 * c / total).toFixed(1)}%`)]))));
  }
  const status = t.status === "ok" ? "ok" : t.status === "rejected" ? "rejected" : "none";
  return el("div", { class: "card " + status, "data-stem": t.stem }, [el("div", { class: "pair" }, pair), caption]);
}

function update() {
  const tiles = selected();
  const pages = Math.max(1, Math.ceil(tiles.length / DATA.pageSize));
  state.page = Math.min(Math.max(0, state.page), pages - 1);
  const shown = tiles.slice(state.page * DATA.pageSize, (state.page + 1) * DATA.pageSize);
  $("grid").replaceChildren(...shown.map(card));
  $("page").textContent = `page ${state.page + 1} of ${pages} (${tiles.length} tiles)`;
  $("prev").disabled = state.page === 0; $("next").disabled = state.page >= pages - 1;
  $("class").value = state.cls;
  for (const entry of document.querySelectorAll(".legend-entry"))
    entry.classList.toggle("active", +entry.dataset.class === state.cls);
  const counts = {};
  for (const t of DATA.tiles) counts[t.status] = (counts[t.status] || 0) + 1;
  writeHash();
  $("summary").textContent = `${DATA.tiles.length} tiles: ` +
    Object.entries(counts).map(([k, v]) => `${v} ${k === "ok" ? "with an accepted image" : k}`).join(", ");
}

// The view's state lives in the address's #fragment too, so a view can be bookmarked or shared.
function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.has("class")) {
    const i = DATA.classes.indexOf(params.get("class"));
    state.cls = i >= 0 ? i : -1;
  }
  if (params.has("status")) state.status = params.get("status");
  if (params.has("page")) state.page = Math.max(0, (parseInt(params.get("page"), 10) || 1) - 1);
  if (params.has("overlay")) state.overlay = params.get("overlay") === "1";
  if (params.has("opacity")) state.opacity = Math.min(1, Math.max(0, +params.get("opacity") || 0));
  $("status").value = state.status; $("overlay").checked = state.overlay;
  $("opacity").value = Math.round(100 * state.opacity);
}

function writeHash() {
  const params = new URLSearchParams();
  if (state.cls >= 0) params.set("class", DATA.classes[state.cls]);
  if (state.status !== "all") params.set("status", state.status);
  if (state.page > 0) params.set("page", state.page + 1);
  if (state.overlay) params.set("overlay", "1");
  if (state.opacity !== 0.6) params.set("opacity", state.opacity);
  history.replaceState(null, "", params.toString() ? "#" + params : location.pathname + location.search);
}

buildControls();
readHash();
update();
window.addEventListener("hashchange", () => { readHash(); update(); });
</script>
</body>
</html>
"""
