"""What the monitor says: each :class:`Alert` it raises, issued as a :class:`CollapseWarning`."""

from __future__ import annotations

from dataclasses import dataclass


class CollapseWarning(UserWarning):
    """Issued by :class:`CollapseMonitor` when a quantizer collapses, blows up or saturates."""


@dataclass(frozen=True)
class Alert:
    """One warning: ``kind`` is "collapse", "loss_growth", "loss_nonfinite",
    "saturation", "tau_not_annealed", or a mechanism of :mod:`stabq.mechanisms` ("lag",
    "codes_blown_up", "blown_code_chosen", "loss_reduction", "fp16_overflow");
    ``step`` the forward call it fired at; ``value`` the figure that crossed its
    threshold."""

    kind: str
    step: int
    message: str
    value: float

    def __str__(self) -> str:
        return self.message


__all__ = ["Alert", "CollapseWarning"]
