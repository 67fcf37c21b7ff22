"""What the monitor says: each :class:`Alert` it raises, issued as a :class:`CollapseWarning`."""

from __future__ import annotations

from dataclasses import dataclass


class CollapseWarning(UserWarning):
    """The warning a `CollapseMonitor` issues when a quantizer collapses, blows up or saturates.

    A `UserWarning`: the `warnings` module's filters apply (show each once, turn them
    into errors, record them in a test).

    Examples:
        >>> import warnings, torch, stabq
        >>> q = stabq.VectorQuantizer(8, codebook_size=64)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     with stabq.CollapseMonitor(q, check_every=5, min_samples=16):
        ...         for _ in range(5):
        ...             _ = q(torch.zeros(32, 8))
        >>> [w.category.__name__ for w in caught]
        ['CollapseWarning']
    """


@dataclass(frozen=True)
class Alert:
    """One alert of a `CollapseMonitor` (`str(alert)` is its message).

    Attributes:
        kind: `"collapse"`, `"loss_growth"`, `"loss_nonfinite"`, `"saturation"`,
            `"tau_not_annealed"`, or a mechanism: `"lag"`, `"codes_blown_up"`,
            `"blown_code_chosen"`, `"loss_reduction"`, `"fp16_overflow"`,
            `"one_sided"`, `"dims_correlated"`, `"map_singular"`.
        step: the forward call (counted from 1) it fired at.
        message: one plain sentence saying what happened.
        value: the figure that crossed its threshold.

    Examples:
        >>> import stabq
        >>> alert = stabq.Alert("collapse", 50, "collapse: 1 of 64 codes carry 95%", 1.0)
        >>> alert.kind, str(alert)
        ('collapse', 'collapse: 1 of 64 codes carry 95%')
    """

    kind: str
    step: int
    message: str
    value: float

    def __str__(self) -> str:
        return self.message


__all__ = ["Alert", "CollapseWarning"]
