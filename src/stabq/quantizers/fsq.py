"""Finite scalar quantization (Mentzer et al. 2023, "FSQ: VQ-VAE made simple").

Each of ``d = len(levels)`` dimensions is bounded and rounded to ``L_i`` levels:

    half_l = (L - 1) * (1 + eps) / 2,   offset = 0.5 if L even else 0
    shift  = atanh(offset / half_l)
    r      = round(tanh(z + shift) * half_l - offset)      (integers)
    code   = r / (L // 2)                                 (in [-1, 1])
    index  = sum_i (r_i + L_i // 2) * prod_{j<i} L_j        (mixed radix)

Rounding passes gradients straight through. The implicit codebook has
``prod(levels)`` codes; there is nothing to collapse, but the bound can
saturate: when the projection grows until every ``|z|`` sits far out on the
tanh, every input lands on a corner code and the gradient vanishes.
``pre_norm=True`` standardises each dimension over the batch before the bound
(running statistics at eval), which keeps ``z`` where tanh is not flat.
The codes and indices equal vector-quantize-pytorch's ``FSQ`` for the same
levels and input (with ``pre_norm=False``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stabq import distributed
from stabq.errors import ShapeError, check, is_int
from stabq.quantizers.base import Quantizer

BOUND_EPS = 1e-3
_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
# Inside a backward: will the graph (and what it saved) be used again? True under
# retain_graph or create_graph; where torch lacks this private probe, assume it will.
_graph_kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)


def _levels_tensor(levels: Sequence[int] | Tensor, device: torch.device | None = None) -> Tensor:
    return torch.as_tensor(levels, dtype=torch.int32, device=device)


def fsq_constants(levels: Tensor) -> Tensor:
    """Per-dimension constants ``(5, d)`` of ``levels`` (float): ``shift``, ``half_l``,
    ``-offset``, ``half_width`` and ``slope = half_l / half_width``."""
    half_l = (levels - 1) * (1 + BOUND_EPS) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    half_width = (levels // 2).to(half_l.dtype)
    shift = torch.atanh(offset / half_l)
    return torch.stack([shift, half_l, -offset, half_width, half_l / half_width])


def _mixed_radix_basis(levels: Tensor) -> Tensor:
    """``b_i = prod_{j<i} L_j`` (int64): index ``= sum_i level_i b_i``."""
    return torch.cumprod(F.pad(levels[:-1].long(), (1, 0), value=1), dim=0)


def _row_group(n: int) -> int:
    """How many rows to pack side by side: the largest of 16, 8, 4, 2, 1 dividing ``n``."""
    return next(g for g in (16, 8, 4, 2, 1) if n % g == 0)


class _BoundRound(torch.autograd.Function):
    """``r = round(tanh(z + shift) * half_l - offset)``, its index, ``codes = r / half_width``.

    Rounding passes gradients straight through, so
    ``d codes / dz = half_l / half_width * (1 - tanh(z + shift)^2)``. ``z`` is
    ``(n / g, g d)`` (rows packed ``g`` at a time), every constant ``(g d,)``.
    Forward takes five elementwise passes over two buffers: ``y = tanh(z + shift)``,
    kept for backward, and ``r``, turned into the codes in place once its index is
    read. Backward is two passes, ``grad (1 - y^2)`` then ``* slope``: ``tanh`` is
    the costliest operation of the step on CPU, and keeping ``y`` rather than ``z``
    computes it once (the peer keeps it too). The gradient is written over ``y``
    (into a buffer just read: measured three times as fast as into a fresh one)
    unless the graph is kept (``retain_graph``, ``create_graph``): then ``y`` stays.
    """

    @staticmethod
    def forward(ctx, z, shift, half_l, neg_offset, half_width, slope, index):
        y = torch.add(z, shift).tanh_()
        r = torch.addcmul(neg_offset, y, half_l).round_()
        indices = index(r)
        ctx.save_for_backward(y, slope)
        ctx.mark_non_differentiable(indices)
        return r.div_(half_width), indices  # divided, not times 1 / w: the peer's exact values

    @staticmethod
    def backward(ctx, grad, _grad_indices):
        y, slope = ctx.saved_tensors
        if _graph_kept():
            grad_z = torch.ops.aten.tanh_backward(grad, y)
        else:  # y is dropped after this backward: reuse its buffer
            grad_z = torch.ops.aten.tanh_backward.grad_input(grad, y, grad_input=y)
        return grad_z.mul_(slope), None, None, None, None, None, None


def fsq_bound_round_plain(z: Tensor, levels: Sequence[int]) -> tuple[Tensor, Tensor]:
    """:func:`fsq_bound_round` in plain differentiable operations: what ``torch.compile`` traces.

    ``b = tanh(z + shift) * half_l - offset``, ``r = b + sg(round(b) - b)`` (the sum is
    exact: ``round(b) - b`` is exact by Sterbenz's lemma or is ``-b``), ``codes = r /
    half_width``; indices in int64 from the Python levels. No cache, no in-place
    write, no custom autograd Function and no tensor-to-int read, so the compiled
    graph has no break and nothing that lives between calls; the inductor fuses it anyway.
    """
    constants = fsq_constants(torch.tensor(list(levels), dtype=torch.int32))
    shift, half_l, neg_offset, half_width, _ = constants.to(z.device, z.dtype).unbind(0)
    bounded = torch.tanh(z + shift) * half_l + neg_offset
    r = bounded + (torch.round(bounded) - bounded).detach()
    basis = [math.prod(levels[:i]) for i in range(len(levels))]
    level_idx = r.detach().long() + torch.tensor([v // 2 for v in levels], device=z.device)
    indices = (level_idx * torch.tensor(basis, device=z.device)).sum(-1)
    return r / half_width, indices


def fsq_bound_round(z: Tensor, levels: Tensor, cache: dict | None = None) -> tuple[Tensor, Tensor]:
    """Codes ``(n, d)`` in [-1, 1] (straight-through) and their int64 indices ``(n,)``.

    Rows are packed ``g`` at a time into ``(n / g, g d)`` so that the
    per-dimension constants broadcast over a wide last dimension: a broadcast
    over ``(n, 6)`` measured about twice as slow on CPU (torch 2.13). The
    tiled constants and the index basis are kept in ``cache`` (keyed by
    device, dtype and ``g``): a dozen small tensor operations fewer per call.
    """
    n, d = z.shape
    g = _row_group(n)
    key = (z.device, z.dtype, g)
    found = cache.get(key) if cache is not None else None
    if found is None:  # constants in float32 like the peer, then cast
        tiled = fsq_constants(levels.cpu()).to(z.device, z.dtype).repeat(1, g).unbind(0)
        found = (tiled, _RoundIndex(levels, z.dtype, z.device))
        if cache is not None:
            cache[key] = found
    tiled, index = found
    codes, indices = _BoundRound.apply(z.contiguous().view(n // g, g * d), *tiled, index)
    return codes.view(n, d), indices


class _RoundIndex:
    """Index of rounded integers ``r`` ``(..., d)`` in ``[-L // 2, L // 2]``: ``(n,)`` int64.

    ``sum_i (r_i + L_i // 2) b_i = r . b + (L // 2) . b`` with the mixed-radix basis ``b``:
    one matrix-vector product where the float type holds every index exactly
    (up to 2^24 codes in float32), else in int64.
    """

    def __init__(self, levels: Tensor, dtype: torch.dtype, device: torch.device) -> None:
        levels = levels.to(device)
        self.levels, self.d = levels, len(levels)
        basis = _mixed_radix_basis(levels)
        self.exact = int(basis[-1]) * int(levels[-1]) <= _EXACT_INTEGERS.get(dtype, 0)
        self.basis = basis.to(dtype) if self.exact else basis
        self.const = float((levels // 2).long() @ basis)

    def __call__(self, r: Tensor) -> Tensor:
        r = r.view(-1, self.d)
        if not self.exact:
            return fsq_level_indices_to_index(r.long() + self.levels // 2, self.levels)
        return (r @ self.basis).add_(self.const).round_().long()


_EXACT_INTEGERS = {torch.float32: 2**24, torch.float64: 2**53}


def fsq_level_indices_to_index(level_idx: Tensor, levels: Tensor) -> Tensor:
    """Mixed-radix index of per-dimension level indices ``(..., d)`` in ``[0, L_i)``.

    Float input is reduced by one matrix-vector product where the float type
    holds every index exactly (up to 2^24 codes in float32), else in int64.
    """
    basis = _mixed_radix_basis(levels)
    size = int(basis[-1]) * int(levels[-1])
    if level_idx.is_floating_point() and size <= _EXACT_INTEGERS.get(level_idx.dtype, 0):
        return (level_idx @ basis.to(level_idx.dtype)).round_().long()
    return (level_idx.long() * basis).sum(dim=-1)


def fsq_codes_to_indices(codes: Tensor, levels: Tensor) -> Tensor:
    """Codes ``(..., d)`` on the grid ``r / (L // 2)`` to int64 indices ``(...,)``."""
    half_width = (levels // 2).to(codes.dtype)
    level_idx = (codes.detach() * half_width + half_width).round()
    return fsq_level_indices_to_index(level_idx, levels)


def fsq_indices_to_levels(indices: Tensor, levels: Tensor) -> Tensor:
    """Per-dimension level indices ``(..., d)`` in ``[0, L_i)`` of indices ``(...,)``."""
    basis = _mixed_radix_basis(levels)
    return (indices.long().unsqueeze(-1) // basis) % levels


def fsq_indices_to_codes(indices: Tensor, levels: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`fsq_codes_to_indices`: int indices ``(...,)`` to codes ``(..., d)``."""
    level_idx = fsq_indices_to_levels(indices, levels)
    half_width = levels // 2
    return ((level_idx - half_width) / half_width).to(dtype)


def grid_dtype(project_in: nn.Module, norm: nn.BatchNorm1d | None, x: Tensor) -> torch.dtype:
    """The dtype a grid quantizer computes in: its projection's, else its normalisation's,
    else float64 for float64 input and float32 otherwise."""
    if isinstance(project_in, nn.Linear):
        return project_in.weight.dtype
    if norm is not None:
        return norm.running_mean.dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pre_normalise(norm: nn.BatchNorm1d | None, z: Tensor) -> Tensor:
    """``z`` ``(n, d)`` standardised per dimension by ``norm`` (batch statistics in training,
    running ones at eval or for a single row); ``z`` itself when ``norm`` is None.

    In distributed training the batch statistics, running ones included, are every rank's
    rows together (:func:`stabq.distributed.batch_norm`, the same rule for fewer than 2 rows,
    counted over all ranks), so that the ranks stay one model."""
    if norm is None:
        return z
    # Beyond sqrt(max) the batch variance overflows, and an infinite running variance
    # would send every later input to one code; tanh saturates long before this bound.
    limit = math.sqrt(torch.finfo(z.dtype).max) / 1024
    z = z.clamp(-limit, limit)
    if norm.training and distributed.is_distributed():
        return distributed.batch_norm(norm, z)
    if norm.training and z.shape[0] < 2:
        # one value per dimension has no variance: use the running statistics
        return F.batch_norm(z, norm.running_mean, norm.running_var, training=False, eps=norm.eps)
    return norm(z)


class FSQ(Quantizer):
    """Finite scalar quantization over ``levels``, with optional projections.

    Args:
        levels: levels per code dimension, each >= 2; ``prod(levels)`` codes.
        dim: input size; when it differs from ``len(levels)``, Linear layers
            project ``dim -> len(levels)`` before and back after quantizing.
        pre_norm: standardise each code dimension over the batch before the
            bound (BatchNorm without affine), so tanh cannot saturate.
    """

    grid = True  # prod(levels) fixed cells: health reports occupied cells, not dead codes

    def __init__(
        self, levels: Sequence[int], dim: int | None = None, pre_norm: bool = False
    ) -> None:
        super().__init__()
        if isinstance(levels, Sequence) and not isinstance(levels, str):
            levels = list(levels)
        check(
            isinstance(levels, list) and len(levels) > 0,
            f"FSQ: levels={levels!r}, allowed is a non-empty list of integers >= 2",
        )
        check(
            all(is_int(v) and v >= 2 for v in levels),
            f"FSQ: levels={levels!r}, allowed is a non-empty list of integers >= 2",
        )
        size = math.prod(levels)
        check(
            size < 2**62,
            f"FSQ: levels={levels!r} give {size} codes, allowed is fewer than 2**62",
        )
        codes_dim = len(levels)
        dim = codes_dim if dim is None else dim
        check(
            is_int(dim) and dim >= 1,
            f"FSQ: dim={dim!r}, allowed is an integer >= 1 (or None for len(levels))",
        )
        self.levels = levels
        self.dim = dim
        self.codebook_size = size
        self.register_buffer("_levels", _levels_tensor(levels), persistent=False)
        self._cache: dict = {}  # fsq_bound_round's constants per device, dtype and packing
        has_projection = dim != codes_dim
        self.project_in = nn.Linear(dim, codes_dim) if has_projection else nn.Identity()
        self.project_out = nn.Linear(codes_dim, dim) if has_projection else nn.Identity()
        self.pre_norm = nn.BatchNorm1d(codes_dim, affine=False) if pre_norm else None

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        return grid_dtype(self.project_in, self.pre_norm, x)

    def _normalise(self, z: Tensor) -> Tensor:
        return pre_normalise(self.pre_norm, z)

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = self._normalise(self.project_in(x))
        if _compiling():  # the fast eager Function's in-place tricks stay out of graphs
            codes, indices = fsq_bound_round_plain(z, self.levels)
        else:
            codes, indices = fsq_bound_round(z, self._levels, self._cache)
        return self.project_out(codes), indices, x.new_zeros((), dtype=torch.float32)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Codes ``(..., len(levels))`` on the level grid to int64 indices ``(...,)``."""
        check(
            codes.shape[-1:] == (len(self.levels),),
            f"FSQ.codes_to_indices: codes of shape {tuple(codes.shape)} must end in "
            f"len(levels)={len(self.levels)}",
            ShapeError,
        )
        return fsq_codes_to_indices(codes, self._levels)

    def indices_to_level_codes(self, indices: Tensor) -> Tensor:
        """Indices ``(...,)`` to codes ``(..., len(levels))`` in [-1, 1], before projection."""
        flat = self._check_indices(indices)
        dtype = self.compute_dtype(flat.float())
        codes = fsq_indices_to_codes(flat, self._levels, dtype)
        return codes.reshape(*indices.shape, len(self.levels))

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices ``(...,)`` to ``(..., dim)``: the level codes through ``project_out``."""
        return self.project_out(self.indices_to_level_codes(indices))

    def extra_repr(self) -> str:
        return f"levels={self.levels}, dim={self.dim}, pre_norm={self.pre_norm is not None}"
