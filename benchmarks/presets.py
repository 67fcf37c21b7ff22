"""Every preset on a built-in dataset with default training: accuracy, codebook health, time.

    python benchmarks/presets.py [--data mnist1d] [--seeds 3] [--epochs 100] [--json out.json]

Prints a markdown table (mean and standard deviation over seeds) for README.
Torch runs on one thread so the timings do not depend on what else runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from stabq import BottleneckClassifier, TrainConfig, preset_names, train
from stabq.data import load_data
from stabq.training.loop import evaluate_model


def run(data: str, seeds: int, epochs: int) -> list[dict]:
    train_set, test_set = load_data(data, "train"), load_data(data, "test")
    tx, ty = torch.from_numpy(test_set.x), torch.from_numpy(test_set.y)
    rows = []
    for name in preset_names():
        runs = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = BottleneckClassifier(train_set.num_features, train_set.num_classes, name)
            started = time.perf_counter()
            result = train(model, train_set, config=TrainConfig(epochs=epochs, seed=seed))
            seconds = time.perf_counter() - started
            runs.append({**evaluate_model(model, tx, ty), "seconds": seconds,
                         "guard_events": len(result.guard_events)})  # fmt: skip
        rows.append({"preset": name, "runs": runs})
        print(f"done {name}", flush=True)
    return rows


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
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = run(args.data, args.seeds, args.epochs)
    print(f"\n{args.data}, {args.seeds} seeds, torch {torch.__version__}, {platform.processor()}")
    print(table(rows, args.epochs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
