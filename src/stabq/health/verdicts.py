"""Health verdicts: ok / rescued / under-used / collapsed / stalled / diverged, with reasons.

A comparison judges each method from its runs (one per seed). Per run, with
``K`` codes per codebook, ``C`` codebooks and ``N`` test inputs:

    fillable     = min(K, N)                   codes one codebook can show on N inputs
    used_c       = |{k : n_ck > 0}|            codes of codebook c the test inputs reached
    fill         = mean_c used_c / fillable    usage against what the test set can fill
    effective    = perplexity of the joint code (the tuple of C indices the head
                   receives; for C = 1 the plain perplexity)
    dead codes   = K - used_c, mean over codebooks: codes of a learned codebook that
                   no test input reached (:mod:`stabq.metrics`, the one definition
                   every figure uses). Grids (FSQ and other quantizers with
                   ``grid = True``) have none: an unvisited cell of a fixed grid
                   costs nothing and is not dead; their table shows occupied cells
                   and perplexity instead.

The verdict of a run, in order of precedence (the first that holds):

    diverged    the run ended in a TrainingError, or its loss, accuracy or weights are
                not finite
    stalled     test accuracy <= STALLED_ACCURACY / number of classes (1.5 x chance for
                balanced classes) and the last epoch's training loss >= STALLED_LOSS x
                ln(number of classes) (cross-entropy at chance): the model learned
                nothing, however many codes it spreads its inputs over
    collapsed   effective < number of classes: fewer effective codes than classes
                cannot separate them (the joint code, so that PQ's eight small
                subspaces are not called collapsed when their product separates)
    under-used  fill < UNDER_USED_BELOW: the test set could show ten times more codes
                than the method uses
    rescued     guard events > 0, and it ended as none of the above
    ok          none of the above

A method's verdict is the worst (highest precedence) over its runs, the reason
giving its figures (means over the runs with that verdict) and, when not all
runs share it, how many did. under-used outranks rescued: a rescued run that
ends with 5% of its codes is judged by where it ended; its rescues stay in the
``rescued`` column.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stabq.health.usage import codebook_figures

UNDER_USED_BELOW = 0.10  # fill under this (strictly) is under-used; exactly 10% is not
STALLED_ACCURACY = 1.5  # stalled: test accuracy at most this many times 1 / classes ...
STALLED_LOSS = 0.9  # ... and the last training loss at least this share of ln(classes)
VERDICTS = ("diverged", "stalled", "collapsed", "under-used", "rescued", "ok")  # worst first
HEALTHY = ("ok", "rescued")  # verdicts a method may be favoured with


def is_grid(quantizer: nn.Module) -> bool:
    """True for quantizers whose codes are cells of a fixed grid (FSQ): no dead codes."""
    return bool(getattr(quantizer, "grid", False))


def joint_perplexity(indices: Tensor) -> float:
    """Perplexity of the rows of ``indices`` ``(N,)`` or ``(N, C)`` taken as whole codes
    (entries of -1 count as a code like any other); 0 for no rows."""
    flat = indices.reshape(indices.shape[0], -1) if indices.dim() else indices.reshape(1, 1)
    if flat.shape[0] == 0:
        return 0.0
    _, counts = torch.unique(flat, dim=0, return_counts=True)
    p = counts.double() / flat.shape[0]
    return math.pow(2.0, float(-(p * p.log2()).sum()))


def fill_usage(code_counts: Sequence[Sequence[int]]) -> dict[str, float]:
    """Usage against what the test set can fill, from per-codebook code counts ``(C, K)``:
    ``inputs`` (N, the rows the first codebook counted), ``fillable`` (min(K, N)),
    ``used`` (mean over codebooks of the codes seen) and ``fill`` (mean of used / fillable;
    0 when nothing was counted), as :class:`~stabq.metrics.CodebookUsage` defines them."""
    counts = torch.tensor(code_counts, dtype=torch.long).reshape(len(code_counts), -1)
    figures = [codebook_figures(row) for row in counts]
    inputs = int(counts[0].sum())
    return {
        "inputs": inputs,
        "fillable": min(counts.shape[1], inputs),
        "used": statistics.mean(f["codes_used"] for f in figures),
        "fill": statistics.mean(f["fill"] for f in figures),
    }


def annotate(record: dict[str, Any], model: nn.Module, indices: Tensor | None) -> None:
    """Add to a compare run's ``record`` what its verdict needs: ``grid``, ``codebook_size``,
    ``num_codebooks`` and ``test_joint_perplexity``. ``indices``: the model's codes for the
    test rows, ``(N,)`` or ``(N, C)`` (None for the continuous model)."""
    quantizer = model.quantizer
    record.update(grid=is_grid(quantizer), codebook_size=quantizer.codebook_size)
    record["num_codebooks"] = quantizer.num_codebooks
    if quantizer.codebook_size == 0 or indices is None:
        return
    record["test_joint_perplexity"] = joint_perplexity(indices.cpu())


def run_figures(run: dict[str, Any]) -> dict[str, Any]:
    """The figures a run's verdict reads, with fallbacks for records without counts."""
    counts = run.get("code_counts")
    if counts:
        figures = fill_usage(counts)
        size = len(counts[0])
    else:  # a record made elsewhere: usage over all codes is all there is
        size = run.get("codebook_size") or 0
        usage = run.get("test_usage") or 0.0
        figures = {"inputs": None, "fillable": size, "used": usage * size, "fill": usage}
    grid = bool(run.get("grid", False))
    if grid:
        dead = None
    elif counts:
        dead = size - figures["used"]
    else:
        dead = run.get("test_dead_codes")
    effective = run.get("test_joint_perplexity", run.get("test_perplexity"))
    return {
        **figures,
        "codebook_size": size,
        "num_codebooks": len(counts) if counts else run.get("num_codebooks", 1),
        "grid": grid,
        "dead_codes": dead,
        "effective": effective,
    }


def stalled(run: dict[str, Any], num_classes: int) -> bool:
    """Whether a run learned nothing: test accuracy at most :data:`STALLED_ACCURACY` /
    classes and its last epoch's training loss at least :data:`STALLED_LOSS` x ln(classes).
    False for a run without a history or with fewer than 2 classes."""
    history = run.get("history") or []
    loss = history[-1].get("train_loss") if history else None
    if num_classes < 2 or loss is None or not math.isfinite(loss):
        return False
    low = run["test_accuracy"] <= STALLED_ACCURACY / num_classes
    return low and loss >= STALLED_LOSS * math.log(num_classes)


def run_verdict(run: dict[str, Any], num_classes: int, quantized: bool = True) -> str:
    """The verdict of one run (see the module docstring for the rules)."""
    if run["diverged"]:
        return "diverged"
    if stalled(run, num_classes):
        return "stalled"
    if quantized:
        figures = run_figures(run)
        if figures["effective"] < num_classes:
            return "collapsed"
        if figures["fill"] < UNDER_USED_BELOW:
            return "under-used"
    return "rescued" if run.get("guard_events", 0) > 0 else "ok"


def method_health(
    runs: Sequence[dict[str, Any]], num_classes: int, quantized: bool = True
) -> dict[str, Any]:
    """A method's row fields: ``verdict``, ``reason``, ``fill``, ``codes_used``,
    ``fillable``, ``codebook_size``, ``num_codebooks``, ``grid``, ``dead_codes``,
    ``effective_codes`` (None where they do not apply) and ``collapsed``
    (collapsed or diverged, the flag of earlier versions)."""
    verdicts = [run_verdict(r, num_classes, quantized) for r in runs]
    worst = min(verdicts, key=VERDICTS.index)
    chosen = [r for r, v in zip(runs, verdicts, strict=True) if v == worst]
    row: dict[str, Any] = dict.fromkeys(
        ("fill", "codes_used", "fillable", "codebook_size", "num_codebooks", "grid"), None
    )
    row.update(dead_codes=None, effective_codes=None)
    if quantized:
        figures = [run_figures(r) for r in runs]
        first = figures[0]
        deads = [f["dead_codes"] for f in figures if f["dead_codes"] is not None]
        row.update(
            fill=statistics.mean(f["fill"] for f in figures),
            codes_used=statistics.mean(f["used"] for f in figures),
            fillable=first["fillable"],
            codebook_size=first["codebook_size"],
            num_codebooks=first["num_codebooks"],
            grid=first["grid"],
            dead_codes=statistics.mean(deads) if deads and not first["grid"] else None,
            effective_codes=statistics.mean(f["effective"] for f in figures),
        )
    reason = _reason(worst, chosen, num_classes, quantized)
    if len(chosen) < len(runs):
        reason += f"; in {len(chosen)} of {len(runs)} runs"
    collapsed = worst in ("diverged", "collapsed")
    return {**row, "verdict": worst, "reason": reason, "collapsed": collapsed}


def _reason(verdict: str, runs: Sequence[dict[str, Any]], classes: int, quantized: bool) -> str:
    """A few words: the figures behind ``verdict``, means over ``runs``."""
    if verdict == "diverged":
        errors = [r["error"] for r in runs if r.get("error")]
        return (errors[0].splitlines()[0] if errors else "loss, accuracy or weights non-finite")[
            :120
        ]
    if verdict == "stalled":
        accuracy = statistics.mean(r["test_accuracy"] for r in runs)
        loss = statistics.mean(r["history"][-1]["train_loss"] for r in runs)
        return (
            f"test accuracy {100 * accuracy:.1f}% (chance {100 / classes:.1f}%), last "
            f"training loss {loss:.2f} against ln {classes} = {math.log(classes):.2f}: "
            "learned nothing"
        )
    events = statistics.mean(r.get("guard_events", 0) for r in runs)
    if not quantized:
        return f"{events:g} guard events, ended finite" if verdict == "rescued" else "ended finite"
    f = [run_figures(r) for r in runs]
    first = f[0]
    effective = statistics.mean(x["effective"] for x in f)
    fill = statistics.mean(x["fill"] for x in f)
    used = statistics.mean(x["used"] for x in f)
    kind = "cells" if first["grid"] else "codes"
    books = first["num_codebooks"]
    per = f" in each of {books} codebooks" if books > 1 else ""
    inputs = first["inputs"]
    what = f"what {inputs:,} test inputs can fill" if inputs is not None else "all codes"
    usage = f"{used:,.0f} of {first['codebook_size']:,} {kind}{per} ({100 * fill:.0f}% of {what})"
    joint = "joint perplexity" if books > 1 else "perplexity"
    if verdict == "collapsed":
        return f"{joint} {effective:.1f} < {classes} classes: fewer effective codes than classes"
    if verdict == "under-used":
        return f"{usage}, under {100 * UNDER_USED_BELOW:.0f}%"
    tail = f", {events:g} guard events" if verdict == "rescued" else ""
    return f"{usage}, {joint} {effective:.0f}{tail}"


def used_cell(row: dict[str, Any]) -> str:
    """A row's codes used against what the test set can fill: ``26/512``, ``768/1000 cells``
    for a grid, ``205/256 x4`` for 4 codebooks; ``-`` for the continuous model."""
    if row.get("codes_used") is None:
        return "-"
    cell = f"{row['codes_used']:.0f}/{row['fillable']}"
    if row.get("num_codebooks", 1) > 1:
        cell += f" x{row['num_codebooks']}"
    return cell + (" cells" if row.get("grid") else "")


def favoured(rows: Sequence[dict[str, Any]], reference: str = "none") -> dict[str, Any] | None:
    """The row of the best healthy method: the highest mean test accuracy among the
    quantized methods judged ok or rescued (the first of a tie); None when there is none."""
    healthy = [r for r in rows if r["method"] != reference and r["verdict"] in HEALTHY]
    return max(healthy, key=lambda r: r["accuracy"]) if healthy else None


def favoured_line(
    rows: Sequence[dict[str, Any]], data_name: str, reference: str = "none", detail: str = ""
) -> str:
    """The comparison's one line: the best healthy method, and why the others were not.

    ``detail``: words to add after the best method's figures (the compare room says there
    which methods are within the uncertainty of the best).
    """
    quantized = [r for r in rows if r["method"] != reference]
    healthy = [r for r in quantized if r["verdict"] in HEALTHY]
    passed = [f"{r['method']} {r['verdict']} ({r['reason']}{_caution(r)})" for r in quantized]
    passed = [p for p, r in zip(passed, quantized, strict=True) if r not in healthy]
    tail = f"; not considered: {'; '.join(passed)}" if passed else ""
    best = favoured(rows, reference)
    if best is None:
        return f"{data_name}: no quantized method was judged ok or rescued{tail}."
    gap = (
        "" if best["gap"] is None else f", {100 * best['gap']:+.1f}{_interval(best)} vs continuous"
    )
    ppl = best.get("effective_codes") or best.get("perplexity") or 0.0
    among = (
        f"the highest test accuracy of the {len(healthy)} methods judged ok or rescued"
        if len(healthy) > 1
        else "the only method judged ok or rescued"
    )
    detail = f"; {detail}" if detail else ""
    return (
        f"{data_name} favours {best['method']}: {among} ({100 * best['accuracy']:.1f}%{gap}; "
        f"effective codes {ppl:.0f}){detail}{tail}."
    )


def _caution(row: dict[str, Any]) -> str:
    """``; known: CONDITION`` for a row whose preset the registry cautions against, else ``""``."""
    return f"; known: {row['caution']}" if row.get("caution") else ""


def _interval(row: dict[str, Any]) -> str:
    """`` [low, high]`` of a row's gap in points, or nothing when it has no interval."""
    low, high = row.get("gap_low"), row.get("gap_high")
    return "" if low is None or high is None else f" [{100 * low:+.1f}, {100 * high:+.1f}]"


__all__ = [
    "STALLED_ACCURACY",
    "STALLED_LOSS",
    "UNDER_USED_BELOW",
    "VERDICTS",
    "annotate",
    "favoured",
    "favoured_line",
    "fill_usage",
    "is_grid",
    "joint_perplexity",
    "method_health",
    "run_verdict",
    "stalled",
    "used_cell",
]
