"""README's one summary table: each method's test accuracy and health verdict in several
kept comparisons side by side (``summary:STEM,STEM,...``)."""

from __future__ import annotations

from tablegen.common import load, pct, sources, table

ENCODERS = {"mlp": "MLP", "cnn1d": "CNN", "cnn2d": "CNN"}


def summary(stems: list[str]) -> str:
    """Per method (in the order the comparisons list them): mean test accuracy % and the
    health verdict in each comparison, ``-`` where it did not run."""
    documents = [load(stem) for stem in stems]
    methods: list[str] = []
    for document in documents:
        methods += [row["method"] for row in document["rows"] if row["method"] not in methods]
    header = ["method"] + [
        f"{d['data']}, {ENCODERS.get(d['settings']['encoder'], d['settings']['encoder'])}, "
        f"{d['settings']['seeds']} seeds"
        for d in documents
    ]
    body = []
    for method in methods:
        cells = [f"`{method}`"]
        for document in documents:
            row = next((r for r in document["rows"] if r["method"] == method), None)
            cells.append("-" if row is None else f"{pct(row['accuracy'])} {row['verdict']}")
        body.append(cells)
    return (
        f"{table(header, body)}\nTest accuracy % (mean over seeds) and health verdict.\n\n"
        f"{sources(stems)}"
    )
