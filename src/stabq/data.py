"""Labeled feature data: built-in datasets, feature files, and their validation.

``load_data(spec)`` takes a built-in name (``mnist1d``, ``digits``,
``synthetic[:DIM]``, generated locally) or a file (``.npz``, ``.pt``,
``.safetensors``, ``.csv``, ``.parquet``) and returns :class:`LabeledData`:

    x        (n, d) float32, finite, C-contiguous
    y        (n,)   int64 class ids in [0, len(classes))
    classes  class names, id i <-> classes[i]

Every check lives in :func:`from_arrays`; every problem is a one-line
:class:`DataError` that starts with the source and says what and where.
Rows are counted from 0; in CSV and Parquet files as "data row N", the
header not counted.
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

PARTS: tuple[str, ...] = ("train", "test", "all")
FILE_EXTENSIONS: tuple[str, ...] = (".npz", ".pt", ".safetensors", ".csv", ".parquet")
_SHOWN = 10  # class names shown in a message before "..."
_Columns = Sequence[str] | None  # feature column names of a table; None for arrays


def _error(source: str, message: str) -> DataError:
    text = " ".join(f"{source}: {message}".splitlines())
    return DataError(text if len(text) <= 500 else text[:497] + "...")


@dataclass(eq=False)
class LabeledData:
    """Features ``x`` ``(n, d)`` float32 and class ids ``y`` ``(n,)`` int64 named by ``classes``."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    source: str

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (
            f"LabeledData(source={self.source!r}, rows={len(self)}, "
            f"num_features={self.num_features}, num_classes={self.num_classes})"
        )


def _where(row: int, columns: _Columns, col: int | None = None) -> str:
    """``row 3, column 1`` for arrays; ``data row 3 (...), column 'f1'`` for tables."""
    text = f"row {row}" if columns is None else f"data row {row} (0-based, header excluded)"
    if col is not None:
        text += f", column {col}" if columns is None else f", column {columns[col]!r}"
    return text


def _as_numpy(a: Any, source: str, name: str) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "numpy"):  # a torch tensor, without importing torch
        a = a.detach().cpu()
        if a.is_floating_point() and a.element_size() < 4:  # float16 / bfloat16
            a = a.float()
        return a.numpy()
    try:
        return np.asarray(a)
    except (ValueError, TypeError) as exc:
        raise _error(source, f"{name} is not an array ({exc})") from exc


def _check_features(x: np.ndarray, source: str, columns: _Columns) -> np.ndarray:
    """Numeric, finite ``x`` as C-contiguous float32 (its rank and rows are checked before)."""
    if x.dtype.kind not in "biuf":
        raise _error(source, f"features must be numbers, found dtype {x.dtype}")
    if x.shape[1] == 0:
        raise _error(source, f"no feature columns (x has shape {x.shape})")
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, by row and column
        x32 = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x32)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        col = int(np.flatnonzero(bad[row])[0])
        v = float(x[row, col])
        what = "NaN" if math.isnan(v) else f"{v:+}".title()  # +Inf, -Inf
        what = f"value {v!r} overflows float32" if math.isfinite(v) else f"value is {what}"
        raise _error(source, f"{_where(row, columns, col)}: feature {what}")
    return x32


def _label_values(y: np.ndarray, source: str, columns: _Columns) -> np.ndarray:
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
                source, f"{_where(row, columns)}: label {v!r} is not a whole number or a string"
            )
    if any(isinstance(v, str) for v in values):
        strings = [v if isinstance(v, str) else str(int(v)) for v in values]
        return np.asarray(strings, dtype=object)  # not dtype=str: it drops trailing "\0"
    return np.asarray([int(v) for v in values], dtype=np.int64)


def _encode_labels(
    y: np.ndarray, classes: Sequence[str] | None, source: str, columns: _Columns
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
        known = ", ".join(repr(c) for c in classes[:_SHOWN])
        known += ", ..." if len(classes) > _SHOWN else ""
        others = f" ({bad.size - 1} more rows too)" if bad.size > 1 else ""
        raise _error(
            source,
            f"{_where(int(bad[0]), columns)}: label {str(values[bad[0]])!r} is not one of "
            f"the {len(classes)} known classes [{known}]{others}",
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
    return _build(_as_numpy(x, source, "x"), _as_numpy(y, source, "y"), classes, source)


def _build(
    x: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str] | None,
    source: str,
    columns: _Columns = None,
) -> LabeledData:
    if x.ndim != 2:
        raise _error(source, f"features must be 2-D (rows, features), found shape {x.shape}")
    if y.ndim != 1:
        raise _error(source, f"labels must be 1-D (one per row), found shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise _error(source, f"{x.shape[0]} feature rows but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise _error(source, "no rows")
    x32 = _check_features(x, source, columns)
    ids, names = _encode_labels(y, classes, source, columns)
    return LabeledData(x32, ids, names, source)


def _from_mapping(obj: Any, source: str) -> tuple[np.ndarray, np.ndarray, None]:
    if not isinstance(obj, Mapping):
        raise _error(source, f"expected a dict with 'x' and 'y', found {type(obj).__name__}")
    for key in ("x", "y"):
        if key not in obj:
            raise _error(source, f"no entry {key!r} (found: {', '.join(map(str, obj)) or 'none'})")
    return _as_numpy(obj["x"], source, "x"), _as_numpy(obj["y"], source, "y"), None


def _read_npz(path: Path, source: str) -> tuple[np.ndarray, np.ndarray, None]:
    with open(path, "rb") as fh:  # ours to close, whatever np.load raises
        obj = np.load(fh, allow_pickle=False)  # an object array raises: nothing is unpickled
        if not isinstance(obj, np.lib.npyio.NpzFile):
            raise _error(source, "holds one array, expected an .npz archive with 'x' and 'y'")
        with obj:
            return _from_mapping(obj, source)


def _read_tensors(path: Path, source: str) -> tuple[np.ndarray, np.ndarray, None]:
    if path.suffix.lower() == ".pt":
        import torch

        return _from_mapping(torch.load(path, map_location="cpu", weights_only=True), source)
    from safetensors.torch import load_file  # torch, not numpy: bfloat16 is allowed

    return _from_mapping(load_file(path), source)


def _read_table(path: Path, source: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Feature columns and the label column (``label``, else the last) of a CSV or Parquet file."""
    import pandas as pd

    if path.suffix.lower() == ".csv":
        df = pd.read_csv(path, low_memory=False)
    else:
        df = pd.read_parquet(path, engine="pyarrow")
    names = [str(c) for c in df.columns]
    if len(names) < 2:
        raise _error(source, f"needs feature columns and a label column, found columns {names}")
    if len(df) == 0:
        raise _error(source, "no rows (a header but no data)")
    label_pos = names.index("label") if "label" in names else len(names) - 1
    feature_pos = [i for i in range(len(names)) if i != label_pos]
    columns = [names[i] for i in feature_pos]
    for j, pos in enumerate(feature_pos):
        col = df.iloc[:, pos]
        if not pd.api.types.is_numeric_dtype(col):
            bad = (pd.to_numeric(col, errors="coerce").isna() & col.notna()).to_numpy()
            row = int(np.argmax(bad))
            where = f": {_where(row, columns)} holds {col.iloc[row]!r}" if bad.any() else ""
            raise _error(source, f"column {columns[j]!r} is not numeric{where}")
    x = df.iloc[:, feature_pos].to_numpy(dtype=np.float64, na_value=np.nan)
    label = df.iloc[:, label_pos]
    missing = label.isna().to_numpy()
    if missing.any():
        raise _error(source, f"{_where(int(np.argmax(missing)), columns)}: label is missing")
    if pd.api.types.is_bool_dtype(label) or pd.api.types.is_integer_dtype(label):
        return x, label.to_numpy(dtype=np.int64), columns
    if pd.api.types.is_float_dtype(label):
        return x, label.to_numpy(dtype=np.float64), columns
    return x, label.to_numpy(dtype=object), columns


_READERS = {
    ".npz": _read_npz, ".pt": _read_tensors, ".safetensors": _read_tensors,
    ".csv": _read_table, ".parquet": _read_table,
}  # fmt: skip


def _load_file(path: Path, classes: Sequence[str] | None) -> LabeledData:
    source = str(path)
    ext = path.suffix.lower()
    if ext not in _READERS:
        raise _error(
            source, f"unknown data format {ext or '(no extension)'!r}: expected a file ending in "
            f"{', '.join(FILE_EXTENSIONS)} or a built-in dataset "
            f"({', '.join(BUILTIN_DATASETS)}, synthetic:DIM)",
        )  # fmt: skip
    if not path.exists():
        raise _error(source, "no such file")
    if not path.is_file():
        raise _error(source, "is not a file (a directory?)")
    if path.stat().st_size == 0:
        raise _error(source, "file is empty: no rows")
    try:
        x, y, columns = _READERS[ext](path, source)
    except DataError:
        raise
    except Exception as exc:  # whatever the third-party reader raises; KeyboardInterrupt passes
        detail = str(exc).split(". ")[0]  # its first sentence: not its advice to unpickle
        detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        hint = " (only tensors load: save {'x': tensor, 'y': tensor})" if ext == ".pt" else ""
        raise _error(source, f"cannot read as a {ext} file: {detail}{hint}") from exc
    return _build(x, y, classes, source, columns)


def load_data(
    spec: str | os.PathLike[str], part: str = "train", classes: list[str] | None = None
) -> LabeledData:
    """Load a built-in dataset (``part``: train, test or all) or a whole data file.

    ``classes`` (a saved model's class names) fixes the label -> id mapping;
    labels outside it are a :class:`DataError`.
    """
    spec = os.fspath(spec)
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
    """Per-feature ``(x - mean) / std`` with ``mean``, ``std`` ``(d,)`` float32.

    ``std`` is the population standard deviation (ddof=0); a feature without
    variance gets ``std = 1`` so it maps to 0 instead of NaN.
    """

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        self.mean = np.ascontiguousarray(self.mean, dtype=np.float32).reshape(-1)
        self.std = np.ascontiguousarray(self.std, dtype=np.float32).reshape(-1)
        m, s = self.mean, self.std
        if not (m.shape == s.shape and m.size and np.isfinite([*m, *s]).all() and (s > 0).all()):
            raise _error(
                "Standardizer", f"mean has {m.size} values, std {s.size}: allowed is the same "
                "number (>= 1) of finite values, std > 0",
            )  # fmt: skip

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        """Mean and std of ``x`` ``(n, d)`` over its rows (computed in float64)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0 or not np.isfinite(x).all():
            raise _error(
                "Standardizer", f"fit needs finite x of shape (n >= 1, d), found {x.shape}"
            )
        std = x.std(axis=0).astype(np.float32)
        std[~(std >= np.finfo(np.float32).tiny)] = 1.0
        return cls(x.mean(axis=0), std)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` for ``x`` ``(..., d)``, as float32."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 0 or x.shape[-1] != self.mean.size:
            raise _error(
                "Standardizer", f"x of shape {x.shape} must end in {self.mean.size} features"
            )
        return ((x - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict:
        """``{"mean": [...], "std": [...]}`` of Python floats (exact float32 values)."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

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
