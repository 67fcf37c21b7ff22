"""The train/validation split by row index, in narrow integers: the rows of each part.

:func:`split_indices` draws the rows of scikit-learn's ``train_test_split(np.arange(n),
test_size=n_val, random_state=seed, stratify=y)`` (its ``StratifiedShuffleSplit``, or
its ``ShuffleSplit`` without ``stratify``), the same random numbers in the same order,
without its per-row Python lists: the bookkeeping is a few bytes a row, in int32 row
numbers below 2**31 rows. Only numpy is needed.
"""

from __future__ import annotations

import numpy as np

CHUNK_ROWS = 1 << 20  # rows one step of a pass over labels or row numbers holds


def index_dtype(n: int) -> np.dtype:
    """The narrowest signed integer that numbers ``n`` rows: int32 below 2**31, else int64.

    Examples:
        >>> from stabq.data.split import index_dtype
        >>> index_dtype(1000).name, index_dtype(2**31).name
        ('int32', 'int64')
    """
    return np.dtype(np.int32) if n < 2**31 else np.dtype(np.int64)


def approximate_mode(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Rows a class ``(k,)`` when ``n_draws`` are drawn from classes of ``counts`` ``(k,)``:
    scikit-learn's ``_approximate_mode``, ties broken by ``rng`` as it breaks them."""
    continuous = counts / counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def _permutation(n: int, rng: np.random.RandomState, dtype: np.dtype) -> np.ndarray:
    """``rng.permutation(n)`` as ``dtype``: the shuffle draws the same numbers at any width."""
    out = np.arange(n, dtype=dtype)
    rng.shuffle(out)
    return out


def class_order(y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``np.argsort(y, kind="stable")`` of class ids ``y`` ``(n,)`` whose bincount is
    ``counts``, as :func:`index_dtype` integers, built chunk by chunk (a counting sort)."""
    order = np.empty(len(y), index_dtype(len(y)))
    fill = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    for start in range(0, len(y), CHUNK_ROWS):
        chunk = np.asarray(y[start : start + CHUNK_ROWS])
        within = np.argsort(chunk, kind="stable")
        ids = chunk[within]
        present, first, seen = np.unique(ids, return_index=True, return_counts=True)
        rank = np.arange(len(ids)) - np.repeat(first, seen)
        order[fill[ids] + rank] = within + start
        fill[present] += seen
    return order


def _where(mark: np.ndarray, value: int) -> np.ndarray:
    """``np.flatnonzero(mark == value)`` as :func:`index_dtype` integers, in chunks."""
    dtype = index_dtype(len(mark))
    parts = [
        (np.flatnonzero(mark[s : s + CHUNK_ROWS] == value) + s).astype(dtype)
        for s in range(0, len(mark), CHUNK_ROWS)
    ]
    return np.concatenate(parts) if parts else np.empty(0, dtype)


def split_indices(
    y: np.ndarray, n_val: int, seed: int, stratify: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The sorted rows ``(n - n_val,)`` and ``(n_val,)`` of each part of class ids ``y``
    ``(n,)`` (int32 below 2**31 rows): the rows ``train_test_split`` gives, stratified
    by ``y`` when ``stratify`` (every class has >= 2 rows, both parts >= 1 of each).

    Examples:
        >>> import numpy as np
        >>> from stabq.data.split import split_indices
        >>> train, val = split_indices(np.array([0, 0, 1, 1, 0, 1]), 2, 0, stratify=True)
        >>> train.dtype.name, len(train), np.bincount(np.array([0, 0, 1, 1, 0, 1])[val]).tolist()
        ('int32', 4, [1, 1])
    """
    n = len(y)
    dtype = index_dtype(n)
    rng = np.random.RandomState(seed)
    mark = np.zeros(n, np.int8)  # 1: train, 2: validation
    if not stratify:
        permutation = _permutation(n, rng, dtype)
        mark[permutation[:n_val]], mark[permutation[n_val:]] = 2, 1
        return _where(mark, 1), _where(mark, 2)
    counts = np.bincount(y)
    present = np.flatnonzero(counts)
    counts = counts[present]
    n_i = approximate_mode(counts, n - n_val, rng)
    t_i = approximate_mode(counts - n_i, n_val, rng)
    order = class_order(y, np.bincount(y))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for i, (start, count) in enumerate(zip(starts.tolist(), counts.tolist(), strict=True)):
        rows = order[start : start + count].take(_permutation(count, rng, dtype), mode="clip")
        mark[rows[: n_i[i]]], mark[rows[n_i[i] : n_i[i] + t_i[i]]] = 1, 2
    return _where(mark, 1), _where(mark, 2)


__all__ = ["CHUNK_ROWS", "approximate_mode", "class_order", "index_dtype", "split_indices"]
