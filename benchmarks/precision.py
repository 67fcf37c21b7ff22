"""bf16-mixed against float32: every preset trained both ways, its accuracy and health.

    python benchmarks/precision.py [--data mnist1d] [--seeds 3] [--epochs 100]
                                   [--precisions 32,bf16-mixed] [--presets fsq,vq]
                                   [--workers 2] [--json benchmarks/results/precision-bf16-cpu.json]

Each run is what ``stabq train --data DATA --quantizer PRESET --seed S --precision P``
trains (stabq's defaults: 100 epochs, AdamW 3e-3, the guards on), judged as
``stabq compare`` judges a run (:func:`stabq.compare.runs.run_one`): the test accuracy
of the trained weights (evaluated in float32), the last epoch's validation accuracy
(under the run's autocast), the test rows' fill, perplexity and dead codes, the
guard's events and the health verdict. Each run trains in its own process with torch
on one thread, ``--workers`` at a time. The JSON is rewritten after every run, and a
run already in it is not trained again: a cut-short benchmark continues where it
stopped when started again with the same command.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from _measure import command_line, provenance

RESULT = Path(__file__).parent / "results" / "precision-bf16-cpu.json"
KEPT = (
    "test_accuracy", "test_loss", "test_fill", "test_perplexity", "test_dead_codes",
    "test_joint_perplexity", "guard_events", "diverged", "seconds", "epochs",
)  # fmt: skip
_DATA: dict[str, tuple] = {}


def _setup() -> None:
    torch.set_num_threads(1)


def one_run(data: str, preset: str, seed: int, precision: str, epochs: int) -> dict:
    """Train and judge one run (in a worker process); its record, without the history."""
    from stabq.compare.methods import Method
    from stabq.compare.runs import run_one
    from stabq.data import load_data
    from stabq.data.labeled import require_classes
    from stabq.health import verdicts as health
    from stabq.training import TrainConfig

    if data not in _DATA:
        _DATA[data] = (require_classes(load_data(data, "train")), load_data(data, "test"))
    train_set, test_set = _DATA[data]
    config = TrainConfig(epochs=epochs, device="cpu", progress=False, precision=precision)
    record = run_one(Method(preset, preset), seed, train_set, test_set, config)
    classes = train_set.num_classes
    verdict = health.run_verdict(record, classes, quantized=record["codebook_size"] > 0)
    last = record["history"][-1] if record["history"] else {}
    return {
        "preset": preset, "seed": seed, "precision": precision,
        **{key: record.get(key) for key in KEPT},
        "fill": health.run_figures(record)["fill"] if record["codebook_size"] else None,
        "val_accuracy": last.get("val_accuracy"),
        "scaler_skips": sum(row.get("scaler_skips", 0) for row in record["history"]),
        "verdict": verdict,
        "error": record.get("error"),
    }  # fmt: skip


def _save(path: Path, document: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, path)


def main() -> None:
    from stabq import preset_names

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="mnist1d")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--precisions", default="32,bf16-mixed")
    parser.add_argument("--presets", default=None, help="comma-separated (default: every one)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULT)
    args = parser.parse_args()
    presets = args.presets.split(",") if args.presets else preset_names()
    precisions = args.precisions.split(",")
    document = {"runs": []}
    if args.json.is_file():  # continue a benchmark that was cut short
        document = json.loads(args.json.read_text())
    done = {(r["preset"], r["seed"], r["precision"]) for r in document["runs"]}
    document.update(
        provenance(command_line(), threads=1), data=args.data, epochs=args.epochs,
        seeds=args.seeds, precisions=precisions, workers=args.workers,
    )  # fmt: skip
    jobs = [  # seed by seed: a cut-short benchmark has every preset's first seeds
        (args.data, preset, seed, precision, args.epochs)
        for seed in range(args.seeds)
        for preset in presets
        for precision in precisions
        if (preset, seed, precision) not in done
    ]
    print(f"{len(jobs)} runs to do, {len(done)} done", file=sys.stderr, flush=True)
    os.environ["OMP_NUM_THREADS"] = "1"
    context = mp.get_context("spawn")
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_setup) as pool:
        futures = [pool.submit(one_run, *job) for job in jobs]
        for future in as_completed(futures):
            record = future.result()
            document["runs"].append(record)
            _save(args.json, document)
            print(
                f"{record['preset']} seed {record['seed']} {record['precision']}: "
                f"test {record['test_accuracy']:.4f} {record['verdict']} "
                f"{record['seconds']:.0f} s ({time.perf_counter() - started:.0f} s in)",
                file=sys.stderr, flush=True,
            )  # fmt: skip


if __name__ == "__main__":
    main()
