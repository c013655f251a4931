"""Helpers shared by the command-line scripts: argument parsing, exit codes, atomic output."""

from __future__ import annotations

import argparse
import contextlib
import os
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
