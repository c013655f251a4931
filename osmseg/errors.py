"""The project's exceptions: what a user can cause, and what they should do about it."""


class UserError(Exception):
    """Bad input the user can fix.

    The message names the thing that is wrong and the fix. Command-line entry points
    turn it into one line on stderr and exit status 2 (see osmseg.cli.run).
    """


class ClassesError(UserError):
    """A classes file that cannot be used (not JSON, missing keys, clashing colours...)."""


class BBoxError(UserError):
    """A bounding box that is malformed, inverted, out of range or empty."""


class SourceError(UserError):
    """An OSM or imagery source that cannot be read or reached."""


class CacheError(UserError):
    """A training cache that is missing, corrupt, or made from other inputs."""


class WeightsError(UserError):
    """A weights file that is missing, corrupt, or made for another model."""
