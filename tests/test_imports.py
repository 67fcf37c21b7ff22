"""What ``import stabq`` and the CLI's start import: scikit-learn, ``torch._dynamo`` and
matplotlib only once something needs them (``import stabq`` took 5.2 to 6.3 s with the first
two, 2.6 to 3.1 s without, on the development machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("sklearn", "torch._dynamo", "matplotlib")
# One fresh interpreter answers the three questions in turn (``import stabq`` costs about 3 s
# a process): what ``import stabq, stabq.cli`` brought in, then what the estimator's name
# added, then what attaching a monitor added. Each step's modules are seen after that step
# alone, as a process of their own would see them: none of the three is there before.
STEPS = {
    "import": "import stabq, stabq.cli",
    "estimator": "stabq.DiscreteBottleneckClassifier",
    "monitor": "stabq.CollapseMonitor(stabq.FSQ([5, 5]))",
}


@pytest.fixture(scope="module")
def imported_after() -> dict[str, dict[str, bool]]:
    """For each of STEPS, in order in one fresh process: which of HEAVY it had imported."""
    seen = f"{{m: m in sys.modules for m in {HEAVY!r}}}"
    probe = "; ".join(
        ["import json, sys", "found = {}"]
        + [f"{code}; found[{step!r}] = {seen}" for step, code in STEPS.items()]
        + ["print(json.dumps(found))"]
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_import_stabq_and_its_cli_import_neither(imported_after):
    assert imported_after["import"] == dict.fromkeys(HEAVY, False)


def test_the_estimator_and_a_monitor_import_them_when_used(imported_after):
    """The probe sees them (it can fail): the estimator brings scikit-learn, an attached
    monitor (whose hook is kept out of compiled graphs) brings torch._dynamo."""
    assert imported_after["import"]["sklearn"] is False  # the estimator's name brought it
    assert imported_after["estimator"]["sklearn"]
    assert imported_after["estimator"]["torch._dynamo"] is False  # the monitor brought it
    assert imported_after["monitor"]["torch._dynamo"]


def test_the_estimator_is_still_stabqs():
    from sklearn.base import BaseEstimator

    import stabq

    assert "DiscreteBottleneckClassifier" in stabq.__all__
    assert issubclass(stabq.DiscreteBottleneckClassifier, BaseEstimator)
    namespace: dict = {}
    exec("from stabq import *", namespace)
    assert namespace["DiscreteBottleneckClassifier"] is stabq.DiscreteBottleneckClassifier


@pytest.fixture(scope="module")
def users_matplotlib(tmp_path_factory) -> dict:
    """One fresh process as a notebook's: the user picks the svg backend, imports stabq and
    its CLI (the backend then), opens a pyplot figure and saves a model (the backend and
    pyplot's figures then)."""
    target = tmp_path_factory.mktemp("saved") / "m"
    code = (
        "import json, matplotlib; matplotlib.use('svg'); import stabq, stabq.cli; "
        "imported = matplotlib.get_backend(); "
        "import matplotlib.pyplot as plt; f = plt.figure(); "
        "m = stabq.BottleneckClassifier(input_dim=4, num_classes=2, quantizer='fsq'); "
        f"stabq.save_model(m, {str(target)!r}, classes=['a', 'b'], "
        "history=[{'epoch': 1, 'train_loss': 1.0, 'usage': 0.5}]); "
        "print(json.dumps([imported, matplotlib.get_backend(), plt.get_fignums()]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imported, saved, figures = json.loads(done.stdout)
    return {"imported": imported, "saved": saved, "figures": figures, "model": target}


def test_import_stabq_leaves_the_users_matplotlib_backend_alone(users_matplotlib):
    """A notebook's backend stays its own: stabq neither imports matplotlib nor picks Agg."""
    assert users_matplotlib["imported"] == "svg"


def test_a_saved_model_plots_without_touching_pyplot(users_matplotlib):
    """Saving draws training.png on a canvas of its own: pyplot's backend and figures stay
    as the user left them."""
    assert (users_matplotlib["saved"], users_matplotlib["figures"]) == ("svg", [1])
    assert (users_matplotlib["model"] / "training.png").stat().st_size > 1000
