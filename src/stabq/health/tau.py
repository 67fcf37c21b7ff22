"""The monitor's check that something anneals a Gumbel quantizer's temperature.

A :class:`~stabq.GumbelQuantizer` starts at ``tau_start`` (5.0 in the ``gumbel``
preset: soft samples, far from one-hot) and moves towards ``tau_end`` only when
something anneals it: stabq's trainer calls ``set_progress(p)`` every step, and
``anneal_steps=N`` makes the quantizer count its own training steps. In a loop
of one's own, without either, it trains at ``tau_start`` for ever: its training
samples stay soft, far from the one-hot codes it uses in eval, and accuracy
suffers. :class:`TauWatch` counts a Gumbel quantizer's training forwards and,
from ``steps`` of them on, holds when its ``tau`` is still ``tau_start``.
"""

from __future__ import annotations

from torch import nn

from stabq.quantizers.gumbel import GumbelQuantizer

UNANNEALED_STEPS = 1000  # training forwards at tau_start before the monitor says so
KIND = "tau_not_annealed"


class TauWatch:
    """The ``tau_not_annealed`` check of one module (a no-op unless it is a Gumbel quantizer
    whose ``tau_start`` and ``tau_end`` differ).

    Args:
        quantizer: the module the monitor describes (its target).
        steps: training forwards (that quantize) before the check may hold.
    """

    def __init__(self, quantizer: nn.Module, steps: int) -> None:
        gumbel = isinstance(quantizer, GumbelQuantizer) and quantizer.tau_start != quantizer.tau_end
        self.quantizer = quantizer if gumbel else None
        self.steps, self.count = steps, 0

    def record(self) -> None:
        """Count one forward call, if it was a quantizing training forward."""
        q = self.quantizer
        if q is not None and q.training and q.quantization_enabled:
            self.count += 1

    def verdict(self) -> tuple[str, bool, str, float] | None:
        """``(kind, holds, message, value)`` for the monitor, or None while nothing is judged
        (too few steps, or ``anneal_steps`` anneals it)."""
        q = self.quantizer
        if q is None or self.count < self.steps or q.counting:
            return None
        message = (
            f"Gumbel temperature still at tau_start={q.tau_start:g} after {self.count} "
            f"training steps: nothing anneals it towards tau_end={q.tau_end:g}; build the "
            "quantizer with anneal_steps=N (its own count of training steps) or call its "
            "set_progress(p) every step, p from 0 to 1"
        )
        return KIND, q.tau == q.tau_start, message, float(self.count)


__all__ = ["KIND", "UNANNEALED_STEPS", "TauWatch"]
