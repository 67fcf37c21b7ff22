"""A comparison's tables and files: the text and markdown table, ``results.csv``,
``results.json``, ``report.md`` and a self-contained ``report.html`` (its plots,
:mod:`stabq.compare.plots`, embedded as data URIs), written atomically."""

from __future__ import annotations

import base64
import csv
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stabq.compare.paired import pack_correct
from stabq.compare.plots import plot_comparison
from stabq.errors import StabqError
from stabq.files import atomic_directory, write_text
from stabq.health.verdicts import HEALTHY, used_cell

# --- comparisons: table, files, plots ---------------------------------------------------------

COLUMNS = (
    ("method", "method", "{}"),
    ("accuracy", "test acc %", "pct"),
    ("accuracy_sd", "± sd", "pct"),
    ("gap", "gap [95%]", "interval"),
    ("to_best", "vs best [95%]", "interval"),
    ("codes_used", "used / fillable", "used"),
    ("fill", "fill %", "pct"),
    ("perplexity", "perplexity", "{:.1f}"),
    ("dead_codes", "dead codes", "{:.0f}"),
    ("max_loss", "max loss", "{:.3g}"),
    ("diverged", "diverged", "{}"),
    ("rescued", "rescued", "{}"),
    ("epochs", "epochs", "{:g}"),
    ("seconds", "s / run", "{:.1f}"),
    ("verdict", "verdict", "{}"),
)
WHY = ("reason", "why", "{}")  # markdown and HTML carry it as a column; text lists it below


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """One cell of ``row``: ``key`` shown as ``fmt`` says (``interval``: a difference in
    points with its 95% interval, ``+0.6 [-1.2, +2.4]``, from ``key_low`` and ``key_high``)."""
    value = row.get(key)
    if value is None:
        return "-"
    if fmt == "pct":
        return f"{100 * value:.1f}"
    if fmt == "interval":
        low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
        shown = f"{100 * value:+.1f}"
        if low is None or high is None:
            return shown
        return f"{shown} [{100 * low:+.1f}, {100 * high:+.1f}]"
    if fmt == "used":
        return used_cell(row)
    return fmt.format(value)


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The comparison table as aligned text, each verdict's reason listed below it
    (or a markdown table with the reason as its last column).

    ``gap`` is the paired difference to the continuous reference and ``vs best`` to the
    best healthy method, in points, each with its 95% interval in brackets
    (:mod:`stabq.compare.paired`); ``± sd`` is the spread of the accuracy over seeds.
    """
    columns = (*COLUMNS, WHY) if markdown else COLUMNS
    header = [label for _, label, _ in columns]
    body = [[_cell(row, key, fmt) for key, _, fmt in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(c) for c in col) for col in zip(header, *body, strict=True)]
    table = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *body]
    ]
    name = max(len(row["method"]) for row in rows)
    why = [f"  {row['method']:<{name}}  {row['verdict']}: {row['reason']}" for row in rows]
    return "\n".join([*table, "", *why])


def write_comparison(comparison: Any, directory: str | Path) -> Path:
    """results.csv, results.json, report.md, report.html and the plots, written atomically.

    ``results.json`` holds the rows and every run's record; a run's ``test_correct`` (which
    test rows it got right) is stored packed, 8 rows a byte, base64
    (:func:`~stabq.compare.paired.pack_correct`; :func:`~stabq.compare.paired.correct_of`
    reads it back), so that large test sets do not bloat the file.
    """
    target = Path(directory)
    with atomic_directory(target, StabqError, "the comparison") as tmp:
        with open(tmp / "results.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(comparison.rows[0]))
            writer.writeheader()
            writer.writerows(comparison.rows)
        payload = {
            "data": comparison.data,
            "preset": comparison.preset,
            "verdict": comparison.verdict,
            "seconds": comparison.seconds,
            "settings": comparison.settings,
            "rows": comparison.rows,
            "runs": [_stored(r) for r in comparison.records],
        }
        write_text(tmp / "results.json", json.dumps(payload, indent=1, default=str))
        plots = plot_comparison(comparison, tmp)
        encoder = comparison.settings.get("encoder", "mlp")
        title = f"stabq compare: {comparison.data}, encoder {encoder} ({comparison.preset})"
        settings = ", ".join(
            f"{k}={comparison.settings[k]}"
            for k in ("encoder", "seeds", "epochs", "lr", "guards")
            if k in comparison.settings
        )
        md = [f"# {title}", "", comparison.verdict, "", format_table(comparison.rows, True), ""]
        md += [f"Settings: {settings}; {comparison.seconds:.0f} s in all.", ""]
        md += [f"![{p.stem}]({p.name})" for p in plots]
        write_text(tmp / "report.md", "\n".join(md) + "\n")
        images = "".join(
            f'<figure><img alt="{p.stem}" src="data:image/png;base64,'
            f'{base64.b64encode(p.read_bytes()).decode()}"></figure>'
            for p in plots
        )
        table = _html_table(comparison.rows)
        write_text(
            tmp / "report.html",
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='verdict'>{html.escape(comparison.verdict)}</p>{table}"
            f"<p>Settings: {html.escape(settings)}; {comparison.seconds:.0f} s in all.</p>"
            f"{images}</body></html>\n",
        )
    return target


def _stored(record: dict[str, Any]) -> dict[str, Any]:
    """A run record as ``results.json`` stores it: ``test_correct`` packed."""
    correct = record.get("test_correct")
    if correct is None or isinstance(correct, str):
        return record
    return {**record, "test_correct": pack_correct(correct)}


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
    "table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;"
    "text-align:right}td:first-child,th:first-child,td:last-child{text-align:left}"
    ".bad{color:#b00;font-weight:bold}.verdict{font-size:1.1em}img{max-width:100%}"
)


def _html_table(rows: Sequence[dict[str, Any]]) -> str:
    columns = (*COLUMNS, WHY)
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in columns)
    body = ""
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            text = html.escape(_cell(row, key, fmt))
            cls = " class='bad'" if key == "verdict" and row[key] not in HEALTHY else ""
            cells.append(f"<td{cls}>{text}</td>")
        body += "<tr>" + "".join(cells) + "</tr>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
