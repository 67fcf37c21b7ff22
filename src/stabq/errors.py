"""Every failure stabq reports to a user is a :class:`StabqError`.

Each subclass also derives from the built-in exception a Python user would
expect (``ValueError`` for bad arguments), so ``except ValueError`` keeps
working. Messages name the argument, the value found and what is allowed.
"""

from __future__ import annotations


class StabqError(Exception):
    """The base class of every error stabq raises on purpose.

    Each message is one line that names the argument, the value found and what is
    allowed. Each subclass also derives from the built-in exception a Python user would
    expect (`ValueError` for bad arguments), so `except ValueError` keeps working.

    Examples:
        >>> import stabq
        >>> try:
        ...     stabq.build_quantizer("vq", 16, codebook_size=0)
        ... except stabq.StabqError as err:
        ...     print(type(err).__name__, "-", err)
        ConfigError - VectorQuantizer: codebook_size=0, allowed is an integer >= 1
    """


class ConfigError(StabqError, ValueError):
    """An argument or option has a value that is not allowed (also a `ValueError`).

    Raised by constructors and functions before anything runs: an unknown preset, an
    option out of range, a device this machine lacks, a file that cannot be written.

    Examples:
        >>> import stabq
        >>> stabq.TrainConfig(batch_size=0)
        Traceback (most recent call last):
        stabq.errors.ConfigError: batch_size=0, allowed is an integer >= 1
    """


class ShapeError(StabqError, ValueError):
    """A tensor's shape or dtype does not fit what the module was built for (a `ValueError`).

    Examples:
        >>> import torch, stabq
        >>> stabq.build_quantizer("fsq", 8)(torch.randn(2, 4))
        Traceback (most recent call last):
        stabq.errors.ShapeError: FSQ: input of shape (2, 4) has last dimension 4, expected dim=8
    """


def check(condition: bool, message: str, error: type[StabqError] = ConfigError) -> None:
    """Raise ``error(message)`` unless ``condition`` holds."""
    if not condition:
        raise error(message)


def is_int(value: object) -> bool:
    """True for a Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


class DataError(StabqError, ValueError):
    """Data cannot be used: a file missing, unreadable or malformed, or invalid values (a
    `ValueError`); the message names the source and the first bad row.

    Examples:
        >>> import numpy as np, stabq
        >>> x, y = np.zeros((10, 2), "float32"), np.array([0, 1] * 5)
        >>> x[3, 1] = np.nan
        >>> model = stabq.BottleneckClassifier(2, 2, "fsq", hidden=8, bottleneck_dim=4)
        >>> try:
        ...     stabq.train(model, (x, y))
        ... except stabq.DataError as err:
        ...     print(err)
        arrays: row 3, column 1: feature value is NaN: features must be finite, not NaN or infinite
    """


class ModelFileError(StabqError):
    """A saved model directory is missing, incomplete, altered or from a newer stabq.

    Examples:
        >>> import stabq
        >>> stabq.load("no/such/dir")
        Traceback (most recent call last):
        stabq.errors.ModelFileError: no/such/dir: no such model directory
    """


class UntrustedEncoderError(ModelFileError):
    """A model names an encoder factory of the user's, which loading it would import and
    run, and nothing says to trust it (a `ModelFileError`).

    Args:
        where: the model directory (or the checkpoint directory of `--resume DIR`).
        reference: the factory, `package.module:factory`.
        how: what grants trust: `trust_encoder=True` in Python, `--trust-encoder` on
            the command line (`hinting` swaps it).
        doing: what would import the factory (`"loading"`, ...).

    Examples:
        >>> import stabq
        >>> err = stabq.UntrustedEncoderError("runs/m", "mypkg.enc:build")
        >>> err.reference, err.hinting("--trust-encoder").how
        ('mypkg.enc:build', '--trust-encoder')
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
        """The same refusal, naming another way to grant trust.

        Args:
            how: what grants trust where the error is shown (`"--trust-encoder"`).
        """
        return UntrustedEncoderError(self.where, self.reference, how, self.doing)


class CheckpointError(StabqError):
    """A training checkpoint cannot be written, read, or resumed as asked.

    Examples:
        >>> import numpy as np, stabq
        >>> x, y = np.zeros((10, 2), "float32"), np.array([0, 1] * 5)
        >>> model = stabq.BottleneckClassifier(2, 2, "fsq", hidden=8, bottleneck_dim=4)
        >>> stabq.train(model, (x, y), resume=True)
        Traceback (most recent call last):
        stabq.errors.CheckpointError: train: resume=True needs checkpoint_dir
    """


class TrainingError(StabqError, RuntimeError):
    """Training diverged and the stability guards could not recover it (a `RuntimeError`).

    Examples:
        >>> import torch, stabq
        >>> model = torch.nn.Linear(2, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = stabq.StabilityGuard(model, optimizer, max_recoveries=0)
        >>> try:
        ...     guard.step(float("nan"))
        ... except stabq.TrainingError as err:
        ...     print(str(err).split(";")[0])
        training diverged at epoch 0, step 0: loss is nan
    """


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
