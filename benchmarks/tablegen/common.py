"""What every generated table shares: the results files, where each came from, markdown.

A result's provenance is read from its top-level keys (``_measure.provenance``: command,
commit, date, processor, cores, threads, torch, cpu_capability), and for the results
written before the scripts recorded it, from its ``machine`` (a line such as ``cpu
(x86_64, 2 cores), torch 2.13.0+cpu, 2 threads``, or an object) and the ``commit`` and
``date`` taken from git, marked ``commit_kind: committed``: the commit the result was
committed in, not necessarily the one it was measured at.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MACHINE = re.compile(
    r"\w+ \((?P<processor>[^,]+), (?P<cores>\d+) cores\), torch (?P<torch>\S+), "
    r"(?P<threads>\d+) threads?"
)
ARCH = re.compile(r"(x86_64|aarch64|arm64|ppc64le|s390x|i686)")
KEYS = ("command", "commit", "date", "commit_kind", "processor", "cores", "threads", "torch",
        "cpu_capability", "peer", "note")  # fmt: skip


@cache
def load(stem: str) -> dict:
    """``benchmarks/results/STEM.json``."""
    path = RESULTS / f"{stem}.json"
    if not path.is_file():
        raise SystemExit(f"benchmarks/tables.py: no benchmarks/results/{stem}.json")
    return json.loads(path.read_text())


def stems() -> list[str]:
    """Every result kept in ``benchmarks/results/``, by name."""
    return sorted(path.stem for path in RESULTS.glob("*.json"))


def provenance_of(document: dict) -> dict:
    """The provenance of a result, from its own keys or its ``machine``; missing keys are
    left out."""
    found: dict = {}
    machine = document.get("machine")
    if isinstance(machine, str) and (match := MACHINE.match(machine)):
        found.update(processor=match["processor"], cores=int(match["cores"]),
                     threads=int(match["threads"]), torch=match["torch"])  # fmt: skip
    elif isinstance(machine, dict):
        keys = ("processor", "cores", "threads", "torch", "cpu_capability", "memory_gib")
        found.update({k: machine[k] for k in keys if machine.get(k) is not None})
        if machine.get("cpus") is not None:
            found["cores"] = machine["cpus"]
        if (arch := ARCH.search(machine.get("platform", ""))) is not None:
            found["processor"] = arch.group(1)
    found.update({k: document[k] for k in KEYS if document.get(k) is not None})
    return found


def threads_text(threads: int | None) -> str:
    if threads is None:
        return "its default threads"
    return f"{threads} thread" if threads == 1 else f"{threads} threads"


def machine_text(found: dict) -> str:
    """``x86_64, 2 cores, torch 2.13.0+cpu on 1 thread, AVX512 kernels`` (what is known)."""
    parts = [found.get("processor", "processor not recorded")]
    if "cores" in found:
        parts.append(f"{found['cores']} cores")
    torch = f"torch {found['torch']}" if "torch" in found else "torch"
    parts.append(f"{torch} on {threads_text(found.get('threads'))}")
    if "cpu_capability" in found:
        parts.append(f"{found['cpu_capability']} kernels")
    return ", ".join(parts)


def commit_text(found: dict) -> str:
    """``measured at commit `abc1234` on DATE`` or, for a result whose commit was taken
    from git, ``committed in `abc1234` on DATE``."""
    commit, date = found.get("commit", "not recorded"), found.get("date", "an unrecorded date")
    if found.get("commit_kind") == "committed":
        return f"committed in `{commit}` on {date}"
    return f"measured at commit `{commit}` on {date}"


def source(stem: str) -> str:
    """One line: the file, its command, its commit and date, the machine, its note."""
    found = provenance_of(load(stem))
    command = found.get("command", "command not recorded")
    line = (
        f"`benchmarks/results/{stem}.json`: `{command}`; {commit_text(found)}; "
        f"{machine_text(found)}."
    )
    if "peer" in found:
        line += f" Peer: {found['peer']}."
    if "note" in found:
        line += f" Note: {found['note']}."
    return line


def sources(names: Sequence[str]) -> str:
    """The provenance of the results behind a table, one line each."""
    if len(names) == 1:
        return f"Source: {source(names[0])}\n"
    return "Sources:\n\n" + "".join(f"- {source(name)}\n" for name in names)


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pct(value: float | None, sign: bool = False) -> str:
    """A fraction in percent, one decimal (``-`` for none)."""
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"


def num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def span(values: Iterable[float], fmt: str) -> str:
    """``lo to hi`` of ``values`` (one value: itself)."""
    ordered = sorted(values)
    low, high = fmt.format(ordered[0]), fmt.format(ordered[-1])
    return low if low == high else f"{low} to {high}"
