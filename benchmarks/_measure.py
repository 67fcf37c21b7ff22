"""Timing and peak-memory helpers the benchmarks share.

Peak memory is measured in a fresh process per measurement: the callable is
built, run once (lazy initialisation such as BLAS buffers or k-means is not a
per-step cost), then the peak is reset and one more run is measured: on CPU the
rise of the peak resident set (VmHWM, reset through Linux's ``clear_refs``),
with glibc told to map every block over 128 KiB on its own so freed tensors
leave the resident set at once; on CUDA ``max_memory_allocated``.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def elapsed_ms(fn: Callable[[], Any], device: str) -> float:
    """Wall time of one call, synchronised on CUDA."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def alternate(runs: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, float]:
    """Median ms of each callable, run in turn ``repeats`` times after two warm-ups each."""
    for fn in runs.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(elapsed_ms(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _child(make: Callable[..., Callable[[], Any] | None], args: tuple, queue: mp.Queue) -> None:
    device = args[-1]
    run = make(*args)
    if run is None:
        queue.put(None)
        return
    run()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        queue.put((torch.cuda.max_memory_allocated() - before) / 2**20)
        return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from the current resident set
    before = _status_kib("VmRSS")
    run()
    queue.put((_status_kib("VmHWM") - before) / 1024)


def peak_mib(make: Callable[..., Callable[[], Any] | None], *args: Any) -> float | None:
    """Peak extra MiB of one call of ``make(*args)()`` after a warm-up call, in a fresh
    process (``make`` must be a module-level function; its last argument is the device)."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(make, args, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def machine(device: str) -> str:
    """One line naming where the numbers came from."""
    if device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return f"{device} ({where}), torch {torch.__version__}, {torch.get_num_threads()} threads"


# settings of the environment that change what a benchmark measures
ENVIRONMENT = ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def command_line(script: str | None = None, args: list[str] | None = None) -> str:
    """A benchmark's command as a user would type it from the repository root, with the
    environment settings above that are set (``ATEN_CPU_CAPABILITY=avx2 python ...``):
    ``script`` (this one's name) with ``args`` (this process's arguments) by default."""
    env = [f"{name}={os.environ[name]}" for name in ENVIRONMENT if name in os.environ]
    script = f"benchmarks/{script or os.path.basename(sys.argv[0])}"
    return shlex.join([*env, "python", script, *(sys.argv[1:] if args is None else args)])


def provenance(command: str, threads: int | None = None) -> dict:
    """Where and when a result was measured: the command, the commit, the date (UTC), the
    processor, its cores, the torch threads (``threads`` when the runs set their own),
    torch's version and its CPU kernel path. The benchmark pages print these with each table."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)  # fmt: skip
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True)  # fmt: skip
    commit = git.stdout.strip() or None
    if commit and dirty.stdout.strip():
        commit += "+changes"
    return {
        "command": command,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def save_report(report: dict, path: str | Path) -> None:
    """Write a benchmark's report as JSON at ``path``, making its folder if need be."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))


def markdown(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table: ``columns`` are (header, key, format); missing values print '-'."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["-" if row.get(k) is None else fmt.format(row[k]) for _, k, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def publish(report: dict, columns: list[tuple[str, str, str]], title: str,
            path: str | Path | None) -> None:  # fmt: skip
    """Print ``report["rows"]`` as a markdown table under its machine and ``title``; with
    ``path``, save the report there as JSON."""
    print(f"\n{report['machine']}, {title}\n")
    print(markdown(report["rows"], columns))
    if path:
        save_report(report, path)


def on_kernel_paths(script: str, args: list[str], paths: list[str]) -> list[dict]:
    """Run ``python script --worker ARGS`` once per CPU kernel path (``ATEN_CPU_CAPABILITY``,
    which sets both ATen's kernels and the inductor's), two processes at a time, torch
    and OpenMP on one thread each; the JSON lines they print, in order of ``paths``."""
    records: list[dict] = []
    for start in range(0, len(paths), 2):
        procs = [
            subprocess.Popen(
                [sys.executable, script, "--worker", *args],
                env={**os.environ, "ATEN_CPU_CAPABILITY": path, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                text=True,
            )
            for path in paths[start : start + 2]
        ]
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"{script}: a worker failed with status {proc.returncode}")
            records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return records
