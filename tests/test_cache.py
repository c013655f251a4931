"""Tests for the HDF5 cache: writers, resume and refusal, the split, readers, import."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import subprocess
import sys

import cv2
import h5py
import mercantile
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import prepare
from osmseg import cache, cli, datafiles
from osmseg.cache import build, imports, schema
from osmseg.classes import IGNORE, parse_classes
from osmseg.commands import import_masks
from osmseg.errors import CacheError, UserError

SIZE = 32  # tiny tiles keep every test fast
CLASSES_TEXT = """[
 {"name": "water", "color": "#0000ff"},
 {"name": "building", "color": "#ff0000"},
 {"name": "road", "color": "#ffffff"}
]"""
CLASSES = parse_classes(CLASSES_TEXT, require_filters=False)


def _label_rgb(labels: np.ndarray) -> np.ndarray:
    return CLASSES.labels_to_colors(labels)


def _random_tile(rng, size=SIZE):
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES.num_classes, (size, size), dtype=np.uint8)
    return image, labels


def _write_png(path, rgb):
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


@pytest.fixture
def world(tmp_path):
    """A tiny pipeline data folder: 12 tiles with PNG images, colour labels, a sample list."""
    return make_world(tmp_path)


def make_world(tmp_path):
    """The `world` fixture's folder, made in tmp_path (also used by tests/test_shards.py)."""
    rng = np.random.default_rng(1)
    images_dir, labels_dir = tmp_path / "images", tmp_path / "labels"
    images_dir.mkdir()
    labels_dir.mkdir()
    tiles, truth = [], {}
    lines = ["#source z x y water building road Background"]
    for i in range(12):
        tile = mercantile.Tile(100 + i, 200, 17)
        image, labels = _random_tile(rng)
        # Lossless PNG imagery so that the round trip can be checked bit for bit.
        _write_png(images_dir / f"17-{tile.x}-{tile.y}.png", image)
        _write_png(labels_dir / f"17-{tile.x}-{tile.y}.png", _label_rgb(labels))
        tiles.append(("demo", tile))
        truth[(17, tile.x, tile.y)] = (image, labels)
        counts = np.bincount(labels.ravel(), minlength=4)
        lines.append(f"demo 17 {tile.x} {tile.y} {counts[1]} {counts[2]} {counts[3]} {counts[0]}")
    sample = tmp_path / "sample-filtered.txt"
    sample.write_text("\n".join(lines) + "\n")
    classes_file = tmp_path / "classes.json"
    classes_file.write_text(CLASSES_TEXT)
    return {
        "root": tmp_path, "images": images_dir, "labels": labels_dir, "tiles": tiles,
        "truth": truth, "sample": sample, "classes": classes_file,
    }


def _cache_argv(world, *extra):
    root = world["root"]
    return [
        "cache", "--sample", str(world["sample"]), "--images", str(world["images"]),
        "--labels", str(world["labels"]), "--classes", str(world["classes"]),
        "--tile-size", str(SIZE), "--test-size", "3", "--seed", "7",
        "--test-list", str(root / "test-sample-filtered.txt"),
        "--out", str(root / "training.hdf5"), "--test-out", str(root / "testing.hdf5"), *extra,
    ]


def _build(world, out=None, **kwargs):
    out = out or world["root"] / "c.hdf5"
    arguments = {
        "entries": world["tiles"], "images_dir": world["images"], "labels_dir": world["labels"],
        "classes": CLASSES, "out_path": out, "tile_size": SIZE, "log": lambda _: None,
    }
    return build.build_cache(**(arguments | kwargs)), out


# --- build_cache -------------------------------------------------------------------------


def test_round_trip_is_bit_exact(world):
    summary, out = _build(world)
    assert summary.written == 12 and not summary.skipped
    info = cache.open_cache(out)
    assert (info.length, info.tile_size, info.classes) == (12, SIZE, CLASSES)
    assert info.attrs["schema_version"] == 1
    with h5py.File(out, "r") as file:
        assert file["images"].chunks == (1, SIZE, SIZE, 3)
        assert file["labels"].chunks == (1, SIZE, SIZE)
        assert file["images"].compression == "gzip"
        for row, (z, x, y) in enumerate(file["tiles"][:]):
            image, labels = world["truth"][(z, x, y)]
            np.testing.assert_array_equal(file["images"][row], image)
            np.testing.assert_array_equal(file["labels"][row], labels)
        assert [s.decode() for s in file["sources"][:]] == ["demo"] * 12


def test_jpeg_images_come_back_rgb_not_bgr(world):
    """A pure-red JPEG must be stored red: cv2 reads BGR and the writer must convert."""
    tile = world["tiles"][0][1]
    os.remove(world["images"] / f"17-{tile.x}-{tile.y}.png")
    red = np.zeros((SIZE, SIZE, 3), np.uint8)
    red[..., 0] = 255
    assert cv2.imwrite(str(world["images"] / f"17-{tile.x}-{tile.y}.jpg"), cv2.cvtColor(red, cv2.COLOR_RGB2BGR))
    _, out = _build(world)
    with h5py.File(out, "r") as file:
        pixel = file["images"][0].reshape(-1, 3).mean(axis=0)
    assert pixel[0] > 240 and pixel[2] < 15


def test_read_with_plain_h5py_as_the_readme_shows(world):
    _, out = _build(world)
    # The README's example, verbatim apart from the path.
    with h5py.File(out, "r") as f:
        names = ["background"] + [c["name"] for c in json.loads(f.attrs["classes"])]
        image = f["images"][3]  # uint8 (H, W, 3) RGB, one chunk read
        labels = f["labels"][3]  # uint8 (H, W): 0 background, i names[i], 255 ignore
        z, x, y = f["tiles"][3]
        source = f["sources"][3].decode()
    assert names == ["background", "water", "building", "road"]
    np.testing.assert_array_equal(image, world["truth"][(z, x, y)][0])
    np.testing.assert_array_equal(labels, world["truth"][(z, x, y)][1])
    assert source == "demo"


def test_missing_corrupt_and_odd_sized_tiles_are_skipped_and_counted(world):
    tiles = [tile for _, tile in world["tiles"]]
    os.remove(world["images"] / f"17-{tiles[0].x}-{tiles[0].y}.png")
    os.remove(world["labels"] / f"17-{tiles[1].x}-{tiles[1].y}.png")
    (world["images"] / f"17-{tiles[2].x}-{tiles[2].y}.png").write_bytes(b"not a png")
    _write_png(world["images"] / f"17-{tiles[3].x}-{tiles[3].y}.png", np.zeros((SIZE, SIZE + 2, 3), np.uint8))
    summary, out = _build(world)
    assert summary.written == 8
    reasons = {reason.split(" (")[0]: names for reason, names in summary.skipped.items()}
    assert reasons["no image"] == [f"17-{tiles[0].x}-{tiles[0].y}"]
    assert reasons["no label"] == [f"17-{tiles[1].x}-{tiles[1].y}"]
    assert reasons["corrupt image"] == [f"17-{tiles[2].x}-{tiles[2].y}.png"]
    assert len(reasons["image and label sizes differ"]) == 1
    assert cache.open_cache(out).length == 8


def test_unknown_label_colours_become_ignore_and_are_counted(world):
    tile = world["tiles"][0][1]
    _, labels = world["truth"][(17, tile.x, tile.y)]
    rgb = _label_rgb(labels)
    rgb[:4, :5] = (12, 34, 56)
    _write_png(world["labels"] / f"17-{tile.x}-{tile.y}.png", rgb)
    summary, out = _build(world)
    assert summary.ignored_pixels == 20
    assert summary.unknown_colors == {"#0c2238": 20}
    with h5py.File(out, "r") as file:
        row = [tuple(t) for t in file["tiles"][:]].index((17, tile.x, tile.y))
        stored = file["labels"][row]
    assert (stored[:4, :5] == IGNORE).all() and (stored[4:] == labels[4:]).all()


def test_nothing_usable_raises_and_writes_nothing(world, tmp_path):
    with pytest.raises(CacheError, match="no tile could be cached"):
        _build(world, images_dir=tmp_path / "nowhere")
    assert not (world["root"] / "c.hdf5").exists()


# --- resume, rebuild, refusal, atomicity ---------------------------------------------------


def test_same_inputs_are_not_rebuilt(world):
    _, out = _build(world)
    before = out.stat().st_mtime_ns
    messages = []
    summary, _ = _build(world, log=messages.append)
    assert summary.up_to_date and summary.written == 12
    assert out.stat().st_mtime_ns == before
    assert "up to date" in messages[0]


@pytest.mark.parametrize(
    "change, reason",
    [
        ("classes", "classes changed"),
        ("tiles", "tile list changed"),
        ("tile_size", "tile size changed (32 -> 16)"),
        ("files", "files changed on disk"),
    ],
)
def test_changed_inputs_rebuild_and_say_why(world, change, reason):
    _, out = _build(world)
    kwargs = {}
    if change == "classes":
        kwargs["classes"] = parse_classes(CLASSES_TEXT.replace("water", "lake"), require_filters=False)
    elif change == "tiles":
        kwargs["entries"] = world["tiles"][:-1]
    elif change == "tile_size":
        kwargs["tile_size"] = 16
    else:
        tile = world["tiles"][5][1]
        path = world["images"] / f"17-{tile.x}-{tile.y}.png"
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    messages = []
    if change == "tile_size":
        # Every 32-pixel tile is now the wrong size: the stale cache is gone, nothing replaces it.
        with pytest.raises(CacheError, match="not 16x16"):
            _build(world, log=messages.append, **kwargs)
        assert not out.exists()
    else:
        summary, _ = _build(world, log=messages.append, **kwargs)
        assert not summary.up_to_date and summary.written
        assert cache.open_cache(out).length == summary.written
    assert reason in messages[0] and "rebuilding" in messages[0]


def test_refuses_to_overwrite_a_file_that_is_not_a_cache(world):
    out = world["root"] / "c.hdf5"
    out.write_text("my thesis")
    with pytest.raises(CacheError, match="not a readable HDF5 file"):
        _build(world)
    assert out.read_text() == "my thesis"
    with h5py.File(out, "w") as file:
        file["x"] = 1
    with pytest.raises(CacheError, match="not an osmseg cache"):
        _build(world)


def test_a_killed_builds_leftover_is_removed(world):
    leftover = world["root"] / ".c.x1y2.partial.hdf5"
    leftover.write_bytes(b"half a cache")
    other = world["root"] / ".other.x1y2.partial.hdf5"
    other.write_bytes(b"someone else's")
    messages = []
    _build(world, log=messages.append)
    assert not leftover.exists() and other.exists()
    assert "interrupted build" in messages[0]


def test_interrupted_build_leaves_no_file(world, monkeypatch):
    calls = {"n": 0}
    real = build.read_rgb

    def failing(path):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(build, "read_rgb", failing)
    with pytest.raises(KeyboardInterrupt):
        _build(world)
    assert calls["n"] >= 9
    assert list(world["root"].glob("*.hdf5")) == []
    assert list(world["root"].glob(".c.*")) == []


# --- the split and `prepare.py cache` -------------------------------------------------------


def test_split_is_disjoint_complete_and_reproducible():
    for n, size in [(10, 0.1), (10, 0.5), (101, 0.1), (7, 3), (2, 0.01)]:
        kept, held = cache.split_indices(n, size, seed=3)
        assert len(np.intersect1d(kept, held)) == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), np.arange(n))
        assert len(held) == (int(size) if size >= 1 else max(1, round(n * size)))
        again = cache.split_indices(n, size, seed=3)
        np.testing.assert_array_equal(held, again[1])
    assert not np.array_equal(cache.split_indices(100, 0.1, 1)[1], cache.split_indices(100, 0.1, 2)[1])
    assert len(cache.split_indices(5, 0, 0)[1]) == 0


@pytest.mark.parametrize("n, size", [(5, 5), (5, 2.5), (1, 0.1), (5, -1)])
def test_split_rejects_sizes_that_leave_nothing(n, size):
    with pytest.raises(UserError, match="test size"):
        cache.split_indices(n, size, 0)


def test_prepare_cache_holds_back_the_test_set(world, capsys):
    assert cli.run(prepare.main, _cache_argv(world)) == 0
    root = world["root"]
    test_lines = (root / "test-sample-filtered.txt").read_text().splitlines()
    assert test_lines[0].startswith("#source z x y")
    test_list = datafiles.read_tile_list(root / "test-sample-filtered.txt")
    assert test_list.made_by["command"] == "cache" and test_list.made_by["test_seed"] == 7
    held = {(tile.z, tile.x, tile.y) for tile in test_list.tiles}
    assert len(held) == 3
    with h5py.File(root / "training.hdf5", "r") as train, h5py.File(root / "testing.hdf5", "r") as test:
        trained = {tuple(t) for t in train["tiles"][:]}
        tested = {tuple(t) for t in test["tiles"][:]}
    assert len(trained) == 9 and tested == held and not trained & tested
    assert trained | tested == set(world["truth"])
    # Re-running changes nothing.
    stamps = [(root / name).stat().st_mtime_ns for name in ("training.hdf5", "testing.hdf5", "test-sample-filtered.txt")]
    assert cli.run(prepare.main, _cache_argv(world)) == 0
    assert stamps == [(root / name).stat().st_mtime_ns for name in ("training.hdf5", "testing.hdf5", "test-sample-filtered.txt")]
    assert capsys.readouterr().out.count("up to date") == 2


def test_prepare_cache_lists_tiles_without_images(world, capsys):
    tile = world["tiles"][4][1]
    os.remove(world["images"] / f"17-{tile.x}-{tile.y}.png")
    assert cli.run(prepare.main, _cache_argv(world)) == 0
    out = capsys.readouterr().out
    assert "11 of 12 tiles" in out and f"17-{tile.x}-{tile.y}" in out
    assert cache.open_cache(world["root"] / "training.hdf5").length == 8


@pytest.mark.parametrize(
    "edit, message",
    [
        ("no_sample", "run `make data/sample-filtered.txt`"),
        ("bad_line", ".txt:2: expected `source z x y`"),
        ("no_images", "need at least 2"),
        ("bad_classes", "already used by"),
        ("test_size", "leaves none to train on"),
        ("zero_test", "must be positive"),
        ("same_out", "--out and --test-out are both"),
        ("test_list_is_sample", "--sample and --test-list are both"),
    ],
)
def test_prepare_cache_bad_input_exits_2(world, capsys, edit, message):
    argv = _cache_argv(world)
    if edit == "no_sample":
        world["sample"].unlink()
    elif edit == "bad_line":
        world["sample"].write_text("#header\ndemo 17 x 3\n")
    elif edit == "no_images":
        argv[argv.index("--images") + 1] = str(world["root"] / "nowhere")
    elif edit == "bad_classes":
        world["classes"].write_text(CLASSES_TEXT.replace("#ffffff", "#ff0000"))
    elif edit == "test_size":
        argv[argv.index("--test-size") + 1] = "12"
    elif edit == "same_out":
        argv[argv.index("--test-out") + 1] = argv[argv.index("--out") + 1]
    elif edit == "test_list_is_sample":
        argv[argv.index("--test-list") + 1] = str(world["sample"])
    else:
        argv[argv.index("--test-size") + 1] = "0"
    assert cli.run(prepare.main, argv) == 2
    assert message in capsys.readouterr().err
    assert not (world["root"] / "training.hdf5").exists()


# --- readers -------------------------------------------------------------------------------


def test_open_cache_errors_name_the_fix(tmp_path, world):
    with pytest.raises(CacheError, match=r"run `make data/training.hdf5`"):
        cache.open_cache(tmp_path / "training.hdf5")
    with pytest.raises(CacheError, match=r"run `make data/testing.hdf5`"):
        cache.open_cache(tmp_path / "testing.hdf5")
    bad = tmp_path / "training.hdf5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CacheError, match="not an HDF5 file, or corrupt"):
        cache.open_cache(bad)
    _, out = _build(world)
    with h5py.File(out, "a") as file:
        file.attrs["schema_version"] = 99
    with pytest.raises(CacheError, match="schema version 99"):
        cache.open_cache(out)


def test_a_damaged_chunk_is_reported_as_a_cache_error(world):
    _, out = _build(world)
    with h5py.File(out, "r") as file:
        offset = file["images"].id.get_chunk_info(5).byte_offset
    with open(out, "r+b") as handle:  # overwrite the middle of tile 5's compressed bytes
        handle.seek(offset + 100)
        handle.write(b"\0" * 200)
    batches = cache.make_batches(out, [1, 5], 2, shuffle=False)
    with pytest.raises(CacheError, match=r"cannot read images row 5 .*delete it and build it again"):
        batches[0]
    with pytest.raises(CacheError, match=r"cannot read images row 5"):
        list(cache.iter_tiles(out))


def test_label_histogram_and_iter_tiles(world):
    _, out = _build(world)
    with h5py.File(out, "r") as file:
        labels = file["labels"][:]
    labels[0, :3, :3] = IGNORE
    with h5py.File(out, "a") as file:
        file["labels"][0] = labels[0]
    expected = np.bincount(labels[labels != IGNORE].ravel(), minlength=4)
    np.testing.assert_array_equal(cache.label_histogram(out), expected)
    subset = [7, 2, 2]
    np.testing.assert_array_equal(
        cache.label_histogram(out, subset), np.bincount(labels[subset].ravel(), minlength=256)[:4]
    )
    seen = []
    with h5py.File(out, "r") as file:
        all_images = file["images"][:]
    for indices, images, batch_labels in cache.iter_tiles(out, [5, 1, 9, 0, 3], batch_size=2):
        assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(images, all_images[indices])
        np.testing.assert_array_equal(batch_labels, labels[indices])
        seen.extend(indices.tolist())
    assert seen == [5, 1, 9, 0, 3]


def test_batches_shapes_dtypes_and_weights(world):
    _, out = _build(world)
    with h5py.File(out, "a") as file:
        labels = file["labels"][0]
        labels[:2] = IGNORE
        file["labels"][0] = labels
    weights = [0.5, 1.0, 2.0, 4.0]
    batches = cache.make_batches(out, np.arange(12), 5, shuffle=False, class_weights=weights)
    assert len(batches) == 3
    images, targets, sample_weight = batches[0]
    assert images.dtype == np.float32 and images.shape == (5, SIZE, SIZE, 3)
    assert targets.dtype == np.int32 and targets.shape == (5, SIZE, SIZE)
    assert sample_weight.dtype == np.float32 and sample_weight.shape == (5, SIZE, SIZE)
    assert images.max() > 1  # 0..255, not rescaled
    assert (targets[0, :2] == 0).all() and (sample_weight[0, :2] == 0).all()
    np.testing.assert_array_equal(sample_weight[0, 2:], np.take(weights, targets[0, 2:]))
    assert batches[-1][0].shape[0] == 2
    with pytest.raises(IndexError):
        batches[3]


def test_batches_shuffle_per_epoch_reproducibly_and_cover_every_tile(world):
    _, out = _build(world)
    indices = np.arange(1, 12)

    def epoch_order(reader):
        return np.concatenate([reader.order()[b * 4 : (b + 1) * 4] for b in range(len(reader))])

    first = cache.make_batches(out, indices, 4, seed=5)
    second = cache.make_batches(out, indices, 4, seed=5)
    epoch0 = epoch_order(first)
    assert sorted(epoch0) == list(indices)
    np.testing.assert_array_equal(epoch0, epoch_order(second))
    first.on_epoch_begin()  # as fit does: the first begin keeps epoch 0, the next one moves on
    np.testing.assert_array_equal(epoch0, epoch_order(first))
    first.on_epoch_end()
    first.on_epoch_begin()
    epoch1 = epoch_order(first)
    assert sorted(epoch1) == list(indices) and not np.array_equal(epoch0, epoch1)
    second.set_epoch(1)
    for b in range(len(first)):
        for a, c in zip(first[b], second[b]):
            np.testing.assert_array_equal(a, c)


def test_augmentation_moves_image_and_label_together(world, tmp_path):
    """Labels that encode the image (label = red channel mod 4) must still do after augmenting."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
    labels = (images[..., 0] % 4).astype(np.uint8)
    out = tmp_path / "aug.hdf5"
    with h5py.File(out, "w") as file:
        writer = build.Writer(file, SIZE)
        for image, label in zip(images, labels):
            writer.append(schema.compress_tile(image, label), (-1, -1, -1), "x")
        writer.close()
        schema.write_attrs(file, CLASSES, SIZE, {})
    batches = cache.make_batches(out, None, 6, shuffle=False, augment=True, seed=2)
    changed = 0
    for epoch in range(3):
        batches.set_epoch(epoch)
        x, y, _ = batches[0]
        np.testing.assert_array_equal(y, x[..., 0].astype(np.int32) % 4)
        changed += sum(not np.array_equal(x[i], images[i]) for i in range(6))
        # Every augmented tile is one of the 8 symmetries of the original.
        for i in range(6):
            variants = [np.rot90(v, k) for v in (images[i], images[i][::-1]) for k in range(4)]
            assert any(np.array_equal(x[i], v) for v in variants)
    assert changed >= 12  # 7 of the 8 symmetries change a random tile


def test_batches_pickle_without_the_open_file(world):
    _, out = _build(world)
    batches = cache.make_batches(out, None, 4, workers=2, use_multiprocessing=True)
    first = batches[0]
    clone = pickle.loads(pickle.dumps(batches))
    assert type(clone).__name__ == "CacheBatches" and clone.workers == 2
    for a, b in zip(first, clone[0]):
        np.testing.assert_array_equal(a, b)


def test_importing_the_module_does_not_import_keras():
    code = "import sys, osmseg.cache, osmseg.commands.cache; print('keras' in sys.modules or 'tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- `prepare.py import` ----------------------------------------------------------------------


@pytest.fixture
def pairs(tmp_path):
    """Two odd-sized image/mask pairs (one mask a palette PNG) and one unpaired image."""
    rng = np.random.default_rng(4)
    images_dir, masks_dir = tmp_path / "img", tmp_path / "msk"
    images_dir.mkdir()
    masks_dir.mkdir()
    truth = {}
    for stem, (height, width) in {"alpha": (50, 70), "beta": (32, 40)}.items():
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        labels = rng.integers(0, 4, (height, width), dtype=np.uint8)
        _write_png(images_dir / f"{stem}.png", image)
        truth[stem] = (image, labels)
    # alpha's mask: an RGB PNG with 6 pixels of a colour no class lists.
    rgb = _label_rgb(truth["alpha"][1])
    rgb[0, :6] = (9, 9, 9)
    truth["alpha"][1][0, :6] = IGNORE
    _write_png(masks_dir / "alpha.png", rgb)
    # beta's mask: a palette ("P" mode) PNG whose palette order differs from the classes'.
    palette_order = [2, 0, 3, 1]
    indexed = np.argsort(palette_order)[truth["beta"][1]].astype(np.uint8)
    mask = Image.fromarray(indexed, mode="P")
    mask.putpalette(np.concatenate([CLASSES.palette[i] for i in palette_order]).tolist())
    mask.save(masks_dir / "beta.png")
    _write_png(images_dir / "lonely.png", np.zeros((8, 8, 3), np.uint8))
    classes_file = tmp_path / "classes.json"
    classes_file.write_text(CLASSES_TEXT)
    return {"root": tmp_path, "images": images_dir, "masks": masks_dir, "truth": truth, "classes": classes_file}


def _import_argv(pairs, *extra):
    return ["import", str(pairs["images"]), str(pairs["masks"]), "--classes", str(pairs["classes"]),
            "--out", str(pairs["root"] / "training.hdf5"), "--tile-size", str(SIZE), *extra]


def _reassemble(file, stem, shape, stride):
    """Stitch a stem's tiles back in row-major order (no overlap: stride == SIZE)."""
    rows = [i for i, s in enumerate(file["sources"][:]) if s.decode() == stem]
    tops = imports.tile_origins(shape[0], SIZE, stride)
    lefts = imports.tile_origins(shape[1], SIZE, stride)
    image = np.zeros((len(tops) * SIZE, len(lefts) * SIZE, 3), np.uint8)
    labels = np.zeros(image.shape[:2], np.uint8)
    for row, (top, left) in zip(rows, [(t, le) for t in tops for le in lefts]):
        image[top : top + SIZE, left : left + SIZE] = file["images"][row]
        labels[top : top + SIZE, left : left + SIZE] = file["labels"][row]
    return image, labels, len(rows)


def test_import_cuts_pads_and_reads_palette_masks(pairs, capsys):
    assert cli.run(prepare.main, _import_argv(pairs)) == 0
    out = capsys.readouterr().out
    assert "lonely.png" in out and "image without a mask" in out
    assert "6 pixels have colours no class lists" in out and "#090909" in out
    with h5py.File(pairs["root"] / "training.hdf5", "r") as file:
        assert (file["tiles"][:] == -1).all()
        for stem, (image, labels) in pairs["truth"].items():
            height, width = labels.shape
            stitched, stitched_labels, count = _reassemble(file, stem, labels.shape, SIZE)
            assert count == (2 * 3 if stem == "alpha" else 1 * 2)
            np.testing.assert_array_equal(stitched[:height, :width], image)
            np.testing.assert_array_equal(stitched_labels[:height, :width], labels)
            assert (stitched[height:] == 0).all() and (stitched[:, width:] == 0).all()
            assert (stitched_labels[height:] == IGNORE).all() and (stitched_labels[:, width:] == IGNORE).all()
    assert cache.open_cache(pairs["root"] / "training.hdf5").params["command"] == "import"


def test_import_with_stride_and_test_size(pairs):
    argv = _import_argv(pairs, "--stride", "16", "--test-size", "1", "--seed", "1")
    assert cli.run(prepare.main, argv) == 0
    train = cache.open_cache(pairs["root"] / "training.hdf5")
    test = cache.open_cache(pairs["root"] / "testing.hdf5")
    with h5py.File(train.path, "r") as a, h5py.File(test.path, "r") as b:
        train_stems = {s.decode() for s in a["sources"][:]}
        test_stems = {s.decode() for s in b["sources"][:]}
    assert len(test_stems) == 1 and not train_stems & test_stems
    # alpha 50x70: origins 0,16,32 down and 0,16,32,48 across; beta 32x40: 0 down, 0,16 across
    expected = {"alpha": 3 * 4, "beta": 1 * 2}
    assert train.length + test.length == sum(expected.values())
    assert test.length == expected[test_stems.pop()]
    assert import_masks.testing_path_for(pairs["root"] / "mine.hdf5").name == "mine-test.hdf5"


def test_import_skips_16_bit_images_rather_than_darken_them(pairs, capsys):
    deep = (np.arange(32 * 40 * 3).reshape(32, 40, 3) % 4096).astype(np.uint16)  # 12-bit values
    assert cv2.imwrite(str(pairs["images"] / "beta.png"), deep)
    assert cli.run(prepare.main, _import_argv(pairs)) == 0
    out = capsys.readouterr().out
    assert "image has uint16 samples, not 8-bit" in out and "beta.png" in out
    assert cache.open_cache(pairs["root"] / "training.hdf5").length == 6


def test_import_size_mismatch_is_skipped(pairs, capsys):
    _write_png(pairs["masks"] / "beta.png", np.zeros((10, 10, 3), np.uint8))
    assert cli.run(prepare.main, _import_argv(pairs)) == 0
    out = capsys.readouterr().out
    assert "sizes differ" in out and "beta (image 40x32, mask 10x10)" in out
    assert cache.open_cache(pairs["root"] / "training.hdf5").length == 6


@pytest.mark.parametrize(
    "edit, message",
    [
        ("no_pairs", "no image in"),
        ("no_folder", "no such folder of masks"),
        ("stride", "--stride 64"),
        ("classes", "is not of the form #rrggbb"),
        ("one_image_test", "leaves none to train on"),
        ("all_corrupt", "no image/mask pair could be imported"),
    ],
)
def test_import_bad_input_exits_2(pairs, capsys, edit, message):
    argv = _import_argv(pairs)
    if edit == "no_pairs":
        for path in pairs["masks"].iterdir():
            path.rename(path.with_name("other-" + path.name))
    elif edit == "no_folder":
        argv[2] = str(pairs["root"] / "nowhere")
    elif edit == "stride":
        argv += ["--stride", "64"]
    elif edit == "classes":
        pairs["classes"].write_text('[{"name": "water", "color": "blue"}]')
    elif edit == "one_image_test":
        (pairs["images"] / "beta.png").unlink()
        argv += ["--test-size", "0.5"]
    else:
        for path in pairs["masks"].iterdir():
            path.write_bytes(b"garbage")
    assert cli.run(prepare.main, argv) == 2
    assert message in capsys.readouterr().err
    assert not (pairs["root"] / "training.hdf5").exists()


def test_fit_with_worker_processes(world):
    """Keras fit reads batches in two forked workers after the parent opened the file itself,
    and epoch e of fit uses the order of epoch e."""
    keras = pytest.importorskip("keras")
    _, out = _build(world)
    batches = cache.make_batches(out, None, 4, augment=True, workers=2, use_multiprocessing=True, max_queue_size=2)
    batches[0]  # the parent now holds an open handle that the forked workers must not use
    batches.set_epoch(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    outputs = keras.layers.Conv2D(CLASSES.num_classes, 1, activation="softmax")(keras.layers.Rescaling(1 / 255)(inputs))
    net = keras.Model(inputs, outputs)
    net.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    seen = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(batches.epoch))
    history = net.fit(batches, epochs=2, shuffle=False, verbose=0, callbacks=[record])
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    assert seen == [0] * 3 + [1] * 3


def test_worker_threads_do_not_change_the_file(world):
    _, one = _build(world, out=world["root"] / "one.hdf5", workers=1)
    _, four = _build(world, out=world["root"] / "four.hdf5", workers=4)
    with h5py.File(one, "r") as a, h5py.File(four, "r") as b:
        for name in ("images", "labels", "tiles", "sources"):
            np.testing.assert_array_equal(a[name][:], b[name][:])


def test_reads_caches_written_by_other_tools(tmp_path):
    """Uncompressed, several tiles per chunk: the readers fall back to h5py's own reads."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (5, SIZE, SIZE), dtype=np.uint8)
    out = tmp_path / "other.hdf5"
    with h5py.File(out, "w") as file:
        file.create_dataset("images", data=images, chunks=(2, SIZE, SIZE, 3))
        file.create_dataset("labels", data=labels)
        file["tiles"] = np.full((5, 3), -1, np.int32)
        file["sources"] = np.array(["x"] * 5, dtype=h5py.string_dtype())
        file.attrs.update(classes=CLASSES.to_json(), tile_size=SIZE, schema_version=1)
    x, y, _ = cache.make_batches(out, [4, 0, 2], 3, shuffle=False)[0]
    np.testing.assert_array_equal(x, images[[4, 0, 2]].astype(np.float32))
    np.testing.assert_array_equal(y, labels[[4, 0, 2]])
    _, read_images, _ = next(cache.iter_tiles(out, [3, 1]))
    np.testing.assert_array_equal(read_images, images[[3, 1]])
    np.testing.assert_array_equal(cache.label_histogram(out), np.bincount(labels.ravel(), minlength=4))


@given(length=st.integers(1, 2000), tile_size=st.integers(1, 300), data=st.data())
def test_tile_origins_cover_every_pixel_without_empty_tiles(length, tile_size, data):
    stride = data.draw(st.integers(1, tile_size))
    origins = imports.tile_origins(length, tile_size, stride)
    assert origins[0] == 0 and all(b - a == stride for a, b in itertools.pairwise(origins))
    assert origins[-1] + tile_size >= length  # the last tile reaches the edge
    assert origins[-1] < length  # and holds at least one real pixel
    assert len(origins) == 1 or origins[-2] + tile_size < length  # no tile more than needed


def test_batches_reject_bad_arguments(world):
    _, out = _build(world)
    with pytest.raises(UserError, match="expected 4 values"):
        cache.make_batches(out, None, 4, class_weights=[1.0, 2.0])
    with pytest.raises(UserError, match="batch size 0"):
        cache.make_batches(out, None, 0)
    with pytest.raises(IndexError, match="0..11"):
        cache.make_batches(out, [3, 12], 4)


def test_raw_chunk_reads_from_many_threads_match_serial_reads(tmp_path):
    # h5py 3.14's read_direct_chunk takes no lock of its own: unguarded, four threads
    # reading one handle failed within a few hundred reads here (and once freed memory twice).
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "rows.hdf5", "w") as file:
        file.create_dataset("rows", data=data, chunks=(1, 32, 32, 3), compression="gzip")
    with h5py.File(tmp_path / "rows.hdf5", "r") as file:
        rows = file["rows"]
        assert schema.inflatable(rows)
        draws = [rng.permutation(48)[:6] for _ in range(800)]

        def read(indices):
            return schema.read_rows(rows, indices, inflate=True)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(read, draws))
    for indices, result in zip(draws, results):
        np.testing.assert_array_equal(result, data[indices])


def test_reader_threads_share_one_handle_and_agree_with_serial_reads(world):
    from concurrent.futures import ThreadPoolExecutor

    _, out = _build(world)
    serial = cache.BatchReader(out, None, 2, augment=True, seed=4)
    threaded = cache.BatchReader(out, None, 2, augment=True, seed=4)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(threaded.__getitem__, range(len(threaded))))
    for batch, result in enumerate(results):
        for a, b in zip(serial[batch], result):
            np.testing.assert_array_equal(a, b)
    assert threaded._file is not None and threaded._file.id.valid
