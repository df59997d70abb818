"""Exceptions that the CLI turns into a one-line message and a non-zero exit."""


class FluxJaxError(Exception):
    """Base class: an error caused by user input (a file, a config), not a bug."""


class CheckpointError(FluxJaxError):
    """A checkpoint file or directory cannot be read, or does not hold the expected tensors."""
