"""Labeled feature data: built-in datasets, feature files, and their validation.

``load_data(spec)`` takes a built-in name (``mnist1d``, ``digits``,
``digits:images``, ``synthetic[:DIM]``, generated locally) or a file (``.npz``,
``.pt``, ``.safetensors``, ``.csv``, ``.parquet``) and returns :class:`LabeledData`:

    x        (n, ...) float32, finite, C-contiguous: feature rows (n, d), sequences
             (n, L) or (n, C, L), images (n, C, H, W); uint8 values are scaled to [0, 1]
    y        (n,)   int64 class ids in [0, len(classes))
    classes  class names, id i <-> classes[i]

Tables (``.csv``, ``.parquet``) are always feature rows.

Files are read by :mod:`stabq.readers`; every check of what they hold lives
here (:func:`from_arrays` for data sets, :func:`validate_features` for what a
model is fed, :func:`require_classes`, :func:`with_classes` and
:func:`require_fit` for what training and a saved model need), for the CLI,
the Python API and the estimator alike. Every problem is a one-line
:class:`DataError` that starts with the source and says what and where.
Rows are counted from 0; in CSV and Parquet files as "data row N", the
header not counted. Labels are class names: integer labels keep their values
as names (``7`` is class ``"7"``), so a label is "out of range" only against
given classes (a saved model's, the training data's).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stabq.datasets import BUILTIN_DATASETS, DIGIT_CLASSES, builtin_arrays
from stabq.errors import DataError
from stabq.readers import FILE_EXTENSIONS, Columns, as_numpy, read_file, where
from stabq.readers import data_error as _error

PARTS: tuple[str, ...] = ("train", "test", "all")
_SHOWN = 10  # class names shown in a message before "..."


@dataclass(eq=False)
class LabeledData:
    """Inputs ``x`` ``(n, ...)`` float32 and class ids ``y`` ``(n,)`` int64 named by ``classes``."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    source: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One row's shape: ``(d,)`` for feature rows, ``(C, H, W)`` for images, ..."""
        return tuple(int(v) for v in self.x.shape[1:])

    @property
    def num_features(self) -> int:
        """Values in one row (the features of feature rows)."""
        return math.prod(self.input_shape)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        shape = (
            f"num_features={self.num_features}"
            if self.x.ndim == 2
            else (f"input_shape={self.input_shape}")
        )
        return (
            f"LabeledData(source={self.source!r}, rows={len(self)}, {shape}, "
            f"num_classes={self.num_classes})"
        )


def _check_features(
    x: np.ndarray,
    source: str,
    columns: Columns,
    dtype: type = np.float32,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Numeric, finite ``x`` as C-contiguous ``dtype`` (its rank and rows are checked before);
    ``uint8`` values (images) become ``x / 255``. ``rows`` ``(len(x),)``: the row numbers a
    message names (a chunk's rows in its file); default ``0, 1, ...``."""
    if x.dtype.kind not in "biuf":
        raise _error(source, f"features must be numbers, found dtype {x.dtype}")
    if 0 in x.shape[1:]:
        raise _error(source, f"no feature columns (x has shape {x.shape})")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=dtype) / dtype(255)
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, by row and column
        xd = np.ascontiguousarray(x, dtype=dtype)
    bad = ~np.isfinite(xd)
    if bad.any():
        bad_rows = bad.reshape(len(bad), -1)
        row = int(np.flatnonzero(bad_rows.any(axis=1))[0])
        flat = int(np.flatnonzero(bad_rows[row])[0])
        named = row if rows is None else int(rows[row])
        if x.ndim == 2:
            col, at = flat, where(named, columns, flat)
        else:
            col = np.unravel_index(flat, x.shape[1:])
            at = f"row {named}, position {tuple(int(i) for i in col)}"
        v = float(x[(row, *np.atleast_1d(col))])
        what = "NaN" if math.isnan(v) else f"{v:+}".title()  # +Inf, -Inf
        what = (
            f"value {v!r} overflows {np.dtype(dtype).name}"
            if math.isfinite(v)
            else f"value is {what}: features must be finite, not NaN or infinite"
        )
        raise _error(source, f"{at}: feature {what}")
    return xd


def _label_values(y: np.ndarray, source: str, columns: Columns) -> np.ndarray:
    """Labels as int64, or as str when any label is a string; whole floats count as integers."""
    kind = y.dtype.kind
    if kind in "biu":
        return y.astype(np.int64)
    if kind in "US":
        return (np.char.decode(y, "utf-8", errors="replace") if kind == "S" else y).astype(str)
    if kind not in "fO":
        raise _error(source, f"labels must be integers or strings, found dtype {y.dtype}")
    if kind == "f" and (np.isfinite(y) & (y == np.round(y)) & (np.abs(y) < 2.0**62)).all():
        return y.astype(np.int64)
    values = y.tolist()
    for row, v in enumerate(values):
        if not isinstance(v, str) and not (
            isinstance(v, numbers.Real) and abs(v) < 2**62 and v == int(v)  # False for NaN
        ):
            raise _error(
                source, f"{where(row, columns)}: label {v!r} is not a whole number or a string"
            )
    if any(isinstance(v, str) for v in values):
        strings = [v if isinstance(v, str) else str(int(v)) for v in values]
        return np.asarray(strings, dtype=object)  # not dtype=str: it drops trailing "\0"
    return np.asarray([int(v) for v in values], dtype=np.int64)


def _encode_labels(
    y: np.ndarray, classes: Sequence[str] | None, source: str, columns: Columns
) -> tuple[np.ndarray, list[str]]:
    """Class ids ``(n,)`` int64 and the class names; labels match names by ``str(label)``."""
    values = _label_values(y, source, columns)
    unique, inverse = np.unique(values, return_inverse=True)
    names = [str(v) for v in unique.tolist()]
    if classes is None:
        return inverse.astype(np.int64).reshape(-1), names
    if isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
        raise _error(source, f"classes must be a list of strings, found {classes!r}")
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise _error(source, f"classes must be distinct, found {classes!r}")
    index = {c: i for i, c in enumerate(classes)}
    ids = np.asarray([index.get(n, -1) for n in names], dtype=np.int64)[inverse.reshape(-1)]
    bad = np.flatnonzero(ids < 0)
    if bad.size:
        others = f" ({bad.size - 1} more rows too)" if bad.size > 1 else ""
        raise _error(
            source,
            f"{where(int(bad[0]), columns)}: label {str(values[bad[0]])!r} is not one of "
            f"the {len(classes)} known classes {_known(classes)}{others}",
        )
    return ids, classes


def from_arrays(
    x: Any, y: Any, classes: list[str] | None = None, source: str = "arrays"
) -> LabeledData:
    """Validate features ``x`` ``(n, d)`` and labels ``y`` ``(n,)`` into :class:`LabeledData`.

    ``x``: numbers, finite. ``y``: integers or strings (whole floats count as
    integers). With ``classes``, label ``v`` gets the id of ``str(v)`` there;
    without, the classes are the sorted distinct labels.
    """
    return _build(as_numpy(x, source, "x"), as_numpy(y, source, "y"), classes, source)


def validate_features(
    x: Any, source: str = "X", dtype: type = np.float32, allow_nd: bool = False
) -> np.ndarray:
    """Features ``x`` ``(n >= 1, d >= 1)`` (with ``allow_nd``, ``(n >= 1, ...)``), numbers,
    finite in ``dtype``, as a C-contiguous ``dtype`` array: what a model is fed. A problem
    is a :class:`DataError` naming the first bad row and column."""
    x = as_numpy(x, source, "x")
    if x.ndim != 2 and not (allow_nd and x.ndim > 2):
        raise _error(source, f"features must be 2-D (rows, features), found shape {x.shape}")
    if x.shape[0] == 0:
        raise _error(source, "no rows")
    return _check_features(x, source, None, dtype)


def require_classes(data: LabeledData, minimum: int = 2) -> LabeledData:
    """``data`` if its labels hold at least ``minimum`` classes (training needs 2), else a
    :class:`DataError` naming the source and the one class found."""
    found = np.unique(data.y)
    if found.size < minimum:
        names = ", ".join(repr(data.classes[i]) for i in found.tolist())
        raise _error(
            data.source, f"{found.size} class ({names}) in {len(data)} rows: training a "
            f"classifier needs labels of at least {minimum} classes",
        )  # fmt: skip
    return data


def _known(classes: Sequence[str]) -> str:
    """``[a, b, ...]``: the first class names, for messages."""
    shown = ", ".join(repr(c) for c in classes[:_SHOWN])
    return f"[{shown}{', ...' if len(classes) > _SHOWN else ''}]"


def with_classes(data: LabeledData, classes: Sequence[str]) -> LabeledData:
    """``data`` with its class ids re-mapped to ``classes`` by name (the training data's, a
    saved model's), so id ``i`` means ``classes[i]`` in both; a label outside ``classes``
    is a :class:`DataError` naming its first row."""
    classes = list(classes)
    if data.classes == classes:
        return data
    index = {c: i for i, c in enumerate(classes)}
    ids = np.asarray([index.get(c, -1) for c in data.classes], dtype=np.int64)[data.y]
    bad = np.flatnonzero(ids < 0)
    if bad.size:
        label = data.classes[int(data.y[bad[0]])]
        raise _error(
            data.source, f"row {bad[0]}: label {label!r} is not one of the {len(classes)} "
            f"known classes {_known(classes)}",
        )  # fmt: skip
    return LabeledData(data.x, ids, classes, data.source)


def require_fit(
    data: LabeledData,
    input_shape: int | Sequence[int],
    num_classes: int | None = None,
    model: str = "the model",
) -> LabeledData:
    """``data`` if ``model`` (rows of ``input_shape``, an int for feature rows;
    ``num_classes`` classes, None: any) can take it, else a :class:`DataError` naming the
    source and the expected and found shape, or the first label too many."""
    shape = (input_shape,) if isinstance(input_shape, numbers.Integral) else tuple(input_shape)
    if data.input_shape != shape:
        if len(shape) == 1 and data.x.ndim == 2:
            raise _error(data.source, f"{data.num_features} features, {model} expects {shape[0]}")
        found, wanted = (", ".join(map(str, s)) for s in (data.input_shape, shape))
        raise _error(data.source, f"inputs of shape (N, {found}), {model} expects (N, {wanted})")
    if num_classes is not None and len(data) and int(data.y.max()) >= num_classes:
        label = data.classes[int(data.y.max())]
        raise _error(
            data.source, f"label {label!r} is class {int(data.y.max())} of "
            f"{_known(data.classes)}, but {model} has {num_classes} classes",
        )  # fmt: skip
    return data


def _build(
    x: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str] | None,
    source: str,
    columns: Columns = None,
) -> LabeledData:
    if x.ndim < 2 or (columns is not None and x.ndim != 2):
        raise _error(
            source, f"features must be 2-D (rows, features) or more (rows, channels, ...), "
            f"found shape {x.shape}",
        )  # fmt: skip
    if y.ndim != 1:
        raise _error(source, f"labels must be 1-D (one per row), found shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise _error(source, f"{x.shape[0]} feature rows but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise _error(source, "no rows")
    x32 = _check_features(x, source, columns)
    ids, names = _encode_labels(y, classes, source, columns)
    return LabeledData(x32, ids, names, source)


def _load_file(path: Path, classes: Sequence[str] | None) -> LabeledData:
    if path.suffix.lower() == ".npy" or (path.is_dir() and path.suffix not in FILE_EXTENSIONS):
        from stabq.rows import open_npy  # memory-mapped; stabq.rows builds on this module

        return open_npy(path, classes)
    x, y, columns = read_file(path)
    return _build(x, y, classes, str(path), columns)


def load_data(
    spec: str | os.PathLike[str], part: str = "train", classes: list[str] | None = None
) -> LabeledData:
    """Load a built-in dataset (``part``: train, test or all) or a whole data file.

    ``classes`` (a saved model's class names) fixes the label -> id mapping;
    labels outside it are a :class:`DataError`.
    """
    spec = os.fspath(spec)
    if not spec.strip():
        raise _error("data", f"no name given: a file or a built-in ({', '.join(BUILTIN_DATASETS)})")
    if part not in PARTS:
        raise _error(spec, f"unknown part {part!r}; allowed: {', '.join(PARTS)}")
    arrays = builtin_arrays(spec)
    if arrays is None:
        return _load_file(Path(spec), classes)
    x_tr, y_tr, x_te, y_te = arrays
    x, y = {  # copies: the cached arrays stay as generated
        "train": (x_tr.copy(), y_tr.copy()), "test": (x_te.copy(), y_te.copy()),
        "all": (np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])),
    }[part]  # fmt: skip
    return _build(x, y, DIGIT_CLASSES if classes is None else classes, f"{spec}:{part}")


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _subset(data: LabeledData, rows: np.ndarray, name: str) -> LabeledData:
    return LabeledData(data.x[rows], data.y[rows], list(data.classes), f"{data.source} ({name})")


def train_val_split(
    data: LabeledData, val_fraction: float = 0.1, seed: int = 0
) -> tuple[LabeledData, LabeledData]:
    """Split off ``ceil(n * val_fraction)`` rows (at least 1, at most n - 1) for validation.

    Stratified by class when every class present has >= 2 rows and both parts
    can hold one row of each; a plain shuffle otherwise. Rows keep their order.
    """
    from sklearn.model_selection import train_test_split

    n = len(data.y)
    if not (isinstance(val_fraction, numbers.Real) and 0.0 < val_fraction < 1.0):
        raise _error(data.source, f"val_fraction={val_fraction!r}, allowed is 0 < val_fraction < 1")
    if n < 2:
        raise _error(data.source, f"cannot split {n} row into train and validation; need >= 2")
    n_val = min(n - 1, max(1, math.ceil(n * val_fraction - 1e-9)))  # 100 * 0.07 is 7, not 8
    counts = np.bincount(data.y)
    counts = counts[counts > 0]
    can_stratify = counts.min() >= 2 and min(n_val, n - n_val) >= len(counts)
    train, val = train_test_split(
        np.arange(n), test_size=n_val, random_state=seed,
        stratify=data.y if can_stratify else None,
    )  # fmt: skip
    return _subset(data, np.sort(train), "train split"), _subset(data, np.sort(val), "val split")


@dataclass(eq=False)
class Standardizer:
    """``(x - mean) / std`` with ``mean``, ``std`` float32 of one shape: ``(d,)`` per feature
    (the default), or per channel, e.g. ``(C, 1, 1)`` for images ``(n, C, H, W)``.

    ``std`` is the population standard deviation (ddof=0); a feature without
    variance gets ``std = 1`` so it maps to 0 instead of NaN.
    """

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        self.mean = np.ascontiguousarray(self.mean, dtype=np.float32)
        self.std = np.ascontiguousarray(self.std, dtype=np.float32)
        if self.mean.ndim == 0:
            self.mean, self.std = self.mean.reshape(-1), self.std.reshape(-1)
        m, s = self.mean, self.std
        if not (m.shape == s.shape and m.size and np.isfinite([*m.flat, *s.flat]).all()
                and (s > 0).all()):  # fmt: skip
            raise _error(
                "Standardizer", f"mean has {m.size} values, std {s.size}: allowed is the same "
                "number (>= 1) of finite values, std > 0",
            )  # fmt: skip

    @classmethod
    def fit(cls, x: np.ndarray, shape: Sequence[int] | None = None) -> Standardizer:
        """Mean and std of ``x`` ``(n, ...)`` (computed in float64) over its rows, and over
        every axis where ``shape`` (default ``x.shape[1:]``: per value) has a 1."""
        x = np.asarray(x)
        if x.ndim < 2 or x.shape[0] == 0 or not np.isfinite(x).all():
            raise _error(
                "Standardizer", f"fit needs finite x of shape (n >= 1, d), found {x.shape}"
            )
        shape = tuple(x.shape[1:]) if shape is None else tuple(shape)
        if len(shape) != x.ndim - 1 or any(
            s not in (1, d) for s, d in zip(shape, x.shape[1:], strict=True)
        ):
            raise _error("Standardizer", f"statistics of shape {shape} for x of shape {x.shape}")
        axes = (0, *[i + 1 for i, s in enumerate(shape) if s == 1])
        x64 = x.astype(np.float64, copy=False)
        std = x64.std(axis=axes).astype(np.float32).reshape(shape)
        std[~(std >= np.finfo(np.float32).tiny)] = 1.0
        return cls(x64.mean(axis=axes).reshape(shape), std)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` for ``x`` ``(..., *shape)``, as float32."""
        x = np.asarray(x, dtype=np.float32)
        shape = self.mean.shape
        fits = x.ndim >= len(shape) and all(
            s in (1, d) for s, d in zip(shape, x.shape[x.ndim - len(shape) :], strict=True)
        )
        if not fits:
            what = f"{shape[0]} features" if len(shape) == 1 else f"shape {shape}"
            raise _error("Standardizer", f"x of shape {x.shape} must end in {what}")
        return ((x - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict:
        """``{"mean": [...], "std": [...]}`` of Python floats (exact float32 values), flattened."""
        return {"mean": self.mean.reshape(-1).tolist(), "std": self.std.reshape(-1).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Standardizer:
        """Inverse of :meth:`to_dict`; anything else is a :class:`DataError`."""
        if not isinstance(d, Mapping) or set(d) != {"mean", "std"}:
            found = sorted(map(str, d)) if isinstance(d, Mapping) else type(d).__name__
            raise _error("Standardizer", f"expected a dict with keys mean, std; found {found}")
        for key, v in d.items():
            if not (isinstance(v, list) and all(_is_real(e) for e in v)):
                raise _error("Standardizer", f"{key} must be a list of numbers, found {v!r}")
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64))


__all__ = [
    "BUILTIN_DATASETS", "FILE_EXTENSIONS", "PARTS", "DataError", "LabeledData", "Standardizer",
    "from_arrays", "load_data", "require_classes", "require_fit", "train_val_split",
    "validate_features", "with_classes",
]  # fmt: skip
