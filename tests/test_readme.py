"""README links to pages that exist (the code blocks: test_docs_blocks.py; the generated
tables of the docs: test_benchmark_pages.py)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_has_an_example_and_its_links_lead_to_pages():
    text = README.read_text()
    assert re.findall(r"```python\n(.*?)```", text, flags=re.S), "README has no python example"
    links = re.findall(r"\]\(((?:docs/)?[A-Za-z/-]+\.md)\)", text)
    assert links and all((ROOT / link).is_file() for link in links), links
