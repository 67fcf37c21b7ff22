"""The one-line messages of bad data: where a value sits, and the error that names it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stabq.errors import DataError

Columns = Sequence[str] | None  # a table's column names; None for arrays


def data_error(source: str, message: str) -> DataError:
    """One line, at most 500 characters: ``"{source}: {message}"``."""
    text = " ".join(f"{source}: {message}".splitlines())
    return DataError(text if len(text) <= 500 else text[:497] + "...")


def where(row: int, columns: Columns, col: int | None = None) -> str:
    """``row 3, column 1`` for arrays; ``data row 3 (...), column 'f1'`` for tables."""
    text = f"row {row}" if columns is None else f"data row {row} (0-based, header excluded)"
    if col is not None:
        text += f", column {col}" if columns is None else f", column {columns[col]!r}"
    return text


def position(x: np.ndarray, row: int, flat: int, named: int, columns: Columns) -> str:
    """``row R, column C`` (or ``row R, position (..)``) of value ``flat`` of row ``row``."""
    if x.ndim == 2:
        return where(named, columns, flat)
    col = np.unravel_index(flat, x.shape[1:])
    return f"row {named}, position {tuple(int(i) for i in col)}"


def first_bad(bad: np.ndarray) -> tuple[int, int]:
    """``(row, flat index within the row)`` of the first True of ``bad`` ``(n, ...)``."""
    bad_rows = bad.reshape(len(bad), -1)
    row = int(np.flatnonzero(bad_rows.any(axis=1))[0])
    return row, int(np.flatnonzero(bad_rows[row])[0])


__all__ = ["Columns", "data_error", "first_bad", "position", "where"]
