"""turboserve: padding-free transformer inference serving."""
from .encoder import Encoder
from .errors import (InputTooLongError, InvalidInputError, ModelLoadError, TurboServeError,
                     UnsupportedArchitectureError)

__all__ = ["Encoder", "TurboServeError", "ModelLoadError", "UnsupportedArchitectureError",
           "InvalidInputError", "InputTooLongError"]
__version__ = "0.1.0"
