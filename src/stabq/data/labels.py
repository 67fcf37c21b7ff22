"""Labels as class ids: integers or strings in, the class names and each row's id out.

Integer labels are encoded a chunk of rows at a time, so labels memory-mapped from a
``.npy`` file are never held whole beside their ids.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from stabq.data.messages import Columns, data_error, where
from stabq.data.split import CHUNK_ROWS

_SHOWN = 10  # class names shown in a message before "..."


def _whole_ids(y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """For integer labels ``y`` ``(n,)`` (or whole floats): their sorted distinct int64
    values and each row's index among them ``(n,)`` int64, what ``np.unique(...,
    return_inverse=True)`` gives, in chunks of rows; None for any other labels."""
    if y.dtype.kind not in "biuf":
        return None
    chunks = [slice(s, s + CHUNK_ROWS) for s in range(0, len(y), CHUNK_ROWS)]
    found = []
    for rows in chunks:
        part = np.asarray(y[rows])
        if part.dtype.kind == "f" and not _whole(part):
            return None
        found.append(np.unique(part.astype(np.int64)))
    unique = np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)
    ids = np.empty(len(y), np.int64)
    for rows in chunks:
        ids[rows] = np.searchsorted(unique, np.asarray(y[rows]).astype(np.int64))
    return unique, ids


def _whole(y: np.ndarray) -> bool:
    return bool((np.isfinite(y) & (y == np.round(y)) & (np.abs(y) < 2.0**62)).all())


def _label_values(y: np.ndarray, source: str, columns: Columns) -> np.ndarray:
    """Labels as int64, or as str when any label is a string; whole floats count as integers."""
    kind = y.dtype.kind
    if kind in "biu":
        return y.astype(np.int64)
    if kind in "US":
        return (np.char.decode(y, "utf-8", errors="replace") if kind == "S" else y).astype(str)
    if kind not in "fO":
        raise data_error(source, f"labels must be integers or strings, found dtype {y.dtype}")
    if kind == "f" and _whole(y):
        return y.astype(np.int64)
    values = y.tolist()
    for row, v in enumerate(values):
        if not isinstance(v, str) and not (
            isinstance(v, numbers.Real) and abs(v) < 2**62 and v == int(v)  # False for NaN
        ):
            raise data_error(
                source, f"{where(row, columns)}: label {v!r} is not a whole number or a string"
            )
    if any(isinstance(v, str) for v in values):
        strings = [v if isinstance(v, str) else str(int(v)) for v in values]
        return np.asarray(strings, dtype=object)  # not dtype=str: it drops trailing "\0"
    return np.asarray([int(v) for v in values], dtype=np.int64)


def encode_labels(
    y: np.ndarray, classes: Sequence[str] | None, source: str, columns: Columns
) -> tuple[np.ndarray, list[str]]:
    """Class ids ``(n,)`` int64 and the class names; labels match names by ``str(label)``.
    Integer labels are encoded a chunk of rows at a time (``y`` may be memory-mapped)."""
    found = _whole_ids(y)
    if found is None:
        values = _label_values(y, source, columns)
        unique, inverse = np.unique(values, return_inverse=True)
        inverse = inverse.astype(np.int64, copy=False).reshape(-1)
    else:
        unique, inverse = found
    names = [str(v) for v in unique.tolist()]
    if classes is None:
        return inverse, names
    if isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
        raise data_error(source, f"classes must be a list of strings, found {classes!r}")
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise data_error(source, f"classes must be distinct, found {classes!r}")
    index = {c: i for i, c in enumerate(classes)}
    ids = np.asarray([index.get(n, -1) for n in names], dtype=np.int64)[inverse]
    bad = np.flatnonzero(ids < 0)
    if bad.size:
        others = f" ({bad.size - 1} more rows too)" if bad.size > 1 else ""
        raise data_error(
            source,
            f"{where(int(bad[0]), columns)}: label {str(unique[inverse[bad[0]]])!r} is not one of "
            f"the {len(classes)} known classes {known(classes)}{others}",
        )
    return ids, classes


def known(classes: Sequence[str]) -> str:
    """``[a, b, ...]``: the first class names, for messages."""
    shown = ", ".join(repr(c) for c in classes[:_SHOWN])
    return f"[{shown}{', ...' if len(classes) > _SHOWN else ''}]"


__all__ = ["encode_labels", "known"]
