"""The benchmark index: every result kept, with its command, commit and date, and the
machines they were measured on."""

from __future__ import annotations

import re

from tablegen.common import ROOT, load, provenance_of, stems, table

PAGES = ROOT / "docs" / "benchmarks"
BLOCK_NAME = re.compile(r"<!-- generated: (\S+?):(\S+) -->")


def shown_on() -> dict[str, list[str]]:
    """Which benchmark pages show each result (``<!-- generated: KIND:STEM,STEM -->``)."""
    found: dict[str, list[str]] = {}
    for page in sorted(PAGES.glob("*.md")):
        for match in BLOCK_NAME.finditer(page.read_text()):
            for stem in match.group(2).split(","):
                found.setdefault(stem, [])
                if page.name not in found[stem]:
                    found[stem].append(page.name)
    return found


def results() -> str:
    """One row per file in ``benchmarks/results/``."""
    pages = shown_on()
    body = []
    for stem in stems():
        found = provenance_of(load(stem))
        kind = "committed in" if found.get("commit_kind") == "committed" else "measured at"
        where = ", ".join(f"[{page[:-3]}]({page})" for page in pages.get(stem, []))
        body.append([
            f"`{stem}.json`", where or "listed here only", f"`{found.get('command', '-')}`",
            f"{kind} `{found.get('commit', '-')}`", found.get("date", "-"),
        ])  # fmt: skip
    return table(["file", "shown on", "command", "commit", "date"], body)


def _listed(values: list) -> str:
    unique = [str(v) for v in dict.fromkeys(values) if v is not None]
    return ", ".join(unique) if unique else "not recorded"


def machine() -> str:
    """The processors, cores, torch builds and native kernel paths the results record."""
    found = [provenance_of(load(stem)) for stem in stems()]
    memory = [f["memory_gib"] for f in found if "memory_gib" in f]
    cores = sorted({f["cores"] for f in found if "cores" in f})
    native = [f.get("cpu_capability") for f in found
              if "ATEN_CPU_CAPABILITY" not in f.get("command", "")]  # fmt: skip
    text = (
        f"Every result in `benchmarks/results/` ({len(found)} files) was measured on a CPU: "
        f"processor {_listed([f.get('processor') for f in found])}, "
        f"{_listed(cores)} cores, torch {_listed([f.get('torch') for f in found])}"
    )
    if memory:
        text += f", {_listed(memory)} GiB of memory (where recorded)"
    return text + f"; the processor's own kernel path, where recorded: {_listed(native)}.\n"
