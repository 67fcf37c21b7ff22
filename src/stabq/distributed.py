"""The few torch.distributed functions everything uses, each a no-op (its input back)
without a process group of more than one rank, checked at each call: a module built
before ``init_process_group`` still syncs. Collectives never hang because every rank
calls them in the same order: the codebook and the trainer enter one only on values
identical on every rank, never on a rank's own batch size.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from stabq.errors import ConfigError


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """True on rank 0 (`rank()`; `world_size()` ranks), the one rank that writes files,
    logs and progress bars; True in a plain process.

    Examples:
        >>> from stabq import distributed
        >>> distributed.is_main(), distributed.rank(), distributed.world_size()
        (True, 0, 1)
    """
    return rank() == 0


def backend() -> str:
    """``gloo`` for CPU tensors, plus ``nccl`` for CUDA tensors when a GPU is present."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_from_env() -> bool:
    """Join the process group `torchrun` describes in the environment (`RANK`,
    `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`): gloo for CPU tensors, plus
    NCCL for CUDA tensors on a GPU machine, where each process takes GPU `LOCAL_RANK`.

    Returns:
        True when it joined a group; False (doing nothing) unless `WORLD_SIZE` > 1 and
            no group exists yet.

    Examples:
        >>> from stabq import distributed
        >>> distributed.init_from_env()  # a plain process: WORLD_SIZE is not set
        False
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend())
    return True


@contextmanager
def process_group_from_env() -> Iterator[bool]:
    """A context manager: join torchrun's group (as `init_from_env`), leave it at the end.

    Yields:
        True when it joined a group (destroyed when the block ends).

    Examples:
        >>> from stabq import distributed
        >>> with distributed.process_group_from_env() as started:
        ...     print(started, distributed.world_size())
        False 1
    """
    started = init_from_env()
    try:
        yield started
    finally:
        if started:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum_(*tensors: Tensor) -> None:
    """Sum each tensor over all ranks, in place (one collective for all of them)."""
    if not is_distributed() or not tensors:
        return
    if len(tensors) == 1:
        dist.all_reduce(tensors[0])
        return
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(part.view_as(t))


def sum_statistics_(counts: Tensor, sums: Tensor) -> bool:
    """All-reduce a codebook's per-code ``counts`` and ``sums`` in place; whether any rank
    assigned anything (identical on every rank: an empty batch leaves the EMA alone)."""
    if not is_distributed():
        return True
    all_reduce_sum_(counts, sums)
    return bool(counts.any())


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum over ranks. Backward: the gradient summed over ranks too, since
    every rank's loss depends on every rank's input."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def sum_over_ranks(t: Tensor) -> Tensor:
    """``t`` summed over all ranks, differentiably (``t`` itself without a process group).

    Every rank must call it, in the same order, and call backward through it if any rank
    does. Under DistributedDataParallel (which averages the gradients) a loss term
    ``f(sum_over_ranks(s) / N)`` every rank adds with weight 1 gets one process's gradient.
    """
    return _SumOverRanks.apply(t) if is_distributed() else t


def sum_rows_over_ranks(sums: Tensor, rows: int, sync: bool = True) -> tuple[Tensor, float]:
    """``sums`` (any shape) and this rank's row count, each summed over all ranks in one
    differentiable all-reduce when ``sync`` (every rank must then call it, rows or none);
    as given otherwise. Returns ``(sums, rows)``, ``rows`` a float."""
    if not sync:
        return sums, float(rows)
    packed = sum_over_ranks(torch.cat([sums.reshape(-1), sums.new_full((1,), rows)]))
    return packed[:-1].view_as(sums), float(packed[-1].detach())


def batch_norm(norm: nn.BatchNorm1d, z: Tensor) -> Tensor:
    """``norm(z)`` for ``z`` ``(n, d)``, in distributed training on all ranks' rows together.

    As :class:`torch.nn.SyncBatchNorm`, on any device and for any per-rank ``n`` (0
    included): the mean and the biased variance (two passes, differentiable) are those of
    the joined batch, the running statistics take the same step on every rank, and fewer
    than 2 rows over all ranks are normalised by the running statistics. Outside training
    or without a process group it is ``norm(z)``."""
    if not (norm.training and is_distributed()):
        return norm(z)
    total, rows = sum_rows_over_ranks(z.sum(0), z.shape[0])
    if rows < 2:  # rows is identical on every rank: so is every branch below
        return F.batch_norm(z, norm.running_mean, norm.running_var, training=False, eps=norm.eps)
    mean = total / rows
    var = sum_over_ranks((z - mean).pow(2).sum(0)) / rows
    if norm.track_running_stats:
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            momentum = norm.momentum
            step = 1.0 / float(norm.num_batches_tracked) if momentum is None else momentum
            norm.running_mean.lerp_(mean.detach(), step)
            norm.running_var.lerp_(var.detach() * (rows / (rows - 1)), step)
    out = (z - mean) * torch.rsqrt(var + norm.eps)
    return out * norm.weight + norm.bias if norm.affine else out


def broadcast_(*tensors: Tensor, src: int = 0) -> None:
    """Overwrite each tensor with rank ``src``'s copy, in place (bool tensors included)."""
    if not is_distributed():
        return
    for t in tensors:
        if t.dtype == torch.bool:
            as_bytes = t.to(torch.uint8)
            dist.broadcast(as_bytes, src)
            t.copy_(as_bytes.bool())
        else:
            dist.broadcast(t, src)


def gather_rows(x: Tensor, dim: int = 1) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order; sizes may differ (0 too).
    The same tensor comes back on every rank: the union of the ranks' batches."""
    if not is_distributed():
        return x
    sizes = torch.tensor([x.shape[dim]], device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    longest = max(counts)
    if longest == 0:
        return x
    pad = list(x.shape)
    pad[dim] = longest - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad)], dim=dim).contiguous()
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, counts, strict=True)], dim=dim)


def mean_and_max(means: list[float], maxima: list[float]) -> tuple[list[float], list[float]]:
    """Average ``means`` and take the largest of ``maxima`` over all ranks (one collective)."""
    if not is_distributed():
        return means, maxima
    local = torch.tensor(means + maxima, dtype=torch.float64)
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    stacked = torch.stack(parts)
    k = len(means)
    return stacked[:, :k].mean(0).tolist(), stacked[:, k:].max(0).values.tolist()


def all_true(flag: bool) -> bool:
    """True when ``flag`` holds on every rank."""
    if not is_distributed():
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t) == 0


def _empty_like(batch):
    """``batch`` (a tensor, or a tuple / list of them) cut to 0 rows."""
    if isinstance(batch, Tensor):
        return batch[:0]
    if isinstance(batch, tuple | list):
        return type(batch)(_empty_like(b) for b in batch)
    raise ConfigError(
        f"even_batches: cannot make an empty batch like a {type(batch).__name__}; pass empty="
    )


def even_batches(batches: Iterable, empty=None) -> Iterator:
    """This rank's batches, then empty ones until every rank's are done: equal step counts,
    for a loop of your own where ranks hold different numbers of batches.

    Each step all-reduces one flag; a rank that has run out yields a 0-row batch, so every
    rank enters the collectives equally often. Weigh a loss by the step's rows over all
    ranks (an empty batch then adds zero).

    Args:
        batches: this rank's batches (tensors, or tuples or lists of them).
        empty (Any): the batch to yield once they run out; default None: the last batch cut
            to `[:0]`.

    Yields:
        The batches, then empty ones (without a process group, `batches` unchanged).

    Raises:
        ConfigError: a rank without any batch and no `empty`, or a batch not cut to 0 rows.

    Examples:
        >>> import torch
        >>> from stabq import distributed
        >>> [x.shape[0] for x, y in distributed.even_batches([(torch.ones(4, 2), torch.ones(4))])]
        [4]
    """
    done, last = object(), None
    iterator = iter(batches)
    while True:
        item = next(iterator, done)
        if not is_distributed():
            if item is done:
                return
            yield item
            continue
        stuck = item is done and last is None and empty is None
        flags = torch.tensor([int(item is not done), int(stuck)], dtype=torch.int64)
        dist.all_reduce(flags)
        if int(flags[1]):
            raise ConfigError("even_batches: a rank had no batch at all; pass empty= to pad it")
        if int(flags[0]) == 0:
            return
        if item is done:
            yield empty if empty is not None else _empty_like(last)
        else:
            last = item
            yield item


def shard_batches(
    order: Tensor, batch_size: int, world: int | None = None, rank_: int | None = None
) -> tuple[Tensor, int]:
    """This rank's share of an epoch's ``order`` and its per-rank batch size.

    ``batch_size`` is the global batch ``B``; each of ``W`` ranks takes ``b = ceil(B / W)``
    rows a step. ``order`` (length ``n``) is padded by wrapping round to ``m * W`` entries,
    ``m = ceil(n / W)`` (as DistributedSampler pads); step ``i`` takes the global batch
    ``padded[i*W*b : (i+1)*W*b]`` and rank ``r`` its ``r``-th contiguous ``1/W``. So every
    rank runs ``ceil(m / b)`` steps of equal, non-empty batches, and the ranks' batches,
    joined in rank order, are the batch one process would take. With one rank this is
    ``(order, batch_size)``; ``world`` and ``rank_`` default to this process's."""
    w = world_size() if world is None else world
    r = rank() if rank_ is None else rank_
    if w == 1 or order.shape[0] == 0:
        return order, batch_size
    n, b = order.shape[0], -(-batch_size // w)
    m = -(-n // w)
    padded = order.repeat(math.ceil(m * w / n))[: m * w]
    pieces = []
    for start in range(0, m * w, w * b):
        chunk = padded[start : start + w * b]
        k = chunk.shape[0] // w
        pieces.append(chunk[r * k : (r + 1) * k])
    return torch.cat(pieces), b


def steps_per_epoch(rows: int, batch_size: int, world: int | None = None) -> int:
    """Steps every rank takes over ``rows`` rows with global batch ``batch_size`` (at least 1)."""
    w = world_size() if world is None else world
    per_rank_rows, per_rank_batch = -(-rows // w), -(-batch_size // w)
    return max(1, -(-per_rank_rows // per_rank_batch))


def shard_rows(x: Tensor) -> Tensor:
    """Rows ``r::W`` of ``x`` (for evaluation, where ranks may hold different counts)."""
    return x[rank() :: world_size()] if is_distributed() else x


class _WithFeatures(nn.Module):
    """Makes ``forward_with_features`` the forward DDP wraps (so gradients sync)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor):
        return self.model.forward_with_features(x)


def training_forward(model: nn.Module, device: torch.device, all_used: bool = True) -> Callable:
    """``model.forward_with_features``, wrapped in DistributedDataParallel when distributed.

    Buffers are not broadcast from rank 0 at each step: the quantizers keep their codebooks
    identical themselves. Parameters frozen at the time of the call are left out, so call it
    again after freezing; ``all_used=False`` (quantization off) lets DDP skip unused ones."""
    if not is_distributed():
        return model.forward_with_features
    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    ddp = nn.parallel.DistributedDataParallel
    newer = "forward_sync_buffers" in inspect.signature(ddp).parameters  # torch >= 2.13
    no_buffer_sync = {"forward_sync_buffers" if newer else "broadcast_buffers": False}
    return ddp(
        _WithFeatures(model),
        device_ids=ids,
        find_unused_parameters=not all_used,
        **no_buffer_sync,
    )


__all__ = [
    "all_reduce_sum_",
    "all_true",
    "backend",
    "batch_norm",
    "broadcast_",
    "even_batches",
    "gather_rows",
    "init_from_env",
    "is_distributed",
    "is_main",
    "mean_and_max",
    "process_group_from_env",
    "rank",
    "shard_batches",
    "shard_rows",
    "steps_per_epoch",
    "sum_over_ranks",
    "sum_rows_over_ranks",
    "sum_statistics_",
    "training_forward",
    "world_size",
]
