"""Atomic writes: a temporary name beside the target, renamed only when the write completes."""

import os
import stat

import pytest

from osmseg import atomic


def test_atomic_path_renames_only_on_success(tmp_path):
    target = tmp_path / "out" / "file.txt"
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with atomic.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".txt"
        assert tmp.name.startswith(".file.") and ".partial" in tmp.name
        tmp.write_text("whole")
    assert target.read_text() == "whole"


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "counts.json"
    atomic.write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("new but broken")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["counts.json"]


def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_text_atomic(tmp_path / "a.txt", "x")
        atomic.write_bytes_atomic(tmp_path / "b.bin", b"x")
        assert atomic.file_mode() == 0o644
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o644
    assert (tmp_path / "b.bin").read_bytes() == b"x"
