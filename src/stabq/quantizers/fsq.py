"""Finite scalar quantization (Mentzer et al. 2023, "FSQ: VQ-VAE made simple").

Each of ``d = len(levels)`` dimensions is bounded and rounded to ``L_i`` levels:

    half_l = (L - 1) * (1 + eps) / 2,   offset = 0.5 if L even else 0
    shift  = atanh(offset / half_l)
    r      = round(tanh(z + shift) * half_l - offset)      (integers)
    code   = r / (L // 2)                                 (in [-1, 1])
    index  = sum_i (r_i + L_i // 2) * prod_{j<i} L_j        (mixed radix)

Rounding passes gradients straight through; :class:`FSQ` says why ``pre_norm`` exists.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stabq import distributed
from stabq.errors import ShapeError, check, is_int
from stabq.quantizers._graph import compiling, graph_kept
from stabq.quantizers.base import Quantizer

BOUND_EPS = 1e-3


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


def _tiled(levels: Tensor, g: int, dtype: torch.dtype, device: torch.device) -> _Tiled:
    c = fsq_constants(levels.cpu()).to(device, dtype).repeat(1, g)  # float32, like the peer
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
        ctx.sigmoid = sigmoid
        ctx.save_for_backward(y, c.four_slope if sigmoid else c.slope)
        ctx.mark_non_differentiable(indices)
        return r.div_(c.half_width), indices  # divided, not times 1 / w: the peer's values

    @staticmethod
    def backward(ctx, grad, _grad_indices):
        y, slope = ctx.saved_tensors
        kernel = torch.ops.aten.sigmoid_backward if ctx.sigmoid else torch.ops.aten.tanh_backward
        # unless the graph is kept, y is dropped after this backward: then reuse its buffer
        grad_z = kernel(grad, y) if graph_kept() else kernel.grad_input(grad, y, grad_input=y)
        return grad_z.mul_(slope), None, None, None


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


def fsq_bound_round(
    z: Tensor, levels: Tensor, cache: dict | None = None, sigmoid: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Codes ``(n, d)`` in [-1, 1] (straight-through) and their int64 indices ``(n,)``.

    ``sigmoid`` picks :class:`_BoundRound`'s form (None: the sigmoid form for float32 on
    CPU with avx2 or avx512 kernels from :data:`SIGMOID_MIN_ELEMENTS` elements); the codes
    and indices are the same. Rows are packed ``g`` at a time into ``(n / g, g d)`` so that
    the per-dimension constants broadcast over a wide last dimension: a broadcast over
    ``(n, 6)`` measured about twice as slow on CPU (torch 2.13). The tiled constants and the
    index basis are kept in ``cache`` (keyed by device, dtype and ``g``): a dozen small
    tensor operations fewer per call.
    """
    n, d = z.shape
    g = _row_group(n)
    key = (z.device, z.dtype, g)
    found = cache.get(key) if cache is not None else None
    if found is None:
        found = (_tiled(levels, g, z.dtype, z.device), _RoundIndex(levels, z.dtype, z.device, g))
        if cache is not None:
            cache[key] = found
    tiled, index = found
    sigmoid = _use_sigmoid(z, tiled) if sigmoid is None else sigmoid
    codes, indices = _BoundRound.apply(z.contiguous().view(n // g, g * d), tiled, index, sigmoid)
    return codes.view(n, d), indices


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
    """Finite scalar quantization (Mentzer et al. 2023): each code dimension bounded by
    tanh and rounded to one of its levels; the codes are a fixed grid, nothing to collapse.

    The bound can saturate instead: when the projection grows until every input sits far
    out on the tanh, every input lands on a corner code and the gradient vanishes;
    `pre_norm=True` prevents it. Rounding passes gradients straight through; there is
    no auxiliary loss. With `pre_norm=False` the codes and indices equal
    vector-quantize-pytorch's `FSQ` for the same levels and input.

    Args:
        levels: levels per code dimension, each an integer >= 2; `prod(levels)` codes
            (fewer than 2**62). `recommended_levels` gives the paper's choices.
        dim: input size (default None: `len(levels)`); when it differs from
            `len(levels)`, Linear layers project `dim -> len(levels)` before and back
            after quantizing.
        pre_norm: standardise each code dimension over the batch before the bound
            (BatchNorm without affine; running statistics at eval), so tanh cannot
            saturate. Default False.

    Raises:
        ConfigError: `levels` empty or not integers >= 2, too many codes, or `dim` not
            an integer >= 1.

    Examples:
        >>> import torch, stabq
        >>> q = stabq.FSQ([8, 5, 5, 5], dim=32, pre_norm=True)
        >>> out = q(torch.randn(16, 32))
        >>> q.codebook_size, out.indices.shape, out.indices.dtype
        (1000, torch.Size([16]), torch.int64)
        >>> q.indices_to_codes(out.indices).shape
        torch.Size([16, 32])
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
        if compiling():  # the fast eager Function's in-place tricks stay out of graphs
            codes, indices = fsq_bound_round_plain(z, self.levels)
        else:
            codes, indices = fsq_bound_round(z, self._levels, self._cache)
        return self.project_out(codes), indices, x.new_zeros((), dtype=torch.float32)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Grid codes `(..., len(levels))` (before `project_out`) to int64 indices `(...,)`;
        a last dimension other than `len(levels)` is a ShapeError."""
        check(
            codes.shape[-1:] == (len(self.levels),),
            f"FSQ.codes_to_indices: codes of shape {tuple(codes.shape)} must end in "
            f"len(levels)={len(self.levels)}",
            ShapeError,
        )
        return fsq_codes_to_indices(codes, self._levels)

    def indices_to_level_codes(self, indices: Tensor) -> Tensor:
        """Indices `(...,)` to grid codes `(..., len(levels))` in [-1, 1], before projection."""
        flat = self._check_indices(indices)
        dtype = self.compute_dtype(flat.float())
        codes = fsq_indices_to_codes(flat, self._levels, dtype)
        return codes.reshape(*indices.shape, len(self.levels))

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices `(...,)` to `(..., dim)`: the grid codes through `project_out`."""
        return self.project_out(self.indices_to_level_codes(indices))

    def extra_repr(self) -> str:
        return f"levels={self.levels}, dim={self.dim}, pre_norm={self.pre_norm is not None}"
