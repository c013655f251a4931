"""The project's exceptions: what a user can cause, and what they should do about it."""

from pathlib import Path

from osmseg.tiles import BBoxError, TileError, ZoomError


class UserError(Exception):
    """Bad input the user can fix.

    The message names the thing that is wrong and the fix. Command-line entry points
    turn it into one line on stderr and exit status 2 (see osmseg.cli.run).
    """


class ClassesError(UserError):
    """A classes file that cannot be used (not JSON, missing keys, clashing colours...)."""


class SourceError(UserError):
    """An OSM or imagery source that cannot be read or reached."""


class CacheError(UserError):
    """A training cache that is missing, corrupt, or made from other inputs."""


class WeightsError(UserError):
    """A weights file that is missing, corrupt, or made for another model."""


def read_user_file(path, what: str, missing_fix: str, error: type[UserError] = UserError) -> str:
    """The text of a file the user named, or `error` saying which file and what to do.

    Args:
        path: the file.
        what: what it is, for the message ("tile list", "classes file").
        missing_fix: what to do when it does not exist ("make it first (make data/sample.txt)").
        error: the UserError subclass to raise.
    """
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise error(f"{path}: no such {what}; {missing_fix}") from None
    except (OSError, UnicodeDecodeError) as exception:
        raise error(f"{path}: cannot read the {what} ({exception})") from None


# Everything the command-line boundary (osmseg.cli.run) turns into one line and exit status 2:
# our own errors, and those of osmseg.tiles, which imports no module of ours.
USER_ERRORS = (UserError, TileError)

__all__ = [
    "USER_ERRORS",
    "BBoxError",
    "CacheError",
    "ClassesError",
    "SourceError",
    "TileError",
    "UserError",
    "WeightsError",
    "ZoomError",
    "read_user_file",
]
