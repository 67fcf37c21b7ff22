"""Every method side by side on the user's data: which bottleneck does this data favour?

:mod:`~stabq.compare.methods` says what runs (methods, presets, the plan of a comparison),
:mod:`~stabq.compare.runs` trains and judges one run, :mod:`~stabq.compare.run` runs a
whole comparison (:func:`compare`), :mod:`~stabq.compare.paired` says how sure a
difference between two methods is, :mod:`~stabq.compare.scenarios` holds the explode
preset's scenarios, and :mod:`~stabq.compare.report` and :mod:`~stabq.compare.plots`
write what a comparison found.
"""

from stabq.compare.methods import (
    DEFAULT_METHODS,
    METHODS,
    PRESETS,
    QUICK_METHODS,
    STRESS_METHODS,
    Method,
    planned_runs,
    resolve_methods,
)
from stabq.compare.run import Comparison, _train_test, compare, run_explode  # noqa: F401
from stabq.compare.runs import fresh_encoder, run_one, summarise, verdict

__all__ = [
    "DEFAULT_METHODS", "METHODS", "PRESETS", "QUICK_METHODS", "STRESS_METHODS", "Comparison",
    "Method", "compare", "fresh_encoder", "planned_runs", "resolve_methods", "run_explode",
    "run_one", "summarise", "verdict",
]  # fmt: skip
