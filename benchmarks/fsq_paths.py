"""FSQ's two forms side by side: tanh against sigmoid, by input size, in one process.

    python benchmarks/fsq_paths.py [--repeats 15] [--json benchmarks/results/fsq-paths-cpu.json]

``stabq.quantizers.fsq`` rounds ``tanh(z + shift)`` either with tanh itself or with
``2 sigmoid(2 (z + shift)) - 1`` (rows near a rounding tie computed again by tanh), and
picks the sigmoid form for float32 on CPU with avx2 or avx512 kernels from
``SIGMOID_MIN_ELEMENTS`` elements. This
script is where that threshold comes from: for each size it checks that both forms give
the same codes and indices, then times a user-style step of each (``fsq_bound_round`` with
the form forced, the FSQ module's own call, then ``codes.sum().backward()``), the two
alternated in one loop, median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import alternate, command_line, machine, markdown, provenance, save_report

LEVELS = [8, 8, 8, 5, 5, 5]
SIZES = (256, 1024, 4096, 8192, 16384, 65536, 262144)  # rows of len(LEVELS)
COLUMNS = [
    ("rows", "rows", "{}"),
    ("elements", "elements", "{}"),
    ("tanh ms", "tanh_ms", "{:.3f}"),
    ("sigmoid ms", "sigmoid_ms", "{:.3f}"),
    ("tanh / sigmoid", "speedup", "{:.2f}x"),
    ("picked", "picked", "{}"),
]


def user_step(x: torch.Tensor, sigmoid: bool):
    """One step as a user's loop runs FSQ, in the given form."""
    from stabq.quantizers.fsq import fsq_bound_round

    levels, cache = torch.tensor(LEVELS, dtype=torch.int32), {}

    def run() -> None:
        z = x.detach().requires_grad_()
        codes, _ = fsq_bound_round(z, levels, cache, sigmoid=sigmoid)
        codes.sum().backward()

    return run


def measure(rows: int, repeats: int) -> dict:
    from stabq.quantizers import fsq

    torch.manual_seed(rows)
    x = torch.randn(rows, len(LEVELS)) * 2
    levels = torch.tensor(LEVELS, dtype=torch.int32)
    tanh_out = fsq.fsq_bound_round(x, levels, sigmoid=False)
    sigmoid_out = fsq.fsq_bound_round(x, levels, sigmoid=True)
    assert all(map(torch.equal, tanh_out, sigmoid_out)), f"the forms differ at {rows} rows"
    times = alternate({"tanh": user_step(x, False), "sigmoid": user_step(x, True)}, repeats, "cpu")
    elements = rows * len(LEVELS)
    return {
        "rows": rows,
        "elements": elements,
        "tanh_ms": times["tanh"],
        "sigmoid_ms": times["sigmoid"],
        "speedup": times["tanh"] / times["sigmoid"],
        "picked": "sigmoid"
        if fsq._use_sigmoid(x, fsq._tiled(levels, 16, x.dtype, x.device))
        else "tanh",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    report = {
        **provenance(command_line()),
        "machine": machine("cpu"),
        "repeats": args.repeats,
        "rows": [measure(rows, args.repeats) for rows in SIZES],
    }
    print(f"\n{report['machine']}, {report['cpu_capability']}, median of {args.repeats}\n")
    print(markdown(report["rows"], COLUMNS))
    if args.json:
        save_report(report, args.json)


if __name__ == "__main__":
    main()
