"""unroll: compile ReLU classifiers into tied decoders that give every class's heatmap in one pass."""
from .compiler import StaleModelError, Unrolled, UnrolledOutput, compile
from .errors import UnsupportedModelError
from .tracing import InputShapeError, NeedsExampleError
from .verify import verify
from . import attribution  # noqa: E402  (cam, saliency, ixg and their aggregations)
from . import rulesets  # noqa: E402  (RuleSet values and presets: LRP0, epsilon(eps), WS_AE, TRAIN_BN)

__all__ = ["compile", "verify", "rulesets", "Unrolled", "UnrolledOutput", "UnsupportedModelError", "StaleModelError",
           "NeedsExampleError", "InputShapeError"]
__version__ = "0.1.0"
