"""Standardisation: one :class:`Standardizer`, fitted in one chunked pass (exact for data of
one chunk), for arrays in memory and for rows read from a file alike."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stabq.data.messages import data_error

CHUNK_BYTES = 16 << 20  # float64 bytes of rows one step of a streaming pass holds


def chunk_rows(row_shape: Sequence[int], max_bytes: int | None = None) -> int:
    """Rows of ``row_shape`` a chunk of a pass holds: ``max_bytes`` (default
    ``CHUNK_BYTES``) in float64, one row at least."""
    max_bytes = CHUNK_BYTES if max_bytes is None else max_bytes
    return max(1, max_bytes // (8 * max(1, math.prod(row_shape))))


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _finite(chunk: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if not np.isfinite(chunk).all():
        raise data_error("Standardizer", f"fit needs finite x of shape (n >= 1, d), found {shape}")
    return chunk


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
            raise data_error(
                "Standardizer", f"mean has {m.size} values, std {s.size}: allowed is the same "
                "number (>= 1) of finite values, std > 0",
            )  # fmt: skip

    @classmethod
    def fit(cls, x: np.ndarray, shape: Sequence[int] | None = None) -> Standardizer:
        """Mean and std of ``x`` ``(n, ...)`` (computed in float64) over its rows, and over
        every axis where ``shape`` (default ``x.shape[1:]``: per value) has a 1.

        Example::

            Standardizer.fit(np.array([[0.0, 1.0], [2.0, 1.0]])).std  # [1., 1.]
        """
        x = np.asarray(x)
        if x.ndim < 2 or x.shape[0] == 0:
            raise data_error(
                "Standardizer", f"fit needs finite x of shape (n >= 1, d), found {x.shape}"
            )
        step = chunk_rows(x.shape[1:])
        return cls.fit_chunks(
            (_finite(x[s : s + step], x.shape) for s in range(0, len(x), step)), x.shape, shape
        )

    @classmethod
    def fit_chunks(
        cls,
        chunks: Iterable[np.ndarray],
        full_shape: Sequence[int],
        shape: Sequence[int] | None = None,
    ) -> Standardizer:
        """:meth:`fit` over rows that come in chunks (of one array ``full_shape``), in one
        pass: each chunk's float64 mean and sum of squared deviations are merged (Chan et
        al.), which for one chunk is exactly numpy's ``mean`` and ``std``. :meth:`fit` and
        a pass over :class:`~stabq.data.rows.Rows` cut the rows alike (:func:`chunk_rows`):
        the same rows give the same statistics, in memory or in a file."""
        found = tuple(full_shape)
        shape = found[1:] if shape is None else tuple(shape)
        if len(shape) != len(found) - 1 or any(
            s not in (1, d) for s, d in zip(shape, found[1:], strict=True)
        ):
            raise data_error("Standardizer", f"statistics of shape {shape} for x of shape {found}")
        axes = (0, *[i + 1 for i, s in enumerate(shape) if s == 1])
        count, mean, m2 = 0, np.zeros(shape), np.zeros(shape)
        for chunk in chunks:
            x64 = chunk.astype(np.float64, copy=False)
            k = x64.size // math.prod(shape)
            m = x64.mean(axis=axes, keepdims=True)
            s2 = ((x64 - m) ** 2).sum(axis=axes).reshape(shape)
            m = m.reshape(shape)
            if count == 0:
                count, mean, m2 = k, m, s2
                continue
            delta, total = m - mean, count + k
            mean = mean + delta * (k / total)
            m2 = m2 + s2 + delta * delta * (count * k / total)
            count = total
        std = np.sqrt(m2 / count).astype(np.float32)
        std[~(std >= np.finfo(np.float32).tiny)] = 1.0
        return cls(mean, std)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` for ``x`` ``(..., *shape)``, as float32."""
        x = np.asarray(x, dtype=np.float32)
        shape = self.mean.shape
        fits = x.ndim >= len(shape) and all(
            s in (1, d) for s, d in zip(shape, x.shape[x.ndim - len(shape) :], strict=True)
        )
        if not fits:
            what = f"{shape[0]} features" if len(shape) == 1 else f"shape {shape}"
            raise data_error("Standardizer", f"x of shape {x.shape} must end in {what}")
        return ((x - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict:
        """``{"mean": [...], "std": [...]}`` of Python floats (exact float32 values), flattened."""
        return {"mean": self.mean.reshape(-1).tolist(), "std": self.std.reshape(-1).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Standardizer:
        """Inverse of :meth:`to_dict`; anything else is a :class:`DataError`."""
        if not isinstance(d, Mapping) or set(d) != {"mean", "std"}:
            found = sorted(map(str, d)) if isinstance(d, Mapping) else type(d).__name__
            raise data_error("Standardizer", f"expected a dict with keys mean, std; found {found}")
        for key, v in d.items():
            if not (isinstance(v, list) and all(_is_real(e) for e in v)):
                raise data_error("Standardizer", f"{key} must be a list of numbers, found {v!r}")
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64))


__all__ = ["Standardizer"]
