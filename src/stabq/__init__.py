"""stabq: stable discrete bottlenecks for classifiers.

FSQ, a repaired VQ, residual VQ, Gumbel-Softmax, product quantization,
SimVQ, residual FSQ and lookup-free (LFQ, BSQ) quantization behind one
interface (``q, indices, loss = quantizer(x)``), with codebook health metrics.
See README.md and DESIGN.md.
"""

from stabq.compare import compare
from stabq.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ModelFileError,
    ShapeError,
    StabqError,
    TrainingError,
    UntrustedEncoderError,
)
from stabq.metrics import CodebookUsage
from stabq.model import BottleneckClassifier
from stabq.monitor import Alert, CollapseMonitor, CollapseWarning
from stabq.quantizers import (
    FSQ,
    LFQ,
    GumbelQuantizer,
    Identity,
    ProductQuantizer,
    Quantizer,
    QuantizerOutput,
    ResidualFSQ,
    ResidualVQ,
    SimVQ,
    VectorQuantizer,
    build_quantizer,
    preset_names,
    recommended_levels,
)
from stabq.saving import load, save_model
from stabq.swap import SwapReport, swap_quantizers
from stabq.training import StabilityGuard, TrainConfig, TrainResult, train

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``stabq.DiscreteBottleneckClassifier`` is imported on first use: its module imports
    scikit-learn, which took 2 of the 3.7 s that ``import stabq`` took, and the CLI and
    the trainer never need it."""
    if name == "DiscreteBottleneckClassifier":
        from stabq.estimator import DiscreteBottleneckClassifier

        return DiscreteBottleneckClassifier
    raise AttributeError(f"module 'stabq' has no attribute {name!r}")


__all__ = [
    "FSQ",
    "LFQ",
    "Alert",
    "BottleneckClassifier",
    "CheckpointError",
    "CodebookUsage",
    "CollapseMonitor",
    "CollapseWarning",
    "ConfigError",
    "DataError",
    "DiscreteBottleneckClassifier",
    "GumbelQuantizer",
    "Identity",
    "ModelFileError",
    "ProductQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "ResidualFSQ",
    "ResidualVQ",
    "ShapeError",
    "SimVQ",
    "StabilityGuard",
    "StabqError",
    "SwapReport",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "UntrustedEncoderError",
    "VectorQuantizer",
    "__version__",
    "build_quantizer",
    "compare",
    "load",
    "preset_names",
    "recommended_levels",
    "save_model",
    "swap_quantizers",
    "train",
]
