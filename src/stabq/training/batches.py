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
) -> torch.Tensor | RowReader:
    """Features as the loop indexes them: a tensor on ``device`` for an array, a
    :class:`RowReader` for :class:`Rows`. ``shard``: this rank's rows ``r::W`` only."""
    if isinstance(x, Rows):
        if shard and distributed.is_distributed():
            x = x[distributed.rank() :: distributed.world_size()]
        return RowReader(x, device)
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return distributed.shard_rows(t) if shard else t


__all__ = ["RowReader", "as_labeled_data", "on_device"]
