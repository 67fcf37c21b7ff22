"""The mechanisms :class:`CollapseMonitor` names in grids and in a learned codebook map.

A grid's code (FSQ, FSP, residual FSQ, LFQ, BSQ) is one level per code dimension:
the ``D = C x d`` dimensions of ``C`` codebooks of ``d`` dimensions are read from the
indices alone (mixed radix; LFQ's ``2**bits`` codes are ``bits`` dimensions of 2
levels, its signs). Over the monitor's window, and per batch:

    one_sided            a dimension that sits at one of its two end levels (LFQ/BSQ:
                         keeps one sign) for >= ONE_SIGN (95%) of the window's inputs,
                         once the window holds min_samples rows: "3 of 16 bits keep
                         one sign for 96% of inputs over the last 200 steps" (a bit
                         that never flips halves the cells reachable; "code dimensions
                         keep one end level" for levels > 2; a middle level is left
                         out: small inputs start there)
    dims_correlated      the mean over the last CORRELATION_STEPS (20) batches of the
                         mean |Pearson correlation| between the level indices of two
                         dimensions of one codebook (dimensions constant in a batch
                         left out, batches of >= CORRELATION_ROWS (16) rows; judged
                         once the window is full: under a high learning rate the
                         first batches move together) is >= CORRELATION (0.7): each
                         dimension spread, yet together
                         they reach few cells. "code dimensions move together: mean
                         |correlation| 0.90 across the batch over the last 20 steps:
                         few cells are reached"

A module whose codes are a fixed frozen basis times one learned square linear map
(SimVQ: ``C = B W^T``, its ``transform`` or the peer's ``code_transform``), every
MAP_EVERY (50) steps from the first:

    map_singular         while CollapseMonitor's collapse holds (judged with it), the
                         fewest singular values of W carrying SPAN_ENERGY (99%) of
                         sum(sigma^2) are <= SPAN_FRACTION (1/2) x dim: the codes lie
                         near a subspace of that dimension. Alone it names no failure
                         (the simvq preset's W concentrates too under AdamW 3e-2, its
                         codes in use). "the codebook's map W
                         is near-singular (singular values 62 to 0.0016): 33 of 128
                         directions carry 99% of its energy, so the codes span few
                         directions". nn.Linear's random start needs ~3/4 of them,
                         the identity all.

A module that normalises its input (``pre_norm`` BatchNorm, ``spherical`` BSQ,
``cosine`` / ``use_cosine_sim`` codebooks) has codes that do not depend on the
input's scale: :func:`normalises` tells :class:`~stabq.health.mechanisms.Mechanisms`
not to judge lag there. The figures of many steps are computed at once
(:meth:`GridWatch.batch_fields`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stabq.health.probe import attr, percent
from stabq.quantizers.fsq import fsq_indices_to_levels

ONE_SIGN = 0.95
CORRELATION = 0.7
CORRELATION_ROWS = 16
CORRELATION_STEPS = 20
SPAN_ENERGY = 0.99
SPAN_FRACTION = 0.5
MAP_EVERY = 50

Verdict = tuple[str, bool, str, float]


def normalises(module: nn.Module) -> bool:
    """Whether ``module`` normalises its input before choosing codes (``pre_norm`` set,
    ``spherical``, ``cosine`` or ``use_cosine_sim`` true), so its codes ignore the input's scale.

    Examples:
        >>> import stabq
        >>> normalises(stabq.SimVQ(8, 16, pre_norm=True)), normalises(stabq.SimVQ(8, 16))
        (True, False)
    """
    pre_norm = attr(module, "pre_norm")
    if isinstance(pre_norm, nn.Module) or pre_norm is True:
        return True
    return any(attr(module, name) is True for name in ("spherical", "cosine", "use_cosine_sim"))


def grid_levels(
    module: nn.Module, codebook_size: int, levels: Sequence[int] | None, grid: bool
) -> list[int] | None:
    """The levels of each code dimension of a grid: ``levels`` when known, else, for a grid
    of ``2**d`` codes (LFQ, BSQ), ``d`` levels of 2; None for what is no grid.

    Examples:
        >>> import stabq
        >>> grid_levels(stabq.LFQ(8, bits=4), 16, None, True)
        [2, 2, 2, 2]
    """
    if levels is not None:
        return list(levels)
    if grid and codebook_size >= 2 and codebook_size & (codebook_size - 1) == 0:
        return [2] * (codebook_size.bit_length() - 1)
    return None


def linear_map(module: nn.Module) -> Tensor | None:
    """The learned square map ``W`` of a SimVQ-like module (``transform`` or
    ``code_transform``, an ``nn.Linear`` from ``dim`` to ``dim``), or None."""
    for name in ("transform", "code_transform"):
        found = attr(module, name)
        if isinstance(found, nn.Linear) and found.in_features == found.out_features:
            return found.weight.detach()
    return None


def _figure(value: float) -> str:
    """Two significant digits: ``62.3 -> '62'``, ``0.00213 -> '0.0021'``, ``1.5e-5 -> '1.5e-5'``."""
    return f"{value:.2g}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


class GridWatch:
    """The per-dimension level counts and correlations of a grid's last ``window`` steps."""

    def __init__(self, levels: Sequence[int], window: int, min_samples: int) -> None:
        self.levels, self.window, self.min_samples = list(levels), window, min_samples
        self._levels: Tensor | None = None  # ``levels`` on the indices' device
        self._offsets: Tensor | None = None  # each dimension's first bin
        self.reset()

    def reset(self) -> None:
        self.counts: deque[list[float]] = deque(maxlen=self.window)  # (D x L_max) a step
        self.correlations: deque[float] = deque(maxlen=min(self.window, CORRELATION_STEPS))
        self.total: list[float] = []  # the sum of ``counts``

    def state_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "correlations": list(self.correlations)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.counts.extend(state["counts"])
        self.total = [sum(column) for column in zip(*self.counts, strict=True)]
        self.correlations.extend(state["correlations"])

    def fields(self, indices: Tensor, books: int, level: Tensor | None = None) -> Tensor:
        """Device figures of one step, 1-D: the level counts ``(D * L_max,)`` of the valid
        rows, then their mean |correlation| within a codebook (NaN when not measured).
        Invalid rows (an index < 0 or too big) are weighted 0, not dropped: no sync.
        ``level``: ``fsq_indices_to_levels`` of the clamped indices, when already known."""
        flat = indices.detach().reshape(1, -1, books)
        return self.batch_fields(flat, None if level is None else level.unsqueeze(0))[0]

    def batch_fields(self, flat: Tensor, level: Tensor | None = None) -> Tensor:
        """:meth:`fields` of ``S`` steps of ``n`` rows each at once: ``flat`` ``(S, n, C)``
        indices, ``level`` their ``(S, n, C, d)`` levels when known; ``(S, D * L_max + 1)``."""
        k, width = math.prod(self.levels), max(self.levels)
        flat = flat.long()
        valid = ((flat >= 0) & (flat < k)).all(-1).float()  # (S, n)
        if self._levels is None or self._levels.device != flat.device:
            self._levels = torch.tensor(self.levels, device=flat.device)
        if level is None:
            level = fsq_indices_to_levels(flat.clamp(0, k - 1), self._levels)  # (S, n, C, d)
        s, n, dims = level.shape[0], level.shape[1], flat.shape[-1] * len(self.levels)
        if self._offsets is None or self._offsets.shape != (dims,):  # made once
            self._offsets = torch.arange(dims, device=flat.device) * width
        steps = torch.arange(s, device=flat.device)[:, None, None] * (dims * width)
        ids = level.reshape(s, n, dims) + self._offsets.to(flat.device) + steps
        counts = torch.zeros(s * dims * width, device=flat.device)  # index_add_: no sync
        counts.index_add_(0, ids.reshape(-1), valid[:, :, None].expand(s, n, dims).reshape(-1))
        correlation = mean_abs_correlations(level.float(), valid)
        return torch.cat([counts.view(s, dims * width), correlation[:, None]], dim=1)

    def judge(self, values: list[float]) -> list[Verdict]:
        """Verdicts from :meth:`fields`' values (read back) and the window so far."""
        if len(self.counts) == self.window:  # the running total forgets the oldest step
            self.total = [t - c for t, c in zip(self.total, self.counts[0], strict=True)]
        step = values[:-1]
        self.counts.append(step)
        self.total = [t + c for t, c in zip(self.total or [0.0] * len(step), step, strict=True)]
        if math.isfinite(values[-1]):
            self.correlations.append(values[-1])
        verdicts: list[Verdict] = []
        total, width = self.total, max(self.levels)
        dims, rows, d = len(total) // width, sum(self.total[:width]), len(self.levels)
        if rows >= self.min_samples:
            ends = [total[i * width] for i in range(dims)]  # the lowest and highest levels
            ends = [max(lo, total[i * width + self.levels[i % d] - 1]) for i, lo in enumerate(ends)]
            stuck = [end / rows for end in ends if end >= ONE_SIGN * rows]
            binary = all(v == 2 for v in self.levels)
            what = "bits keep one sign" if binary else "code dimensions keep one end level"
            message = (
                f"{len(stuck)} of {dims} {what} for {percent(min(stuck, default=1.0))} of "
                f"inputs over the last {_steps(len(self.counts))}"
            )
            verdicts.append(("one_sided", bool(stuck), message, float(len(stuck))))
        if len(self.counts) == self.window and self.correlations:  # not on the first batches
            mean = sum(self.correlations) / len(self.correlations)
            message = (
                f"code dimensions move together: mean |correlation| {mean:.2f} across the "
                f"batch over the last {_steps(len(self.correlations))}: few cells are reached"
            )
            verdicts.append(("dims_correlated", mean >= CORRELATION, message, mean))
        return verdicts


def _steps(n: int) -> str:
    return f"{n} step" + "s" * (n != 1)


def _mean_abs_correlation(level: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean |Pearson correlation| over the pairs of non-constant dimensions of one codebook,
    ``level`` ``(n, C, d)``, rows weighted 0 or 1 by ``weight`` ``(n,)`` (default all 1);
    NaN for fewer than CORRELATION_ROWS rows or no such pair."""
    w = level.new_ones(level.shape[0]) if weight is None else weight
    return mean_abs_correlations(level.unsqueeze(0), w.unsqueeze(0))[0]


def mean_abs_correlations(level: Tensor, weight: Tensor) -> Tensor:
    """:func:`_mean_abs_correlation` of ``S`` steps at once: ``level`` ``(S, n, C, d)``,
    ``weight`` ``(S, n)``; ``(S,)``."""
    if level.shape[-1] < 2:
        return level.new_full(level.shape[:1], math.nan)
    w = weight.to(level.dtype)
    rows, w = w.sum(1), w[:, :, None, None]
    scale = rows.clamp_min(1)[:, None, None]
    mean = (level * w).sum(1) / scale  # (S, C, d)
    centred = (level - mean[:, None]) * w
    cov = torch.einsum("sncd,snce->scde", centred, centred) / scale[..., None]
    std = cov.diagonal(dim1=-2, dim2=-1).sqrt()  # (S, C, d)
    spread = std > 1e-6 * level.abs().amax((1, 2, 3)).clamp_min(1)[:, None, None]
    pairs = spread[..., :, None] & spread[..., None, :]
    pairs &= torch.ones_like(pairs[0, 0]).triu(1)
    corr = cov / (std[..., :, None] * std[..., None, :]).clamp_min(1e-30)
    count = pairs.sum((1, 2, 3))
    found = (corr.abs() * pairs).sum((1, 2, 3)) / count.clamp_min(1)
    judged = (count > 0) & (rows >= CORRELATION_ROWS)
    return torch.where(judged, found, level.new_tensor(math.nan))


def map_fields(weight: Tensor) -> Tensor:
    """``(sigma_max, sigma_min, k)`` of ``W`` on its device: ``k`` the fewest singular values
    carrying SPAN_ENERGY of ``sum(sigma^2)``."""
    sigma = torch.linalg.svdvals(weight.float())
    energy = sigma.pow(2).cumsum(0) / sigma.pow(2).sum().clamp_min(1e-30)
    k = (energy < SPAN_ENERGY - 1e-6).sum() + 1
    return torch.stack([sigma[0], sigma[-1], k.float()])


def judge_map(values: list[float], dim: int) -> Verdict:
    """The ``map_singular`` verdict from :func:`map_fields`' values and ``W``'s size ``dim``."""
    top, low, k = values
    message = (
        f"the codebook's map W is near-singular (singular values {_figure(top)} to "
        f"{_figure(low)}): {int(k)} of {dim} directions carry {percent(SPAN_ENERGY)} of its "
        "energy, so the codes span few directions"
    )
    return ("map_singular", k <= SPAN_FRACTION * dim, message, k)


__all__ = [
    "CORRELATION",
    "CORRELATION_STEPS",
    "MAP_EVERY",
    "ONE_SIGN",
    "SPAN_ENERGY",
    "SPAN_FRACTION",
    "GridWatch",
    "grid_levels",
    "judge_map",
    "linear_map",
    "map_fields",
    "normalises",
]
