"""Which closed OSM ways are areas (filled) rather than closed lines (a roundabout, a fence)."""

from __future__ import annotations

# Which closed ways are areas.
# A closed way is an area when one of these keys says so; area=yes/no overrides. The table
# follows the OSM wiki's "Key:area" page and iD's areaKeys (id-tagging-schema): for these
# keys every value is an area except the listed ones ...
_AREA_KEYS_EXCEPT = {
    "building": set(),
    "building:part": set(),
    "landuse": set(),
    "natural": {"coastline", "cliff", "ridge", "arete", "tree_row", "earth_bank", "valley"},
    "leisure": {"track", "slipway"},
    "amenity": {"bench", "waste_basket"},
    "shop": set(),
    "tourism": {"artwork"},
    "office": set(),
    "craft": set(),
    "historic": {"citywalls"},
    "military": {"trench"},
    "place": set(),
    "aeroway": {"taxiway", "runway", "parking_position", "jet_bridge"},
    "man_made": {"cutline", "embankment", "pipeline", "groyne", "breakwater", "dyke"},
    "water": set(),
    "wetland": set(),
    "golf": {"hole", "cartpath", "path"},
    "area:highway": set(),
    "indoor": set(),
    "public_transport": {"platform_edge"},
}


# ... and for these keys only the listed values are areas.
_AREA_KEYS_ONLY = {
    "highway": {"rest_area", "services", "platform"},
    "railway": {"platform", "station", "turntable", "roundhouse"},
    "waterway": {"riverbank", "dock", "boatyard", "dam", "fuel"},
    "power": {"plant", "substation", "generator", "transformer", "switchgear"},
    "barrier": {"city_wall_area"},
}


def is_area(tags: dict) -> bool:
    """Whether a closed way with these tags is an area (filled) rather than a closed line."""
    area = tags.get("area")
    if area == "no":
        return False
    if area == "yes":
        return True
    for key, exceptions in _AREA_KEYS_EXCEPT.items():
        value = tags.get(key)
        if value is not None and value != "no" and value not in exceptions:
            return True
    return any(tags.get(key) in values for key, values in _AREA_KEYS_ONLY.items())
