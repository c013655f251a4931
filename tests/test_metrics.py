"""Tests for osmseg.metrics against hand-computed values, plus properties with hypothesis."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from osmseg.metrics import confusion_matrix, median_frequency_weights, scores

NAMES = ["background", "road", "building"]

# A 3x4 truth/prediction pair small enough to count by hand; 255 is ignored.
TRUTH = np.array([[0, 0, 1, 1], [0, 2, 2, 1], [255, 255, 0, 2]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1], [0, 2, 0, 0], [2, 1, 0, 2]], dtype=np.uint8)
# Counted by hand from the pairs above (rows truth, columns prediction), ignoring (255, *):
#   truth 0: (0,0) (0,1) (0,0) (0,0)        -> [3, 1, 0]
#   truth 1: (1,1) (1,1) (1,0)              -> [1, 2, 0]
#   truth 2: (2,2) (2,0) (2,2)              -> [1, 0, 2]
HAND = np.array([[3, 1, 0], [1, 2, 0], [1, 0, 2]])


def test_confusion_matrix_matches_hand_count():
    confusion = confusion_matrix(TRUTH, PRED, 3)
    assert confusion.dtype == np.int64
    np.testing.assert_array_equal(confusion, HAND)


def test_scores_match_hand_computed_values():
    result = scores(HAND, NAMES)
    assert result["pixel_accuracy"] == pytest.approx(7 / 10)
    # IoU_c = TP / (support + predicted - TP)
    iou = {"background": 3 / (4 + 5 - 3), "road": 2 / (3 + 3 - 2), "building": 2 / (3 + 2 - 2)}
    for name, value in iou.items():
        assert result["per_class"][name]["iou"] == pytest.approx(value)
    assert result["mean_iou"] == pytest.approx(np.mean(list(iou.values())))
    assert result["frequency_weighted_iou"] == pytest.approx(
        0.4 * iou["background"] + 0.3 * iou["road"] + 0.3 * iou["building"]
    )
    road = result["per_class"]["road"]
    assert road["precision"] == pytest.approx(2 / 3)
    assert road["recall"] == pytest.approx(2 / 3)
    assert road["f1"] == pytest.approx(2 / 3)
    building = result["per_class"]["building"]
    assert building["precision"] == pytest.approx(1.0)
    assert building["recall"] == pytest.approx(2 / 3)
    assert building["f1"] == pytest.approx(2 * 1.0 * (2 / 3) / (1.0 + 2 / 3))
    assert [result["per_class"][n]["support"] for n in NAMES] == [4, 3, 3]


def test_absent_class_has_no_iou_and_is_left_out_of_the_mean():
    confusion = np.array([[5, 0, 0], [1, 3, 0], [0, 0, 0]])
    result = scores(confusion, NAMES)
    assert result["per_class"]["building"]["iou"] is None
    assert result["per_class"]["building"]["recall"] is None
    assert result["mean_iou"] == pytest.approx((5 / 6 + 3 / 4) / 2)
    json.dumps(result, allow_nan=False)  # undefined values are JSON null, not NaN


def test_empty_confusion_scores_are_none():
    result = scores(np.zeros((3, 3), dtype=np.int64), NAMES)
    assert result["pixel_accuracy"] is None and result["mean_iou"] is None


def test_confusion_matrix_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0, 1]), np.array([0, 7]), 3)


def test_median_frequency_simple_variant_on_known_histogram():
    # freq = [0.5, 0.3, 0.2, 0] -> median of present = 0.3
    weights = median_frequency_weights([500, 300, 200, 0])
    np.testing.assert_allclose(weights, [0.6, 1.0, 1.5, 0.0])


def test_median_frequency_paper_variant_uses_pixels_of_tiles_where_present():
    # Class 2 appears in one 100-pixel tile only: its freq is 20/100, not 20/1000.
    histogram = np.array([700, 280, 20])
    present = np.array([1000, 1000, 100])
    weights = median_frequency_weights(histogram, present)
    frequency = np.array([0.7, 0.28, 0.2])
    np.testing.assert_allclose(weights, 0.28 / frequency)


def test_median_frequency_rejects_bad_input():
    with pytest.raises(ValueError):
        median_frequency_weights([10, -1])
    with pytest.raises(ValueError):
        median_frequency_weights([10, 5], [10, 4])
    np.testing.assert_array_equal(median_frequency_weights([0, 0]), [0, 0])


@settings(max_examples=50, deadline=None)
@given(arrays(np.uint8, (6, 7), elements=st.sampled_from([0, 1, 2, 3, 255])), st.randoms())
def test_confusion_properties(truth, rng):
    pred = np.array([rng.randrange(4) for _ in range(truth.size)], dtype=np.uint8).reshape(truth.shape)
    confusion = confusion_matrix(truth, pred, 4)
    assert confusion.sum() == int((truth != 255).sum())
    np.testing.assert_array_equal(confusion.sum(axis=1), [(truth == c).sum() for c in range(4)])
    result = scores(confusion, ["a", "b", "c", "d"])
    for value in (result["pixel_accuracy"], result["mean_iou"], result["frequency_weighted_iou"]):
        assert value is None or 0.0 <= value <= 1.0
    # A perfect prediction scores 1 everywhere it is defined.
    perfect = scores(confusion_matrix(truth, np.where(truth == 255, 0, truth), 4), ["a", "b", "c", "d"])
    assert perfect["pixel_accuracy"] in (None, pytest.approx(1.0))
    assert perfect["mean_iou"] in (None, pytest.approx(1.0))
