"""The measured tables of the docs, generated from ``benchmarks/results/``.

    python benchmarks/tables.py          # rewrite every generated block
    python benchmarks/tables.py --check  # exit 1 when a block differs from its JSON

A page marks a generated block with ``<!-- generated: NAME -->`` and ``<!-- end
generated -->``; nothing between the markers is written by hand. On the benchmark pages
NAME is ``KIND:STEM[,STEM...]`` (``presets:presets-cpu`` reads
``results/presets-cpu.json``; ``results:all`` lists every file; the kinds are in
``tablegen/__init__.py``), and each table carries its command, commit, date, processor
and threads. README's ``summary:STEM,...`` block sets several comparisons side by side.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tablegen import render

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(<!-- generated: (\S+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def rendered(text: str) -> str:
    """``text`` with every generated block made again from its results."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2)) + m.group(4), text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a block differs")
    args = parser.parse_args()
    stale = []
    for page in PAGES:
        text = page.read_text()
        new = rendered(text)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"generated tables out of date in {', '.join(map(str, stale))}: run "
              f"python benchmarks/tables.py")  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
