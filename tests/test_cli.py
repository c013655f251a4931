"""The CLI helpers: exit status 2 for user errors, prepare.py's commands, a quiet Keras import."""

import os

import pytest

import prepare
from osmseg import cli
from osmseg.errors import UserError


def test_user_error_is_one_line_and_status_2(capsys):
    def main(argv):
        raise UserError("thing.json: broken; fix it")

    assert cli.run(main, []) == 2
    assert capsys.readouterr().err == "error: thing.json: broken; fix it\n"


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


def test_tensorflow_chatter_is_recognised(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    chatter = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1795307708.376888    8933 port.cc:153] oneDNN custom operations are on.",
        "W0000 00:00:1795307708.377327    8933 cudart_stub.cc:31] Could not find cuda drivers",
        "E0000 00:00:1795307711.849143    8933 cuda_platform.cc:52] failed call to cuInit: INTERNAL: (303)",
    ]
    kept = [
        "E0000 00:00:1795307711.849143    8933 some_op.cc:12] out of memory allocating a tensor",
        "F0000 00:00:1795307711.849143    8933 check.cc:1] Check failed",
        "/usr/lib/python3/site-packages/keras/x.py:3: UserWarning: something a user should see",
    ]
    assert [line for line in chatter + kept if not cli._chatter(line)] == kept
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # asked for everything: INFO lines stay
    assert not cli._chatter(chatter[1])


def test_keras_imports_without_start_up_chatter():
    import subprocess
    import sys

    code = "import sys; from osmseg import cli; cli.import_keras(); print('after', file=sys.stderr)"
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stderr == "after\n", done.stderr
