"""The same training on 1 and on 2 processes (torchrun, gloo, CPU), timed side by side.

    python benchmarks/distributed.py [--data mnist1d] [--quantizer vq] [--epochs 20]
                                     [--batch-size 256] [--repeats 3] [--json FILE]

Both runs use the same global batch, so they take the same steps and learn the
same model (up to dropout and float rounding); 2 processes each compute half of
every batch. Each process runs torch on one thread. Reported per run: the
training time rank 0 measures inside ``stabq.train`` (no start-up, no saving)
and the wall time of the whole ``torchrun`` command. 1 and 2 processes alternate,
so a change in the machine's other load hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import command_line, provenance  # noqa: E402


def run_once(nproc: int, args: argparse.Namespace, out: Path) -> tuple[float, float, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", "-m", "stabq", "train", "--data", args.data]
    cmd += ["--quantizer", args.quantizer, "--epochs", str(args.epochs)]
    cmd += ["--batch-size", str(args.batch_size), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600, check=True)
    wall = time.perf_counter() - started
    summary = next(line for line in done.stdout.splitlines() if "val accuracy" in line)
    train_s = float(re.search(r"([0-9.]+) s ->", summary).group(1))
    return train_s, wall, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist1d")
    parser.add_argument("--quantizer", default="vq")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the medians here")
    args = parser.parse_args()
    times: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for nproc in (1, 2):
                train_s, wall, summary = run_once(nproc, args, Path(tmp) / f"m{nproc}-{i}")
                times[nproc].append((train_s, wall))
                print(f"{nproc} process(es), run {i + 1}: {summary}", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average before the summary {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{args.data}, {args.quantizer}, {args.epochs} epochs, global batch {args.batch_size}")
    print("| processes | training s (median) | wall s (median) | speedup (training) |")
    print("|---|---|---|---|")
    base = statistics.median(t for t, _ in times[1])
    rows = []
    for nproc, runs in times.items():
        train_s = statistics.median(t for t, _ in runs)
        wall = statistics.median(w for _, w in runs)
        rows.append({"processes": nproc, "train_s": train_s, "wall_s": wall,
                     "speedup": base / train_s, "runs": runs})  # fmt: skip
        print(f"| {nproc} | {train_s:.1f} | {wall:.1f} | {base / train_s:.2f}x |")
    if args.json is not None:
        settings = {"data": args.data, "quantizer": args.quantizer, "epochs": args.epochs,
                    "batch_size": args.batch_size, "repeats": args.repeats}  # fmt: skip
        document = {**provenance(command_line(), threads=1), **settings, "rows": rows}
        args.json.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
