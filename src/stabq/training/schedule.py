"""Learning-rate and progress schedules, as plain functions of the step."""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR factor: linear ``(step + 1) / warmup`` during warm-up, then cosine from 1 to 0.

    ``0.5 * (1 + cos(pi * t))`` with ``t = (step - warmup) / (total - warmup)`` in [0, 1].
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_then_constant(step: int, warmup_steps: int) -> float:
    """LR factor: linear ``(step + 1) / warmup`` during warm-up, then 1 (the plateau
    schedule of :mod:`stabq.training.stopping` scales it down as the stage levels off)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


def linear_ramp(epoch: int, ramp_epochs: int) -> float:
    """Mix of quantized features in epoch ``epoch`` (0-based) of a ``ramp_epochs`` ramp.

    Rises as ``(epoch + 1) / (ramp_epochs + 1)`` and is 1 from ``ramp_epochs`` on.
    """
    if ramp_epochs <= 0 or epoch >= ramp_epochs:
        return 1.0
    return (epoch + 1) / (ramp_epochs + 1)
