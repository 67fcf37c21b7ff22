"""Labeled data and its checks: the bottom of :mod:`stabq.data`, depending on nothing but
:mod:`stabq.errors` and numpy.

Files are read by :mod:`stabq.data.readers` (:func:`stabq.data.load_data` says which);
every check of what they hold lives here (:func:`from_arrays` for data sets,
:func:`validate_features` for what a model is fed, :func:`require_classes`,
:func:`with_classes` and :func:`require_fit` for what training and a saved model need),
for the CLI, the Python API and the estimator alike. Every problem is a one-line
:class:`DataError` that starts with the source and says what and where. Rows are
counted from 0; in CSV and Parquet files as "data row N", the header not counted.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stabq.data.ids import check_ids, is_ids, require_kind
from stabq.data.labels import encode_labels, known
from stabq.data.messages import Columns, data_error, first_bad, position, where
from stabq.data.split import CHUNK_ROWS, split_indices
from stabq.errors import DataError


def as_numpy(a: Any, source: str, name: str) -> np.ndarray:
    """``a`` (array-like or torch tensor) as a numpy array; half floats become float32."""
    if hasattr(a, "detach") and hasattr(a, "numpy"):  # a torch tensor, without importing torch
        a = a.detach().cpu()
        if a.is_floating_point() and a.element_size() < 4:  # float16 / bfloat16
            a = a.float()
        return a.numpy()
    try:
        return np.asarray(a)
    except (ValueError, TypeError) as exc:
        raise data_error(source, f"{name} is not an array ({exc})") from exc


@dataclass(eq=False)
class LabeledData:
    """Checked data: inputs and class ids with the names of the classes.

    Labels are class names: integer labels keep their values as names (`7` is class
    `"7"`), so a label is "out of range" only against given classes.

    Attributes:
        x: `(n, ...)` float32, finite, C-contiguous: feature rows `(n, d)`, sequences
            `(n, L)` or `(n, C, L)`, images `(n, C, H, W)` (uint8 values scaled to
            [0, 1]); tables are always feature rows. Or token ids: int64 `(n, L)`, each
            `>= 0`, from an integer `x` (any width but one byte) of an array file or
            array: never standardised, never cast to float.
        y: `(n,)` int64 class ids in `[0, len(classes))`.
        classes: the class names, id `i` <-> `classes[i]`.
        source: where the data came from, for messages (a file, `"mnist1d:train"`).

    Examples:
        >>> import numpy as np
        >>> from stabq.data import from_arrays
        >>> data = from_arrays(np.zeros((4, 3)), np.array(["b", "a", "b", "a"]))
        >>> data.classes, data.y.tolist(), data.input_shape, len(data)
        (['a', 'b'], [1, 0, 1, 0], (3,), 4)
    """

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
        """Number of classes."""
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


def to_features(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """``x`` ``(n, ...)`` as the C-contiguous ``dtype`` features a model is fed, ``uint8``
    values (images) scaled to ``[0, 1]``; nothing checked (:func:`check_features` checks)."""
    if x.dtype == np.uint8:
        out = np.asarray(x, dtype=dtype, order="C")  # a new array: divided in place
        out /= dtype(255)
        return out
    with np.errstate(over="ignore", invalid="ignore"):  # check_features reports them
        return np.ascontiguousarray(x, dtype=dtype)


def check_features(
    x: np.ndarray,
    source: str,
    columns: Columns,
    dtype: type = np.float32,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Numeric, finite ``x`` as C-contiguous ``dtype`` (its rank and rows are checked before);
    ``uint8`` values (images) become ``x / 255``; integer ids (:func:`is_ids`, not from a
    table) stay int64 ids (:func:`check_ids`). ``rows`` ``(len(x),)``: the row numbers a
    message names (a chunk's rows in its file); default ``0, 1, ...``."""
    if x.dtype.kind not in "biuf":
        raise data_error(source, f"features must be numbers, found dtype {x.dtype}")
    if 0 in x.shape[1:]:
        raise data_error(source, f"no feature columns (x has shape {x.shape})")
    if is_ids(x) and columns is None:
        return check_ids(x, source, rows=rows)
    if x.dtype == np.uint8:
        return to_features(x, dtype)
    xd = to_features(x, dtype)
    found = _first_nonfinite(xd)
    if found is not None:
        row, flat = found
        named = row if rows is None else int(rows[row])
        at = position(x, row, flat, named, columns)
        v = float(x.reshape(len(x), -1)[row, flat])
        what = "NaN" if math.isnan(v) else f"{v:+}".title()  # +Inf, -Inf
        what = (
            f"value {v!r} overflows {np.dtype(dtype).name}"
            if math.isfinite(v)
            else f"value is {what}: features must be finite, not NaN or infinite"
        )
        raise data_error(source, f"{at}: feature {what}")
    return xd


def _first_nonfinite(x: np.ndarray) -> tuple[int, int] | None:
    """Row and flat column of the first value of ``x`` ``(n, ...)`` that is not finite, or
    None; a chunk of rows at a time, so the check holds no mask of the whole array."""
    step = max(1, (CHUNK_ROWS * 16) // max(1, math.prod(x.shape[1:])))
    for start in range(0, len(x), step):
        bad = ~np.isfinite(x[start : start + step])
        if bad.any():
            row, flat = first_bad(bad)
            return start + row, flat
    return None


def from_arrays(
    x: Any, y: Any, classes: list[str] | None = None, source: str = "arrays"
) -> LabeledData:
    """Check arrays of features and labels into `LabeledData`.

    Args:
        x: `(n, ...)` finite numbers (a numpy array, a torch tensor, nested lists).
        y: `(n,)` labels, integers or strings (whole floats count as integers).
        classes: class names: label `v` gets the id of `str(v)` there; default None:
            the sorted distinct labels.
        source: the name messages give the data.

    Raises:
        DataError: shapes that do not match, values that are not finite numbers, or
            labels outside `classes`; the message names the first bad row.

    Examples:
        >>> from stabq.data import from_arrays
        >>> from_arrays([[0.0, 1.0], [2.0, 3.0]], [7, 3]).classes
        ['3', '7']
    """
    return build_labeled(as_numpy(x, source, "x"), as_numpy(y, source, "y"), classes, source)


def validate_features(
    x: Any, source: str = "X", dtype: type = np.float32, allow_nd: bool = False
) -> np.ndarray:
    """Features ``x`` ``(n >= 1, d >= 1)`` (with ``allow_nd``, ``(n >= 1, ...)``), numbers,
    finite in ``dtype``, as a C-contiguous ``dtype`` array: what a model is fed. A problem
    is a :class:`DataError` naming the first bad row and column."""
    x = as_numpy(x, source, "x")
    if x.ndim != 2 and not (allow_nd and x.ndim > 2):
        raise data_error(source, f"features must be 2-D (rows, features), found shape {x.shape}")
    if x.shape[0] == 0:
        raise data_error(source, "no rows")
    return check_features(x, source, None, dtype)


def require_classes(data: LabeledData, minimum: int = 2) -> LabeledData:
    """``data`` if its labels hold at least ``minimum`` classes (training needs 2), else a
    :class:`DataError` naming the source and the one class found."""
    found = np.unique(data.y)
    if found.size < minimum:
        names = ", ".join(repr(data.classes[i]) for i in found.tolist())
        raise data_error(
            data.source, f"{found.size} class ({names}) in {len(data)} rows: training a "
            f"classifier needs labels of at least {minimum} classes",
        )  # fmt: skip
    return data


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
        raise data_error(
            data.source, f"row {bad[0]}: label {label!r} is not one of the {len(classes)} "
            f"known classes {known(classes)}",
        )  # fmt: skip
    return LabeledData(data.x, ids, classes, data.source)


def require_fit(
    data: LabeledData,
    input_shape: int | Sequence[int],
    num_classes: int | None = None,
    model: str = "the model",
    vocab_size: int | None = None,
) -> LabeledData:
    """``data`` if ``model`` (rows of ``input_shape``, an int for feature rows;
    ``num_classes`` classes, None: any; token ids below ``vocab_size``, None: features) can
    take it, else a :class:`DataError` naming the source and the expected and found shape,
    the kind of input, the first id out of the vocabulary, or the first label too many."""
    require_kind(data, model, vocab_size)
    shape = (input_shape,) if isinstance(input_shape, numbers.Integral) else tuple(input_shape)
    if data.input_shape != shape:
        if len(shape) == 1 and data.x.ndim == 2:
            raise data_error(
                data.source, f"{data.num_features} features, {model} expects {shape[0]}"
            )
        found, wanted = (", ".join(map(str, s)) for s in (data.input_shape, shape))
        raise data_error(
            data.source, f"inputs of shape (N, {found}), {model} expects (N, {wanted})"
        )
    if num_classes is not None and len(data) and int(data.y.max()) >= num_classes:
        label = data.classes[int(data.y.max())]
        raise data_error(
            data.source, f"label {label!r} is class {int(data.y.max())} of "
            f"{known(data.classes)}, but {model} has {num_classes} classes",
        )  # fmt: skip
    return data


def check_layout(
    shape: Sequence[int], dtype: np.dtype, y: np.ndarray, source: str, columns: Columns = None
) -> None:
    """The checks that need no row read, for arrays and rows read later alike: features
    ``shape`` ``(n >= 1, ...)`` of at least 2 dims (exactly 2 for a table), of numbers,
    with a value per row, and labels ``y`` ``(n,)``. Raises a one-line :class:`DataError`."""
    shape = tuple(int(v) for v in shape)
    if len(shape) < 2 or (columns is not None and len(shape) != 2):
        raise data_error(
            source, f"features must be 2-D (rows, features) or more (rows, channels, ...), "
            f"found shape {shape}",
        )  # fmt: skip
    if y.ndim != 1:
        raise data_error(source, f"labels must be 1-D (one per row), found shape {y.shape}")
    if shape[0] != y.shape[0]:
        raise data_error(source, f"{shape[0]} feature rows but {y.shape[0]} labels")
    if shape[0] == 0:
        raise data_error(source, "no rows")
    if np.dtype(dtype).kind not in "biuf":
        raise data_error(source, f"features must be numbers, found dtype {dtype}")
    if 0 in shape[1:]:
        raise data_error(source, f"no feature columns (x has shape {shape})")


def build_labeled(
    x: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str] | None,
    source: str,
    columns: Columns = None,
) -> LabeledData:
    """Checked :class:`LabeledData` from raw ``x`` ``(n, ...)`` and labels ``y`` ``(n,)``
    (what :func:`from_arrays` and every loader build): float32 features, class ids."""
    check_layout(x.shape, x.dtype, y, source, columns)
    x32 = check_features(x, source, columns)
    ids, names = encode_labels(y, classes, source, columns)
    return LabeledData(x32, ids, names, source)


def _subset(data: LabeledData, rows: np.ndarray, name: str) -> LabeledData:
    return LabeledData(data.x[rows], data.y[rows], list(data.classes), f"{data.source} ({name})")


def train_val_split(
    data: LabeledData, val_fraction: float = 0.1, seed: int = 0
) -> tuple[LabeledData, LabeledData]:
    """Split off ``ceil(n * val_fraction)`` rows (at least 1, at most n - 1) for validation.

    Stratified by class when every class present has >= 2 rows and both parts
    can hold one row of each; a plain shuffle otherwise. Rows keep their order. The rows
    of each part are scikit-learn's ``train_test_split`` with ``random_state=seed``
    (:func:`stabq.data.split.split_indices`), numbered in int32 below 2**31 rows.
    """
    n = len(data.y)
    if not (isinstance(val_fraction, numbers.Real) and 0.0 < val_fraction < 1.0):
        raise data_error(
            data.source, f"val_fraction={val_fraction!r}, allowed is 0 < val_fraction < 1"
        )
    if n < 2:
        raise data_error(data.source, f"cannot split {n} row into train and validation; need >= 2")
    n_val = min(n - 1, max(1, math.ceil(n * val_fraction - 1e-9)))  # 100 * 0.07 is 7, not 8
    counts = np.bincount(data.y)
    counts = counts[counts > 0]
    can_stratify = counts.min() >= 2 and min(n_val, n - n_val) >= len(counts)
    train, val = split_indices(data.y, n_val, seed, bool(can_stratify))
    return _subset(data, train, "train split"), _subset(data, val, "val split")


__all__ = [
    "Columns", "DataError", "LabeledData", "as_numpy", "build_labeled", "check_features",
    "check_ids", "check_layout", "data_error", "encode_labels", "first_bad", "from_arrays",
    "is_ids", "require_classes", "require_fit", "to_features", "train_val_split",
    "validate_features", "where", "with_classes",
]  # fmt: skip
