"""Rows read when asked for: training on data larger than memory.

A :class:`Rows` takes the place of the features array ``x`` ``(n, ...)`` of a
:class:`~stabq.data.LabeledData` whose rows stay where they are (a ``.npy``
file opened with ``np.load(mmap_mode="r")``, a map-style torch ``Dataset``);
the labels ``y`` ``(n,)``, small, are held as usual. ``rows[index]`` is a
subset (nothing read); ``rows.read(positions)`` reads those rows, in sorted
order, and returns them as :mod:`stabq.data` makes features: C-contiguous
float32, ``uint8`` scaled to ``[0, 1]``, checked finite. So a batch read from
a file is bitwise the batch the same arrays held in memory give.

Every row is read once when the data is opened (:func:`open_npy`,
:func:`from_dataset`, :func:`from_memmap`): a non-finite value is the usual
one-line :class:`~stabq.errors.DataError` naming its row. :func:`scan` fits
the :class:`~stabq.data.Standardizer` in one more pass, chunk by chunk.

Pages of a mapped file that a read touched count in the process's resident
memory until they are unmapped: after every ``RESIDENT_BYTES`` read, the
mapping is told to drop them (``madvise(MADV_DONTNEED)``; the kernel keeps
them in its page cache while memory allows), so a pass over a file larger
than memory leaves a few megabytes resident, not the file.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from stabq.data.labeled import (
    LabeledData,
    as_numpy,
    check_features,
    check_layout,
    data_error,
    encode_labels,
    to_features,
    train_val_split,
)
from stabq.data.split import index_dtype
from stabq.data.standardize import CHUNK_BYTES, Standardizer, chunk_rows

RESIDENT_BYTES = 16 << 20  # mapped bytes a read may leave resident before they are dropped
_PAGE_SLACK = 64 << 10  # what one row read may map beyond its bytes (the kernel's fault-around)


class Rows:
    """Features ``(n, *row_shape)`` read on demand from ``base``.

    ``base``: an array (a ``np.memmap`` above all) of shape ``(N, *row_shape)``,
    or a map-style Dataset whose item ``i`` is ``(x_i, y_i)``. ``index``
    ``(n,)`` int64: the rows of ``base`` these are (None: all ``N``, in order).
    """

    def __init__(
        self,
        base: Any,
        source: str,
        row_shape: Sequence[int],
        index: np.ndarray | None = None,
    ) -> None:
        self.base, self.source, self.index = base, source, index
        self.row_shape = tuple(int(v) for v in row_shape)
        self._count = len(base) if index is None else len(index)
        self._map = _mapping_of(base)
        self._resident = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._count, *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"Rows({self.source!r}, shape={self.shape})"

    @property
    def in_memory(self) -> bool:
        """Whether ``base`` is an array held in memory (not a mapped file, not a Dataset)."""
        return isinstance(self.base, np.ndarray) and self._map is None

    def __getitem__(self, rows: Any) -> Rows:
        """The subset at ``rows`` (an index array, a mask or a slice); nothing is read. Its
        row numbers are int32 below 2**31 rows of ``base``."""
        if isinstance(rows, slice):
            positions = np.arange(*rows.indices(self._count), dtype=np.int64)
        else:
            positions = np.asarray(rows)
            positions = np.flatnonzero(positions) if positions.dtype == bool else positions
            if positions.size and positions.min() < 0:  # counted from the end
                positions = np.arange(self._count)[positions]
        dtype = index_dtype(len(self.base))
        index = positions if self.index is None else self.index[positions]
        return Rows(self.base, self.source, self.row_shape, index.astype(dtype, copy=False))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every row in memory (``np.asarray(rows)``): only for data known to be small."""
        x = self.read(np.arange(self._count))
        return x if dtype is None else x.astype(dtype, copy=False)

    def _file_rows(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions).reshape(-1)
        rows = positions if self.index is None else self.index[positions]
        return rows.astype(np.int64, copy=False)

    def read(self, positions: np.ndarray, check: bool = True) -> np.ndarray:
        """The rows at ``positions`` ``(k,)`` as float32 ``(k, *row_shape)``, in that order;
        ``base`` is read in increasing row order. ``check=False`` leaves out the finiteness
        check that opening the rows made of every one (the trainer's batches: its guard
        skips a batch that is not finite)."""
        rows = self._file_rows(positions)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        raw = self._raw(ordered)
        x = check_features(raw, self.source, None, rows=ordered) if check else to_features(raw)
        if np.array_equal(order, np.arange(len(order))):
            return x
        out = np.empty_like(x)
        out[order] = x
        return out

    def _raw(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (increasing) of ``base`` as stored."""
        if not isinstance(self.base, np.ndarray):
            return _dataset_rows(self.base, rows, self.row_shape, self.source)
        k = len(rows)
        if k and int(rows[-1]) - int(rows[0]) == k - 1 and np.all(np.diff(rows) == 1):
            self._advise(mmap.MADV_NORMAL)  # one slice, in order: read ahead
            x = np.array(self.base[int(rows[0]) : int(rows[0]) + k])
            self._touched(x.nbytes)
            return x
        self._advise(mmap.MADV_RANDOM)  # a page a row from disk, not a read-ahead window
        x = np.empty((k, *self.row_shape), self.base.dtype)
        row_bytes = x.itemsize * math.prod(self.row_shape) + _PAGE_SLACK
        step = max(1, RESIDENT_BYTES // row_bytes) if self._map is not None else max(1, k)
        for start in range(0, k, step):  # scattered rows: each may map a whole fault-around
            x[start : start + step] = self.base[rows[start : start + step]]
            self._touched(min(step, k - start) * row_bytes)
        return x

    def _advise(self, advice: int) -> None:
        if self._map is not None and hasattr(self._map, "madvise"):
            self._map.madvise(advice)

    def _touched(self, nbytes: int) -> None:
        """Count mapped bytes a read touched; past ``RESIDENT_BYTES``, drop them."""
        if self._map is not None:
            self._resident += nbytes
            if self._resident >= RESIDENT_BYTES:
                self.release()

    def release(self) -> None:
        """Unmap the pages of the file reads have touched (they stay in the page cache)."""
        self._resident = 0
        if self._map is not None and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def chunks(self, max_bytes: int | None = None, check: bool = True) -> Iterator[np.ndarray]:
        """Every row in order, as float32 chunks ``(k, *row_shape)`` of at most ``max_bytes``
        (default ``CHUNK_BYTES``) in float64, one row at least (``check``: as in
        :meth:`read`)."""
        step = chunk_rows(self.row_shape, max_bytes)
        for start in range(0, self._count, step):
            yield self.read(np.arange(start, min(self._count, start + step)), check=check)
        self.release()

    def digest_into(self, h: Any) -> None:
        """Feed ``h`` (a hashlib hash) what :func:`stabq.training.checkpoint.data_digest` feeds
        it for these rows held in memory: dtype, shape, then the float32 bytes."""
        h.update(f"{self.dtype.str}{self.shape}".encode())
        for x in self.chunks(check=not self.in_memory):  # arrays in memory were checked
            h.update(x.tobytes())


def _mapping_of(base: Any) -> mmap.mmap | None:
    """The ``mmap`` under a ``np.memmap`` (None for arrays in memory and Datasets)."""
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if isinstance(base, np.ndarray) else None
    return base


def _dataset_rows(
    dataset: Any, rows: np.ndarray, row_shape: tuple[int, ...], source: str
) -> np.ndarray:
    """``x`` of items ``rows`` of a map-style Dataset, stacked ``(k, *row_shape)``."""
    out = []
    for i in rows.tolist():
        x = _item(dataset, i, source)[0]
        if x.shape != row_shape:
            raise data_error(source, f"item {i}: x has shape {x.shape}, item 0 has {row_shape}")
        out.append(x)
    return np.stack(out) if out else np.empty((0, *row_shape), np.float32)


def _item(dataset: Any, i: int, source: str) -> tuple[np.ndarray, Any]:
    """Item ``i`` of a Dataset as ``(x as numpy, y as a Python value)``."""
    item = dataset[i]
    if not (isinstance(item, Sequence) and len(item) == 2):
        raise data_error(source, f"item {i} is {type(item).__name__}, expected a pair (x, y)")
    x, y = item
    y = y.item() if hasattr(y, "item") and not isinstance(y, str) else y
    return as_numpy(x, source, f"item {i}: x"), y


def _labeled(
    base: Any,
    source: str,
    row_shape: tuple[int, ...],
    dtype: np.dtype,
    y: np.ndarray,
    classes: Sequence[str] | None,
) -> LabeledData:
    """Check what can be checked without reading rows, then read each once (finite?)."""
    check_layout((len(base), *row_shape), dtype, y, source)
    ids, names = encode_labels(y, classes, source, None)
    rows = Rows(base, source, row_shape)
    for _ in rows.chunks():  # every row is finite, as in every LabeledData
        pass
    return LabeledData(rows, ids, names, source)


def from_memmap(
    x: np.ndarray, y: Any, classes: Sequence[str] | None = None, source: str = "arrays"
) -> LabeledData:
    """:func:`stabq.data.from_arrays` for features ``x`` ``(n, ...)`` too large to copy (a
    ``np.memmap``): ``x`` stays where it is; each row is read once, to check it."""
    y = as_numpy(y, source, "y")
    return _labeled(x, source, tuple(x.shape[1:]), x.dtype, y, classes)


def from_dataset(
    dataset: Any, classes: Sequence[str] | None = None, source: str | None = None
) -> LabeledData:
    """A map-style Dataset (``len``, item ``i`` -> ``(x_i, y_i)``) as :class:`LabeledData`
    whose ``x`` is :class:`Rows`; one pass reads the labels and checks every row."""
    source = source or type(dataset).__name__
    n = len(dataset)
    if n == 0:
        raise data_error(source, "no rows")
    x0 = _item(dataset, 0, source)[0]
    labels = [_item(dataset, i, source)[1] for i in range(n)]
    y = np.asarray(labels, dtype=object if any(isinstance(v, str) for v in labels) else None)
    if y.ndim != 1:
        raise data_error(
            source, f"each item's y must be one label, found labels of shape {y.shape}"
        )
    return _labeled(dataset, source, tuple(x0.shape), x0.dtype, y, classes)


def open_npy(path: Any, classes: Sequence[str] | None = None) -> LabeledData:
    """Features ``x.npy`` (memory-mapped) and labels ``y.npy`` from a directory holding
    both, or from ``.../x.npy`` (``NAME_x.npy``) with ``y.npy`` (``NAME_y.npy``) beside it."""
    from pathlib import Path

    path = Path(path)
    source = str(path)
    if path.is_dir():
        x_path, y_path = path / "x.npy", path / "y.npy"
        if not x_path.exists():
            raise data_error(source, "no x.npy here: a data directory holds x.npy and y.npy")
    else:
        x_path = path
        if not (path.stem == "x" or path.stem[-2:] in ("_x", "-x", ".x")):
            raise data_error(
                source, "cannot tell where the labels are: name the features x.npy (or "
                "NAME_x.npy) with y.npy (NAME_y.npy) beside it, or pass their directory",
            )  # fmt: skip
        y_path = path.with_name(path.stem[:-1] + "y.npy")
    for p in (x_path, y_path):
        if not p.is_file():
            raise data_error(source, f"no labels file {p}" if p == y_path else "no such file")
    x = _load_npy(x_path, source, "x")
    y = _load_npy(y_path, source, "y")  # labels: encoded a chunk at a time, then held
    return _labeled(x, source, tuple(x.shape[1:]), x.dtype, y, classes)


def _load_npy(path: Any, source: str, name: str) -> np.ndarray:
    """``np.load(path, mmap_mode="r", allow_pickle=False)``; its refusals as one line."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # a damaged header, an object array, a truncated file
        text = " ".join(str(exc).split())
        if "object" in text.lower():
            fix = "y.astype(str)" if name == "y" else "x.astype(np.float32)"
            raise data_error(
                source, f"{path.name} is an object array; loading it would need pickle, "
                f"which stabq never runs: save it as {fix}",
            ) from exc  # fmt: skip
        raise data_error(source, f"cannot read {path.name} as a .npy file: {text}") from exc


def scan(data: LabeledData, stats_shape: Sequence[int] | None = None) -> Standardizer | None:
    """The :class:`Standardizer` of ``data.x`` for statistics of ``stats_shape`` (None: no
    statistics, nothing read): :meth:`Standardizer.fit` for arrays; for :class:`Rows` one
    pass in chunks, merging each chunk's float64 mean and sum of squared deviations (Chan
    et al.), which for data of one chunk is exactly what ``Standardizer.fit`` computes."""
    if stats_shape is None:
        return None
    if not isinstance(data.x, Rows):
        return Standardizer.fit(data.x, stats_shape)
    chunks = data.x.chunks(check=not data.x.in_memory)  # arrays in memory were checked
    return Standardizer.fit_chunks(chunks, data.x.shape, stats_shape)


def view_split(
    data: LabeledData, val_fraction: float, seed: int
) -> tuple[LabeledData, LabeledData]:
    """:func:`~stabq.data.labeled.train_val_split` whose parts share ``data``'s float32
    features: each part's ``x`` is :class:`Rows` of ``data.x`` at its row numbers (int32),
    so the rows are held once; other features (token ids) are copied, as there."""
    if isinstance(data.x, Rows) or data.x.dtype != np.float32:
        return train_val_split(data, val_fraction, seed)
    rows = Rows(data.x, data.source, data.x.shape[1:])
    return train_val_split(LabeledData(rows, data.y, data.classes, data.source), val_fraction, seed)


__all__ = [
    "CHUNK_BYTES", "Rows", "from_dataset", "from_memmap", "open_npy", "scan", "view_split",
]  # fmt: skip
