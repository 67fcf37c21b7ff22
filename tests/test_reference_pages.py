"""The reference and contributing pages follow the code: every key stabq writes (a model
directory's ``config.json`` and ``metrics.jsonl``, a checkpoint, TensorBoard tags, the
Lightning callbacks' names, a comparison's ``results.csv`` and ``results.json``) is on the
File formats page, every test file is on the test map, and every test the contributing
pages name exists."""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import stabq
from stabq.compare.report import write_comparison
from stabq.integrations.tensorboard import TAGS

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ROOT / "docs" / "reference" / "file-formats.md"
TEST_MAP = ROOT / "docs" / "contributing" / "tests.md"
CONTRIBUTING = sorted((ROOT / "docs" / "contributing").glob("*.md"))
NAMED_TEST = re.compile(r"`(tests/(test_\w+\.py)(?:::(\w+)(?:\[([^\]]+)\])?)?)`")
# keys only some runs write: a diverged run's error, the explode preset's scenario rows
OCCASIONAL = ["error", "scenario", "guards", "best"]


def shown(page: Path) -> set[str]:
    """Every code span of ``page``, and every word of one (``a`, `b`` gives ``a``, ``b``)."""
    spans = re.findall(r"`([^`\n]+)`", page.read_text())
    words = r"[\w/-]+(?:\.[\w/-]+)*"  # `model.*` gives model, `config.json` config.json
    return set(spans) | {w for span in spans for w in re.findall(words, span)}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, list[str]]:
    """The keys of every file stabq writes, from a tiny run, a checkpoint and a comparison."""
    out = tmp_path_factory.mktemp("written")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    config = stabq.TrainConfig(epochs=1, progress=False)
    model = stabq.BottleneckClassifier(6, 2, quantizer="gumbel", hidden=16)
    result = stabq.train(model, (x, y), config=config, checkpoint_dir=out / "run")
    with safe_open(str(out / "run" / "checkpoint.safetensors"), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
        tensors = sorted({name.split(".")[0] for name in f.keys()})  # noqa: SIM118
    stabq.save_model(model, out / "model", classes=["0", "1"], history=result.history,
                     train_config=config.to_dict())  # fmt: skip
    saved = json.loads((out / "model" / "config.json").read_text())
    rows = [json.loads(line) for line in (out / "model" / "metrics.jsonl").open()]
    comparison = stabq.compare((x, y), methods="vq", seeds=1, epochs=2, progress=False)
    write_comparison(comparison, out / "report")
    with open(out / "report" / "results.csv", newline="") as f:
        columns = next(csv.reader(f))
    results = json.loads((out / "report" / "results.json").read_text())
    return {
        "model directory": sorted(p.name for p in (out / "model").iterdir()),
        "config.json": list(saved),
        "config.json model": list(saved["model"]),
        "config.json train_config": list(saved["train_config"]),
        "metrics.jsonl": list(rows[0]),
        "checkpoint": list(state),
        "checkpoint fingerprint": list(state["fingerprint"]),
        "checkpoint tensors": tensors,
        "report": sorted(p.name for p in (out / "report").iterdir()),
        "results.csv": columns,
        "results.json": list(results),
        "results.json settings": list(results["settings"]),
        "results.json runs": list(results["runs"][0]),
    }


def test_every_key_stabq_writes_is_on_the_file_formats_page(written):
    on_page = shown(FORMATS)
    missing = {what: [k for k in keys if k not in on_page] for what, keys in written.items()}
    assert {what: keys for what, keys in missing.items() if keys} == {}
    assert written["config.json train_config"] == [
        f.name for f in dataclasses.fields(stabq.TrainConfig)
    ]


def test_every_tensorboard_tag_and_lightning_name_is_on_the_page():
    from stabq.integrations.lightning import FIGURES, PER_CODEBOOK

    on_page = shown(FORMATS)
    names = [*TAGS, *TAGS.values(), *FIGURES.values(), *PER_CODEBOOK, *OCCASIONAL]
    names += ["guard/events", "guard/lr_scale", "codebook/MODULE/FIGURE"]
    assert [n for n in names if n not in on_page] == []


def test_every_test_file_is_on_the_test_map_and_every_file_there_exists():
    on_map = set(re.findall(r"`(test_\w+\.py)`", TEST_MAP.read_text()))
    files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert sorted(files - on_map) == [], "test files missing from the test map"
    assert sorted(on_map - files) == [], "the test map names files that do not exist"


def missing_tests(text: str) -> list[str]:
    """The ``tests/test_x.py[::name[id]]`` references of ``text`` that do not exist: no
    such file, no such test function in it, or a parameter id its file never spells."""
    missing = []
    for reference, file, name, case in NAMED_TEST.findall(text):
        path = ROOT / "tests" / file
        if not path.is_file():
            missing.append(reference)
            continue
        source = path.read_text()
        defined = {
            node.name
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        if (name and name not in defined) or (case and f'"{case}"' not in source):
            missing.append(reference)
    return missing


@pytest.mark.parametrize("page", CONTRIBUTING, ids=lambda p: p.name)
def test_every_test_the_contributing_pages_name_exists(page):
    assert missing_tests(page.read_text()) == []


def test_the_guarantees_page_names_tests_and_the_check_catches_a_wrong_one():
    text = (ROOT / "docs" / "contributing" / "guarantees.md").read_text()
    assert len(NAMED_TEST.findall(text)) > 20
    wrong = (
        "`tests/test_nowhere.py` `tests/test_saving.py::test_no_such_test` "
        "`tests/test_checkpoint.py::test_a_resumed_run_ends_bitwise_as_an_uninterrupted_one[x]`"
    )
    assert len(missing_tests(wrong)) == 3
    assert missing_tests("`tests/test_layout.py::test_no_file_over_400_lines`") == []
