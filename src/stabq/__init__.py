"""stabq: stable discrete bottlenecks for classifiers.

One interface for FSQ, a repaired VQ, residual VQ, Gumbel-Softmax, product quantization,
SimVQ, residual FSQ and lookup-free quantization (LFQ, BSQ): ``build_quantizer(preset,
dim)`` gives a module whose forward returns ``quantized, indices, loss``. Around it:
``BottleneckClassifier`` (a classifier with a discrete bottleneck), ``train`` with its
``TrainConfig`` and ``StabilityGuard``, the codebook health of ``CodebookUsage`` and
``CollapseMonitor``, ``compare`` (every method on your data), ``save_model`` and
``load``, ``swap_quantizers`` (stabq presets in a vector-quantize-pytorch model),
``stabq.estimator.DiscreteBottleneckClassifier`` (scikit-learn), the Lightning callbacks
and TensorBoard writer of ``stabq.integrations``, and the ``stabq`` command. Every error
raised on purpose is a ``StabqError``.

The documentation (guides, the API reference built from these docstrings, the command
line, the benchmarks) is the site that ``make docs`` builds from the repository's
``docs`` folder into ``site``; ``help(stabq.build_quantizer)`` shows the same docstrings.

The package is grouped by idea: ``stabq.quantizers``, ``stabq.data``, ``stabq.model``,
``stabq.health``, ``stabq.training``, ``stabq.compare``, ``stabq.integrations`` and
``stabq.cli``. The module paths of earlier versions (``stabq.rows``, ``stabq.metrics``,
``stabq.saving``, ...) stay importable: each is the module it became, not a copy, so
an import or a monkeypatch through the old path reaches the code that runs.
"""

import importlib as _importlib
import sys as _sys

from stabq._version import __version__
from stabq.compare.run import compare
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
from stabq.health.monitor import Alert, CollapseMonitor, CollapseWarning
from stabq.health.usage import CodebookUsage
from stabq.model.classifier import BottleneckClassifier
from stabq.model.export import export
from stabq.model.saving import load, save_model
from stabq.model.swap import SwapReport, swap_quantizers
from stabq.quantizers import (
    FSP,
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
    preset_caution,
    preset_names,
    recommended_levels,
)
from stabq.training import StabilityGuard, TrainConfig, TrainResult, train

# the module paths of earlier versions -> the modules they became
MOVED_MODULES = {
    "rows": "stabq.data.rows",
    "readers": "stabq.data.readers",
    "datasets": "stabq.data.builtin",
    "encoders": "stabq.model.encoders",
    "saving": "stabq.model.saving",
    "swap": "stabq.model.swap",
    "swap_layout": "stabq.model.swap_layout",
    "metrics": "stabq.health.usage",
    "monitor": "stabq.health.monitor",
    "monitor_probe": "stabq.health.probe",
    "monitor_tau": "stabq.health.tau",
    "mechanisms": "stabq.health.mechanisms",
    "report": "stabq.compare.report",
    "scenarios": "stabq.compare.scenarios",
    "demo": "stabq.quantizers.demo",
}
# names that left their module when it moved: the torch side of stabq.rows (the trainer's
# batches) now lives in stabq.training.batches, the file readers' message functions in
# stabq.data.labeled; the old module still answers to them
MOVED_NAMES = {
    "rows": ("stabq.training.batches", ("RowReader", "as_labeled_data", "on_device")),
    "readers": ("stabq.data.labeled", ("Columns", "as_numpy", "data_error", "where")),
}
for _old, _new in MOVED_MODULES.items():
    _sys.modules[f"{__name__}.{_old}"] = _importlib.import_module(_new)
for _old, (_new, _names) in MOVED_NAMES.items():
    for _name in _names:
        setattr(_sys.modules[f"{__name__}.{_old}"], _name, getattr(_sys.modules[_new], _name))


def __getattr__(name: str) -> object:
    """``stabq.DiscreteBottleneckClassifier`` is imported on first use: its module imports
    scikit-learn, which took 2 of the 3.7 s that ``import stabq`` took, and the CLI and
    the trainer never need it."""
    if name in MOVED_MODULES:  # ``stabq.rows`` and the like, as attributes
        return _sys.modules[f"{__name__}.{name}"]
    if name == "DiscreteBottleneckClassifier":
        from stabq.estimator import DiscreteBottleneckClassifier

        return DiscreteBottleneckClassifier
    raise AttributeError(f"module 'stabq' has no attribute {name!r}")


__all__ = [
    "FSP",
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
    "export",
    "load",
    "preset_caution",
    "preset_names",
    "recommended_levels",
    "save_model",
    "swap_quantizers",
    "train",
]
