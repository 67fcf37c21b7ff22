"""How a run that trains until it stops improving ends, by what it watches.

    python benchmarks/stopping.py [--encoders mlp,cnn1d] [--methods none,fsq,vq] [--seeds 3]
                                  [--patience 5] [--json benchmarks/results/stopping-cpu.json]

Trains each method, encoder and seed on mnist1d three ways: stopped on the validation
accuracy (the loss breaking ties, compare's default), stopped on the validation loss
alone, and the fixed 40-epoch cosine schedule the comparison used before. Each row gives
the test accuracy, the epochs trained and the best epoch. Torch runs on one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import command_line, provenance
from stabq import BottleneckClassifier, TrainConfig, train
from stabq.data import load_data
from stabq.training import evaluate_model

WAYS = {
    "accuracy": {"patience": True, "monitor": "val_accuracy", "epochs": 150},
    "loss": {"patience": True, "monitor": "val_loss", "epochs": 150},
    "fixed-40": {"patience": False, "epochs": 40},
}


def one(data: tuple, encoder: str, method: str, seed: int, way: str, patience: int) -> dict:
    """Train one run on ``data`` (train and test parts); its test accuracy, epochs, best
    epoch and seconds."""
    train_set, test_set = data
    spec = dict(WAYS[way])
    spec["patience"] = patience if spec["patience"] else None
    torch.manual_seed(seed)
    model = BottleneckClassifier(
        train_set.input_shape, train_set.num_classes, method, encoder=encoder
    )
    config = TrainConfig(seed=seed, progress=False, **spec)
    started = time.perf_counter()
    result = train(model, train_set, config=config)
    seconds = time.perf_counter() - started
    figures = evaluate_model(model, torch.from_numpy(test_set.x), torch.from_numpy(test_set.y))
    return {
        "encoder": encoder, "method": method, "seed": seed, "way": way,
        "test_accuracy": figures["accuracy"], "epochs": len(result.history),
        "best_epoch": result.best_epoch, "seconds": seconds,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", default="mlp")
    parser.add_argument("--methods", default="none,fsq,vq")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_set = load_data("mnist1d", "train")
    data = (train_set, load_data("mnist1d", "test", classes=train_set.classes))
    runs = []
    for encoder in args.encoders.split(","):
        for method in args.methods.split(","):
            for seed in range(args.seeds):
                for way in WAYS:
                    runs.append(one(data, encoder, method, seed, way, args.patience))
                    r = runs[-1]
                    print(f"{encoder} {method} seed {seed} {way}: {100 * r['test_accuracy']:.1f}% "
                          f"in {r['epochs']} epochs, {r['seconds']:.0f} s", flush=True)  # fmt: skip
    print("| encoder | method | stopped on | test acc % (mean) | epochs (median) |")
    print("|---|---|---|---|---|")
    for encoder in args.encoders.split(","):
        for method in args.methods.split(","):
            for way in WAYS:
                mine = [
                    r
                    for r in runs
                    if (r["encoder"], r["method"], r["way"]) == (encoder, method, way)
                ]
                acc = statistics.mean(r["test_accuracy"] for r in mine)
                epochs = statistics.median(r["epochs"] for r in mine)
                print(f"| {encoder} | {method} | {way} | {100 * acc:.1f} | {epochs:g} |")
    if args.json:
        document = {**provenance(command_line(), threads=1), "patience": args.patience}
        document["runs"] = runs
        Path(args.json).write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
