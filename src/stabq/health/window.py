"""The figures of :class:`~stabq.health.monitor.CollapseMonitor`'s steps, computed for many
steps at once.

Each forward call ("step") the monitor's hook only keeps what the step returned
(:class:`Pending`: its indices, its loss as a number, its input and what
:meth:`~stabq.health.mechanisms.Mechanisms.capture` keeps); no figure is computed and the
device is not waited for, but for the loss. At its checks (and whenever its figures or
alerts are read) the steps kept so far are turned into figures together
(:func:`window_figures`): the steps whose indices have one shape are stacked, and each
figure of all of them is one tensor operation (per-step code counts by one ``index_add_``
with a step offset), read back in one transfer. Each verdict still names the step it
was judged on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from stabq.errors import ShapeError, check
from stabq.health.mechanisms import Capture
from stabq.quantizers.fsq import fsq_indices_to_levels

PENDING_STEPS = 64  # steps kept before their figures are computed, at the latest
PENDING_BYTES = 32 * 2**20  # or once the tensors they hold reach this many bytes


class Pending(NamedTuple):
    """One step as the hook keeps it."""

    step: int
    indices: Tensor  # as the module returned them
    loss: float | None  # the auxiliary loss, summed
    x: Tensor | None  # the first input when it is a float tensor of rows (its norm)
    capture: Capture  # what the mechanisms read


class Step(NamedTuple):
    """One step of the window, as figures."""

    bins: Tensor  # bin ids (n * c,), or their counts (c * k + 2,) when is_counts
    is_counts: bool
    loss: float | None  # the auxiliary loss, summed
    norm: float | None  # mean L2 norm of the input rows
    at_bound: float | None  # FSQ values at a bound level
    values: float | None  # FSQ values counted


def kept_bytes(entry: Pending) -> int:
    """The bytes of the tensors ``entry`` holds on to (a tensor held twice counted twice)."""
    held = (entry.indices, entry.x, *entry.capture)
    return sum(t.numel() * t.element_size() for t in held if isinstance(t, Tensor))


def window_full(count: int, held: int) -> bool:
    """Whether ``count`` steps kept, holding ``held`` bytes, are to be computed now: at
    most ``PENDING_STEPS`` steps or ``PENDING_BYTES`` bytes wait (large batches, a GPU's
    memory)."""
    return count >= PENDING_STEPS or held >= PENDING_BYTES


def _groups(keys: Sequence[Any]) -> list[list[int]]:
    """The positions of each distinct key, in order of first appearance."""
    at: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        at.setdefault(key, []).append(i)
    return list(at.values())


def window_figures(
    pending: Sequence[Pending], monitor: Any
) -> tuple[list[Step], list[bool], list[list[float]] | None]:
    """The :class:`Step` of each pending step, whether each quantized (an index >= 0) and,
    for a grid, each step's :meth:`~stabq.health.grid_mechanisms.GridWatch.fields`
    values; ``monitor``: the :class:`CollapseMonitor` (its codebook shape, levels, grid)."""
    c = monitor.num_codebooks
    steps: list[Any] = [None] * len(pending)
    quantized, grid = [False] * len(pending), None
    watch = monitor.mechanisms.grid
    if watch is not None:
        grid = [[] for _ in pending]
    keys = [(p.indices.shape, p.indices.device) for p in pending]
    for at in _groups(keys):
        flat = torch.stack([pending[i].indices for i in at]).reshape(len(at), -1, c).long()
        found, level = _index_figures(flat, monitor)
        if watch is not None:
            shared = level if monitor._shared else None
            rows = watch.batch_fields(flat, shared).tolist()
            for i, row in zip(at, rows, strict=True):
                grid[i] = row
        for i, (bins, is_counts, on, at_bound, values) in zip(at, found, strict=True):
            steps[i] = (bins, is_counts, at_bound, values)
            quantized[i] = on
    norms = _input_norms([p.x for p in pending])
    rows = zip(steps, pending, norms, strict=True)
    return [Step(b, n, p.loss, norm, a, v) for (b, n, a, v), p, norm in rows], quantized, grid


def _index_figures(flat: Tensor, monitor: Any) -> tuple[list[tuple], Tensor | None]:
    """Per step of ``flat`` ``(S, n, c)``: ``(bins, is_counts, quantized, at_bound,
    values)``; and the FSQ levels ``(S, n, c, d)`` when known."""
    c, k = monitor.num_codebooks, monitor.codebook_size
    s, n = flat.shape[:2]
    size = c * k + 2
    ids = flat + torch.arange(c, device=flat.device) * k
    ids = torch.where(flat < 0, c * k, ids)
    ids = torch.where(flat >= k, c * k + 1, ids).reshape(s, n * c)  # c*k: ignored, +1: too big
    is_counts = n * c > size
    if is_counts:  # more indices than bins: keep the counts
        shifted = ids + torch.arange(s, device=ids.device)[:, None] * size
        counts = torch.zeros(s * size, dtype=torch.long, device=ids.device)
        bins = counts.index_add_(0, shifted.reshape(-1), torch.ones_like(shifted).reshape(-1))
        ids = bins.view(s, size)
    figures = [(flat >= 0).flatten(1).any(1)]
    level = None
    if monitor.levels is not None:
        levels = monitor._levels.to(flat.device)  # made once
        valid = (flat >= 0) & (flat < k)
        level = fsq_indices_to_levels(flat.clamp(0, k - 1), levels)
        bound = ((level == 0) | (level == levels - 1)) & valid.unsqueeze(-1)
        figures += [bound.flatten(1).sum(1), valid.flatten(1).sum(1) * len(monitor.levels)]
    read = torch.stack(figures, 1).tolist()  # one transfer for the steps' figures
    found = []
    for i, row in enumerate(read):
        at_bound, values = (float(row[1]), float(row[2])) if level is not None else (None, None)
        found.append((ids[i], is_counts, bool(row[0]), at_bound, values))
    return found, level


def _input_norms(xs: Sequence[Tensor | None]) -> list[float | None]:
    """The mean L2 row norm of each step's input (None where none was kept)."""
    norms: list[float | None] = [None] * len(xs)
    keys = [None if x is None else (x.shape, x.device) for x in xs]
    for at in _groups(keys):
        if keys[at[0]] is None:
            continue
        x = torch.stack([xs[i] for i in at]).float()
        means = x.norm(dim=-1).reshape(len(at), -1).mean(1).tolist()
        for i, value in zip(at, means, strict=True):
            norms[i] = value
    return norms


def require_fit(too_big: int, k: int) -> None:
    """ShapeError when ``too_big`` indices were >= the codebook size ``k``."""
    check(
        too_big == 0,
        f"CollapseMonitor: {too_big} code indices >= codebook_size={k}; "
        "pass the module's real codebook_size",
        ShapeError,
    )


def loss_value(loss: Tensor) -> float:
    """The auxiliary loss as one number: its sum, in float32 (its only value, read as is)."""
    loss = loss.detach()
    if loss.numel() == 1 and loss.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return float(loss)  # exact in float32 already
    return float(loss.float().sum())


def tally(steps: Sequence[Step], c: int, k: int) -> Tensor:
    """Counts ``(c, k)`` over ``steps`` of ``c`` codebooks of ``k`` codes; ShapeError on an
    index >= ``k``."""
    total = torch.zeros(c * k + 2, dtype=torch.long)
    raw = [s.bins for s in steps if not s.is_counts]
    if raw:
        ids = torch.cat([r.to(raw[0].device) for r in raw])
        total += torch.bincount(ids, minlength=c * k + 2).cpu()
    for s in steps:
        if s.is_counts:
            total += s.bins.cpu()
    require_fit(int(total[-1]), k)
    return total[: c * k].view(c, k).clone()


__all__ = [
    "PENDING_BYTES",
    "PENDING_STEPS",
    "Pending",
    "Step",
    "kept_bytes",
    "loss_value",
    "require_fit",
    "tally",
    "window_figures",
    "window_full",
]
