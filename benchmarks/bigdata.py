"""Training on .npy files larger than the memory the process may use.

For each size, writes ``x.npy`` (float32 rows of 128 features, written in chunks
through a file handle, so this process stays small) and ``y.npy``, then runs
``stabq train --data DIR --quantizer fsq --epochs 1`` as a user would, inside a
cgroup v1 memory group limited to ``--limit-mib`` (``memory.limit_in_bytes``
and ``memory.memsw.limit_in_bytes``: no swap either). ``ulimit -v`` cannot
stand in for it: it limits address space, and the mapping of the file alone is
larger than the limit, so ``np.load(mmap_mode="r")`` itself would be refused.

Reported per size: the process's peak resident memory (VmHWM: ``ru_maxrss`` of
the child, which starts from this small process), the cgroup's
``max_usage_in_bytes`` (it counts the page cache the reads fill, which the
kernel reclaims at the limit), its ``failcnt`` and the wall time. Files are
deleted afterwards. Needs root on a cgroup v1 machine. The provenance
(``_measure.provenance``) is read after the runs: torch is not imported before them, so
this process stays small.

    python benchmarks/bigdata.py --sizes-gib 1,2,4 --limit-mib 640 --dir /tmp/stabq-bigdata
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

CGROUP = Path("/sys/fs/cgroup/memory")
CLASSES = 10


def write_npy(directory: Path, rows: int, features: int, seed: int = 0) -> int:
    """``x.npy`` ``(rows, features)`` float32 (class-dependent means) and ``y.npy``."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLASSES, features)).astype(np.float32)
    y = (np.arange(rows) % CLASSES).astype(np.int64)
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, features)}
    with open(directory / "x.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for start in range(0, rows, 65536):
            labels = y[start : start + 65536]
            noise = rng.standard_normal((len(labels), features), dtype=np.float32)
            fh.write((centres[labels] + 2.0 * noise).tobytes())
        fh.flush()
        os.fsync(fh.fileno())  # then out of the page cache: the run's reads are its own
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    np.save(directory / "y.npy", y)
    return (directory / "x.npy").stat().st_size


def run_limited(command: list[str], limit: int) -> dict:
    """Run ``command`` in a fresh memory cgroup limited to ``limit`` bytes."""
    group = CGROUP / f"stabq-bench-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
            if (group / name).exists():
                (group / name).write_text(str(limit))
        wrapped = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"', *command]
        started = time.perf_counter()
        proc = subprocess.Popen(wrapped, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
        return {
            "exit_code": os.waitstatus_to_exitcode(status),
            "seconds": round(seconds, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "cgroup_max_usage_mib": int((group / "memory.max_usage_in_bytes").read_text()) >> 20,
            "cgroup_failcnt": int((group / "memory.failcnt").read_text()),
            "stdout": out.strip()[-300:],
            "stderr": err.strip()[-300:],
        }
    finally:
        group.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-gib", default="1,2,4")
    parser.add_argument("--limit-mib", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--features", type=int, default=128, help="float32 features a row")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/stabq-bigdata"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bigdata-cpu.json"))
    args = parser.parse_args()
    if not os.access(CGROUP, os.W_OK):
        sys.exit(f"{CGROUP} is not writable: this benchmark needs root on cgroup v1")
    results = []
    for gib in (float(s) for s in args.sizes_gib.split(",")):
        rows = int(gib * 2**30) // (4 * args.features)
        data, run = args.dir / "data", args.dir / "run"
        shutil.rmtree(args.dir, ignore_errors=True)
        size = write_npy(data, rows, args.features)
        command = [
            sys.executable, "-m", "stabq", "train", "--data", str(data), "--quantizer", "fsq",
            "--epochs", "1", "--batch-size", str(args.batch_size), "--out", str(run), "--quiet",
        ]  # fmt: skip
        record = {"file_mib": size >> 20, "rows": rows, "features": args.features}
        record.update(limit_mib=args.limit_mib, **run_limited(command, args.limit_mib << 20))
        if record["exit_code"] == 0:
            history = (run / "metrics.jsonl").read_text().splitlines()
            record["val_accuracy"] = json.loads(history[-1])["val_accuracy"]
        results.append(record)
        print(json.dumps(record), flush=True)
        shutil.rmtree(args.dir, ignore_errors=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _measure import command_line, provenance  # imports torch: after the runs

    report = {
        "benchmark": "bigdata",
        **provenance(command_line()),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "platform": platform.platform(),
        },
        "batch_size": args.batch_size,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
