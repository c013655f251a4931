"""Atomic file writes: a temporary name beside the target, renamed onto it only when complete.

An interrupted or failed write never leaves a file that looks complete, and never clobbers
a previous complete file with a partial one. Temporary names start with a dot and contain
``.partial`` (``.<stem>.XXXX.partial<suffix>``), so a stage that finds them after a kill
knows they are leftovers. `locked` lets processes (shards, on one host or several) update a
shared file in turn.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
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


_UNLOCKABLE = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_warned_unlocked: set[str] = set()


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created empty if need be) while the block runs.

    For processes that update one file in turn, possibly from other hosts: shards of a stage
    writing into one folder on a shared filesystem. POSIX record locks (fcntl.lockf) rather
    than flock, because NFS clients pass them to the server's lock manager (NFSv3's NLM, NFSv4
    itself) and so they hold across hosts; the lock file is never replaced, so every process
    locks the same inode. On a filesystem without locks (some Lustre or FUSE mounts) the
    block runs unlocked, with one warning on stderr.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in _UNLOCKABLE:
                raise
            if str(path) not in _warned_unlocked:
                _warned_unlocked.add(str(path))
                print(f"warning: {path}: this filesystem takes no locks ({error.strerror}); "
                      "processes writing here at once may lose each other's updates", file=sys.stderr)
            yield
            return
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)
