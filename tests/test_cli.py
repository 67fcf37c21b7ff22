"""The command line: answers, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from stabq.cli import app

runner = CliRunner()


def test_levels_prints_the_paper_table_entry():
    result = runner.invoke(app, ["levels", "65536"])
    assert result.exit_code == 0
    assert result.stdout.startswith("8,8,8,5,5,5\t(64000 codes")


def test_levels_refuses_a_size_outside_the_table_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "stabq", "levels", "1000"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "stabq: error: recommended_levels: codebook_size=1000, allowed is one of "
        "[256, 1024, 4096, 16384, 65536] (2^8, 2^10, 2^12, 2^14, 2^16)"
    ]
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "stabq", "levels", "1000", "--debug"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_demo_runs_every_preset():
    from stabq import demo, preset_names

    data = demo.mixture(512, 64, clusters=8, seed=1)
    rows = [demo.describe(name, data, steps=2, batch=128) for name in preset_names()]
    assert [r["preset"] for r in rows] == preset_names()
    by_name = {r["preset"]: r for r in rows}
    assert by_name["none"]["rel_error"] == 0.0
    assert 0 < by_name["rvq"]["rel_error"] < by_name["vq-ema"]["rel_error"]


def test_version_is_the_installed_distribution_version():
    from importlib.metadata import version

    proc = subprocess.run(
        [sys.executable, "-m", "stabq", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == f"stabq {version('stabq')}\n"
    import stabq

    assert stabq.__version__ == version("stabq")
