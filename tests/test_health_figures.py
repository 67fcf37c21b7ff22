"""One definition of usage, fill, dead codes and perplexity wherever a figure is shown:
training progress, metrics.jsonl, ``stabq evaluate`` (text and JSON), CodebookUsage, the
comparison, TensorBoard, the Lightning callback. A healthy FSQ must not read as collapsed
anywhere (usage 0.002, 63,705 dead codes), and a codebook's dead codes are the codes no
row reached."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bad_input import cli
from stabq import FSQ, CodebookUsage, VectorQuantizer
from stabq.metrics import codebook_figures


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 500), min_size=1, max_size=40), st.booleans())
def test_codebook_figures_against_their_definitions(counts, grid):
    tally = torch.tensor(counts)
    figures = codebook_figures(tally, grid=grid)
    size, total = len(counts), sum(counts)
    used = sum(1 for c in counts if c > 0)
    assert figures["codes_used"] == used and figures["usage"] == used / size
    assert figures["fill"] == (used / min(size, total) if total else 0.0)
    assert figures["dead_codes"] == (None if grid else size - used)
    entropy = -sum(c / total * math.log2(c / total) for c in counts if c) if total else 0.0
    assert figures["entropy_bits"] == pytest.approx(entropy, abs=1e-12)
    assert figures["perplexity"] == (pytest.approx(2**entropy) if total else 0.0)


def test_a_grid_has_no_dead_codes_and_its_fill_is_judged_against_the_inputs():
    fsq = FSQ([8, 8, 8, 5, 5, 5])  # 64,000 cells
    usage = CodebookUsage.for_quantizer(fsq)
    usage.update(torch.arange(1000) * 7)  # 1,000 inputs on 1,000 cells
    found = usage.compute()
    assert found["dead_codes"] is None and found["grid"] is True
    assert found["fill"] == 1.0 and found["usage"] == 1000 / 64000
    assert found["fillable"] == 1000 and found["samples"] == 1000
    vq = CodebookUsage.for_quantizer(VectorQuantizer(8, codebook_size=512))
    vq.update(torch.tensor([0, 1, 2, 3] * 250))
    assert vq.compute()["dead_codes"] == 508 and vq.compute()["fill"] == 4 / 512


def test_train_evaluate_metrics_and_tensorboard_agree_on_a_healthy_fsq(tmp_path):
    out, board = tmp_path / "fsq", tmp_path / "tb"
    trained = cli("train", "--data", "synthetic:8", "--quantizer", "fsq", "--epochs", "2",
                  "--out", out, "--tensorboard", board)  # fmt: skip
    assert trained.exit_code == 0, trained.output
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["dead_codes"] is None and last["fill"] > 0.1
    assert f"fill {last['fill']:.3f}" in trained.stdout and "usage" not in trained.stdout
    shown = cli("evaluate", out, "--data", "synthetic:8", "--part", "train", "--json")
    figures = json.loads(shown.stdout)
    assert figures["dead_codes"] is None
    assert figures["fill"] == figures["codes_used"] / min(64000, figures["rows"])
    text = cli("evaluate", out, "--data", "synthetic:8", "--part", "train").stdout
    assert text.splitlines()[-2].split() == ["dead_codes", "-"]
    from tensorboard.backend.event_processing import event_accumulator as ea

    reader = ea.EventAccumulator(str(board))
    reader.Reload()
    tags = reader.Tags()["scalars"]
    assert "codebook/fill" in tags and "codebook/dead_codes" not in tags


def test_the_monitor_and_the_lightning_figures_use_the_same_definition():
    from stabq import CollapseMonitor
    from stabq.integrations.lightning import _figures

    fsq = FSQ([5, 5, 5])
    monitor = CollapseMonitor(fsq, warn=False)
    fsq(torch.randn(64, 3))
    report = monitor.report()
    monitor.detach()
    assert report["dead_codes"] is None and 0 < report["fill"] <= 1
    logged = _figures(report)
    assert "dead_codes" not in logged and logged["fill"] == report["fill"]
    vq = VectorQuantizer(4, codebook_size=16)
    monitor = CollapseMonitor(vq, warn=False)
    vq(torch.randn(64, 4))
    report = monitor.report()
    monitor.detach()
    assert report["dead_codes"] == 16 - report["codes_used"]
