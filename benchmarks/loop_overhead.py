"""What ``stabq.train`` costs over the loop a user writes, per preset.

    python benchmarks/loop_overhead.py [--data mnist1d] [--epochs 3] [--repeats 5]
                                       [--presets none,fsq] [--threads 1]
                                       [--json benchmarks/results/loop-overhead-cpu.json]

Every side trains the same ``BottleneckClassifier`` (the MLP ``stabq.train`` builds for
the data), from the same initial weights, on the same training and validation rows, with
AdamW, batches of 128 and the gradient norm clipped to 1.0, for ``--epochs`` epochs:

- **plain**: the 20-line loop of :func:`plain_loop`: shuffle, forward, cross-entropy plus
  the quantizer's auxiliary loss, backward, clip, step; once an epoch, the validation
  loss and accuracy in eval mode, as ``stabq.train`` measures them once an epoch;
- **stabq.train**: its defaults (guards on; the collapse monitor's per-step figures on),
  a fixed length (no early stopping), no progress bar;
- **guards off**: the same with ``TrainConfig(guards=False)``.

The sides run in turn within each repeat, in one process, each from a fresh copy of the
preset's initial model. Each run's wall and CPU seconds are recorded (torch on one thread:
the CPU seconds are the run's own, whatever else loads the machine); the ratios are the
medians over repeats of each repeat's ratio of CPU seconds. The plain loop of a quantized
model is also set against the plain loop of the continuous model (``none``). Other
processes may load the machine: only the ratios, measured side by side, carry over.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _measure import command_line, machine, provenance, publish
from stabq import BottleneckClassifier, TrainConfig, preset_names, train
from stabq.data import load_data, train_val_split

BATCH, CLIP = 128, 1.0


def plain_loop(model, x, y, vx, vy, epochs: int, lr: float, weight_decay: float) -> float:
    """The loop a user writes; returns the last validation accuracy."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], BATCH):
            idx = order[start : start + BATCH]
            logits, out = model(x[idx])
            loss = F.cross_entropy(logits, y[idx]) + out.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
        model.eval()
        with torch.no_grad():
            logits, _ = model(vx)
            val_loss = float(F.cross_entropy(logits, vy))
            accuracy = float((logits.argmax(-1) == vy).float().mean())
    return accuracy if val_loss == val_loss else 0.0


def seconds(fn) -> tuple[float, float]:
    """Wall and CPU seconds of one call (torch on one thread: the CPU time is the run's own,
    whatever else loads the machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def sides(data, preset: str, epochs: int) -> dict:
    """The three ways to train ``preset``, each a callable of a fresh model copy."""
    torch.manual_seed(0)
    initial = BottleneckClassifier(data.input_shape, data.num_classes, preset)
    part, val = train_val_split(data, TrainConfig().val_fraction, 0)
    x, y = torch.from_numpy(part.x).float(), torch.from_numpy(part.y)
    vx, vy = torch.from_numpy(val.x).float(), torch.from_numpy(val.y)
    initial.set_feature_stats(x.mean(0), x.std(0))  # as stabq.train sets them
    defaults = TrainConfig()

    def run_plain(model):
        torch.manual_seed(0)
        plain_loop(model, x, y, vx, vy, epochs, defaults.lr, defaults.weight_decay)

    def run_train(model, guards: bool):
        config = TrainConfig(epochs=epochs, seed=0, progress=False, device="cpu", guards=guards)
        train(model, (part.x, part.y), (val.x, val.y), config=config)

    return {
        "plain": lambda: copy.deepcopy(initial),
        "runs": {
            "plain": run_plain,
            "train": lambda m: run_train(m, True),
            "guards_off": lambda m: run_train(m, False),
        },
    }


COLUMNS = [
    ("preset", "preset", "{}"),
    ("plain loop s", "plain_s", "{:.3f}"),
    ("plain loop CPU s", "plain_cpu_s", "{:.3f}"),
    ("stabq.train / plain", "train_ratio", "{:.2f}x"),
    ("guards off / plain", "guards_off_ratio", "{:.2f}x"),
    ("quantized / continuous (plain)", "plain_vs_none", "{:.2f}x"),
]


def measure(data, presets: list[str], epochs: int, repeats: int) -> list[dict]:
    """Median seconds of each side of each preset, the sides alternated within a repeat;
    the ratios are medians of each repeat's ratios of CPU seconds."""
    cases = {preset: sides(data, preset, epochs) for preset in presets}
    for case in cases.values():  # warm-up: lazy initialisation is no per-run cost
        for run in case["runs"].values():
            run(case["plain"]())
    times = {(p, s): [] for p, case in cases.items() for s in case["runs"]}
    for _ in range(repeats):
        for preset, case in cases.items():
            for side, run in case["runs"].items():
                model = case["plain"]()
                times[preset, side].append(seconds(lambda: run(model)))  # noqa: B023
    rows = []
    for preset in presets:
        cpu = {
            side: [t[1] for t in times[preset, side]] for side in ("plain", "train", "guards_off")
        }
        row = {"preset": preset}
        for side in cpu:
            row[f"{side}_s"] = statistics.median(t[0] for t in times[preset, side])
            row[f"{side}_cpu_s"] = statistics.median(cpu[side])
        for side in ("train", "guards_off"):
            ratios = [t / p for t, p in zip(cpu[side], cpu["plain"], strict=True)]
            row[f"{side}_ratio"] = statistics.median(ratios)
        rows.append(row)
    none = next((r["plain_cpu_s"] for r in rows if r["preset"] == "none"), None)
    for row in rows:
        row["plain_vs_none"] = None if none is None else row["plain_cpu_s"] / none
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist1d")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--presets", default=None, help="comma-separated; default: all")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data(args.data, "train")
    presets = args.presets.split(",") if args.presets else preset_names()
    rows = measure(data, presets, args.epochs, args.repeats)
    report = {**provenance(command_line(), args.threads), "machine": machine("cpu")}
    report.update(data=args.data, epochs=args.epochs, repeats=args.repeats, batch_size=BATCH,
                  grad_clip=CLIP, validation="once an epoch, both sides", rows=rows)  # fmt: skip
    title = f"{args.data}, {args.epochs} epochs, median of {args.repeats}"
    publish(report, COLUMNS, title, args.json)


if __name__ == "__main__":
    main()
