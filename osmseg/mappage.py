"""The results page of a mapped area (index.html): one self-contained, offline HTML file.

Three layers over each other, each with a checkbox: the imagery, the segments (the model's
classes in their display colours, with an opacity slider) and the OSM diff (its polygons
outlined: "missing in OSM" in magenta, "check in OSM" in cyan). Beside them the class legend
with pixels, ground area and agreement with OSM, and the ranked list of diff places; hovering
a place highlights it on the map. Everything is inline (pictures as data: URIs, no script or
style from elsewhere), so the page opens from disk with no network. The URL fragment sets the
layers shown, for links and tests: ``#layers=imagery,segments,diff&opacity=0.6``.
"""

from __future__ import annotations

import base64
import html
import json

import numpy as np

from osmseg import tiles, visualise
from osmseg.classes import Classes

MISSING_COLOUR = "#ff00ff"
CHECK_COLOUR = "#00ffff"
LISTED = 300  # diff places in the page's list (all are in osm-diff.geojson)


def _data_uri(picture: np.ndarray, kind: str) -> str:
    import cv2

    bgr = cv2.cvtColor(picture, cv2.COLOR_RGBA2BGRA if picture.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(f".{kind}", bgr, [cv2.IMWRITE_JPEG_QUALITY, 85] if kind == "jpg" else [])
    if not ok:
        raise ValueError(f"cannot encode the page's {kind} picture")
    mime = "image/jpeg" if kind == "jpg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(data.tobytes()).decode()}"


def _segments_picture(probabilities: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """RGBA: the most probable class's display colour per cell, background see-through."""
    labels = probabilities.argmax(axis=2)
    rgba = np.zeros(labels.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = palette[labels]
    rgba[..., 3] = np.where(labels > 0, 255, 0)
    return rgba


def _area_text(square_metres: float) -> str:
    if square_metres >= 1e6:
        return f"{square_metres / 1e6:.2f} km²"
    if square_metres >= 1e4:
        return f"{square_metres / 1e4:.1f} ha"
    return f"{square_metres:.0f} m²"


def _diff_svg(diff: list[dict], transform, shape: tuple[int, int]) -> str:
    """The diff's polygons as SVG paths in the mosaic's pixel coordinates."""
    inverse = ~transform
    paths = []
    for item in diff:
        geometry, properties = item["geometry"], item["properties"]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        commands = []
        for polygon in polygons:
            for ring in polygon:
                lng, lat = np.asarray(ring, dtype=np.float64).T
                x, y = tiles.lnglat_to_xy(lng, lat)
                columns, rows = inverse @ (x, y)
                points = " ".join(f"{c:.1f},{r:.1f}" for c, r in zip(columns, rows))
                commands.append(f"M{points}Z")
        kind = "missing" if properties["kind"] == "missing in OSM" else "check"
        paths.append(f'<path id="place{properties["rank"]}" class="{kind}" d="{" ".join(commands)}"/>')
    height, width = shape
    return (
        f'<svg id="diff" viewBox="0 0 {width} {height}" preserveAspectRatio="none">'
        + "".join(paths)
        + "</svg>"
    )


def render(
    *,
    imagery: np.ndarray,
    probabilities: np.ndarray,
    classes: Classes,
    counts: dict[str, int],
    square_metres: dict[str, float],
    diff: list[dict] | None,
    bounds,
    shape: tuple[int, int],
    agreement: dict | None,
    title: str,
) -> str:
    """The page's HTML.

    Args:
        imagery: RGB uint8 overview of the mosaic (any size: it is stretched to the map).
        probabilities: float (h, w, C) downscaled class probabilities (the heatmaps' means).
        classes: the model's classes.
        counts, square_metres: per class, over the whole mosaic.
        diff: osm-diff.geojson's features, ranked (None: no OSM comparison).
        bounds: the mosaic's affine transform (pixel -> EPSG:3857).
        shape: the mosaic's (height, width) in pixels.
        agreement: per class IoU against OSM (None without OSM).
        title: the page's title.
    """
    palette = visualise.display_palette(classes.num_classes)
    layers = {
        "imagery": _data_uri(imagery, "jpg"),
        "segments": _data_uri(_segments_picture(probabilities, palette), "png"),
    }
    rows = []
    for index, name in enumerate(classes.names):
        colour = "#{:02x}{:02x}{:02x}".format(*palette[index])
        iou = (agreement or {}).get(name, {}).get("iou")
        rows.append(
            f"<tr><td><span class=swatch style='background:{colour}'></span>{html.escape(name)}</td>"
            f"<td>{counts.get(name, 0):,}</td><td>{_area_text(square_metres.get(name, 0.0))}</td>"
            + (f"<td>{'' if iou is None else f'{iou:.2f}'}</td>" if agreement is not None else "")
            + "</tr>"
        )
    places = []
    for item in (diff or [])[:LISTED]:
        p = item["properties"]
        measure = f"confidence {p['confidence']:.2f}" if "confidence" in p else f"agreement {p['agreement']:.2f}"
        places.append(
            f"<li data-rank='{p['rank']}' class='{'missing' if p['kind'] == 'missing in OSM' else 'check'}'>"
            f"#{p['rank']} {html.escape(p['kind'])}: {html.escape(p['class'])}, {_area_text(p['area_m2'])}, {measure}</li>"
        )
    if diff is None:
        listed = "<li>no OSM comparison (map with an OSM source to get one)</li>"
    else:
        listed = "".join(places) or "<li>none above the thresholds</li>"
    diff_svg = _diff_svg(diff, bounds, shape) if diff else ""
    height, width = shape
    return _PAGE.format(
        title=html.escape(title),
        imagery=layers["imagery"],
        segments=layers["segments"],
        diff_svg=diff_svg,
        aspect=f"{width} / {height}",
        legend="".join(rows),
        agreement_header="<th>IoU vs OSM</th>" if agreement is not None else "",
        places=listed,
        missing=MISSING_COLOUR,
        check=CHECK_COLOUR,
        has_diff=json.dumps(bool(diff)),
    )


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ margin: 0; font: 14px sans-serif; background: #222; color: #eee; display: flex; }}
#map {{ position: relative; flex: 1 1 auto; max-width: calc(100vw - 360px); aspect-ratio: {aspect}; align-self: flex-start; }}
#map img, #map svg {{ position: absolute; inset: 0; width: 100%; height: 100%; image-rendering: pixelated; }}
#diff path {{ fill: none; stroke-width: 3; vector-effect: non-scaling-stroke; }}
#diff path.missing {{ stroke: {missing}; }}
#diff path.check {{ stroke: {check}; }}
#diff path.hot {{ stroke: #ffff00; stroke-width: 6; }}
aside {{ width: 350px; padding: 8px; box-sizing: border-box; height: 100vh; overflow: auto; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ padding: 2px 4px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: middle; }}
li.missing {{ color: {missing}; }} li.check {{ color: {check}; }} li {{ cursor: default; }}
</style></head>
<body>
<div id="map">
 <img id="imagery" alt="imagery" src="{imagery}">
 <img id="segments" alt="segments" src="{segments}">
 {diff_svg}
</div>
<aside>
 <h1>{title}</h1>
 <label><input type="checkbox" id="show-imagery" checked> imagery</label>
 <label><input type="checkbox" id="show-segments" checked> segments</label>
 <label><input type="checkbox" id="show-diff" checked> OSM diff</label><br>
 <label>segments opacity <input type="range" id="opacity" min="0" max="1" step="0.05" value="0.5"></label>
 <table><tr><th>class</th><th>pixels</th><th>area</th>{agreement_header}</tr>{legend}</table>
 <h2>Where OSM and the model disagree</h2>
 <ol id="places">{places}</ol>
</aside>
<script>
(function () {{
  var hasDiff = {has_diff};
  var layers = {{ imagery: true, segments: true, diff: hasDiff }};
  var state = new URLSearchParams(location.hash.slice(1));
  if (state.has("layers")) {{
    var wanted = state.get("layers").split(",");
    Object.keys(layers).forEach(function (k) {{ layers[k] = wanted.indexOf(k) >= 0; }});
  }}
  var opacity = document.getElementById("opacity");
  if (state.has("opacity")) opacity.value = state.get("opacity");
  function show() {{
    Object.keys(layers).forEach(function (k) {{
      var box = document.getElementById("show-" + k), element = document.getElementById(k);
      box.checked = layers[k];
      if (element) element.style.display = layers[k] ? "" : "none";
    }});
    document.getElementById("segments").style.opacity = opacity.value;
  }}
  Object.keys(layers).forEach(function (k) {{
    document.getElementById("show-" + k).addEventListener("change", function (e) {{ layers[k] = e.target.checked; show(); }});
  }});
  opacity.addEventListener("input", show);
  document.querySelectorAll("#places li[data-rank]").forEach(function (li) {{
    var path = document.getElementById("place" + li.dataset.rank);
    li.addEventListener("mouseenter", function () {{ if (path) path.classList.add("hot"); }});
    li.addEventListener("mouseleave", function () {{ if (path) path.classList.remove("hot"); }});
  }});
  show();
}})();
</script>
</body></html>
"""
