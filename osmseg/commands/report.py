"""The end of `make demo`: pick a held-out image to segment, and say what the run produced.

    python -m osmseg.commands.report held-out-image [--test-list F] [--images D]
    python -m osmseg.commands.report summary [--metrics metrics.json] [--predict-out DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from osmseg import cli, datafiles
from osmseg.commands import options
from osmseg.errors import UserError

# Every output of a full run, in pipeline order: (path, what it holds).
OUTPUTS = (
    ("data/osm/", "OSM source tiles (MBTiles)"),
    ("data/sample.txt", "sampled tiles"),
    ("data/labels/color/", "label PNGs, class i coloured #0i0i0i"),
    ("data/sample-filtered.txt", "tiles kept, with pixel counts per class"),
    ("data/labels/label-stats.csv", "pixel frequency and tile count per class"),
    ("data/images/", "imagery tiles as served"),
    ("data/training.hdf5", "training cache"),
    ("data/testing.hdf5", "held-back test cache"),
    ("weights.hdf5", "weights of the epoch with the best training mean IoU (none held back)"),
    ("training_log.csv", "per-epoch losses and metrics"),
    ("training_log.png", "training curves"),
    ("metrics.json", "test-set metrics, per class"),
    ("confusion.png", "test-set confusion matrix"),
    ("predictions.hdf5", "test-set class probabilities"),
)


def held_out_image(test_list: Path, images: Path) -> Path:
    """The image of the first held-back test tile that has one."""
    listed = datafiles.read_tile_list(test_list, make_hint="run `make data/training.hdf5`")
    for tile in listed.tiles:
        path = datafiles.find_image(images, tile)
        if path is not None:
            return path
    raise UserError(f"{test_list}: none of its tiles has an image in {images}")


def summary(metrics: Path, predict_out: Path | None) -> str:
    """A few lines: the test metrics, then where every output is."""
    lines = []
    if metrics.exists():
        scores = json.loads(metrics.read_text())
        tta = int(scores.get("tta", 1))
        lines.append(
            f"Test set: pixel accuracy {scores['pixel_accuracy']:.3f}, mean IoU {scores['mean_iou']:.3f}"
            + (f" (the mean of {tta} turned and mirrored copies of each tile, --tta {tta})" if tta > 1 else "")
        )
        per_class = scores.get("per_class", {})
        if per_class:
            lines.append("  IoU per class: " + ", ".join(f"{name} {v['iou']:.2f}" for name, v in per_class.items()))
    lines.append("Outputs:")
    outputs = list(OUTPUTS)
    if predict_out is not None:
        outputs.append((f"{predict_out}/", "feed_forward.py on a held-out image: counts, heatmaps, segments"))
    for path, what in outputs:
        if Path(path).exists():
            lines.append(f"  {path:<30} {what}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = options.parser(prog="python -m osmseg.commands.report", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    pick = commands.add_parser("held-out-image", help="print the path of a held-out test image")
    pick.add_argument("--test-list", type=Path, default=Path("data/test-sample-filtered.txt"))
    pick.add_argument("--images", type=Path, default=Path("data/images"))
    done = commands.add_parser("summary", help="print the test metrics and where the outputs are")
    done.add_argument("--metrics", type=Path, default=Path("metrics.json"))
    done.add_argument("--predict-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "held-out-image":
        print(held_out_image(args.test_list, args.images))
    else:
        print(summary(args.metrics, args.predict_out))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
