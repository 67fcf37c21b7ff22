"""What ``import stabq`` and the CLI's start import: scikit-learn, ``torch._dynamo`` and
matplotlib only once something needs them (``import stabq`` took 5.2 to 6.3 s with the first
two, 2.6 to 3.1 s without, on the development machine)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("sklearn", "torch._dynamo", "matplotlib")


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


def test_import_stabq_leaves_the_users_matplotlib_backend_alone():
    """A notebook's backend stays its own: stabq neither imports matplotlib nor picks Agg."""
    code = (
        "import matplotlib; matplotlib.use('svg'); import stabq, stabq.cli; "
        "print(matplotlib.get_backend())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg"


def test_a_saved_model_plots_without_touching_pyplot(tmp_path):
    """Saving draws training.png on a canvas of its own: pyplot's backend and figures stay
    as the user left them."""
    code = (
        "import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot as plt; "
        "f = plt.figure(); import stabq; "
        "m = stabq.BottleneckClassifier(input_dim=4, num_classes=2, quantizer='fsq'); "
        f"stabq.save_model(m, {str(tmp_path / 'm')!r}, classes=['a', 'b'], "
        "history=[{'epoch': 1, 'train_loss': 1.0, 'usage': 0.5}]); "
        "print(matplotlib.get_backend(), plt.get_fignums())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "[1]"]
    assert (tmp_path / "m" / "training.png").stat().st_size > 1000
