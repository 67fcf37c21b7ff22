"""Mixed precision for `stabq.train`: the autocast around each forward, the fp16 GradScaler.

``TrainConfig.precision`` takes Lightning's names: ``"32"`` (nothing changes),
``"bf16-mixed"`` (forwards under ``torch.autocast`` in bfloat16) and ``"16-mixed"``
(float16, the backward through a ``torch.amp.GradScaler``). The quantizer turns autocast
off inside its own math (:class:`~stabq.quantizers.base.Quantizer`), so codebooks and
distances stay float32.
"""

from __future__ import annotations

import contextlib

import torch

from stabq.errors import ConfigError, check

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward runs in: ``torch.autocast`` for a mixed precision, else none.

    Args:
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"``.
        device: where the model runs (its type picks the autocast backend).

    Returns:
        A context manager.

    Examples:
        >>> import torch
        >>> with autocast("bf16-mixed", torch.device("cpu")):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
        >>> with autocast("32", torch.device("cpu")):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A ``torch.amp.GradScaler`` for ``"16-mixed"``, else None (bfloat16 needs none).

    Args:
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"``.
        device: where the model runs.

    Returns:
        The scaler, or None.

    Raises:
        ConfigError: ``"16-mixed"`` on a torch without ``torch.amp.GradScaler`` (before 2.3).

    Examples:
        >>> import torch
        >>> grad_scaler("bf16-mixed", torch.device("cpu")) is None
        True
        >>> type(grad_scaler("16-mixed", torch.device("cpu"))).__name__
        'GradScaler'
    """
    if precision != "16-mixed":
        return None
    scaler = getattr(torch.amp, "GradScaler", None)  # torch 2.3 on
    check(scaler is not None, "precision='16-mixed' needs torch 2.3 or later (its "
          f"torch.amp.GradScaler); this is torch {torch.__version__}", ConfigError)  # fmt: skip
    return scaler(device.type)


__all__ = ["AUTOCAST_DTYPES", "autocast", "grad_scaler"]
