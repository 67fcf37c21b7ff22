"""README links to pages that exist, and the measured tables of README and the docs are
what benchmarks/tables.py makes of their JSON (the code blocks: test_docs_blocks.py)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_has_an_example_and_its_links_lead_to_pages():
    text = README.read_text()
    assert re.findall(r"```python\n(.*?)```", text, flags=re.S), "README has no python example"
    links = re.findall(r"\]\(((?:docs/)?[A-Za-z/-]+\.md)\)", text)
    assert links and all((ROOT / link).is_file() for link in links), links


def test_the_generated_tables_match_their_measurements(tmp_path):
    """Every ``<!-- generated: NAME -->`` block is what benchmarks/tables.py makes of its
    JSON in benchmarks/results/; a block edited by hand, or stale, fails."""
    import subprocess
    import sys

    tables = ROOT / "benchmarks" / "tables.py"
    check = subprocess.run([sys.executable, str(tables), "--check"], capture_output=True,
                           text=True, cwd=ROOT)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert any("<!-- generated: " in page.read_text() for page in PAGES)
    # a block changed by hand is caught: a copy of a page with one figure altered
    page = next(p for p in PAGES if "<!-- generated: stopping -->" in p.read_text())
    text = page.read_text()
    block = re.search(r"<!-- generated: stopping -->\n(.*?)<!-- end generated -->", text, re.S)
    altered = text.replace(block.group(1), block.group(1).replace("| 3 |", "| 4 |", 1))
    assert altered != text
    sys.path.insert(0, str(tables.parent))
    import tables as generator

    rendered = generator.BLOCK.sub(
        lambda m: m.group(1) + generator.render(m.group(2)) + m.group(4), altered
    )
    assert rendered == text
