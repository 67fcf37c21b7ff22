"""The measured tables of README and the docs, generated from ``benchmarks/results/``.

    python benchmarks/tables.py          # rewrite every generated block
    python benchmarks/tables.py --check  # exit 1 when a block differs from its JSON

A page marks a generated block with ``<!-- generated: NAME -->`` and ``<!-- end
generated -->``; NAME is ``stopping`` (``results/stopping-cpu.json``) or
``compare-NAME`` (``results/compare-NAME.json``: the table and the verdict line as
``stabq compare`` prints them, with the command and the wall time). Nothing between the
markers is written by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(<!-- generated: (\S+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def stopping_table() -> str:
    """Per encoder, method and rule: mean test accuracy and median epochs over seeds."""
    document = json.loads((RESULTS / "stopping-cpu.json").read_text())
    runs = document["runs"]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["encoder"], run["method"], run["way"]), []).append(run)
    names = {"accuracy": "validation accuracy (default)", "loss": "validation loss",
             "fixed-40": "none: 40 epochs, cosine"}  # fmt: skip
    lines = [
        "| encoder | method | stopped on | test acc % | epochs | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for (encoder, method, way), mine in groups.items():
        acc = 100 * statistics.mean(r["test_accuracy"] for r in mine)
        epochs = statistics.median(r["epochs"] for r in mine)
        lines.append(
            f"| {encoder} | {method} | {names[way]} | {acc:.1f} | {epochs:g} | {len(mine)} |"
        )
    machine = document["machine"]
    lines.append("")
    lines.append(
        f"(`python benchmarks/stopping.py --json benchmarks/results/stopping-cpu.json`: "
        f"patience {document['patience']}, torch {machine['torch']} on "
        f"{machine['threads']} thread, {machine['cpu_capability']} kernels.)"
    )
    return "\n".join(lines) + "\n"


def compare_table(name: str) -> str:
    """A kept comparison as ``stabq compare`` prints it, with its command and wall time."""
    sys.path.insert(0, str(ROOT / "src"))
    from stabq.compare.report import format_table

    document = json.loads((RESULTS / f"{name}.json").read_text())
    minutes, seconds = divmod(round(document["seconds"]), 60)
    head = f"`{document['command']}` ({minutes} min {seconds:02d} s of comparison"
    note = document.get("note")
    head += f"; {note})" if note else ")"
    table = format_table(document["rows"])
    return f"{head}:\n\n```text\n{table}\n{document['verdict']}\n```\n"


def render(name: str) -> str:
    if name == "stopping":
        return stopping_table()
    if name.startswith("compare-"):
        return compare_table(name)
    raise SystemExit(f"unknown generated block {name!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for page in PAGES:
        text = page.read_text()
        new = BLOCK.sub(lambda m: m.group(1) + render(m.group(2)) + m.group(4), text)
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
