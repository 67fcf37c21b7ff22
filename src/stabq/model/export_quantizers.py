"""Each quantizer's evaluation pass in plain tensor operations, for an exported graph.

The quantizers' own forwards carry what a graph cannot hold: custom autograd Functions,
nearest-code searches tile by tile, a kernel picked by the processor, reads of tensors
into Python numbers. :func:`quantizer_graph` gives a module that computes the same
evaluation-mode codes and quantized features from the quantizer's own state (its
projections, running statistics, codebooks and levels) with operations an ONNX
exporter translates one for one:

    FSQ            pre_norm, tanh bound, round, mixed-radix index
    FSP            pre_norm, CDF, bin index, midpoint codes
    ResidualFSQ    pre_norm, tanh, Q rounds on shrinking scales
    VQ, SimVQ      argmin_k ||c_k||^2 - 2 z.c_k (ties to the lowest index), code rows
    ResidualVQ     the same per layer, on what the layers before left
    PQ             the same per subspace
    Gumbel         argmax of the logits, its code
    LFQ            signs of the bits, their binary index
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from stabq.errors import ConfigError
from stabq.quantizers.base import Identity, Quantizer
from stabq.quantizers.codebook import l2norm
from stabq.quantizers.fsp import CDFS, FSP, fsp_bins, fsp_values_to_codes
from stabq.quantizers.fsq import FSQ
from stabq.quantizers.fsq_kernel import fsq_bound_round_plain
from stabq.quantizers.gumbel import GumbelQuantizer
from stabq.quantizers.lfq import LFQ
from stabq.quantizers.pq import ProductQuantizer
from stabq.quantizers.rfsq import ResidualFSQ, symmetric_round
from stabq.quantizers.rvq import ResidualVQ
from stabq.quantizers.simvq import SimVQ
from stabq.quantizers.vq import VectorQuantizer

Pass = Callable[[Quantizer, Tensor], tuple[Tensor, Tensor]]


def mixed_radix(level_idx: Tensor, levels: Sequence[int]) -> Tensor:
    """int64 index ``sum_i k_i prod_{j<i} L_j`` of level indices ``k`` ``(n, d)``."""
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))])
    basis = basis.to(level_idx.device)
    return (level_idx.long() * basis).sum(-1)


def nearest(z: Tensor, codes: Tensor) -> Tensor:
    """Index of the nearest code, ties to the lowest: ``z`` ``(G, n, d)``, ``codes``
    ``(G, K, d)`` -> ``(G, n)``; ``||z||^2`` is left out, it is the same for every code."""
    distance = (codes * codes).sum(-1)[:, None, :] - 2 * torch.bmm(z, codes.transpose(1, 2))
    return distance.argmin(-1)


def standardise(norm: nn.BatchNorm1d | None, z: Tensor) -> Tensor:
    """``pre_norm`` at evaluation: ``z`` clamped as the quantizers clamp it, then ``z a + b``
    with ``a = 1 / sqrt(running_var + eps)``, ``b = -running_mean a``, as torch computes
    batch norm (the ONNX BatchNormalization op needs a channel size the trace loses)."""
    if norm is None:
        return z
    limit = math.sqrt(torch.finfo(z.dtype).max) / 1024
    scale = 1 / torch.sqrt(norm.running_var.to(z.dtype) + norm.eps)
    return z.clamp(-limit, limit) * scale - norm.running_mean.to(z.dtype) * scale


def straight_value(z: Tensor, codes: Tensor) -> Tensor:
    """``z + (codes - z)``: the value of the straight-through estimate, as the forward has it."""
    return z + (codes - z)


def _fsq(q: FSQ, x: Tensor) -> tuple[Tensor, Tensor]:
    z = standardise(q.pre_norm, q.project_in(x))
    codes, indices = fsq_bound_round_plain(z, q.levels, q.bound)
    return q.project_out(codes), indices


def _fsp(q: FSP, x: Tensor) -> tuple[Tensor, Tensor]:
    z = standardise(q.pre_norm, q.project_in(x))
    act = CDFS[q.activation][0](z)
    level_idx, midpoints = fsp_bins(act, q._levels.to(act.dtype))
    codes = fsp_values_to_codes(midpoints, q.activation if q.inverse_activation else None)
    return q.project_out(codes), mixed_radix(level_idx, q.levels)


def _rfsq(q: ResidualFSQ, x: Tensor) -> tuple[Tensor, Tensor]:
    z = standardise(q.pre_norm, q.project_in(x))
    clamp = q._clamp.to(z.dtype)
    residual = (z / clamp).tanh() * clamp
    levels, steps = q._levels.to(z.dtype), (2.0 / (q._levels - 1)).to(z.dtype)
    total, indices = torch.zeros_like(z), []
    for scale in q.scales.to(z.dtype):
        k = symmetric_round(residual / scale, levels)
        codes = (steps * k - 1.0) * scale
        residual = residual - codes
        total = total + codes
        indices.append(mixed_radix(k, q.levels))
    return q.project_out(total), torch.stack(indices, dim=-1)


def _vq(q: VectorQuantizer, x: Tensor) -> tuple[Tensor, Tensor]:
    z = standardise(q.pre_norm, q.project_in(x))
    if q.cosine:
        z = l2norm(z)
    embed = q.codebook.embed[0].detach()
    indices = nearest(z[None], embed[None])[0]
    return q.project_out(straight_value(z, embed[indices].to(z.dtype))), indices


def _rvq(q: ResidualVQ, x: Tensor) -> tuple[Tensor, Tensor]:
    z = standardise(q.pre_norm, q.project_in(x))
    total, indices = torch.zeros_like(z), []
    for layer in q.layers:
        embed = layer.embed[0].detach()
        idx = nearest((z - total)[None], embed[None])[0]
        total = total + embed[idx].to(z.dtype)
        indices.append(idx)
    return q.project_out(straight_value(z, total)), torch.stack(indices, dim=-1)


def _pq(q: ProductQuantizer, x: Tensor) -> tuple[Tensor, Tensor]:
    groups, size = q.num_codebooks, q.codebook.codebook_size
    parts = x.reshape(x.shape[0], groups, q.codebook.dim).transpose(0, 1)  # (M, n, dim / M)
    embed = q.codebook.embed.detach()
    indices = nearest(parts, embed).T  # (n, M)
    offsets = torch.arange(groups, device=x.device) * size  # one table of M * K rows
    codes = embed.reshape(groups * size, -1)[indices + offsets].reshape(x.shape)
    return straight_value(x, codes.to(x.dtype)), indices


def _simvq(q: SimVQ, x: Tensor) -> tuple[Tensor, Tensor]:
    z = standardise(q.pre_norm, x)
    codebook = q.codebook.detach()
    indices = nearest(z[None], codebook[None])[0]
    return straight_value(z, codebook[indices]), indices


def _gumbel(q: GumbelQuantizer, x: Tensor) -> tuple[Tensor, Tensor]:
    indices = q.to_logits(standardise(q.pre_norm, x)).float().argmax(-1)
    return q.embed[indices], indices


def _lfq(q: LFQ, x: Tensor) -> tuple[Tensor, Tensor]:
    n, c, d = x.shape[0], q.num_codebooks, q.bits
    positive = standardise(q.pre_norm, q.project_in(x)).reshape(n, c, d) > 0
    codes = q._signs_to_codes(positive, x.dtype)
    indices = (positive.long() * q.mask).sum(-1)
    return q.project_out(codes.reshape(n, c * d)), indices if q.multi_codebook else indices[:, 0]


PASSES: dict[type, Pass] = {
    FSQ: _fsq, FSP: _fsp, ResidualFSQ: _rfsq, VectorQuantizer: _vq, ResidualVQ: _rvq,
    ProductQuantizer: _pq, SimVQ: _simvq, GumbelQuantizer: _gumbel, LFQ: _lfq,
}  # fmt: skip


class QuantizerGraph(nn.Module):
    """A quantizer's evaluation pass in plain operations: ``(n, dim)`` features to
    ``(quantized (n, dim), indices (n,) or (n, num_codebooks))``."""

    def __init__(self, quantizer: Quantizer, step: Pass) -> None:
        super().__init__()
        self.quantizer, self.step = quantizer, step

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.reshape(-1, self.quantizer.dim).to(self.quantizer.compute_dtype(x))
        quantized, indices = self.step(self.quantizer, flat)
        return quantized.to(x.dtype), indices


def quantizer_graph(quantizer: Quantizer, name: str) -> QuantizerGraph | None:
    """The plain evaluation pass of ``quantizer`` (None for ``Identity``, which has no codes).

    Args:
        quantizer: a stabq quantizer with quantization on.
        name: how the refusal names it (the preset).

    Raises:
        ConfigError: a quantizer class stabq does not build, or one with quantization off.
    """
    if isinstance(quantizer, Identity):
        return None
    if not quantizer.quantization_enabled:
        raise ConfigError(
            f"quantizer {name!r} has quantization off (the first stage of two-stage "
            f"training): export the model once training has switched it on"
        )
    step = PASSES.get(type(quantizer))
    if step is None:
        raise ConfigError(
            f"quantizer {name!r} ({type(quantizer).__name__}) cannot be exported: allowed are "
            f"the classes of stabq's presets ({', '.join(c.__name__ for c in PASSES)})"
        )
    return QuantizerGraph(quantizer, step)


__all__ = ["PASSES", "QuantizerGraph", "mixed_radix", "nearest", "quantizer_graph"]
