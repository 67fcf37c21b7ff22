"""The renderers of ``benchmarks/tables.py``: one per kind of generated block.

A block on a benchmark page is named ``KIND:STEM[,STEM...]``, the results it reads being
``benchmarks/results/STEM.json``.
"""

from __future__ import annotations

from collections.abc import Callable

from tablegen import index, inference, precision, quality, runs, speed, summary

ONE: dict[str, Callable[[str], str]] = {
    "presets": quality.presets,
    "stopping": quality.stopping,
    "compare": quality.compare,
    "quantizers": speed.quantizers,
    "sweep": speed.sweep,
    "search-memory": speed.search_memory,
    "train": speed.train,
    "train-compile": speed.train_compile,
    "attacks": runs.attacks,
    "presets-paths": runs.presets_paths,
    "onnx-inference": inference.onnx_inference,
    "memory-copies": runs.memory_copies,
    "precision": precision.precision,
}
SEVERAL: dict[str, Callable[[list[str]], str]] = {
    "bigdata": runs.bigdata,
    "distributed": runs.distributed,
    "fsq-paths": runs.fsq_paths,
    "loop-overhead": speed.loop_overhead,
    "summary": summary.summary,
}
NONE: dict[str, Callable[[], str]] = {"results": index.results, "machine": index.machine}


def render(name: str) -> str:
    """The text of the block named ``name``."""
    kind, _, argument = name.partition(":")
    if kind in ONE and argument and "," not in argument:
        return ONE[kind](argument)
    if kind in SEVERAL and argument:
        return SEVERAL[kind](argument.split(","))
    if kind in NONE and argument == "all":
        return NONE[kind]()
    raise SystemExit(f"benchmarks/tables.py: unknown generated block {name!r}")
