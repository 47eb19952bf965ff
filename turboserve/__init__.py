"""turboserve: padding-free transformer inference serving."""
from .encoder import Encoder
from .errors import (InputTooLongError, InvalidInputError, ModelLoadError, TurboServeError,
                     UnsupportedArchitectureError)
from .llm import LLM
from .sampling import SamplingParams

__all__ = ["Encoder", "LLM", "SamplingParams", "TurboServeError", "ModelLoadError", "UnsupportedArchitectureError",
           "InvalidInputError", "InputTooLongError"]
__version__ = "0.1.0"
