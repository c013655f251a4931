"""The end of `make demo`: the held-out image it segments and the summary it prints."""

import json

import pytest

from osmseg import cli
from osmseg.commands import report


def test_held_out_image_is_the_first_test_tile_with_an_image(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "17-5-7.png").write_bytes(b"x")
    test_list = tmp_path / "test.txt"
    test_list.write_text("#source z x y a Background\ndemo 17 1 2 0 1\ndemo 17 5 7 1 0\n")
    assert report.held_out_image(test_list, images) == images / "17-5-7.png"


def test_held_out_image_without_images_is_a_user_error(tmp_path, capsys):
    test_list = tmp_path / "test.txt"
    test_list.write_text("demo 17 1 2 0 1\n")
    status = cli.run(report.main, ["held-out-image", "--test-list", str(test_list), "--images", str(tmp_path)])
    assert status == 2
    assert "none of its tiles has an image" in capsys.readouterr().err


def test_summary_prints_metrics_and_only_outputs_that_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({
        "pixel_accuracy": 0.8123, "mean_iou": 0.6012,
        "per_class": {"background": {"iou": 0.7}, "building": {"iou": 0.5}},
    }))
    (tmp_path / "weights.hdf5").write_bytes(b"")
    text = report.summary(metrics, None)
    assert "pixel accuracy 0.812, mean IoU 0.601" in text
    assert "building 0.50" in text
    assert "weights.hdf5" in text and "training_log.csv" not in text and "--tta" not in text
    metrics.write_text(json.dumps({"pixel_accuracy": 0.8, "mean_iou": 0.6, "tta": 8}))
    assert "mean IoU 0.600 (the mean of 8 turned and mirrored copies of each tile, --tta 8)" in report.summary(metrics, None)


@pytest.mark.parametrize("argv", [["--help"], ["summary", "--help"]])
def test_help_exits_cleanly(argv):
    with pytest.raises(SystemExit) as exit_:
        report.main(argv)
    assert exit_.value.code == 0
