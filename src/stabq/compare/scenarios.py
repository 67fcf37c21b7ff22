"""The ``explode`` preset's scenarios: the user's VQ-EMA losses of 1e10 and more, by mechanism.

Each :class:`Scenario` names the mechanism that blows the baseline up, the
baseline method that has it (a VQ-EMA written as user code and tutorials write
it; options documented "reproduces the failure; never use"), the training
options every method in it shares, and the stabq repair that answers it. Every
stabq preset (:data:`STABQ_PRESETS`: each that ``build_quantizer`` lists but ``none``,
the collapsing baseline ``vq-ema`` included) trains under the same optimiser and rate,
with the guards off (no clipping either) so that a failure shows; the baselines then
train again with the guards on (:data:`GUARDED`), where each run must be rescued or
stopped by a one-line :class:`~stabq.errors.TrainingError`, recorded as diverged, never
a crash.

Kept only what reproduces on mnist1d with the MLP encoder (3 seeds; figures on
the stress benchmarks page): the sum-reduced commitment under SGD with
momentum (alone, and with the tutorial's zero-initialised cluster sizes). Zero
cluster sizes alone, vanilla VQ-EMA under the same SGD, and the tutorial module
under Adam at 1e-3 collapse without exploding (largest losses 2.5 to 6e3), so
they are not scenarios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from stabq.health.verdicts import HEALTHY
from stabq.quantizers.registry import preset_names

# SGD as user loops write it: momentum 0.9, lr 1e-2, no clipping, no warm-up, no guards
EXPLODE_CONFIG: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": 1e-2,
    "momentum": 0.9,
    "grad_clip": None,
    "guards": False,
    "warmup_epochs": 0.0,
}
GUARDED: dict[str, Any] = {"guards": True}  # the checks and undo; clipping stays off
# every preset build_quantizer lists but the continuous `none`, each a method of its name
STABQ_PRESETS = [name for name in preset_names() if name != "none"]
LOSS_LIMIT = 1e10  # a baseline whose largest loss reaches this (or is non-finite) exploded
HEALTHY_LOSS = 100.0  # a stabq preset keeps its largest loss under this


@dataclass(frozen=True)
class Scenario:
    """One mechanism: the baseline that has it, the shared training options, the repair."""

    name: str
    mechanism: str
    baseline: str
    repair: str
    config: dict[str, Any]


SCENARIOS: list[Scenario] = [
    Scenario(
        "sum-commitment",
        "commitment loss summed over the batch, beta * ((z - sg(q))**2).sum(), under SGD "
        "with momentum: the encoder's step grows with batch x dim, its outputs overshoot "
        "the EMA codes, which lag, and the residual feeds on itself",
        "vq-ema-sum",
        "mean-reduced commitment (every stabq quantizer); guards: clipping, undo at a lower rate",
        EXPLODE_CONFIG,
    ),
    Scenario(
        "tutorial-vq-ema",
        "the tutorial module: sum-reduced commitment, cluster sizes initialised to zero "
        "with Laplace smoothing (never-used codes ~1e5 x too large), randn codebook",
        "vq-ema-tutorial",
        "cluster sizes start at one, codes by k-means on the first batch (vq, rvq), "
        "mean-reduced commitment; guards",
        EXPLODE_CONFIG,
    ),
]


def exploded(max_loss: float) -> bool:
    """Whether a largest loss is an explosion: non-finite or at least :data:`LOSS_LIMIT`."""
    return not math.isfinite(max_loss) or max_loss >= LOSS_LIMIT


def explode_verdict(rows: list[dict[str, Any]]) -> str:
    """One line per scenario: did the baseline explode, did the stabq presets hold, and
    what the guards made of the baseline."""
    lines = []
    for scenario in SCENARIOS:
        off = [r for r in rows if r["scenario"] == scenario.name and not r["guards"]]
        on = [r for r in rows if r["scenario"] == scenario.name and r["guards"]]
        base = next((r for r in off if r["method"] == scenario.baseline), None)
        if base is None:
            continue
        others = [r for r in off if r["method"] != scenario.baseline]
        held = [r["method"] for r in others if r["max_loss"] < HEALTHY_LOSS]
        line = (
            f"{scenario.name}: {scenario.baseline} largest loss {base['max_loss']:.3g} "
            f"({'exploded' if exploded(base['max_loss']) else 'did not explode'}, "
            f"{base['diverged']}/{base['seeds']} diverged)"
        )
        if others:
            top = max(r["max_loss"] for r in others)
            line += f"; stabq presets under {HEALTHY_LOSS:g}: {len(held)}/{len(others)}"
            line += f" (largest {top:.3g})"
            healthy = [r for r in others if r.get("verdict", "ok") in HEALTHY]
            line += f", ended healthy: {len(healthy)}/{len(others)}"
            sick = [f"{r['method']} {r['verdict']}{_known(r)}" for r in others if r not in healthy]
            line += f" ({', '.join(sick)})" if sick else ""
        for r in on:
            line += f"; guards on: {r['rescued']} rescued, {r['diverged']} stopped, of {r['seeds']}"
        lines.append(line + ".")
    return "\n".join(lines)


def _known(row: dict[str, Any]) -> str:
    """`` (known: CONDITION)`` for a row whose preset the registry cautions against."""
    return f" (known: {row['caution']})" if row.get("caution") else ""


def explode_runs(methods: int, seeds: int) -> int:
    """Runs of the explode preset for ``methods`` chosen methods: each run with every
    scenario's baseline, whose runs come twice more (guards off, then on)."""
    return (methods + 2 * len(SCENARIOS)) * seeds


__all__ = [
    "EXPLODE_CONFIG", "GUARDED", "SCENARIOS", "STABQ_PRESETS", "Scenario", "explode_runs",
    "explode_verdict", "exploded",
]  # fmt: skip
