"""prepare.py import: cache your own image/mask pairs to HDF5.

Pairs each image with the mask of the same file-name stem, cuts both into tiles and writes a
cache of the same schema as `prepare.py cache` (osmseg.cache), holding back whole images for
a test file when asked.
"""

from __future__ import annotations

from pathlib import Path

from osmseg.cache.build import default_workers, report, skipped_text, split_indices
from osmseg.cache.imports import import_pairs, pair_files
from osmseg.classes import load_classes
from osmseg.commands.cache import check_distinct
from osmseg.errors import UserError

NAME = "import"
HELP = "cache your own image/mask pairs to HDF5"


def testing_path_for(out: Path) -> Path:
    """The test file written beside an import's --out: training → testing, else <stem>-test."""
    if "training" in out.stem:
        return out.with_name(out.stem.replace("training", "testing") + out.suffix)
    return out.with_name(f"{out.stem}-test{out.suffix}")


def add_arguments(parser) -> None:
    parser.add_argument("images", type=Path, metavar="IMAGES", help="folder of images (jpg, png, webp, tif, bmp), any size")
    parser.add_argument(
        "masks", type=Path, metavar="MASKS",
        help="folder of colour masks (png, palette PNGs too) paired with the images by file-name stem",
    )
    parser.add_argument(
        "--classes", type=Path, required=True,
        help="classes file: names and colours (#000000 is background; unlisted colours become ignore)",
    )
    parser.add_argument("--out", type=Path, default=Path("data/training.hdf5"), help="the cache to write")
    parser.add_argument("--tile-size", type=int, default=256, help="width and height of the tiles, in pixels")
    parser.add_argument("--stride", type=int, default=None, help="pixels between tile starts; None: the tile size (no overlap)")
    parser.add_argument(
        "--test-size", type=float, default=0,
        help="whole images held back for a test file beside --out (training→testing in its name, "
        "else <stem>-test.hdf5): a fraction (< 1) or a count (>= 1); 0 holds back none",
    )
    parser.add_argument("--test-out", type=Path, default=None, help="the test file; None: beside --out (see --test-size)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the test draw")
    parser.add_argument("--workers", type=int, default=min(4, default_workers()), help="threads that decode, cut and compress; each holds one image (lower it for huge images)")


def main(args) -> int:
    classes = load_classes(args.classes, require_filters=False)
    stride = args.tile_size if args.stride is None else args.stride
    if args.tile_size < 1:
        raise UserError(f"--tile-size {args.tile_size}: must be a positive number of pixels")
    if not 1 <= stride <= args.tile_size:
        raise UserError(f"--stride {stride}: must be between 1 and the tile size ({args.tile_size}) so no pixel is left out")
    pairs, unpaired = pair_files(args.images, args.masks)
    if unpaired.skipped:
        print(f"{len(pairs)} image/mask pairs{skipped_text(unpaired)}")
    if not pairs:
        raise UserError(
            f"no image in {args.images} has a mask of the same file-name stem in {args.masks}; "
            "name each mask like its image (a.jpg ↔ a.png)"
        )
    params = {"seed": args.seed, "test_size": args.test_size, "images": str(args.images), "masks": str(args.masks)}
    # Whole images are held back, never single tiles: neighbouring (or, with a stride below
    # the tile size, overlapping) tiles of one image would otherwise leak into training.
    if args.test_size:
        keep, test = split_indices(len(pairs), args.test_size, args.seed, what="images")
        test_out = args.test_out or testing_path_for(args.out)
        check_distinct({"--out": args.out, "--test-out": test_out})
        jobs = [("training", [pairs[i] for i in keep], args.out), ("testing", [pairs[i] for i in test], test_out)]
        print(f"{len(test)} of {len(pairs)} images held back for {test_out}: {', '.join(pairs[i][0] for i in test)}")
    else:
        jobs = [("training", pairs, args.out)]
    for role, chosen, out in jobs:
        summary = import_pairs(
            chosen, classes, out, args.tile_size, stride, params=dict(params, role=role), workers=args.workers
        )
        report(summary)
    return 0
