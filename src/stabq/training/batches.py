"""The trainer's torch batches: rows in memory as tensors on a device, rows read from a file
(:class:`~stabq.data.rows.Rows`) through a :class:`RowReader`, and what :func:`stabq.train`
accepts as data turned into :class:`~stabq.data.LabeledData`. The torch side of the data
walk: :mod:`stabq.data` itself needs no torch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stabq import distributed
from stabq.data.labeled import LabeledData, from_arrays
from stabq.data.rows import Rows, from_dataset, from_memmap


class RowReader:
    """Rows the training loop indexes like a tensor: ``reader[idx]`` (a LongTensor of
    positions, or a slice) reads them from ``rows`` onto ``device``."""

    def __init__(self, rows: Rows, device: torch.device | str) -> None:
        self.rows, self.device = rows, torch.device(device)
        self.shape = torch.Size(rows.shape)

    def __getitem__(self, idx: torch.Tensor | slice) -> torch.Tensor:
        if isinstance(idx, slice):
            positions = np.arange(*idx.indices(len(self.rows)))
        else:
            positions = idx.detach().cpu().numpy()
        return torch.from_numpy(self.rows.read(positions, check=False)).to(self.device)


class ViewReader:
    """Rows of an array held in memory at row numbers ``index`` (a split's part), indexed
    like a tensor: ``reader[idx]`` gathers them, so the array is never copied whole.

    ``base`` ``(N, ...)`` a tensor sharing the array's memory, ``index`` ``(n,)`` int32 (or
    int64) row numbers of ``base``; ``reader[idx]`` is ``base[index[idx]]`` on ``device``.
    """

    def __init__(self, base: torch.Tensor, index: torch.Tensor, device: torch.device | str) -> None:
        self.base, self.index, self.device = base, index, torch.device(device)
        self.shape = torch.Size((len(index), *base.shape[1:]))

    def __getitem__(self, idx: torch.Tensor | slice) -> torch.Tensor:
        rows = self.index[idx if isinstance(idx, slice) else idx.cpu()]
        return self.base.index_select(0, rows).to(self.device)


def as_labeled_data(data: Any) -> LabeledData:
    """What :func:`stabq.train` and :func:`stabq.compare` take as data, as LabeledData.

    ``data``: :class:`LabeledData` (as it is), a map-style torch ``Dataset`` (item ``i``
    -> ``(x_i, y_i)``; its rows stay where they are), or arrays ``(x, y)``: checked and
    copied, except a memory-mapped ``x`` (``np.load(..., mmap_mode="r")``), read per batch.
    Raises :class:`~stabq.errors.DataError` for rows stabq cannot train on.

    Example::

        as_labeled_data((np.zeros((4, 3)), np.array([0, 1, 0, 1]))).input_shape  # (3,)
    """
    if isinstance(data, LabeledData):
        return data
    if isinstance(data, torch.utils.data.Dataset):
        return from_dataset(data)
    if isinstance(data[0], np.memmap):
        return from_memmap(*data)
    return from_arrays(*data)


def on_device(
    x: np.ndarray | Rows, device: torch.device | str, shard: bool = False
) -> torch.Tensor | RowReader | ViewReader:
    """Features as the loop indexes them: a tensor on ``device`` for an array (sharing its
    memory on the CPU), a :class:`RowReader` for :class:`Rows` of a file or Dataset, and
    for :class:`Rows` of an array in memory (a split's part) a :class:`ViewReader` on the
    CPU, the part's rows copied to another device. ``shard``: this rank's rows ``r::W``
    only."""
    if isinstance(x, Rows):
        if shard and distributed.is_distributed():
            x = x[distributed.rank() :: distributed.world_size()]
        if not x.in_memory:
            return RowReader(x, device)
        if torch.device(device).type != "cpu":
            return torch.from_numpy(x.read(np.arange(len(x)), check=False)).to(device)
        base = torch.from_numpy(x.base)
        return base if x.index is None else ViewReader(base, torch.from_numpy(x.index), device)
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return distributed.shard_rows(t) if shard else t


__all__ = ["RowReader", "ViewReader", "as_labeled_data", "on_device"]
