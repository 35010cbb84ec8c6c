"""unroll: compile ReLU classifiers into tied decoders that give every class's heatmap in one pass."""
from .compiler import Unrolled, UnrolledOutput, compile
from .errors import UnsupportedModelError
from .verify import verify

__all__ = ["compile", "verify", "Unrolled", "UnrolledOutput", "UnsupportedModelError"]
__version__ = "0.1.0"
