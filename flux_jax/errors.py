"""Exceptions that the CLI turns into a one-line message and exit code 2: errors caused by user input, not bugs.

One class per kind of input, defined here once, so that every layer raises (and a caller catches) the same type.
"""


class FluxJaxError(Exception):
    """Base class: an error caused by user input (a file, a config), not a bug."""


class CheckpointError(FluxJaxError):
    """A checkpoint file or directory cannot be read, or does not hold the expected tensors."""


class ConfigError(FluxJaxError):
    """A config file or override is invalid; ``key`` is the dotted key at fault, when known."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class DataError(FluxJaxError):
    """A dataset cannot be used: missing or inconsistent files, nothing usable, bad inputs under ``strict``, or an
    iterator state that belongs to other data."""
