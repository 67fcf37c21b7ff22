"""The Python examples in README.md and the docs pages run as written, and the pages the
README links to exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    for block in blocks:
        exec(compile(block, str(page), "exec"), {})


def test_readme_has_an_example_and_its_links_lead_to_pages():
    text = README.read_text()
    assert re.findall(r"```python\n(.*?)```", text, flags=re.S), "README has no python example"
    links = re.findall(r"\]\(((?:docs/)?[A-Za-z-]+\.md)\)", text)
    assert links and all((ROOT / link).is_file() for link in links), links
