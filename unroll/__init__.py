"""unroll: compile ReLU classifiers into tied decoders that give every class's heatmap in one pass."""
from .compiler import Unrolled, UnrolledOutput, compile
from .errors import UnsupportedModelError
from .verify import verify
from . import attribution  # noqa: E402  (cam, saliency, ixg and their aggregations)

__all__ = ["compile", "verify", "Unrolled", "UnrolledOutput", "UnsupportedModelError"]
__version__ = "0.1.0"
