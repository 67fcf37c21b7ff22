"""Finite scalar quantization (Mentzer et al. 2023, "FSQ: VQ-VAE made simple").

Each of ``d = len(levels)`` dimensions is bounded and rounded to ``L_i`` levels:

    half_l = (L - 1) * (1 + eps) / 2,   offset = 0.5 if L even else 0
    shift  = atanh(offset / half_l)
    r      = round(tanh(z + shift) * half_l - offset)      (integers)
    code   = r / (L // 2)                                 (in [-1, 1])
    index  = sum_i (r_i + L_i // 2) * prod_{j<i} L_j        (mixed radix)

``bound="distribution"`` (iFSQ) bounds by ``tanh(0.8 z)`` onto ``L`` whole units
(:func:`~stabq.quantizers.fsq_kernel.fsq_constants`); the codes and indices keep this layout.
Rounding passes gradients straight through; :class:`FSQ` says why ``pre_norm`` exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stabq import distributed
from stabq.errors import ShapeError, check, is_int
from stabq.quantizers._graph import compiling
from stabq.quantizers.base import Quantizer

# the kernel's names, importable from here as before the kernel had its own module
from stabq.quantizers.fsq_kernel import (  # noqa: F401
    _EXACT_INTEGERS,
    BOUND_EPS,
    BOUNDS,
    DISTRIBUTION_SCALE,
    SIGMOID_MIN_ELEMENTS,
    _BoundRound,
    _mixed_radix_basis,
    _RoundIndex,
    _row_group,
    _Tiled,
    _tiled,
    _use_sigmoid,
    _vector_kernels,
    fsq_bound_round,
    fsq_bound_round_plain,
    fsq_constants,
    fsq_level_indices_to_index,
    kernel_constants,
)
from stabq.quantizers.fsq_norm import (
    PACKED_MIN_ELEMENTS,
    fusable,
    native_projected,
    norm_bound_round,
)


def _levels_tensor(levels: Sequence[int] | Tensor, device: torch.device | None = None) -> Tensor:
    return torch.as_tensor(levels, dtype=torch.int32, device=device)


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
    no auxiliary loss. With `pre_norm=False` and `bound="tanh"` the codes and indices
    equal vector-quantize-pytorch's `FSQ` for the same levels and input.

    `bound="distribution"` is iFSQ (Lin et al. 2026): `tanh(0.8 z)`, which is
    `2 sigmoid(1.6 z) - 1` and close to `2 Phi(z) - 1`, so a standard-normal `z` comes
    out nearly uniform in (-1, 1). stabq spreads that interval over `L` whole rounding
    units (`b = tanh(0.8 z) L (1 - eps) / 2 - offset`, no shift for even `L`), so that
    every level takes about `1/L` of such inputs; FSQ's tanh grid gives its two outer
    levels half a unit each. The codes stay `r / (L // 2)` with the same indices.

    Args:
        levels: levels per code dimension, each an integer >= 2; `prod(levels)` codes
            (fewer than 2**62). `recommended_levels` gives the paper's choices.
        dim: input size (default None: `len(levels)`); when it differs from
            `len(levels)`, Linear layers project `dim -> len(levels)` before and back
            after quantizing.
        pre_norm: standardise each code dimension over the batch before the bound
            (BatchNorm without affine; running statistics at eval), so tanh cannot
            saturate. Default False.
        bound: `"tanh"` (FSQ, default) or `"distribution"` (iFSQ, see above).

    Raises:
        ConfigError: `levels` empty or not integers >= 2, too many codes, `dim` not
            an integer >= 1, or `bound` not one of `"tanh"`, `"distribution"`.

    Examples:
        >>> import torch, stabq
        >>> q = stabq.FSQ([8, 5, 5, 5], dim=32, pre_norm=True)
        >>> out = q(torch.randn(16, 32))
        >>> q.codebook_size, out.indices.shape, out.indices.dtype
        (1000, torch.Size([16]), torch.int64)
        >>> q.indices_to_codes(out.indices).shape
        torch.Size([16, 32])
        >>> iq = stabq.FSQ([5], bound="distribution")
        >>> iq(torch.tensor([[-3.0], [-0.5], [0.0], [0.5], [3.0]])).indices.tolist()
        [0, 1, 2, 3, 4]
    """

    grid = True  # prod(levels) fixed cells: health reports occupied cells, not dead codes

    def __init__(
        self,
        levels: Sequence[int],
        dim: int | None = None,
        pre_norm: bool = False,
        bound: str = "tanh",
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
        check(
            isinstance(bound, str) and bound in BOUNDS,
            f"FSQ: bound={bound!r}, allowed is one of {', '.join(map(repr, BOUNDS))}",
        )
        self.levels = levels
        self.dim = dim
        self.bound = bound
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
        loss = x.new_zeros((), dtype=torch.float32)
        if self._projected(x) and not compiling():  # projections, norm and bound: one node
            g, tiled, index = kernel_constants(x, self._levels, self._cache, self.bound)
            out, indices = native_projected(x, self.pre_norm, tiled, index, g, self.bound,
                                            self.project_in, self.project_out)  # fmt: skip
            return out, indices, loss
        z = self.project_in(x)
        if compiling():  # the fast eager Function's in-place tricks stay out of graphs
            codes, indices = fsq_bound_round_plain(self._normalise(z), self.levels, self.bound)
        else:
            found = self._fused(z) if fusable(self.pre_norm, z) else None
            if found is None:
                found = fsq_bound_round(
                    self._normalise(z), self._levels, self._cache, bound=self.bound
                )
            codes, indices = found
        return self.project_out(codes), indices, loss

    def _projected(self, x: Tensor) -> bool:
        """Do both projections and ``pre_norm`` run as one node
        (:func:`~stabq.quantizers.fsq_norm.native_projected`)? For a small contiguous batch
        through two Linear layers with biases, where the fused normalisation runs."""
        return (
            isinstance(self.project_in, nn.Linear)
            and isinstance(self.project_out, nn.Linear)
            and self.project_in.bias is not None
            and self.project_out.bias is not None
            and x.is_contiguous()
            and x.shape[0] * len(self.levels) < PACKED_MIN_ELEMENTS
            and fusable(self.pre_norm, x)
        )

    def _fused(self, z: Tensor) -> tuple[Tensor, Tensor] | None:
        """``pre_norm`` and the bound in one Function (:mod:`~stabq.quantizers.fsq_norm`);
        None where the unfused form must run."""
        g, tiled, index = kernel_constants(z, self._levels, self._cache, self.bound)
        found = norm_bound_round(z, self.pre_norm, tiled, index, _use_sigmoid(z, tiled), g,
                                 self.bound)  # fmt: skip
        if found is None:
            return None
        codes, indices = found
        return (codes if codes.shape == z.shape else codes.view(z.shape)), indices

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
        pre_norm = self.pre_norm is not None
        return f"levels={self.levels}, dim={self.dim}, pre_norm={pre_norm}, bound={self.bound!r}"
