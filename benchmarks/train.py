"""End-to-end training throughput of BottleneckClassifier per preset, against the continuous one.

    python benchmarks/train.py [--data mnist1d] [--epochs 3] [--repeats 3] [--compile]
                               [--encoders mlp,cnn1d] [--threads 1]
                               [--json benchmarks/results/train-cpu.json]

Each repeat trains every preset once, in turn (so slow drifts of the machine
hit all alike), with the default TrainConfig (batch 128, guards on) for
``--epochs`` epochs; throughput is training samples times epochs over the
wall time of ``stabq.train`` (per-epoch validation included), median over
repeats, and its ratio to the continuous model (``none``) with the same encoder
(``--encoders``: the MLP, the CNN for sequences, ...). Peak memory is the
rise over one more epoch after a warm-up epoch, in a fresh process (see
``_measure.py``). ``--compile`` adds each preset with ``TrainConfig(compile=True)``,
measured in the same alternation, after one untimed run that pays the compilation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import command_line, machine, peak_mib, provenance, publish
from stabq import BottleneckClassifier, TrainConfig, preset_names, train
from stabq.data import load_data, train_val_split


def build(data, preset: str, encoder: str) -> BottleneckClassifier:
    torch.manual_seed(0)
    return BottleneckClassifier(data.input_shape, data.num_classes, preset, encoder=encoder)


def run_once(data, epochs: int, compiled: bool, model: BottleneckClassifier) -> float:
    """Seconds of one training run of ``model``."""
    torch.manual_seed(0)
    config = TrainConfig(epochs=epochs, seed=0, progress=False, compile=compiled)
    started = time.perf_counter()
    train(model, data, config=config)
    return time.perf_counter() - started


def make_epoch(data_name: str, preset: str, encoder: str, device: str) -> Callable[[], None]:
    """One training epoch of a preset (for the peak-memory child)."""
    torch.set_num_threads(1)
    data = load_data(data_name, "train")
    model = build(data, preset, encoder)
    config = TrainConfig(epochs=1, seed=0, progress=False, device=device)
    return lambda: train(model, data, config=config)


COLUMNS = [
    ("encoder", "encoder", "{}"),
    ("preset", "preset", "{}"),
    ("compiled", "compiled", "{}"),
    ("samples/s", "samples_per_s", "{:,.0f}"),
    ("continuous / this", "slowdown", "{:.2f}x"),
    ("peak MiB (1 epoch)", "peak_mib", "{:.1f}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist1d")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time compile=True")
    parser.add_argument("--encoders", default="mlp", help="comma-separated, e.g. mlp,cnn1d")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data(args.data, "train")
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    flags = [False, True] if args.compile else [False]
    cases = [(e, p, c) for c in flags for e in encoders for p in preset_names()]
    models = {}
    for encoder, preset, compiled in cases:  # warm-up (k-means, compilation); models are kept
        models[encoder, preset, compiled] = build(data, preset, encoder)
        run_once(data, 1, compiled, models[encoder, preset, compiled])
    times: dict[tuple[str, str, bool], list[float]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case, model in models.items():
            times[case].append(run_once(data, args.epochs, case[2], model))
    train_part, _ = train_val_split(data, TrainConfig().val_fraction, 0)
    samples = train_part.x.shape[0] * args.epochs
    rows = [
        {"encoder": e, "preset": p, "compiled": c,
         "samples_per_s": samples / statistics.median(times[e, p, c])}
        for e, p, c in cases
    ]  # fmt: skip
    base = {
        r["encoder"]: r["samples_per_s"]
        for r in rows
        if r["preset"] == "none" and not r["compiled"]
    }
    for row in rows:
        row["slowdown"] = base[row["encoder"]] / row["samples_per_s"]
        if not args.no_memory and not row["compiled"]:
            row["peak_mib"] = peak_mib(make_epoch, args.data, row["preset"], row["encoder"], "cpu")
    report = {**provenance(command_line(), args.threads), "machine": machine("cpu")}
    report.update(data=args.data, epochs=args.epochs, repeats=args.repeats, rows=rows)
    title = f"{args.data}, {args.epochs} epochs, median of {args.repeats}"
    publish(report, COLUMNS, title, args.json)


if __name__ == "__main__":
    main()
