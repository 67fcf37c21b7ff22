"""How close each preset ends to its clean run under attack, over seeds and CPU kernel paths.

    python benchmarks/attacks.py [--seeds 5] [--paths default,avx2,avx512] [--json out.json]

The attacks and the runs are tests/test_attacks.py's own (poisoned batches,
lr 1.0, features x 1e4; 1,200 rows of synthetic:16, 12 epochs). A chaotic run
lands elsewhere after a last-bit difference, so one run's accuracy says little;
this prints, for every preset and attack, the median test accuracy over seeds
and kernel paths, its range, the median gap to the clean run, how many runs
stopped with a TrainingError and the guard events per run. Each kernel path
runs in its own process (``ATEN_CPU_CAPABILITY``), torch on one thread; the
paths run two at a time. ``--json`` writes every run with the provenance
(``_measure.provenance``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from _measure import command_line, on_kernel_paths, provenance

TESTS = Path(__file__).resolve().parent.parent / "tests"


def worker(seeds: int, presets: list[str] | None = None) -> None:
    """Every preset, clean and under each attack, for seeds 0..seeds-1: a JSON line each."""
    import torch

    sys.path.insert(0, str(TESTS))
    from stabq import TrainingError, preset_names
    from test_attacks import ATTACKS, blobs_data, run

    torch.set_num_threads(1)
    data = blobs_data()
    path = torch.backends.cpu.get_cpu_capability()
    for preset in presets or preset_names():
        for attack in ("clean", *ATTACKS):
            for seed in range(seeds):
                started = time.perf_counter()
                record = {"path": path, "preset": preset, "attack": attack, "seed": seed}
                try:
                    outcome = run(preset, attack, data, seed=seed)
                    record.update(accuracy=outcome.accuracy, events=len(outcome.events))
                except TrainingError as err:
                    record.update(accuracy=None, events=None, error=str(err))
                record["seconds"] = time.perf_counter() - started
                print(json.dumps(record), flush=True)


def table(records: list[dict]) -> str:
    """One markdown row per preset and attack."""

    def finished(preset: str, attack: str) -> list[dict]:
        return [r for r in records if (r["preset"], r["attack"]) == (preset, attack)]

    lines = [
        "| preset | attack | median accuracy | range | median gap to clean | stopped | "
        "guard events per run |",
        "|---|---|---|---|---|---|---|",
    ]
    presets = list(dict.fromkeys(r["preset"] for r in records))
    attacks = list(dict.fromkeys(r["attack"] for r in records))
    for preset in presets:
        clean = {(r["path"], r["seed"]): r["accuracy"] for r in finished(preset, "clean")}
        for attack in attacks:
            runs = finished(preset, attack)
            done = [r for r in runs if r["accuracy"] is not None]
            accs = [r["accuracy"] for r in done]
            gaps = [
                r["accuracy"] - clean[r["path"], r["seed"]]
                for r in done
                if clean.get((r["path"], r["seed"])) is not None
            ]
            events = [r["events"] for r in done]
            stopped = f"{len(runs) - len(done)} of {len(runs)}"
            if not done:
                lines.append(f"| `{preset}` | {attack} | - | - | - | {stopped} | - |")
                continue
            gap = "-" if attack == "clean" else f"{100 * statistics.median(gaps):+.1f}"
            lines.append(
                f"| `{preset}` | {attack} | {100 * statistics.median(accs):.1f} | "
                f"{100 * min(accs):.1f}-{100 * max(accs):.1f} | {gap} | {stopped} | "
                f"{min(events)}-{max(events)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--paths", default="default,avx2,avx512")
    parser.add_argument("--json", default=None)
    parser.add_argument("--presets", default=None, help="comma-separated (default: all)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    presets = args.presets.split(",") if args.presets else None
    if args.worker:
        worker(args.seeds, presets)
        return
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    started = time.perf_counter()
    argv = ["--seeds", str(args.seeds)] + (["--presets", args.presets] if args.presets else [])
    records = on_kernel_paths(__file__, argv, paths)
    print(
        f"{args.seeds} seeds x kernel paths {', '.join(paths)}; torch on one thread; "
        f"{platform.machine()}, {time.perf_counter() - started:.0f} s\n"
    )
    print(table(records))
    if args.json:
        settings = {"seeds": args.seeds, "paths": paths}
        document = {**provenance(command_line(), threads=1), **settings, "runs": records}
        Path(args.json).write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
