"""Codebook health: the figures (:mod:`~stabq.health.usage`, one definition everywhere), the
monitor that watches training (:mod:`~stabq.health.monitor`, with its probe, mechanisms and
temperature watch), and the verdicts a comparison gives (:mod:`~stabq.health.verdicts`)."""

from stabq.health.verdicts import (
    HEALTHY,
    UNDER_USED_BELOW,
    VERDICTS,
    annotate,
    favoured,
    favoured_line,
    fill_usage,
    is_grid,
    joint_perplexity,
    method_health,
    run_figures,
    run_verdict,
    used_cell,
)

__all__ = [
    "HEALTHY", "UNDER_USED_BELOW", "VERDICTS", "annotate", "favoured", "favoured_line",
    "fill_usage", "is_grid", "joint_perplexity", "method_health", "run_figures", "run_verdict",
    "used_cell",
]  # fmt: skip
