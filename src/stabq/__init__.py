"""stabq: stable discrete bottlenecks for classifiers.

FSQ, a repaired VQ, residual VQ, Gumbel-Softmax and product quantization
behind one interface (``q, indices, loss = quantizer(x)``), with codebook
health metrics. See README.md and DESIGN.md.
"""

from stabq.errors import ConfigError, ShapeError, StabqError
from stabq.metrics import CodebookUsage
from stabq.quantizers import (
    FSQ,
    GumbelQuantizer,
    Identity,
    ProductQuantizer,
    Quantizer,
    QuantizerOutput,
    ResidualVQ,
    VectorQuantizer,
    build_quantizer,
    preset_names,
    recommended_levels,
)

__version__ = "0.1.0"

__all__ = [
    "FSQ",
    "CodebookUsage",
    "ConfigError",
    "GumbelQuantizer",
    "Identity",
    "ProductQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "ResidualVQ",
    "ShapeError",
    "StabqError",
    "VectorQuantizer",
    "__version__",
    "build_quantizer",
    "preset_names",
    "recommended_levels",
]
