"""Every failure stabq reports to a user is a :class:`StabqError`.

Each subclass also derives from the built-in exception a Python user would
expect (``ValueError`` for bad arguments), so ``except ValueError`` keeps
working. Messages name the argument, the value found and what is allowed.
"""

from __future__ import annotations


class StabqError(Exception):
    """Base class of every error stabq raises on purpose."""


class ConfigError(StabqError, ValueError):
    """An argument or option has a value that is not allowed."""


class ShapeError(StabqError, ValueError):
    """A tensor's shape or dtype does not fit what the module was built for."""


def check(condition: bool, message: str, error: type[StabqError] = ConfigError) -> None:
    """Raise ``error(message)`` unless ``condition`` holds."""
    if not condition:
        raise error(message)


def is_int(value: object) -> bool:
    """True for a Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


class DataError(StabqError, ValueError):
    """A data file or array cannot be used: missing, unreadable, malformed or invalid values."""


class ModelFileError(StabqError):
    """A saved model directory is missing, incomplete, altered or from a newer stabq."""


class UntrustedEncoderError(ModelFileError):
    """A model names a user's encoder factory, which loading it would import and run, and
    nothing says to trust it (see :mod:`stabq.model.trust`).

    ``where`` is the model directory (or ``--resume DIR``), ``reference`` the factory
    (``package.module:factory``), ``how`` what grants trust: ``trust_encoder=True`` in
    Python, ``--trust-encoder`` on the command line (:meth:`hinting` swaps it).
    """

    def __init__(
        self, where: object, reference: str, how: str = "trust_encoder=True", doing: str = "loading"
    ) -> None:
        self.where, self.reference, self.how, self.doing = where, reference, how, doing
        super().__init__(
            f"{where}: its encoder is {reference}, a factory from outside stabq that {doing} "
            f"it would import and run; if you trust where it came from, pass {how}"
        )

    def hinting(self, how: str) -> UntrustedEncoderError:
        """The same refusal, naming ``how`` as what grants trust."""
        return UntrustedEncoderError(self.where, self.reference, how, self.doing)


class CheckpointError(StabqError):
    """A training checkpoint cannot be written, read, or resumed as asked."""


class TrainingError(StabqError, RuntimeError):
    """Training diverged and the stability guards could not recover it."""


def check_int(owner: str, name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum``, else a ConfigError naming ``owner.name``."""
    check(
        is_int(value) and value >= minimum,
        f"{owner}: {name}={value!r}, allowed is an integer >= {minimum}",
    )
    return value  # type: ignore[return-value]


def check_number(owner: str, name: str, value: object, minimum: float) -> float:
    """``float(value)`` if it is a finite real number >= ``minimum``, else a ConfigError."""
    check(
        isinstance(value, float | int)
        and not isinstance(value, bool)
        and minimum <= value < float("inf"),
        f"{owner}: {name}={value!r}, allowed is a finite number >= {minimum:g}",
    )
    return float(value)  # type: ignore[arg-type]
