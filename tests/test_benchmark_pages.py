"""The benchmark pages are what benchmarks/tables.py makes of benchmarks/results/: a table
edited by hand, or stale, fails; every results file is listed on the index with its
provenance; and no figure on those pages sits outside a generated block."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "benchmarks" / "tables.py"
BENCHMARK_PAGES = sorted((ROOT / "docs" / "benchmarks").glob("*.md"))
GENERATED = re.compile(r"<!-- generated: (\S+) -->\n(.*?)<!-- end generated -->", re.S)


@pytest.fixture(scope="module")
def generator():
    sys.path.insert(0, str(TABLES.parent))
    import tables

    return tables


def test_the_generated_tables_match_their_results():
    """``tables.py --check`` exits 0: every generated block of README and the docs is
    what the script makes of its JSON."""
    check = subprocess.run([sys.executable, str(TABLES), "--check"], capture_output=True,
                           text=True, cwd=ROOT)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("page", BENCHMARK_PAGES, ids=lambda p: p.name)
def test_a_generated_figure_changed_by_hand_is_caught(page, generator):
    """On every benchmark page, a copy with one figure of a generated block altered is
    rendered back to the page as committed: the check would fail on it."""
    text = page.read_text()
    blocks = list(GENERATED.finditer(text))
    assert blocks, f"{page.name} has no generated block"
    assert generator.rendered(text) == text
    block = blocks[0]
    figure = re.search(r"(?<![\w.])\d+\.\d+", block.group(2))
    assert figure, f"{page.name}: no figure in {block.group(1)}"
    start = block.start(2) + figure.start()
    altered = text[:start] + ("9" if text[start] != "9" else "8") + text[start + 1 :]
    assert altered != text
    assert generator.rendered(altered) == text


def test_readmes_summary_table_is_caught_too(generator):
    """README's summary block, generated from three kept comparisons, like any other."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- generated: (summary:\S+) -->\n(.*?)<!-- end generated -->", text, re.S)
    assert block, "README has no summary block"
    figure = re.search(r"\| \d+\.\d ", block.group(2))
    start = block.start(2) + figure.start() + 2
    altered = text[:start] + ("9" if text[start] != "9" else "8") + text[start + 1 :]
    assert altered != text
    assert generator.rendered(altered) == text


def test_the_benchmarks_index_lists_every_result_with_its_provenance():
    index = (ROOT / "docs" / "benchmarks" / "index.md").read_text()
    listed = next(m.group(2) for m in GENERATED.finditer(index) if m.group(1) == "results:all")
    results = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert results
    for path in results:
        row = next((line for line in listed.splitlines() if f"`{path.name}`" in line), None)
        assert row, f"{path.name} is not listed on docs/benchmarks/index.md"
        assert re.search(r"(measured at|committed in) `[0-9a-f]{7,}", row), row
        assert re.search(r"\| \d{4}-\d\d-\d\d \|", row), row


@pytest.mark.parametrize("page", BENCHMARK_PAGES, ids=lambda p: p.name)
def test_every_generated_benchmarks_table_names_its_source(page):
    """Each table's block ends with its results file, command, commit and date."""
    for match in GENERATED.finditer(page.read_text()):
        name, body = match.groups()
        if name in ("results:all", "machine:all"):
            continue
        assert "benchmarks/results/" in body, name
        assert re.search(r"(measured at commit|committed in) `[0-9a-f]{7,}[^`]*` on "
                         r"\d{4}-\d\d-\d\d", body), name  # fmt: skip
        assert re.search(r"\d+ threads?|default threads", body), name


def _prose(text: str) -> str:
    """``text`` without its generated blocks, fenced blocks, code spans and link targets."""
    text = GENERATED.sub("", text)
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`]*`", "", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


@pytest.mark.parametrize("page", BENCHMARK_PAGES, ids=lambda p: p.name)
def test_no_figure_on_a_benchmarks_page_is_written_by_hand(page):
    """Outside the generated blocks (and code), a benchmark page holds no number: its
    figures come from the results."""
    numbers = re.findall(r"(?<![\w.-])\d[\d,.]*(?![\w])", _prose(page.read_text()))
    assert numbers == [], f"{page.name}: {numbers}"
