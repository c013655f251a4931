"""The CLI helpers: exit status 2 for user errors, atomic writes that leave nothing half-done."""

import os
import stat

import pytest

import prepare
from osmseg import cli
from osmseg.errors import UserError


def test_user_error_is_one_line_and_status_2(capsys):
    def main(argv):
        raise UserError("thing.json: broken; fix it")

    assert cli.run(main, []) == 2
    assert capsys.readouterr().err == "error: thing.json: broken; fix it\n"


def test_atomic_path_renames_only_on_success(tmp_path):
    target = tmp_path / "out" / "file.txt"
    with pytest.raises(RuntimeError):
        with cli.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with cli.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".txt"
        tmp.write_text("whole")
    assert target.read_text() == "whole"


def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        cli.write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


def test_prepare_lists_commands_and_rejects_unknown_ones(capsys):
    assert prepare.main(["--help"]) == 0
    assert "demo-world" in capsys.readouterr().out
    assert prepare.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_every_prepare_command_has_help(capsys):
    for name in prepare.COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            prepare.main([name, "--help"])
        assert exit_.value.code == 0, name
        assert "show this help message" in capsys.readouterr().out
