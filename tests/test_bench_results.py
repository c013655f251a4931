"""The bench's bookkeeping: figures keep the day they were measured, and a quick run of part
of a bench does not overwrite what a fuller run measured."""

from __future__ import annotations

import datetime
import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import bench_quality  # noqa: E402
import common  # noqa: E402
import run  # noqa: E402


@pytest.fixture()
def results(tmp_path, monkeypatch):
    folder = tmp_path / "results"
    folder.mkdir()
    monkeypatch.setattr(common, "RESULTS", folder)
    monkeypatch.setattr(run, "HERE", tmp_path)
    return folder


def test_a_figure_carried_over_unchanged_keeps_the_day_it_was_measured(results):
    kept = {"seconds": {"value": 1.5, "unit": "s"}}
    (results / "demo.json").write_text(
        json.dumps({"name": "demo", "date": "2026-01-02T03:04:05+00:00", "figures": {"kept": kept, "redone": kept}})
    )
    common.write_result("demo", {"kept": kept, "redone": {"seconds": {"value": 2.5, "unit": "s"}}, "added": kept})
    record = json.loads((results / "demo.json").read_text())
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert record["dates"] == {"kept": "2026-01-02", "redone": today, "added": today}
    table = run.table()
    assert "| demo | kept.seconds | 1.5 | s | 2026-01-02 |" in table
    assert f"| demo | redone.seconds | 2.5 | s | {today} |" in table
    # A second write keeps the first day of the untouched figure, from `dates`.
    common.write_result("demo", {"kept": kept})
    assert json.loads((results / "demo.json").read_text())["dates"] == {"kept": "2026-01-02"}


def test_a_one_seed_run_does_not_replace_a_three_seed_figure():
    three = {"test_mean_iou": {"value": 0.6, "unit": "mean over 3 seeds"}}
    one = {"test_mean_iou": {"value": 0.7, "unit": "mean over 1 seeds"}}
    merged = bench_quality.merged({"new": three, "old": one}, {"new": one, "old": three, "other": one})
    assert merged == {"new": three, "old": three, "other": one}
    assert bench_quality.seeds_of({"mean_iou": {"value": 1, "unit": "no seeds here"}}) == 0


def test_every_recipe_can_be_named_on_the_command_line():
    """--recipes splits on commas, so a name with one could never be chosen; each also needs
    its own run folder and results key."""
    names = list(bench_quality.RECIPES)
    assert not [name for name in names if "," in name]
    assert len({bench_quality.run_name(name) for name in names}) == len(names)
    assert len({bench_quality.figure_key(name) for name in names}) == len(names)
