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


class PickleRefusedError(CheckpointError):
    """A pickle (``.bin``) checkpoint was given without permission to load pickles.

    The CLI words the remedy for the command at hand (:meth:`with_remedy`); the default text
    is for Python callers.
    """

    def __init__(self, path: object) -> None:
        self.path = path
        super().__init__(
            self.with_remedy("pass allow_pickle=True to load it with torch.load(weights_only=True)")
        )

    def with_remedy(self, remedy: str) -> str:
        return (
            f"{self.path}: is a pickle (.bin) checkpoint; pickle can run code on load, so it "
            f"is refused by default: {remedy}"
        )
