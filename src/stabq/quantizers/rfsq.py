"""Residual FSQ: FSQ levels stacked on successive residuals, as residual VQ stacks codebooks.

With ``L`` the levels per dimension and ``Q`` layers (vector-quantize-pytorch's
``ResidualFSQ``, itself after SoundStream's algorithm 1 and the symmetric
quantizer of Zhao et al. 2024, arXiv 2411.19842, section 3.2)::

    z   = c tanh(W_in x / c),   c = 1 + 1 / (L - 1)       (just past [-1, 1])
    r_1 = z;  for layer i = 1..Q, with scale s_i = L^-(i-1):
        t_i = clamp(r_i / s_i, -1, 1)
        k_i = floor((L - 1)(t_i + 1) / 2 + 1/2)            (level index in [0, L - 1])
        c_i = s_i (2 k_i / (L - 1) - 1)                    (L values evenly spaced in [-s_i, s_i])
        r_{i+1} = r_i - sg(c_i)
    out = W_out (c_1 + ... + c_Q),   index_i = sum_j k_ij prod_{l<j} L_l

Flooring passes gradients straight through, so each layer still in its linear
range passes the identity back to ``z``. The symmetric grid (no zero for even
``L``) spans ``[-1, 1]`` exactly, so layer ``i + 1`` at ``L`` times finer
steps covers what layer ``i`` left over (``|r_{i+1}| <= s_i / (L - 1)``).
There is no codebook and no auxiliary loss. Codes and indices equal
vector-quantize-pytorch's ``ResidualFSQ`` (1.32) for the same levels and
input with ``pre_norm=False``; ``pre_norm=True`` standardises each code
dimension before the tanh, as :class:`~stabq.quantizers.fsq.FSQ` does, so the
projection cannot grow until every input sits on a corner. In distributed
training those statistics are the joined batch's, running ones included
(:func:`stabq.distributed.batch_norm`): ranks stay identical, and equal to one
process on the whole batch. Apart from them the layers hold no state (the
scales are constants).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from stabq.errors import check, check_int, is_int
from stabq.quantizers.base import Quantizer
from stabq.quantizers.fsq import (
    fsq_indices_to_levels,
    fsq_level_indices_to_index,
    grid_dtype,
    pre_normalise,
)


def symmetric_round(t: Tensor, levels: Tensor) -> Tensor:
    """Level indices ``k`` of ``t`` ``(n, d)`` on ``L`` evenly spaced values in [-1, 1].

    ``k = floor((L - 1)(clamp(t, -1, 1) + 1) / 2 + 1/2)``, a float with the
    gradient of the expression before the floor (exactly the floor in value:
    ``b + (floor(b) - b)`` is exact for ``b >= 0``).
    """
    bracket = (levels - 1) * (t.clamp(-1.0, 1.0) + 1) / 2.0 + 0.5
    return bracket + (bracket.floor() - bracket).detach()


class ResidualFSQ(Quantizer):
    """Residual FSQ: `num_quantizers` FSQ layers over `levels` on successive residuals.

    Layer `i` quantizes what the layers before it left over, on a grid `L` times finer
    per dimension than layer `i - 1`'s (`L` that dimension's levels); the output is the
    sum of the layers' codes. Flooring passes gradients straight through; there is no
    codebook to collapse and no auxiliary loss. With `pre_norm=False` codes and indices
    equal vector-quantize-pytorch's `ResidualFSQ` (1.32) for the same levels and input.

    Args:
        levels: levels per code dimension, each an integer >= 2; `prod(levels)` codes
            per layer.
        num_quantizers: layers `Q`, an integer >= 1; indices are `(..., Q)`.
        dim: input size (default None: `len(levels)`); Linear projections
            `dim -> len(levels)` and back when it differs from `len(levels)`.
        pre_norm: standardise each code dimension over the batch (all ranks' rows in
            distributed training) before the soft clamp (BatchNorm without affine), so
            tanh cannot saturate.

    Raises:
        ConfigError: `levels` empty or not integers >= 2, too many codes, or `dim` or
            `num_quantizers` not an integer >= 1.

    Examples:
        >>> import torch, stabq
        >>> q = stabq.ResidualFSQ([8, 5, 5, 5], num_quantizers=3, dim=32)
        >>> out = q(torch.randn(16, 32))
        >>> q.codebook_size, q.num_codebooks, out.indices.shape
        (1000, 3, torch.Size([16, 3]))
    """

    grid = True  # fixed cells (levels or signs): health reports occupied cells, not dead codes

    multi_codebook = True

    def __init__(
        self,
        levels: Sequence[int],
        num_quantizers: int = 4,
        dim: int | None = None,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(levels, Sequence) and not isinstance(levels, str):
            levels = list(levels)
        allowed = f"{name}: levels={levels!r}, allowed is a non-empty list of integers >= 2"
        check(isinstance(levels, list) and len(levels) > 0, allowed)
        check(all(is_int(v) and v >= 2 for v in levels), allowed)
        size = math.prod(levels)
        check(size < 2**62, f"{name}: levels={levels!r} give {size} codes, allowed is < 2**62")
        codes_dim = len(levels)
        dim = codes_dim if dim is None else dim
        self.dim = check_int(name, "dim", dim, 1)
        self.num_codebooks = check_int(name, "num_quantizers", num_quantizers, 1)
        self.levels = levels
        self.codebook_size = size
        level_tensor = torch.tensor(levels)
        self.register_buffer("_levels", level_tensor.float(), persistent=False)
        self.register_buffer("_clamp", 1 + 1 / (level_tensor - 1), persistent=False)
        scales = torch.stack([level_tensor.float() ** -i for i in range(num_quantizers)])
        self.register_buffer("scales", scales, persistent=False)  # (Q, d): s_i per dimension
        has_projection = dim != codes_dim
        self.project_in = nn.Linear(dim, codes_dim) if has_projection else nn.Identity()
        self.project_out = nn.Linear(codes_dim, dim) if has_projection else nn.Identity()
        self.pre_norm = nn.BatchNorm1d(codes_dim, affine=False) if pre_norm else None

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        return grid_dtype(self.project_in, self.pre_norm, x)

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = pre_normalise(self.pre_norm, self.project_in(x))
        clamp = self._clamp.to(z.dtype)
        residual = (z / clamp).tanh() * clamp
        levels, steps = self._levels.to(z.dtype), (2.0 / (self._levels - 1)).to(z.dtype)
        total: Tensor | float = 0.0
        indices = []
        for scale in self.scales.to(z.dtype):
            k = symmetric_round(residual / scale, levels)
            codes = (steps * k - 1.0) * scale
            residual = residual - codes.detach()
            total = total + codes
            indices.append(fsq_level_indices_to_index(k.detach(), self._levels.long()))
        loss = x.new_zeros((), dtype=torch.float32)
        return self.project_out(total), torch.stack(indices, dim=-1), loss

    def indices_to_level_codes(self, indices: Tensor) -> Tensor:
        """Indices ``(..., Q)`` to the summed codes ``(..., len(levels))``, before projection."""
        flat = self._check_indices(indices).to(self._levels.device)
        dtype = self.compute_dtype(flat.float())
        levels = self._levels.long()
        steps, total = (2.0 / (self._levels - 1)).to(dtype), 0.0
        for i, scale in enumerate(self.scales.to(dtype)):
            k = fsq_indices_to_levels(flat[:, i], levels).to(dtype)
            total = total + (steps * k - 1.0) * scale
        return torch.as_tensor(total).reshape(*indices.shape[:-1], len(self.levels))

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices ``(..., Q)`` to ``(..., dim)``: the summed codes through ``project_out``."""
        return self.project_out(self.indices_to_level_codes(indices))

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, num_quantizers={self.num_codebooks}, dim={self.dim}, "
            f"pre_norm={self.pre_norm is not None}"
        )


__all__ = ["ResidualFSQ"]
