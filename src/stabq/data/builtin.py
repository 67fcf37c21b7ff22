"""Built-in datasets, generated locally (nothing is downloaded).

``mnist1d`` (4,000 train / 1,000 test, 40-D, by the ``mnist1d`` package: rows
for the MLP, sequences of length 40 for ``cnn1d``), ``digits`` (scikit-learn's
8x8 digits, 64-D, a stratified 80/20 split; ``digits:images`` the same rows as
``(1, 8, 8)`` images) and
``synthetic[:DIM]`` (a 10-class Gaussian mixture, 128-D by default) and ``tokens``
(4,000/1,000 sequences of token ids whose class is the order of three markers:
:mod:`stabq.data.tokens`). Each is generated once per process and returned as
``(x, y, x_test, y_test)``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from stabq.errors import DataError

BUILTIN_DATASETS: tuple[str, ...] = ("mnist1d", "digits", "synthetic", "tokens")
DIGIT_CLASSES: list[str] = [str(i) for i in range(10)]
SYNTHETIC_DIM, SYNTHETIC_TRAIN, SYNTHETIC_TEST, SYNTHETIC_SPREAD = 128, 4000, 1000, 3.5
SPLIT_SEED = 0  # digits' 80/20 split and the synthetic mixture


@functools.lru_cache(maxsize=1)
def _mnist1d() -> tuple[np.ndarray, ...]:
    """mnist1d's default dataset (4000 + 1000 rows, 40-D); numpy's global RNG left as found."""
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    return (
        d["x"].astype(np.float32), d["y"].astype(np.int64),
        d["x_test"].astype(np.float32), d["y_test"].astype(np.int64),
    )  # fmt: skip


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, ...]:
    """scikit-learn's 8x8 digits (1797 x 64, values 0..16), stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x.astype(np.float32), y.astype(np.int64),
        test_size=0.2, stratify=y, random_state=SPLIT_SEED,
    )  # fmt: skip
    return (x_tr, y_tr, x_te, y_te)


@functools.lru_cache(maxsize=8)
def _synthetic(dim: int) -> tuple[np.ndarray, ...]:
    """10 balanced Gaussian classes in ``dim`` D, unit noise around means drawn as
    ``N(0, SPREAD**2 / dim)``: means sit about ``SPREAD * sqrt(2)`` apart whatever the
    dimension, so a linear classifier scores about 0.9 (0.89 at 128-D), not 1.0."""
    rng = np.random.default_rng(SPLIT_SEED)
    n = SYNTHETIC_TRAIN + SYNTHETIC_TEST
    means = rng.normal(0.0, SYNTHETIC_SPREAD / math.sqrt(dim), size=(10, dim))
    y = rng.permutation(np.arange(n) % 10).astype(np.int64)
    x = (means[y] + rng.standard_normal((n, dim))).astype(np.float32)
    cut = SYNTHETIC_TRAIN
    return (x[:cut], y[:cut], x[cut:], y[cut:])


@functools.lru_cache(maxsize=1)
def _tokens() -> tuple[np.ndarray, ...]:
    from stabq.data.tokens import token_arrays

    return token_arrays(SPLIT_SEED)


def builtin_classes(spec: str) -> list[str]:
    """The class names of a built-in: the order of the markers for ``tokens`` (``"ABC"``,
    ...), the digits ``"0"`` to ``"9"`` (mnist1d's too) otherwise."""
    if spec.partition(":")[0] == "tokens":
        from stabq.data.tokens import TOKEN_CLASSES

        return list(TOKEN_CLASSES)
    return DIGIT_CLASSES


def builtin_arrays(spec: str) -> tuple[np.ndarray, ...] | None:
    """The (x, y, x_test, y_test) of a built-in ``spec``, or None when it names a file."""
    name, _, option = spec.partition(":")
    if name not in BUILTIN_DATASETS:
        return None
    if name == "mnist1d" and not option:
        return _mnist1d()
    if name == "digits" and not option:
        return _digits()
    if name == "tokens" and not option:
        return _tokens()
    if name == "digits" and option == "images":  # the same rows as 1 x 8 x 8 images
        x_tr, y_tr, x_te, y_te = _digits()
        return (x_tr.reshape(-1, 1, 8, 8), y_tr, x_te.reshape(-1, 1, 8, 8), y_te)
    if name == "synthetic":
        if not option:
            return _synthetic(SYNTHETIC_DIM)
        if option.isdigit() and int(option) >= 2:
            return _synthetic(int(option))
        raise DataError(f"{spec}: synthetic:DIM needs an integer DIM >= 2, found {option!r}")
    raise DataError(
        f"{spec}: {name} takes no option (only digits:images and synthetic:DIM); choose a "
        f"part with part="
    )
