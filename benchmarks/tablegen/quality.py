"""Quality tables: every preset trained on a built-in dataset, the stopping rule, and the
comparisons ``stabq compare`` printed (kept by ``benchmarks/compare_results.py``)."""

from __future__ import annotations

import statistics
import sys

from tablegen.common import ROOT, load, pct, sources, span, table

RULES = {"accuracy": "validation accuracy (default)", "loss": "validation loss",
         "fixed-40": "none: 40 epochs, cosine"}  # fmt: skip


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def presets(stem: str) -> str:
    """Per preset: mean test accuracy ± sd over seeds, its gap to ``none``, the usage and
    perplexity of the test codes, the epochs and the seconds a run."""
    document = load(stem)
    rows = document["presets"]
    none = next(row for row in rows if row["preset"] == "none")
    reference = statistics.mean(r["accuracy"] for r in none["runs"])
    body = []
    for row in rows:
        runs, plain = row["runs"], row["preset"] == "none"
        acc, sd = _mean_sd([r["accuracy"] for r in runs])
        usage = statistics.mean(r["usage"] for r in runs)
        perplexity = statistics.mean(r["perplexity"] for r in runs)
        body.append([
            f"`{row['preset']}`", f"{pct(acc)} ± {pct(sd)}",
            "-" if plain else pct(acc - reference, sign=True),
            "-" if plain else f"{usage:.3f}", "-" if plain else f"{perplexity:.1f}",
            document["epochs"], f"{statistics.mean(r['seconds'] for r in runs):.1f}",
        ])  # fmt: skip
    header = ["preset", "test accuracy %", "gap to `none`", "usage", "perplexity", "epochs",
              "s / run"]  # fmt: skip
    seeds = len(none["runs"])
    gaps = [statistics.mean(r["accuracy"] for r in row["runs"]) - reference
            for row in rows if row is not none]  # fmt: skip
    summary = (
        f"{document['data']}, {document['epochs']} epochs, {seeds} seeds (± is the standard "
        f"deviation over them). The gaps to `none` run from "
        f"{span([100 * g for g in gaps], '{:+.1f}')} points.\n"
    )
    return f"{table(header, body)}\n{summary}\n{sources([stem])}"


def _stopping_groups(document: dict) -> dict[tuple[str, str, str], list[dict]]:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for run in document["runs"]:
        groups.setdefault((run["encoder"], run["method"], run["way"]), []).append(run)
    return groups


def _stopping_table(document: dict) -> str:
    body = []
    for (encoder, method, way), runs in _stopping_groups(document).items():
        acc = 100 * statistics.mean(r["test_accuracy"] for r in runs)
        epochs = statistics.median(r["epochs"] for r in runs)
        body.append([encoder, method, RULES[way], f"{acc:.1f}", f"{epochs:g}", len(runs)])
    return table(["encoder", "method", "stopped on", "test acc %", "epochs", "seeds"], body)


def stopping(stem: str) -> str:
    """Per encoder, method and rule: mean test accuracy and median epochs over seeds, and
    how far each other rule lands from the default one."""
    document = load(stem)
    groups = _stopping_groups(document)
    means = {key: statistics.mean(r["test_accuracy"] for r in runs) for key, runs in groups.items()}
    moves = []
    for way, words in (("loss", "stopped on the validation loss"),
                       ("fixed-40", "trained the fixed 40 epochs")):  # fmt: skip
        shifts = [100 * (means[e, m, way] - means[e, m, "accuracy"])
                  for (e, m, w) in means if w == way and (e, m, "accuracy") in means]  # fmt: skip
        if shifts:
            moves.append(f"by {span(shifts, '{:+.1f}')} points {words}")
    summary = (
        f"Patience {document['patience']}. Against the same method stopped on the validation "
        f"accuracy, the mean test accuracy moves {' and '.join(moves)}.\n"
    )
    return f"{_stopping_table(document)}\n{summary}\n{sources([stem])}"


def _printed(document: dict) -> str:
    """The tables and the verdict line as ``stabq compare`` printed them (explode: one
    table per scenario and guard setting)."""
    sys.path.insert(0, str(ROOT / "src"))
    from stabq.compare.report import format_table

    rows = document["rows"]
    parts = []
    for section in dict.fromkeys((r.get("scenario"), r.get("guards")) for r in rows):
        mine = [r for r in rows if (r.get("scenario"), r.get("guards")) == section]
        head = f"{section[0]}, guards {'on' if section[1] else 'off'}:\n" if section[0] else ""
        parts.append(head + format_table(mine))
    return "\n\n".join(parts) + f"\n{document['verdict']}"


def _minutes(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s"


def _settings(document: dict) -> str:
    """The comparison's data and training settings in words."""
    s = document["settings"]
    length = f"{s['epochs']} epochs"
    if s.get("patience"):
        length = f"each run until it stops improving (patience {s['patience']}, at most {length})"
    clip = s.get("grad_clip")
    clip = "no gradient clipping" if clip is None else f"gradient clipping at {clip:g}"
    return (
        f"`{document['data']}`, preset `{document['preset']}`, encoder `{s['encoder']}`, "
        f"{s['seeds']} seeds, {length}, `{s['optimizer']}` at lr {s['lr']:g}, {clip}, "
        f"guards {'on' if s['guards'] else 'off'}; {_minutes(document['seconds'])} of "
        f"comparison."
    )


def compare(stem: str) -> str:
    """A kept comparison: its settings, the printed table and verdict, its provenance."""
    document = load(stem)
    return f"{_settings(document)}\n\n```text\n{_printed(document)}\n```\n\n{sources([stem])}"
