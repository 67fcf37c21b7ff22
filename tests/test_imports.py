"""What ``import stabq`` and the CLI's start import: scikit-learn and ``torch._dynamo`` only
once something needs them (``import stabq`` took 5.2 to 6.3 s with them, 2.6 to 3.1 s
without, on the development machine)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("sklearn", "torch._dynamo")


def imported_after(code: str) -> dict[str, bool]:
    probe = (
        f"import json, sys; {code}; print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_import_stabq_and_its_cli_import_neither():
    assert imported_after("import stabq, stabq.cli") == dict.fromkeys(HEAVY, False)


def test_the_estimator_and_a_monitor_import_them_when_used():
    """The probe sees them (it can fail): the estimator brings scikit-learn, an attached
    monitor (whose hook is kept out of compiled graphs) brings torch._dynamo."""
    assert imported_after("import stabq; stabq.DiscreteBottleneckClassifier")["sklearn"]
    monitor = "import stabq; stabq.CollapseMonitor(stabq.FSQ([5, 5]))"
    assert imported_after(monitor)["torch._dynamo"]


def test_the_estimator_is_still_stabqs():
    from sklearn.base import BaseEstimator

    import stabq

    assert "DiscreteBottleneckClassifier" in stabq.__all__
    assert issubclass(stabq.DiscreteBottleneckClassifier, BaseEstimator)
    namespace: dict = {}
    exec("from stabq import *", namespace)
    assert namespace["DiscreteBottleneckClassifier"] is stabq.DiscreteBottleneckClassifier
