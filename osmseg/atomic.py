"""Atomic file writes: a temporary name beside the target, renamed onto it only when complete.

An interrupted or failed write never leaves a file that looks complete, and never clobbers
a previous complete file with a partial one. Temporary names start with a dot and contain
``.partial`` (``.<stem>.XXXX.partial<suffix>``), so a stage that finds them after a kill
knows they are leftovers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


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
            os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_mode() -> int:
    """The mode a newly created file gets under this process's umask (usually 0o644).

    Temporary files are created 0o600 (tempfile.mkstemp); atomic_path gives the finished
    file this mode instead, as a plain open() would.
    """
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
