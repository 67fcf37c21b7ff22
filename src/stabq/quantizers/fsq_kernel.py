"""FSQ's bound and round: the fast eager kernel and the plain form ``torch.compile`` traces.

Per dimension of ``levels`` (see :func:`fsq_constants`):

    b = tanh(a z + shift) * half_l - offset,   r = round(b),   code = r / half_width

with the mixed-radix index of ``r``; ``a = 1`` for ``bound="tanh"`` and ``a = 0.8`` for
``bound="distribution"`` (iFSQ, Lin et al. 2026: ``tanh(0.8 z) = 2 sigmoid(1.6 z) - 1``,
close to ``2 Phi(z) - 1``, so standard-normal ``z`` comes out nearly uniform).
:class:`~stabq.quantizers.fsq.FSQ` calls :func:`fsq_bound_round`
(or :func:`fsq_bound_round_plain` while compiling).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from stabq.quantizers._graph import graph_kept

BOUND_EPS = 1e-3


BOUNDS = ("tanh", "distribution")
DISTRIBUTION_SCALE = 0.8  # iFSQ: 2 sigmoid(1.6 z) - 1 = tanh(0.8 z)


def fsq_constants(levels: Tensor, bound: str = "tanh") -> Tensor:
    """Per-dimension constants ``(5, d)`` of ``levels`` (float): ``shift``, ``half_l``,
    ``-offset``, ``half_width`` and ``slope = half_l / half_width``.

    ``bound="tanh"`` is FSQ's: ``half_l = (L - 1)(1 + eps) / 2``, and for even ``L``
    ``shift = atanh(offset / half_l)`` puts ``z = 0`` on level 0; the two outer levels
    then get half a unit of ``b`` each. ``bound="distribution"`` spreads ``(-1, 1)`` over
    ``L`` whole units, ``half_l = L (1 - eps) / 2`` with no shift, so that a uniform
    bounded value uses every level equally."""
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    if bound == "distribution":
        half_l = levels * (1 - BOUND_EPS) / 2
        shift = torch.zeros_like(half_l)
    else:
        half_l = (levels - 1) * (1 + BOUND_EPS) / 2
        shift = torch.atanh(offset / half_l)
    half_width = (levels // 2).to(half_l.dtype)
    return torch.stack([shift, half_l, -offset, half_width, half_l / half_width])


def _mixed_radix_basis(levels: Tensor) -> Tensor:
    """``b_i = prod_{j<i} L_j`` (int64): index ``= sum_i level_i b_i``."""
    return torch.cumprod(F.pad(levels[:-1].long(), (1, 0), value=1), dim=0)


def _row_group(n: int) -> int:
    """How many rows to pack side by side: the largest of 16, 8, 4, 2, 1 dividing ``n``."""
    return next(g for g in (16, 8, 4, 2, 1) if n % g == 0)


# The sigmoid form pays off from about this many elements of ``z`` (CPU, float32; measured
# in benchmarks/fsq_paths.py): below it, its extra operations cost more than tanh saves.
SIGMOID_MIN_ELEMENTS = 2**16


class _Tiled(NamedTuple):
    """:func:`fsq_constants` tiled over the packed width, and what the sigmoid form needs."""

    shift: Tensor
    half_l: Tensor
    neg_offset: Tensor
    half_width: Tensor
    slope: Tensor
    two_shift: Tensor  # 2 shift
    two_half_l: Tensor  # 2 half_l
    sig_offset: Tensor  # -half_l - offset
    four_slope: Tensor  # 4 slope
    window: float  # |bounded from sigmoid - bounded from tanh| stays below this


def _tiled(
    levels: Tensor, g: int, dtype: torch.dtype, device: torch.device, bound: str = "tanh"
) -> _Tiled:
    c = fsq_constants(levels.cpu(), bound).to(device, dtype).repeat(1, g)  # float32, like the peer
    shift, half_l, neg_offset, half_width, slope = c.unbind(0)
    # float32 errors: sigmoid a few ulp of 1, tanh one, each product and sum one ulp of its
    # result; together under 8 eps (max half_l + 1), measured under 3 eps: 64 eps keeps 8x
    window = 64 * torch.finfo(dtype).eps * (float(half_l.max()) + 1)
    return _Tiled(shift, half_l, neg_offset, half_width, slope, 2 * shift, 2 * half_l,
                  neg_offset - half_l, 4 * slope, window)  # fmt: skip


@functools.cache
def _vector_kernels() -> bool:
    """Does torch run its avx2 or avx512 CPU kernels (``ATEN_CPU_CAPABILITY``, fixed for the
    process)? There torch's tanh takes about five times sigmoid's time; on the default
    path, sigmoid is no faster than tanh, and other processors are not measured."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _use_sigmoid(z: Tensor, tiled: _Tiled) -> bool:
    """The sigmoid form where tanh is the step's cost: float32 on CPU with vector kernels,
    large inputs, and levels small enough that the window is far below a level's width."""
    return (
        z.device.type == "cpu"
        and z.dtype == torch.float32
        and z.numel() >= SIGMOID_MIN_ELEMENTS
        and tiled.window < 0.01
        and _vector_kernels()
    )


def bound_round(z: Tensor, c: _Tiled, index, sigmoid: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`_BoundRound`'s forward without autograd: ``(y, codes, indices)`` of the packed
    ``z``, ``y`` the tanh (or sigmoid) that backward needs."""
    if sigmoid:
        y = torch.add(c.two_shift, z, alpha=2).sigmoid_()
        b = torch.addcmul(c.sig_offset, y, c.two_half_l)
        r = torch.round(b)
        near = (b.sub_(r).abs_().amax(dim=1) > 0.5 - c.window).nonzero().squeeze(1)
        if near.numel():  # within the window of a tie: decide by tanh itself
            again = torch.add(z.index_select(0, near), c.shift).tanh_()
            r.index_copy_(0, near, torch.addcmul(c.neg_offset, again, c.half_l).round_())
    else:
        y = torch.add(z, c.shift).tanh_()
        r = torch.addcmul(c.neg_offset, y, c.half_l).round_()
    indices = index(r)
    return y, r.div_(c.half_width), indices  # divided, not times 1 / w: the peer's values


class _BoundRound(torch.autograd.Function):
    """``r = round(tanh(z + shift) * half_l - offset)``, its index, ``codes = r / half_width``.

    Rounding passes gradients straight through, so ``d codes / dz = half_l / half_width *
    (1 - tanh(z + shift)^2)``. ``z`` is ``(n / g, g d)`` (rows packed ``g`` at a time),
    every constant ``(g d,)``. The tanh form takes five elementwise passes over two buffers:
    ``y = tanh(z + shift)``, kept for backward, and ``r``, turned into the codes in place
    once its index is read. Backward is two passes, ``grad (1 - y^2)`` then ``* slope``:
    keeping ``y`` rather than ``z`` computes tanh once (the peer keeps it too).

    The sigmoid form (``sigmoid=True``) uses ``tanh(a) = 2 sigmoid(2a) - 1``: ``s =
    sigmoid(2 (z + shift))``, ``b = 2 half_l s - half_l - offset``. Its ``b`` is within
    ``window`` of the tanh form's, so it rounds the same wherever ``b`` is farther than
    ``window`` from a tie; the few rows that are not are computed again by the tanh form.
    The codes and indices are therefore the tanh form's. Backward is ``grad s (1 - s) * 4
    slope`` (``1 - tanh^2 = 4 s (1 - s)``), within a few ulp of ``slope`` of the tanh form's.
    The gradient is written over what forward kept (``y`` or ``s``: into a buffer just read,
    measured three times as fast as into a fresh one) unless the graph is kept.
    """

    @staticmethod
    def forward(ctx, z, c: _Tiled, index, sigmoid: bool):
        y, codes, indices = bound_round(z, c, index, sigmoid)
        ctx.sigmoid = sigmoid
        ctx.save_for_backward(y, c.four_slope if sigmoid else c.slope)
        ctx.mark_non_differentiable(indices)
        return codes, indices

    @staticmethod
    def backward(ctx, grad, _grad_indices):
        y, slope = ctx.saved_tensors
        kernel = torch.ops.aten.sigmoid_backward if ctx.sigmoid else torch.ops.aten.tanh_backward
        # unless the graph is kept, y is dropped after this backward: then reuse its buffer
        grad_z = kernel(grad, y) if graph_kept() else kernel.grad_input(grad, y, grad_input=y)
        return grad_z.mul_(slope), None, None, None


def fsq_bound_round_plain(
    z: Tensor, levels: Sequence[int], bound: str = "tanh"
) -> tuple[Tensor, Tensor]:
    """:func:`fsq_bound_round` in plain differentiable operations: what ``torch.compile`` traces.

    ``b = tanh(z + shift) * half_l - offset``, ``r = b + sg(round(b) - b)`` (the sum is
    exact: ``round(b) - b`` is exact by Sterbenz's lemma or is ``-b``), ``codes = r /
    half_width``; indices in int64 from the Python levels. No cache, no in-place
    write, no custom autograd Function and no tensor-to-int read, so the compiled
    graph has no break and nothing that lives between calls; the inductor fuses it anyway.
    ``bound="distribution"`` scales ``z`` by 0.8 first, as :func:`fsq_bound_round` does.
    """
    constants = fsq_constants(torch.tensor(list(levels), dtype=torch.int32), bound)
    shift, half_l, neg_offset, half_width, _ = constants.to(z.device, z.dtype).unbind(0)
    if bound == "distribution":
        z = z * DISTRIBUTION_SCALE
    bounded = torch.tanh(z + shift) * half_l + neg_offset
    r = bounded + (torch.round(bounded) - bounded).detach()
    basis = [math.prod(levels[:i]) for i in range(len(levels))]
    level_idx = r.detach().long() + torch.tensor([v // 2 for v in levels], device=z.device)
    indices = (level_idx * torch.tensor(basis, device=z.device)).sum(-1)
    return r / half_width, indices


def fsq_bound_round(
    z: Tensor,
    levels: Tensor,
    cache: dict | None = None,
    sigmoid: bool | None = None,
    bound: str = "tanh",
) -> tuple[Tensor, Tensor]:
    """Codes ``(n, d)`` in [-1, 1] (straight-through) and their int64 indices ``(n,)``.

    ``sigmoid`` picks :class:`_BoundRound`'s form (None: the sigmoid form for float32 on
    CPU with avx2 or avx512 kernels from :data:`SIGMOID_MIN_ELEMENTS` elements); the codes
    and indices are the same. Rows are packed ``g`` at a time into ``(n / g, g d)`` so that
    the per-dimension constants broadcast over a wide last dimension: a broadcast over
    ``(n, 6)`` measured about twice as slow on CPU (torch 2.13). The tiled constants and the
    index basis are kept in ``cache`` (keyed by device, dtype, ``g`` and a bound other
    than tanh): a dozen small tensor operations fewer per call. ``bound="distribution"``
    (iFSQ) multiplies ``z`` by 0.8 and runs the same kernel on :func:`fsq_constants` of
    that bound: ``tanh(0.8 z)`` in either form, and the gradient gains the factor 0.8
    through the product.
    """
    n, d = z.shape
    if bound == "distribution":
        z = z * DISTRIBUTION_SCALE
    g, tiled, index = kernel_constants(z, levels, cache, bound)
    sigmoid = _use_sigmoid(z, tiled) if sigmoid is None else sigmoid
    codes, indices = _BoundRound.apply(z.contiguous().view(n // g, g * d), tiled, index, sigmoid)
    return codes.view(n, d), indices


def kernel_constants(
    z: Tensor, levels: Tensor, cache: dict | None, bound: str = "tanh"
) -> tuple[int, _Tiled, _RoundIndex]:
    """The row group ``g`` of ``z`` ``(n, d)``, :func:`_tiled`'s constants and the index of
    :func:`fsq_bound_round`, from ``cache`` (keyed by device, dtype, ``g`` and a bound other
    than tanh) or made and put there."""
    g = _row_group(z.shape[0])
    key = (z.device, z.dtype, g) + ((bound,) if bound != "tanh" else ())
    found = cache.get(key) if cache is not None else None
    if found is None:
        found = (
            _tiled(levels, g, z.dtype, z.device, bound),
            _RoundIndex(levels, z.dtype, z.device, g),
        )
        if cache is not None:
            cache[key] = found
    return (g, *found)


class _RoundIndex:
    """Index of rounded integers ``r`` ``(n / g, g d)`` (rows packed ``g`` at a time) in
    ``[-L // 2, L // 2]``: ``(n,)`` int64.

    ``sum_i (r_i + L_i // 2) b_i = r . b + (L // 2) . b`` with the mixed-radix basis ``b``:
    where the float type holds every index exactly (up to 2^24 codes in float32; then every
    partial sum is an exact integer, in any order), one product of the packed ``r`` with the
    block-diagonal ``(g d, g)`` matrix of ``g`` copies of ``b`` (measured faster than a
    matrix-vector product over ``(n, d)``); else in int64.
    """

    def __init__(self, levels: Tensor, dtype: torch.dtype, device: torch.device, g: int) -> None:
        levels = levels.to(device)
        self.levels, self.d = levels, len(levels)
        basis = _mixed_radix_basis(levels)
        self.exact = int(basis[-1]) * int(levels[-1]) <= _EXACT_INTEGERS.get(dtype, 0)
        self.basis = torch.block_diag(*[basis.to(dtype)[:, None]] * g) if self.exact else basis
        self.const = float((levels // 2).long() @ basis)

    def __call__(self, r: Tensor) -> Tensor:
        if not self.exact:
            r = r.view(-1, self.d)
            return fsq_level_indices_to_index(r.long() + self.levels // 2, self.levels)
        return (r @ self.basis).view(-1).add_(self.const).long()


_EXACT_INTEGERS = {torch.float32: 2**24, torch.float64: 2**53}


def fsq_level_indices_to_index(level_idx: Tensor, levels: Tensor) -> Tensor:
    """Mixed-radix index of per-dimension level indices ``(..., d)`` in ``[0, L_i)``: for
    float input one matrix-vector product where the float type holds every index exactly
    (up to 2^24 codes in float32), else in int64."""
    basis = _mixed_radix_basis(levels)
    size = int(basis[-1]) * int(levels[-1])
    if level_idx.is_floating_point() and size <= _EXACT_INTEGERS.get(level_idx.dtype, 0):
        return (level_idx @ basis.to(level_idx.dtype)).round_().long()
    return (level_idx.long() * basis).sum(dim=-1)
