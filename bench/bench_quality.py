#!/usr/bin/env python3
"""Benchmark: model quality on the demo world, today's recipe against the one before, with an ablation.

The demo world (DEMO_SEED 0, the Makefile's demo box and sample) is prepared once in a scratch
folder with the Makefile's own targets; then every recipe is trained there with `make train`
and `make demo`'s variables (so "new" is exactly what `make demo` trains), once per training
seed, and scored on the held-out test cache with validate.py. Reported per recipe: the mean,
spread (largest minus smallest) and standard deviation over seeds of the test mean IoU, the
mean test IoU of every class, the mean pixel accuracy and the mean training time; for the new
recipe also its score with test-time augmentation (--tta 8) and what that costs against
--tta 1. The recipes (see RECIPES):

- before: the demo as it was (constant learning rate, cross-entropy, no augmentation, Keras's
  batch-norm momentum 0.99, 20 epochs);
- new: `make demo` today (35 epochs in bfloat16 on every training tile, none held back,
  with repeat-factor sampling at 0.5); the demos before it (38 epochs holding back a fifth
  for validation; 30 epochs), that in float32, with 40 epochs, with twice the learning rate,
  with the validation split of seed 0 whatever the training seed (run it with
  --ablation-seeds 1,2: how much of the spread over seeds is which tiles are held back), and
  on every tile at 30 and 35 epochs without repeat-factor sampling;
- new at 20 float32 epochs (the demo of 2026-12-03), and that without one ingredient each
  (the Lovász term, schedule, augmentation, colour jitter, batch-norm momentum), with
  median-frequency class weights (the demo's until 2026-12-03, with and without the Lovász
  term), with soft Dice in place of Lovász, with background pixels down-weighted, and with
  batch size 4, to show what each one is worth and what did not help.

Scored twice. Against OSM's labels (data/testing.hdf5), as `make demo` scores itself; and
against the world: the same 30 test tiles labelled from every feature the imagery shows,
mapped or not (data/testing-world.hdf5, made here from the demo world's own feature list).
The demo leaves out of OSM, by design, 18% of its buildings and 8% of its land-use areas
(bench_demo_world.py), so a model that sees them is marked wrong by the first score. The
bench also scores those world labels themselves against OSM's ("label ceiling"): what a model
that painted exactly what is on the ground would get on the first score.

Every run is resumable (train.py --resume; a finished validation is kept), so an interrupted
bench continues where it stopped when run again with the same --work folder.

Usage: .venv/bin/python bench/bench_quality.py [--seeds 0,1,2] [--ablation-seeds 0]
       [--recipes before,new,...] [--work DIR] [--note TEXT]
Writes bench/results/quality.json and prints the ablation table (bench/README.md, "Quality").
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from common import RESULTS, write_result  # noqa: E402

# What a recipe changes from `make demo`'s variables: Makefile variables and train.py flags.
# Recipes measured against an older demo keep its settings, so that re-running one reproduces
# the row it made: until 2026-12-06 the demo held back a fifth of the training cache for
# validation and drew every tile alike (HELD_BACK); until 2026-12-04 it trained 20 epochs in
# float32 (TWENTY), that day 30 (THIRTY), then 38 (THIRTY_EIGHT).
HELD_BACK = {"VALIDATION": "0.2", "REPEAT_THRESHOLD": "0"}
TWENTY = HELD_BACK | {"EPOCHS": "20", "MIXED_PRECISION": "no"}
THIRTY = HELD_BACK | {"EPOCHS": "30"}
THIRTY_EIGHT = HELD_BACK | {"EPOCHS": "38"}
EVERY_TILE = HELD_BACK | {"VALIDATION": "0"}
BEFORE = {
    "vars": TWENTY | {"OPTIMIZER": "adam", "LEARNING_RATE": "0.003", "CLASS_WEIGHTS": "median-frequency"},
    "flags": "--schedule constant --loss ce --no-augment --bn-momentum 0.99 --background-weight 1",
}
RECIPES = {
    "before": BEFORE,
    "new": {"vars": {}, "flags": ""},
    # The demo of 2026-12-04 (second change) to 12-05.
    "new at 38 epochs": {"vars": THIRTY_EIGHT, "flags": ""},
    "new at 30 epochs": {"vars": THIRTY, "flags": ""},
    "new - bfloat16": {"vars": THIRTY | {"MIXED_PRECISION": "no"}, "flags": ""},
    "new + 40 epochs": {"vars": HELD_BACK | {"EPOCHS": "40"}, "flags": ""},
    "new + learning rate 0.006": {"vars": THIRTY_EIGHT | {"LEARNING_RATE": "0.006"}, "flags": ""},
    # The validation split of seed 0 whatever the training seed: how much of the spread over
    # seeds is which 54 tiles are held back (seed 0 itself is "new at 38 epochs" seed 0).
    "new with the validation split of seed 0": {"vars": THIRTY_EIGHT, "flags": "--split-seed 0"},
    # Every tile trained on, none held back for validation (the weights kept are the epoch's with
    # the best training mean IoU): 30 epochs of 34 steps, the 38 × 27 steps of "new at 38 epochs".
    "new on every tile at 30 epochs": {"vars": THIRTY | EVERY_TILE, "flags": ""},
    # The same with the time the validation passes took spent on five more epochs.
    "new on every tile at 35 epochs": {"vars": EVERY_TILE | {"EPOCHS": "35"}, "flags": ""},
    # That with --repeat-threshold 0.5 is "new", the demo since 2026-12-06.
    "new at 20 float32 epochs": {"vars": TWENTY, "flags": ""},
    "new - Lovasz term": {"vars": TWENTY, "flags": "--loss ce"},
    "new + median-frequency weights": {"vars": TWENTY | {"CLASS_WEIGHTS": "median-frequency"}, "flags": ""},
    # The recipe of 2026-12-02: cross-entropy alone, weighted by median frequency.
    "new - Lovasz term + median-frequency weights": {
        "vars": TWENTY | {"CLASS_WEIGHTS": "median-frequency"},
        "flags": "--loss ce",
    },
    "new - constant learning rate": {"vars": TWENTY, "flags": "--schedule constant"},
    "new with Dice instead of Lovasz": {"vars": TWENTY, "flags": "--loss ce+dice"},
    "new - no augmentation": {"vars": TWENTY, "flags": "--no-augment"},
    "new - Lovasz term - no augmentation": {"vars": TWENTY, "flags": "--loss ce --no-augment"},
    "new - no colour jitter": {"vars": TWENTY, "flags": "--jitter 0"},
    "new - batch-norm momentum 0.99": {"vars": TWENTY, "flags": "--bn-momentum 0.99"},
    "new + background weight 0.5": {"vars": TWENTY, "flags": "--background-weight 0.5"},
    "new + batch size 4": {"vars": TWENTY | {"BATCH_SIZE": "4"}, "flags": ""},
}
# Which recipes run with every seed (the others with --ablation-seeds).
MAIN = ("before", "new")
# The scratch folder sees the project through links, so make's relative paths work there.
LINKED = ("requirements.txt", "prepare.py", "train.py", "validate.py", "model.py", "feed_forward.py", "osmseg", "classes", ".venv")


def demo_vars() -> dict[str, str]:
    """The Makefile's DEMO_VARS (with DEMO_SEED 0 and the demo box filled in)."""
    text = (ROOT / "Makefile").read_text()
    found = re.search(r"^DEMO_VARS\s*:=\s*((?:.*\\\n)*.*)$", text, re.M)
    if not found:
        raise SystemExit("Makefile: no DEMO_VARS line")
    bbox = re.search(r"^DEMO_BBOX\s*:=\s*(\S+)", text, re.M).group(1)
    words = found.group(1).replace("\\\n", " ").split()
    values = dict(word.split("=", 1) for word in words)
    return {key: value.replace("$(DEMO_BBOX)", bbox).replace("$(DEMO_SEED)", "0") for key, value in values.items()}


def make(work: Path, variables: dict[str, str], *targets: str, log: Path | None = None) -> float:
    """Run the project's Makefile in the scratch folder; its wall time in seconds."""
    command = ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-C", str(work)]
    command += [f"{key}={value}" for key, value in variables.items()] + list(targets)
    started = time.perf_counter()
    with open(log or work / "make.log", "a") as out:
        out.write("$ " + shlex.join(command) + "\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed (exit {done.returncode}); see {log or work / 'make.log'}")
    return time.perf_counter() - started


def prepare(work: Path) -> None:
    """The demo world's caches in the scratch folder (skipped where they are there)."""
    work.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = work / name
        if not link.exists():
            link.symlink_to(ROOT / name)
    if not (work / "data/testing.hdf5").exists():
        print(f"preparing the demo world in {work}", flush=True)
        make(work, demo_vars(), "data/osm/demo.mbtiles", "data/sample-filtered.txt", "data/training.hdf5")


def train(work: Path, recipe: str, seed: int) -> Path:
    """Train one recipe with one seed (resuming a run that stopped); its run folder."""
    spec = RECIPES[recipe]
    run = work / "runs" / f"{run_name(recipe)}-seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    variables = demo_vars() | spec["vars"] | {
        "SEED": str(seed),
        "WEIGHTS": str(run / "weights.hdf5"),
        "TRAIN_FLAGS": f"--log {run / 'training_log.csv'} {spec['flags']}".strip(),
    }
    finished = run / "train.json"
    if not finished.exists():
        print(f"training {recipe!r} with seed {seed}", flush=True)
        seconds = make(work, variables, "train", log=run / "train.log")
        finished.write_text(json.dumps({"seconds": seconds, "variables": variables}))
    return run


def world_test_cache(work: Path) -> Path:
    """data/testing-world.hdf5: the test cache with labels of every feature, mapped or not.

    A copy of data/testing.hdf5 (same tiles, images and order) whose labels are rendered by
    osmseg.labels, as the pipeline renders OSM's, from QA tiles of the whole demo world.
    """
    out = work / "data/testing-world.hdf5"
    if out.exists():
        return out
    import shutil

    import h5py
    import mercantile

    from osmseg import demo, labels, osm
    from osmseg.atomic import atomic_path
    from osmseg.classes import load_classes

    seed = int(demo_vars()["IMAGE_TILES"].split(":", 1)[1])
    mbtiles = work / "data/osm/demo-everything.mbtiles"
    if not mbtiles.exists():
        demo.write_qa_tiles(demo.build_world(seed).fully_mapped(), mbtiles)
    classes = load_classes(work / "classes/mine.json")
    with atomic_path(out) as tmp:
        shutil.copyfile(work / "data/testing.hdf5", tmp)
        with h5py.File(tmp, "r+") as cache:
            tiles = [mercantile.Tile(int(x), int(y), int(z)) for z, x, y in cache["tiles"][()]]
            renderer = labels.LabelRenderer(classes, int(cache.attrs["tile_size"]))
            rendered = dict(labels.render_tiles(osm.open_source("qa-tiles", mbtiles), renderer, tiles))
            for index, tile in enumerate(tiles):
                cache["labels"][index] = classes.colors_to_labels(rendered[tile])[0]
    return out


def label_ceiling(work: Path) -> dict:
    """The world's labels scored as a prediction against OSM's, on the test tiles (metrics.scores)."""
    import h5py

    from osmseg import metrics
    from osmseg.classes import load_classes

    names = load_classes(work / "classes/mine.json").names
    with h5py.File(work / "data/testing.hdf5", "r") as osm_cache, h5py.File(world_test_cache(work), "r") as world:
        confusion = metrics.confusion_matrix(osm_cache["labels"][()], world["labels"][()], len(names))
    return metrics.scores(confusion, names)


def validate(work: Path, run: Path, tta: int, against: str = "test") -> dict:
    """The run's metrics with this test-time augmentation (kept once computed).

    against: "test" (OSM's labels, data/testing.hdf5) or "world" (every feature's labels).
    """
    out = run / f"{against}-tta{tta}"
    metrics, seconds = out / "metrics.json", out / "seconds.txt"
    # seconds.txt is written last: a validation stopped before it is done again.
    if not (metrics.exists() and seconds.exists()):
        data = world_test_cache(work) if against == "world" else work / "data/testing.hdf5"
        command = [str(ROOT / ".venv/bin/python"), str(ROOT / "validate.py"), "--weights", str(run / "weights.hdf5")]
        command += ["--data", str(data), "--out-dir", str(out), "--no-predictions"]
        if tta > 1:
            command += ["--tta", str(tta)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
        seconds.write_text(f"{time.perf_counter() - started:.3f}\n")
    return json.loads(metrics.read_text()) | {"seconds": float(seconds.read_text())}


def run_name(recipe: str) -> str:
    """The recipe's run folders' stem: "new - no colour jitter" -> "new-no-colour-jitter"."""
    return re.sub(r"[^a-z0-9]+", "-", recipe.lower())


def figure_key(recipe: str) -> str:
    """The recipe's key in quality.json: "new - no colour jitter" -> "new_no_colour_jitter"."""
    return re.sub(r"[^a-z0-9]+", "_", recipe.lower()).strip("_")


def summary(results: list[dict]) -> dict:
    """Mean, spread and deviation over seeds of one recipe's scores."""
    scores = [r["mean_iou"] for r in results]
    names = results[0]["classes"]
    return {
        "seeds": len(results),
        "mean_iou": statistics.fmean(scores),
        "spread": max(scores) - min(scores),
        "std": statistics.pstdev(scores),
        "pixel_accuracy": statistics.fmean(r["pixel_accuracy"] for r in results),
        "per_class": {
            name: statistics.fmean(r["per_class"][name]["iou"] or 0.0 for r in results) for name in names
        },
        "train_seconds": statistics.fmean(r["train_seconds"] for r in results),
    }


def table(summaries: dict[str, dict]) -> str:
    """The ablation table (markdown), per-class IoU columns included."""
    names = next(iter(summaries.values()))["per_class"]
    header = ["recipe", "seeds", "test mIoU", "spread", "pixel acc."] + list(names) + ["train s"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for recipe, s in summaries.items():
        cells = [recipe, str(s["seeds"]), f"{s['mean_iou']:.3f}", f"{s['spread']:.3f}", f"{s['pixel_accuracy']:.3f}"]
        cells += [f"{s['per_class'][name]:.2f}" for name in names] + [f"{s['train_seconds']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def seeds_of(figure: dict) -> int:
    """How many training seeds a figure averages (its units say "over N seeds"; 0 if none)."""
    for value in figure.values():
        found = re.search(r"over (\d+) seeds", value.get("unit", "")) if isinstance(value, dict) else None
        if found:
            return int(found.group(1))
    return 0


def merged(earlier: dict, figures: dict) -> dict:
    """This run's figures over the earlier ones: a run of some recipes keeps the others', and
    a figure over fewer seeds (a quick one-seed check) does not replace one over more."""
    result = dict(earlier)
    for key, figure in figures.items():
        if key in earlier and seeds_of(earlier[key]) > seeds_of(figure):
            print(f"{key}: kept the earlier figure over {seeds_of(earlier[key])} seeds, not this run's {seeds_of(figure)}")
            continue
        result[key] = figure
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds of the main recipes (before, new)")
    parser.add_argument("--ablation-seeds", default="0", help="training seeds of the ablation recipes")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="which recipes, comma-separated")
    parser.add_argument("--work", default="/tmp/osmseg-bench-quality", help="scratch folder (kept, for resuming)")
    parser.add_argument("--note", default="", help="a note stored with the results (e.g. the machine's load)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    ablation_seeds = [int(s) for s in args.ablation_seeds.split(",")]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}: choose from {', '.join(RECIPES)}")
    work = Path(args.work)
    prepare(work)

    summaries, tta, world = {}, {}, {}
    # Seed-major order: an interrupted bench has every recipe's first seed before any second.
    for seed in sorted(set(seeds) | set(ablation_seeds)):
        for recipe in recipes:
            if seed not in (seeds if recipe in MAIN else ablation_seeds):
                continue
            train(work, recipe, seed)
    for recipe in recipes:
        results = []
        for seed in seeds if recipe in MAIN else ablation_seeds:
            run = train(work, recipe, seed)
            train_seconds = json.loads((run / "train.json").read_text())["seconds"]
            results.append(validate(work, run, 1) | {"train_seconds": train_seconds})
            if recipe == "new":
                tta.setdefault("plain", []).append(results[-1])
                tta.setdefault("tta8", []).append(validate(work, run, 8))
            world.setdefault(recipe, []).append(validate(work, run, 1, against="world") | {"train_seconds": train_seconds})
        summaries[recipe] = summary(results)
        print(f"{recipe}: test mIoU {summaries[recipe]['mean_iou']:.3f} (spread {summaries[recipe]['spread']:.3f})")

    figures = {}
    for recipe, s in summaries.items():
        figures[figure_key(recipe)] = {
            "test_mean_iou": {"value": round(s["mean_iou"], 4), "unit": f"mean over {s['seeds']} seeds"},
            "spread": {"value": round(s["spread"], 4), "unit": "max - min over seeds (goal <= 0.03 for new)"},
            "pixel_accuracy": {"value": round(s["pixel_accuracy"], 4), "unit": "mean over seeds"},
            "lowest_class_iou": {"value": round(min(s["per_class"].values()), 4), "unit": "goal >= 0.4 for new"},
            "train_seconds": {"value": round(s["train_seconds"], 1), "unit": "s, make train (mean)"},
            "per_class_iou": {name: round(value, 4) for name, value in s["per_class"].items()},
        }
    if tta:
        plain = statistics.fmean(r["mean_iou"] for r in tta["plain"])
        augmented = statistics.fmean(r["mean_iou"] for r in tta["tta8"])
        cost = statistics.fmean(a["seconds"] / p["seconds"] for a, p in zip(tta["tta8"], tta["plain"]))
        figures["tta8"] = {
            "test_mean_iou": {
                "value": round(augmented, 4),
                "unit": f"new recipe, validate.py --tta 8, mean over {len(tta['tta8'])} seeds",
            },
            "gain": {"value": round(augmented - plain, 4), "unit": "mIoU over --tta 1"},
            "cost": {"value": round(cost, 2), "unit": "x validate.py's time with --tta 1 (start-up included)"},
        }
    ceiling = label_ceiling(work)
    figures["label_ceiling"] = {
        "test_mean_iou": {"value": round(ceiling["mean_iou"], 4), "unit": "world's labels scored against OSM's"},
        "per_class_iou": {name: round(c["iou"] or 0.0, 4) for name, c in ceiling["per_class"].items()},
    }
    print(f"label ceiling: the world's own labels score {ceiling['mean_iou']:.3f} against OSM's")
    for recipe, results in world.items():
        s = summary(results)
        figures[figure_key(recipe) + "_against_the_world"] = {
            "mean_iou": {"value": round(s["mean_iou"], 4), "unit": f"mean over {s['seeds']} seeds, every feature's labels"},
            "spread": {"value": round(s["spread"], 4), "unit": "max - min over seeds"},
            "per_class_iou": {name: round(value, 4) for name, value in s["per_class"].items()},
        }
        print(f"{recipe} against the world: mean IoU {s['mean_iou']:.3f} (spread {s['spread']:.3f})")
    print(table(summaries))
    earlier = RESULTS / "quality.json"
    if earlier.exists():
        figures = merged(json.loads(earlier.read_text())["figures"], figures)
    print(write_result("quality", figures, ("tensorflow", "keras"), args.note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
