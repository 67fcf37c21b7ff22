"""Keep a measured comparison in ``benchmarks/results/``, with its command and provenance.

    python benchmarks/compare_results.py OUT_DIR NAME --command "stabq compare ..." \\
        --classes 10 [--threads 1] [--note "..."] [--also OTHER_OUT_DIR]

``OUT_DIR`` is a comparison's ``--out`` directory. Its ``results.json`` is kept whole, less
each run's code frequencies (a grid's run holds 64,000 counts) and with each epoch's
history row cut to the figures the docs read; the rows, the verdict, the settings and
each run's packed correct test rows (the paired intervals) stay as they were. Written to
``benchmarks/results/compare-NAME.json``, with :func:`_measure.provenance` (the command,
the commit, the date, the processor, the threads: ``--threads`` when the comparison set
its own, else torch's default here) so the benchmark pages can say where it came from.

The rows and the verdict are summarised again from the runs by this checkout's rules
(``--classes``: the data's number of classes), so a kept comparison reads as one made now
would. ``--also`` adds the runs of another comparison of the same data, preset, seeds and
training options (methods run later, say): runs do not depend on which other methods ran,
each seeded alone, so the result is what one comparison of every method would give. The
settings must agree, or it refuses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import provenance

HISTORY_KEYS = ("epoch", "stage", "train_loss", "val_loss", "val_accuracy", "lr", "stage_end")


def trimmed(results: dict) -> dict:
    """``results`` with code frequencies dropped and history rows cut to HISTORY_KEYS."""
    runs = []
    for run in results["runs"]:
        run = {k: v for k, v in run.items() if k != "code_counts"}
        run["history"] = [{k: row.get(k) for k in HISTORY_KEYS} for row in run["history"]]
        runs.append(run)
    return {**results, "runs": runs}


def merged(first: dict, others: list[dict]) -> dict:
    """``first`` with the runs of ``others`` added (the same data, preset and settings), in
    the order of the methods, then seeds; ``first`` itself when there are none."""
    if not others:
        return first
    for other in others:
        same = {k: other[k] == first[k] for k in ("data", "preset", "settings")}
        if not all(same.values()):
            sys.exit(
                f"compare_results.py: --also differs in {[k for k, v in same.items() if not v]}"
            )
    runs = first["runs"] + [run for other in others for run in other["runs"]]
    order = list(dict.fromkeys(run["method"] for run in runs))
    runs.sort(key=lambda run: (order.index(run["method"]), run["seed"]))
    seconds = first["seconds"] + sum(other["seconds"] for other in others)
    return {**first, "seconds": seconds, "runs": runs}


def summarised(results: dict, classes: int) -> dict:
    """``results`` with its rows and verdict summarised from its runs by this checkout's
    rules (an explode comparison per scenario and guard setting, as ``compare`` does)."""
    from stabq.compare.runs import summarise, verdict
    from stabq.compare.scenarios import explode_verdict

    runs = results["runs"]
    if results["preset"] != "explode":
        rows = summarise(runs, classes)
        return {**results, "rows": rows, "verdict": verdict(rows, results["data"])}
    rows = []
    for scenario, guards in dict.fromkeys((r["scenario"], r["guards"]) for r in runs):
        part = [r for r in runs if (r["scenario"], r["guards"]) == (scenario, guards)]
        rows += [
            {"scenario": scenario, "guards": guards, **row} for row in summarise(part, classes)
        ]
    return {**results, "rows": rows, "verdict": explode_verdict(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--command", required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--note", default="")
    parser.add_argument("--also", type=Path, action="append", default=[])
    parser.add_argument("--classes", type=int, required=True, help="classes in the data")
    args = parser.parse_args()
    results = json.loads((args.out_dir / "results.json").read_text())
    results = merged(results, [json.loads((d / "results.json").read_text()) for d in args.also])
    results = summarised(results, args.classes)
    document = {**provenance(args.command, args.threads), "note": args.note,
                **trimmed(results)}  # fmt: skip
    target = Path(__file__).parent / "results" / f"compare-{args.name}.json"
    target.write_text(json.dumps(document, indent=None, separators=(",", ":")) + "\n")
    print(f"{target}: {target.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
