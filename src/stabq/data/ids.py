"""Token ids: integer inputs (text, events, codes) kept as ids, never standardised or cast
to float, and checked against the vocabulary a model was trained with."""

from __future__ import annotations

from typing import Any

import numpy as np

from stabq.data.messages import data_error, first_bad


def is_ids(x: Any) -> bool:
    """Whether ``x`` holds token ids: integers of any width but one byte (``uint8`` values
    are images, scaled to [0, 1]; booleans are features)."""
    dtype = np.dtype(getattr(x, "dtype", np.float32))
    return dtype.kind in "iu" and dtype.itemsize > 1


def id_position(x: np.ndarray, row: int, flat: int, named: int) -> str:
    """``row R, position P`` of value ``flat`` of row ``row`` (``P`` a tuple past 2-D)."""
    at = flat if x.ndim == 2 else tuple(int(i) for i in np.unravel_index(flat, x.shape[1:]))
    return f"row {named}, position {at}"


def check_ids(
    x: np.ndarray, source: str, vocab_size: int | None = None, rows: np.ndarray | None = None
) -> np.ndarray:
    """Token ids ``x`` as C-contiguous int64, each ``>= 0`` and, given ``vocab_size``,
    ``< vocab_size``; else a :class:`DataError` naming the first bad id's row and position."""
    ids = np.ascontiguousarray(x, dtype=np.int64)
    bad = ids < 0 if vocab_size is None else (ids < 0) | (ids >= vocab_size)
    if bad.any():
        row, flat = first_bad(bad)
        named = row if rows is None else int(rows[row])
        value = int(ids.reshape(len(ids), -1)[row, flat])
        allowed = ">= 0" if vocab_size is None else f"in [0, {vocab_size}), the vocabulary"
        raise data_error(
            source, f"{id_position(ids, row, flat, named)}: token id {value}, allowed is an "
            f"id {allowed}",
        )  # fmt: skip
    return ids


def vocab_of(data: Any) -> int | None:
    """The vocabulary a model trained on ``data`` takes: its largest token id + 1 (at
    least 2), or None for features (:class:`~stabq.data.LabeledData` or arrays ``x``)."""
    x = getattr(data, "x", data)
    if not is_ids(x):
        return None
    return max(2, int(np.max(x)) + 1) if np.size(x) else 2


def require_kind(data: Any, model: str, vocab_size: int | None) -> None:
    """A :class:`DataError` unless ``data`` (:class:`~stabq.data.LabeledData`) is what
    ``model`` takes: token ids within ``vocab_size``, or (``vocab_size`` None) features."""
    ids = is_ids(data.x)
    if vocab_size is not None and not ids:
        raise data_error(
            data.source, f"{data.x.dtype} features, but {model} takes token ids (integers in "
            f"[0, {vocab_size})): give x as integers",
        )  # fmt: skip
    if vocab_size is None and ids:
        raise data_error(
            data.source, f"integer token ids, but {model} takes features: give x as floats "
            f"(x.astype(np.float32)), or train a model on the ids",
        )  # fmt: skip
    if vocab_size is not None:
        check_ids(data.x, data.source, vocab_size)


__all__ = ["check_ids", "is_ids", "require_kind", "vocab_of"]
