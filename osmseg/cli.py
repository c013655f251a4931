"""Helpers shared by the command-line scripts: argument parsing, exit codes, atomic output."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from osmseg.errors import UserError

EXIT_USAGE = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults in --help and keeps the description's line breaks."""


def parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser that shows every default in --help."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call a script's main and turn a UserError into one line on stderr and status 2.

    Args:
        main: the script's main(argv) function.
        argv: arguments without the program name (None: sys.argv[1:]).

    Returns:
        The process exit status.
    """
    try:
        status = main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; re-run to resume", file=sys.stderr)
        return 130
    return int(status or 0)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    An interrupted or failed write never leaves a file at `path` that looks complete,
    and never clobbers a previous complete file with a partial one.

    Args:
        path: the final file name.
        suffix: the temporary file's suffix (default: the final one's, so that libraries
            that choose a format by extension still do so).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file owner-only; give it the mode a plain open() would.
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# TensorFlow's start-up lines that say nothing to a user: absl's notice that it logs before
# being set up, and INFO/WARNING lines, which TF_CPP_MIN_LOG_LEVEL=2 means to hide but does
# not reach in TensorFlow 2.21 (oneDNN notices, "Could not find cuda drivers"); and the
# ERROR line every machine without an NVIDIA driver gets, "failed call to cuInit".
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ \S+\] (.*)$")
_HARMLESS_ERRORS = ("failed call to cuInit",)


def _chatter(line: str) -> bool:
    if line.startswith("WARNING: All log messages before absl::InitializeLog() is called"):
        return True
    match = _ABSL_LINE.match(line)
    if match is None:
        return False
    severity, message = match.groups()
    level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") or 0)
    hidden = {"I": 1, "W": 2}.get(severity)
    return (hidden is not None and level >= hidden) or any(text in message for text in _HARMLESS_ERRORS)


def import_keras():
    """Import Keras (and its backend) without TensorFlow's start-up chatter; return keras.

    Everything written to stderr (file descriptor 2, where TensorFlow's C++ logs go) during
    the import and the backend's device discovery is held back, then written out again
    without the lines _chatter recognises: any other warning or error still shows. Honours
    TF_CPP_MIN_LOG_LEVEL (default here 2: errors only).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "keras" in sys.modules:
        import keras

        return keras
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no standard error to hold back
        import keras

        return keras
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import keras

            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                tf.config.list_physical_devices()  # where "failed call to cuInit" is logged
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines()
    kept = [line for line in lines if not _chatter(line)]
    if kept:
        print("\n".join(kept), file=sys.stderr)
    return keras
