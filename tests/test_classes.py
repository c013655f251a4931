"""The classes file parser: the seed's file loads; each kind of mistake is named."""

import json

import numpy as np
import pytest

from osmseg.classes import IGNORE, load_classes, parse_classes
from osmseg.errors import ClassesError


def test_mine_json_has_the_seed_classes_in_order(classes_file):
    classes = load_classes(classes_file)
    assert classes.names == [
        "background", "residential", "commercial", "industrial", "vegetation", "building", "brownfield",
    ]
    # Class i is coloured #0i0i0i.
    assert [tuple(c) for c in classes.palette] == [(i, i, i) for i in range(7)]
    assert "[building].match('.+')" == classes.classes[4].filter


def test_round_trip_through_canonical_json(classes_file):
    classes = load_classes(classes_file)
    assert parse_classes(classes.to_json()) == classes


def _one(**entry):
    base = {"name": "a", "color": "#010101", "filter": "[landuse] = 'x'"}
    base.update(entry)
    return json.dumps([{k: v for k, v in base.items() if v is not None}])


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[]", "non-empty JSON list"),
        (_one(color=None), "missing key(s) ['color']"),
        (_one(filter=None), "missing key(s) ['filter']"),
        (_one(color="#000000"), "#000000 is the background"),
        (_one(color="red"), "not of the form #rrggbb"),
        (_one(colour="#020202"), "unknown key(s) ['colour']"),
        (_one(**{"stroke-width": "wide"}), "is not a number"),
    ],
)
def test_bad_files_are_named(text, fragment):
    with pytest.raises(ClassesError) as error:
        parse_classes(text, origin="x.json")
    assert fragment in str(error.value)
    assert str(error.value).startswith("x.json")


def test_repeated_colour_names_the_first_owner():
    text = json.dumps([
        {"name": "a", "color": "#010101", "filter": "[a]=1"},
        {"name": "b", "color": "#010101", "filter": "[b]=1"},
    ])
    with pytest.raises(ClassesError, match="already used by 'a'"):
        parse_classes(text)


def test_filters_are_optional_for_imports():
    classes = parse_classes(json.dumps([{"name": "water", "color": "#0000ff"}]), require_filters=False)
    assert classes.num_classes == 2


def test_colour_masks_map_to_indices_and_unknown_colours_to_ignore(classes_file):
    classes = load_classes(classes_file)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes.num_classes, size=(16, 16)).astype(np.uint8)
    colours = classes.labels_to_colors(labels)
    colours[0, 0] = (200, 10, 10)
    back, ignored = classes.colors_to_labels(colours)
    assert ignored == 1 and back[0, 0] == IGNORE
    back[0, 0] = labels[0, 0]
    np.testing.assert_array_equal(back, labels)


def test_missing_file_says_so(tmp_path):
    with pytest.raises(ClassesError, match="no such classes file"):
        load_classes(tmp_path / "nope.json")
