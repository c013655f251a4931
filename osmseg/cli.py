"""Helpers shared by the command-line scripts: argument parsing, exit codes, a quiet Keras import."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from typing import Callable, Sequence

from osmseg.errors import USER_ERRORS

EXIT_USAGE = 2


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
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; re-run to resume", file=sys.stderr)
        return 130
    return int(status or 0)


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
