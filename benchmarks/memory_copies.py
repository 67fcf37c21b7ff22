"""Copies of the data a run on arrays in memory holds: ``stabq compare`` on an ``.npz``.

Writes ``train.npz`` (``--rows`` x ``--features`` float32, Fashion-MNIST's shape by
default, labels of 10 classes) and ``test.npz`` (``--test-rows``), and the same files of
``--base-rows`` rows, then runs

    stabq compare --data train.npz --test-data test.npz --methods fsq --seeds 1 --epochs 1

as a user would, once on the small files (the process's own base: torch, the model, the
report) and once on the large ones, for each source tree given (``--src LABEL=PATH``,
``PATH`` put on ``PYTHONPATH``; default ``after=src``). Reported: each run's peak
resident memory (``ru_maxrss`` of the child), the peak above the base, and that as
copies of the features held (train and test, float32). The fsq row of each table is kept
too: the same rows and seed give the same figures in every tree.

    python benchmarks/memory_copies.py --src before=/tmp/stabq-before/src --src after=src
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CLASSES = 10


def write_npz(path: Path, rows: int, features: int, seed: int) -> int:
    """``x`` ``(rows, features)`` float32 in [0, 1) nudged by class, ``y`` of 10 classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, rows)
    x = rng.random((rows, features), dtype=np.float32)
    x += (np.float32(0.01) * y[:, None]).astype(np.float32)
    np.savez(path, x=x, y=y)
    return x.nbytes


def write_all(files: dict[str, tuple[Path, Path, int]], args: argparse.Namespace) -> None:
    """The train and test files of each size, ``--test-rows`` per ``--rows`` in the test."""
    for seed, (train, test, rows) in enumerate(files.values()):
        write_npz(train, rows, args.features, 2 * seed)
        write_npz(test, max(1, rows * args.test_rows // args.rows), args.features, 2 * seed + 1)


def peak_run(src: str, train: Path, test: Path, epochs: int) -> dict:
    """One ``stabq compare`` with ``src`` on ``PYTHONPATH``: its peak and its fsq row. The
    child's peak counts this process's own until its exec: this one holds no data."""
    command = [
        sys.executable, "-m", "stabq", "compare", "--data", str(train), "--test-data",
        str(test), "--methods", "fsq", "--seeds", "1", "--epochs", str(epochs),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak, not the largest yet
        out.seek(0), err.seek(0)
        text, problem = out.read().decode(), err.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"stabq compare failed: {problem[-500:]}")
    row = next((line.strip() for line in text.splitlines() if line.startswith("fsq ")), "")
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "fsq_row": " ".join(row.split())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--test-rows", type=int, default=10000)
    parser.add_argument("--base-rows", type=int, default=600)
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--src", action="append", help="LABEL=PATH of a source tree")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/stabq-memory-copies"))
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/memory-copies-cpu.json")
    )
    args = parser.parse_args()
    trees = [s.split("=", 1) for s in (args.src or ["after=src"])]
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    files = {
        name: (args.dir / f"{name}-train.npz", args.dir / f"{name}-test.npz", rows)
        for name, rows in (("base", args.base_rows), ("data", args.rows))
    }
    writer = mp.get_context("fork").Process(target=write_all, args=(files, args))
    writer.start()  # in a child: this process stays small, and so does each run's start
    writer.join()
    data_mib = (args.rows + args.test_rows) * args.features * 4 / 2**20
    results = []
    for label, src in trees:
        base = peak_run(src, *files["base"][:2], args.epochs)
        run = peak_run(src, *files["data"][:2], args.epochs)
        above = run["peak_rss_mib"] - base["peak_rss_mib"]
        record = {"tree": label, "base_rss_mib": base["peak_rss_mib"], **run}
        record.update(above_base_mib=round(above, 1), copies=round(above / data_mib, 2))
        results.append(record)
        print(json.dumps(record), flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _measure import command_line, provenance  # imports torch: after the runs

    report = {
        "benchmark": "memory-copies",
        **provenance(command_line(), threads=1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": args.rows, "test_rows": args.test_rows, "base_rows": args.base_rows,
        "features": args.features, "epochs": args.epochs, "data_mib": round(data_mib, 1),
        "results": results,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
