"""The one exception family weightsmith raises for bad input or a failed write.

The CLI turns any :class:`WeightsmithError` into a one-line ``error: ...`` message and a
non-zero exit code; anything else is a bug and shows a traceback with ``--debug``.
"""


class WeightsmithError(Exception):
    """A user-facing error: the message says what went wrong and where, in one line."""


class CheckpointError(WeightsmithError):
    """An input checkpoint is missing, corrupt, unsafe or inconsistent."""


class OutputError(WeightsmithError):
    """The output cannot be written (exists, overlaps the input, disk full, ...)."""


class ConfigError(WeightsmithError):
    """Options or a recipe are invalid."""
