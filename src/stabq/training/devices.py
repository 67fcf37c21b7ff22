"""Which torch device a run asks for, checked before anything is built on it."""

from __future__ import annotations

import torch

from stabq.errors import ConfigError


def check_device(name: str) -> torch.device:
    """``torch.device(name)`` if this machine has it, else a one-line :class:`ConfigError`.

    ``cuda`` and ``cuda:N`` need CUDA and ``N < torch.cuda.device_count()``;
    ``mps`` needs the Metal backend; other types are left to torch.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device={name!r} is not a device; allowed: auto, cpu, cuda, cuda:N, mps"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={name!r}, but CUDA is not available here; use cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device={name!r}, but this machine has {count} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r}, but MPS is not available here; use cpu or auto")
    return device
