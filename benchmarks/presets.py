"""Every preset on a built-in dataset with default training: accuracy, codebook health, time.

    python benchmarks/presets.py [--data mnist1d] [--seeds 3] [--epochs 100] [--json out.json]
                                 [--paths default,avx2,avx512]

Prints a markdown table (mean and standard deviation over seeds) for README.
Torch runs on one thread so the timings do not depend on what else runs.
``--paths`` repeats every run on each CPU kernel path (``ATEN_CPU_CAPABILITY``),
each in its own process, two at a time (so the seconds are then under load), and
adds each preset's lowest accuracy and its gap to ``none`` on every path and seed.
``--json`` writes the runs with their provenance (``_measure.provenance``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from _measure import command_line, on_kernel_paths, provenance
from stabq import BottleneckClassifier, TrainConfig, preset_names, train
from stabq.data import load_data
from stabq.training.loop import evaluate_model


def run(
    data: str, seeds: int, epochs: int, log=None, presets: list[str] | None = None
) -> list[dict]:
    train_set, test_set = load_data(data, "train"), load_data(data, "test")
    tx, ty = torch.from_numpy(test_set.x), torch.from_numpy(test_set.y)
    path = torch.backends.cpu.get_cpu_capability()
    rows = []
    for name in presets or preset_names():
        runs = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = BottleneckClassifier(train_set.num_features, train_set.num_classes, name)
            started = time.perf_counter()
            result = train(model, train_set, config=TrainConfig(epochs=epochs, seed=seed))
            seconds = time.perf_counter() - started
            runs.append({**evaluate_model(model, tx, ty), "seconds": seconds, "path": path,
                         "seed": seed, "guard_events": len(result.guard_events)})  # fmt: skip
            if log is not None:
                log({"preset": name, **runs[-1]})
        rows.append({"preset": name, "runs": runs})
        print(f"done {name}", flush=True, file=sys.stderr)
    return rows


def joined(records: list[dict]) -> list[dict]:
    """The workers' records as :func:`run`'s rows: one per preset, every path's runs."""
    names = list(dict.fromkeys(r["preset"] for r in records))
    return [{"preset": n, "runs": [r for r in records if r["preset"] == n]} for n in names]


def spread(rows: list[dict]) -> str:
    """Each preset's lowest accuracy and its gap to `none` on the same path and seed."""
    none = {(r["path"], r["seed"]): r["accuracy"] for row in rows if row["preset"] == "none"
            for r in row["runs"]}  # fmt: skip
    lines = ["| preset | lowest accuracy | gap to `none`, same path and seed |", "|---|---|---|"]
    for row in rows:
        gaps = [r["accuracy"] - none[r["path"], r["seed"]] for r in row["runs"]]
        low = min(r["accuracy"] for r in row["runs"])
        text = (
            "-" if row["preset"] == "none" else f"{100 * min(gaps):+.1f} to {100 * max(gaps):+.1f}"
        )
        lines.append(f"| `{row['preset']}` | {100 * low:.1f} | {text} |")
    return "\n".join(lines)


def table(rows: list[dict], epochs: int) -> str:
    def mean_sd(values):
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    none = next(row for row in rows if row["preset"] == "none")
    reference = statistics.mean(r["accuracy"] for r in none["runs"])
    lines = [
        "| preset | test accuracy | gap to `none` | usage | perplexity | epochs | s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        acc, sd = mean_sd([r["accuracy"] for r in row["runs"]])
        usage = statistics.mean(r["usage"] for r in row["runs"])
        ppl = statistics.mean(r["perplexity"] for r in row["runs"])
        secs = statistics.mean(r["seconds"] for r in row["runs"])
        gap = "-" if row["preset"] == "none" else f"{100 * (acc - reference):+.1f}"
        health = ("-", "-") if row["preset"] == "none" else (f"{usage:.3f}", f"{ppl:.1f}")
        lines.append(
            f"| `{row['preset']}` | {100 * acc:.1f} ± {100 * sd:.1f} | {gap} | {health[0]} "
            f"| {health[1]} | {epochs} | {secs:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist1d")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    parser.add_argument("--json", default=None)
    parser.add_argument("--paths", default=None, help="kernel paths, e.g. default,avx2,avx512")
    parser.add_argument("--presets", default=None, help="comma-separated (default: all)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    presets = args.presets.split(",") if args.presets else None
    if args.worker:
        log = lambda r: print(json.dumps(r), flush=True)  # noqa: E731
        run(args.data, args.seeds, args.epochs, log=log, presets=presets)
        return
    if args.paths:
        paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        argv = ["--data", args.data, "--seeds", str(args.seeds), "--epochs", str(args.epochs)]
        argv += ["--presets", args.presets] if args.presets else []
        rows = joined(on_kernel_paths(__file__, argv, paths))
    else:
        rows = run(args.data, args.seeds, args.epochs, presets=presets)
        paths = ["this processor's own"]
    print(f"\n{args.data}, {args.seeds} seeds, kernel paths: {', '.join(paths)}, "
          f"torch {torch.__version__}, {platform.processor()}")  # fmt: skip
    print(table(rows, args.epochs))
    if args.paths:
        print()
        print(spread(rows))
    if args.json:
        settings = {"data": args.data, "seeds": args.seeds, "epochs": args.epochs}
        document = {**provenance(command_line(), threads=1), **settings, "presets": rows}
        with open(args.json, "w") as f:
            f.write(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
