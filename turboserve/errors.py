"""Errors a user can act on. Each carries a one-line message; the CLI prints it without a traceback
and the server maps the class to a status code."""


class TurboServeError(Exception):
    """Base class: a problem with the user's model or input, not a bug in turboserve."""


class ModelLoadError(TurboServeError):
    """The model directory is missing, unreadable or incomplete."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture is not one turboserve implements."""


class InvalidInputError(TurboServeError):
    """An input is of the wrong type, empty, or out of range."""


class InputTooLongError(InvalidInputError):
    """An input has more tokens than the model accepts and truncation was not asked for."""
