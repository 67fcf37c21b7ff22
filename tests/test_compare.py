"""stabq compare: every method trained alike, the table, the verdict, the report files."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from typer.testing import CliRunner

import stabq
from stabq.cli import app
from stabq.compare import PRESETS, compare, summarise, verdict
from stabq.errors import ConfigError
from stabq.report import format_table, write_comparison

pytestmark = pytest.mark.outcome  # the verdict depends on how training ends


@pytest.fixture(scope="module")
def small():
    """Three methods, two seeds, two epochs on a 16-D Gaussian mixture."""
    return compare("synthetic:16", ["none", "vq-ema", "fsq"], seeds=2, epochs=2, progress=False)


def test_every_method_runs_every_seed_with_the_same_settings(small):
    assert [(r["method"], r["seed"]) for r in small.records] == [
        ("none", 0), ("none", 1), ("vq-ema", 0), ("vq-ema", 1), ("fsq", 0), ("fsq", 1),
    ]  # fmt: skip
    assert [row["method"] for row in small.rows] == ["none", "vq-ema", "fsq"]
    assert all(len(r["history"]) == 2 for r in small.records)
    assert small.settings["epochs"] == 2 and small.settings["seeds"] == 2


def test_rows_summarise_the_runs(small):
    fsq = next(row for row in small.rows if row["method"] == "fsq")
    runs = [r for r in small.records if r["method"] == "fsq"]
    accs = [r["test_accuracy"] for r in runs]
    assert fsq["accuracy"] == pytest.approx(sum(accs) / 2)
    assert fsq["accuracy_sd"] == pytest.approx(float(np.std(accs, ddof=1)))
    none = next(row for row in small.rows if row["method"] == "none")
    assert fsq["gap"] == pytest.approx(fsq["accuracy"] - none["accuracy"])  # the same seeds
    assert fsq["gap_low"] <= fsq["gap"] <= fsq["gap_high"]  # stabq.compare.paired
    assert none["gap"] is None and none["gap_low"] is None and none["usage"] is None
    assert all(r["test_correct"].shape == (1000,) for r in small.records)
    assert fsq["max_loss"] == max(max(h["max_loss"] for h in r["history"]) for r in runs)
    assert sum(runs[0]["code_counts"][0]) == 1000  # every test input counted once


def _record(method, seed, acc, ppl, diverged=False):
    return {
        "method": method, "seed": seed, "test_accuracy": acc, "test_usage": 0.5,
        "test_perplexity": ppl, "test_dead_codes": 3, "max_loss": 2.0,
        "diverged": diverged, "guard_events": 0, "seconds": 1.0,
    }  # fmt: skip


def test_collapse_flag_and_verdict():
    records = [
        _record("none", 0, 0.70, 0.0),
        _record("vq-ema", 0, 0.75, 3.0),  # fewer effective codes than classes: collapsed
        _record("fsq", 0, 0.71, 300.0),
        _record("rvq", 0, 0.72, 150.0),
        _record("pq", 0, 0.90, 80.0, diverged=True),
    ]
    rows = summarise(records, num_classes=10)
    flags = {row["method"]: row["collapsed"] for row in rows}
    assert flags == {"none": False, "vq-ema": True, "fsq": False, "rvq": False, "pq": True}
    line = verdict(rows, "mydata")
    assert line.startswith("mydata favours rvq: ")
    assert "(72.0%, +2.0 vs continuous; effective codes 150)" in line
    assert "not considered: vq-ema collapsed (perplexity 3.0 < 10 classes" in line
    assert "; pq diverged (" in line


def test_unknown_method_and_preset_are_refused():
    with pytest.raises(ConfigError, match="unknown vqq; allowed: none, vq-ema"):
        compare("synthetic:16", ["none", "vqq"], seeds=1, epochs=1)
    with pytest.raises(ConfigError, match="--preset 'hard'"):
        compare("synthetic:16", preset="hard")


def test_stress_preset_turns_guards_off_at_a_high_learning_rate():
    stress = PRESETS["stress"]
    assert stress["config"]["lr"] == 3e-2 and stress["config"]["guards"] is False
    assert stress["methods"] == ["none", *(n for n in stabq.preset_names() if n != "none")]
    result = compare("synthetic:16", ["vq-ema"], seeds=1, epochs=1, preset="stress")
    assert result.settings["guards"] is False and result.settings["lr"] == 3e-2


def test_report_files(small, tmp_path):
    out = write_comparison(small, tmp_path / "report")
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "accuracy.png", "codes.png", "health.png", "loss.png", "report.html", "report.md",
        "results.csv", "results.json",
    ]  # fmt: skip
    payload = json.loads((out / "results.json").read_text())
    assert payload["verdict"] == small.verdict and len(payload["runs"]) == 6
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.startswith("method,seeds,accuracy,accuracy_sd,gap,gap_low,gap_high,to_best,")
    assert all(isinstance(r["test_correct"], str) for r in payload["runs"])  # packed bits
    md = (out / "report.md").read_text()
    assert format_table(small.rows, markdown=True) in md and "![loss](loss.png)" in md


def test_html_report_is_self_contained_and_every_image_decodes(small, tmp_path):
    page = (write_comparison(small, tmp_path / "r") / "report.html").read_text()
    sources = re.findall(r'<img alt="[^"]*" src="([^"]+)"', page)
    assert len(sources) == 4
    for src in sources:
        assert src.startswith("data:image/png;base64,")  # nothing to fetch
        image = matplotlib.image.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.shape[0] > 100 and image.shape[1] > 100
    assert small.verdict.split(":")[0] in page


def test_a_failed_report_write_leaves_the_previous_report(small, tmp_path, monkeypatch):
    out = write_comparison(small, tmp_path / "r")
    before = (out / "results.json").read_bytes()
    monkeypatch.setattr("stabq.report.plot_comparison", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_comparison(small, out)
    assert (out / "results.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_cli_compare_on_a_file_prints_the_table(tmp_path):
    gen = np.random.default_rng(0)
    y = np.arange(300) % 3
    x = (gen.normal(size=(300, 8)) + y[:, None] * 2).astype(np.float32)
    np.savez(tmp_path / "features.npz", x=x, y=y)
    result = CliRunner().invoke(
        app,
        ["compare", "--data", str(tmp_path / "features.npz"), "--methods", "none,fsq",
         "--seeds", "1", "--epochs", "2", "--quiet", "--out", str(tmp_path / "rep")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "method" in result.stdout and "fsq" in result.stdout and "favours" in result.stdout
    assert (tmp_path / "rep" / "report.html").is_file()


def test_cli_compare_bad_data_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.array([[1.0, np.nan]] * 4), y=np.array([0, 1, 0, 1]))
    proc = subprocess.run(
        [sys.executable, "-m", "stabq", "compare", "--data", str(bad), "--quiet"],
        capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stabq: error: ") and "NaN" in lines[0]
    assert "row 0" in lines[0]
