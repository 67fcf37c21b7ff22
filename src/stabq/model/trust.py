"""Which user encoders a model may make stabq import: the one place that decides.

A model whose encoder is a factory (``package.module:factory``, :mod:`stabq.encoders`)
is rebuilt by importing that module and calling the factory, so a model directory
from someone else could run any module on the user's path. As transformers asks for
``trust_remote_code``, stabq imports such a factory only when told to
(``stabq.load(..., trust_encoder=True)``; ``--trust-encoder`` on ``stabq evaluate``,
``encode`` and ``train --init-from / --resume``), and refuses otherwise, before
anything is imported, with an :class:`~stabq.errors.UntrustedEncoderError` naming the
factory and the flag. Built-in encoders (``mlp``, ``cnn1d``, ``cnn2d``) need nothing.

What this process wrote itself is trusted without the flag, and only that: in memory,
never on disk, it keeps the (resolved directory, SHA-256 of ``config.json``) of every
model :func:`stabq.save_model` wrote (:func:`remember_saved`), and the (resolved
directory, factory) of every ``stabq train`` run it started with a factory it was
given (:func:`remember_run`), so a model saved or a run resumed in the same process
loads as it is. A ``config.json`` altered in a single byte is no longer the one written.

    >>> require_trusted("mlp", "runs/m", trusted=False)  # built in: nothing to trust
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from stabq.errors import UntrustedEncoderError
from stabq.model.encoders import is_reference

PYTHON_HINT = "trust_encoder=True"
CLI_HINT = "--trust-encoder"
_SAVED: set[tuple[Path, str]] = set()  # (resolved directory, sha256 of config.json)
_RUNS: set[tuple[Path, str]] = set()  # (resolved directory, factory reference)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remember_saved(directory: str | Path, config_bytes: bytes) -> None:
    """This process wrote ``config_bytes`` as ``directory/config.json``."""
    _SAVED.add((Path(directory).resolve(), _digest(config_bytes)))


def saved_here(directory: str | Path, config_bytes: bytes) -> bool:
    """True when this process wrote exactly ``config_bytes`` to ``directory``."""
    return (Path(directory).resolve(), _digest(config_bytes)) in _SAVED


def remember_run(directory: str | Path, encoder: object) -> None:
    """This process started (or was trusted to resume) a run into ``directory`` with the
    factory ``encoder``; nothing is kept for a built-in encoder."""
    if is_reference(encoder):
        _RUNS.add((Path(directory).resolve(), str(encoder)))


def run_started_here(directory: str | Path, encoder: object) -> bool:
    """True when this process ran ``encoder`` into ``directory`` (see :func:`remember_run`)."""
    return (Path(directory).resolve(), str(encoder)) in _RUNS


def require_trusted(
    encoder: object,
    where: object,
    *,
    trusted: bool,
    how: str = PYTHON_HINT,
    doing: str = "loading",
) -> None:
    """Refuse a factory ``encoder`` named by a model or run at ``where`` unless ``trusted``.

    Args:
        encoder: the ``encoder`` a ``config.json`` or a checkpoint records.
        where: what to name in the refusal (the model directory, ``--resume DIR``).
        trusted: the caller's flag, or what :func:`saved_here` / :func:`run_started_here`
            found.
        how: the flag or argument that grants trust, named in the refusal.
        doing: ``loading`` or ``resuming``.

    Raises:
        UntrustedEncoderError: ``encoder`` is a ``package.module:factory`` reference and
            ``trusted`` is False. Nothing has been imported.
    """
    if is_reference(encoder) and not trusted:
        raise UntrustedEncoderError(where, str(encoder), how, doing)


__all__ = [
    "CLI_HINT",
    "PYTHON_HINT",
    "remember_run",
    "remember_saved",
    "require_trusted",
    "run_started_here",
    "saved_here",
]
