"""bf16-mixed against float32 (``benchmarks/precision.py``): per preset, both precisions'
test accuracy, their paired difference, codebook health, guard events and verdicts."""

from __future__ import annotations

import statistics

from tablegen.common import load, pct, sources, span, table

HEALTHY = ("ok", "rescued")
CODE_FIGURES = (("fill", "{:.3f}"), ("test_perplexity", "{:.1f}"), ("test_dead_codes", "{:.1f}"))
WORST_FIRST = ("diverged", "stalled", "collapsed", "under-used", "rescued", "ok")


def _mean(values: list, fmt: str) -> str:
    values = [v for v in values if v is not None]
    return fmt.format(statistics.mean(values)) if values else "-"


def _worst(runs: list[dict]) -> str:
    found = {r["verdict"] for r in runs}
    worst = next(v for v in WORST_FIRST if v in found)
    count = sum(r["verdict"] == worst for r in runs)
    return worst if count == len(runs) else f"{worst} ({count} of {len(runs)})"


def _pair(runs: dict[str, list[dict]], key: str, fmt: str) -> str:
    return " / ".join(_mean([r[key] for r in runs[p]], fmt) for p in ("32", "bf16-mixed"))


def _row(preset: str, runs: dict[str, list[dict]]) -> tuple[list, list[float]]:
    by_seed = {p: {r["seed"]: r for r in runs[p]} for p in runs}
    paired = sorted(set(by_seed["32"]) & set(by_seed["bf16-mixed"]))
    gaps = [by_seed["bf16-mixed"][s]["test_accuracy"] - by_seed["32"][s]["test_accuracy"]
            for s in paired]  # fmt: skip
    accuracy = [
        f"{pct(statistics.mean(r['test_accuracy'] for r in runs[p]))}"
        + (f" ± {pct(statistics.stdev(r['test_accuracy'] for r in runs[p]))}"
           if len(runs[p]) > 1 else "")
        for p in ("32", "bf16-mixed")
    ]  # fmt: skip
    row = [
        f"`{preset}`", len(paired), *accuracy,
        pct(statistics.mean(gaps), sign=True) if gaps else "-",
        *(_pair(runs, key, fmt) if preset != "none" else "-"  # no codebook: no code figures
          for key, fmt in CODE_FIGURES),
        " / ".join(str(sum(r["guard_events"] for r in runs[p])) for p in ("32", "bf16-mixed")),
        " / ".join(_worst(runs[p]) for p in ("32", "bf16-mixed")),
        _pair(runs, "seconds", "{:.0f}"),
    ]  # fmt: skip
    return row, gaps


def precision(stem: str) -> str:
    """One row per preset measured at both precisions: mean test accuracy ± sd over seeds,
    the mean paired difference (bf16-mixed minus float32, same seed), then float32 / bf16
    figures: fill, perplexity and dead codes of the test codes, guard events summed over
    seeds, the worst verdict over seeds, seconds a run."""
    document = load(stem)
    groups: dict[str, dict[str, list[dict]]] = {}
    for run in document["runs"]:
        groups.setdefault(run["preset"], {}).setdefault(run["precision"], []).append(run)
    body, gaps, healthy = [], [], 0
    for preset, runs in groups.items():
        if set(runs) < {"32", "bf16-mixed"}:
            continue  # one precision measured so far: nothing to set beside it
        row, preset_gaps = _row(preset, runs)
        body.append(row)
        gaps += preset_gaps
        healthy += all(r["verdict"] in HEALTHY for r in runs["bf16-mixed"])
    header = [
        "preset", "seeds", "test acc % float32", "test acc % bf16", "bf16 − float32",
        "fill", "perplexity", "dead codes", "guard events", "verdict", "s / run",
    ]  # fmt: skip
    seeds = sorted({row[1] for row in body})
    presets = f"{len(body)} preset" + ("" if len(body) == 1 else "s")
    summary = (
        f"{document['data']}, {document['epochs']} epochs, stabq's defaults; {presets}, "
        f"{span(seeds, '{}')} of {document['seeds']} seeds each (± is the standard "
        f"deviation over them). From fill on, each cell is float32 / bf16-mixed. "
        f"{healthy} of {len(body)} end every bf16-mixed run healthy (ok or rescued). The "
        f"paired differences of single runs (bf16-mixed minus float32, same seed): "
        f"{span([100 * g for g in gaps], '{:+.1f}')} points.\n"
    )
    return f"{table(header, body)}\n{summary}\n{sources([stem])}"
