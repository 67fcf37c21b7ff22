"""The registry's cautions: which presets not to use under which measured condition, and
that compare's verdict lines quote them where such a preset is not considered."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import stabq
from stabq import ConfigError
from stabq.compare.runs import summarise, verdict
from stabq.compare.scenarios import explode_verdict
from stabq.quantizers.registry import CAUTIONS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "explanation" / "quantizers.md"


def _record(method, seed, acc, ppl, **extra):
    return {
        "method": method, "seed": seed, "test_accuracy": acc, "test_usage": 0.5,
        "test_perplexity": ppl, "test_dead_codes": 3, "max_loss": 2.0,
        "diverged": False, "guard_events": 0, "seconds": 1.0, **extra,
    }  # fmt: skip


def test_every_caution_names_a_preset_and_unknown_names_are_refused():
    assert set(CAUTIONS) <= set(stabq.preset_names())
    for name in stabq.preset_names():
        assert stabq.preset_caution(name) == CAUTIONS.get(name)
    with pytest.raises(ConfigError, match="quantizer='vqq' is not a preset; allowed: fsq"):
        stabq.preset_caution("vqq")


def test_the_verdict_quotes_the_caution_of_a_preset_not_considered():
    records = [
        _record("none", 0, 0.70, 0.0),
        _record("vq-ema", 0, 0.75, 3.0),  # collapsed: fewer effective codes than classes
        _record("fsq-plain", 0, 0.60, 2.0),
        _record("fsq", 0, 0.71, 300.0),
    ]
    rows = {r["method"]: r for r in summarise(records, num_classes=10)}
    assert rows["vq-ema"]["caution"] == CAUTIONS["vq-ema"]
    assert rows["fsq"]["caution"] is None and rows["none"]["caution"] is None
    line = verdict(list(rows.values()), "mydata")
    assert f"vq-ema collapsed (perplexity 3.0 < 10 classes: fewer effective codes than " \
        f"classes; known: {CAUTIONS['vq-ema']})" in line  # fmt: skip
    assert f"; known: {CAUTIONS['fsq-plain']})" in line
    assert line.count("known:") == 2  # fsq, judged ok, carries none


def test_a_healthy_row_of_a_cautioned_preset_says_nothing():
    records = [_record("none", 0, 0.70, 0.0), _record("vq-ema", 0, 0.75, 300.0)]
    line = verdict(summarise(records, num_classes=10), "mydata")
    assert line.startswith("mydata favours vq-ema") and "known:" not in line


def test_the_explode_verdict_quotes_the_caution_of_a_sick_preset():
    rows = [
        {"scenario": "sum-commitment", "guards": False, "method": "vq-ema-sum",
         "max_loss": float("inf"), "diverged": 3, "seeds": 3, "verdict": "diverged"},
        {"scenario": "sum-commitment", "guards": False, "method": "fsq-plain", "max_loss": 2.0,
         "seeds": 3, "verdict": "collapsed", "caution": CAUTIONS["fsq-plain"]},
        {"scenario": "sum-commitment", "guards": False, "method": "fsq", "max_loss": 2.0,
         "seeds": 3, "verdict": "ok", "caution": None},
    ]  # fmt: skip
    line = explode_verdict(rows)
    assert f"(fsq-plain collapsed (known: {CAUTIONS['fsq-plain']}))" in line
    assert "ended healthy: 1/2" in line


def test_the_docs_list_every_caution_word_for_word():
    text = DOCS.read_text()
    section = text.split("## When not to use a preset", 1)[1].split("\n## ", 1)[0]
    listed = dict(re.findall(r"^\| `([\w-]+)` \| (.+?) \|$", section, re.M))
    assert listed == CAUTIONS
