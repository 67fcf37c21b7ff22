"""Lookup-free quantization (Yu et al. 2023, MAGVIT-v2) and, with ``spherical=True``,
binary spherical quantization (Zhao et al. 2024, BSQ).

``C`` codebooks of ``d`` bits each (``2^d`` codes per codebook, none stored)::

    z  = W_in x (pre_norm: standardised per dimension over the batch), split into (C, d)
                                      spherical: z = s z / |z| per codebook
    b  = [z > 0],   code = s (2b - 1)            spherical: s (2b - 1) / sqrt(d)
    index = sum_i b_i 2^(d-1-i)                  (first dimension most significant)
    out = W_out (code + z - sg(z))              (straight through, exactly the code in value)

Entropy penalty (per codebook, in nats). The peer scores every code ``c`` by
``p(c | z) = softmax_c(2 tau z.c)``; with ``c_i = +-a`` (``a = s``, or ``s / sqrt(d)``)
``z.c = sum_i z_i c_i`` splits, so ``p(c | z) = prod_i p_i(b_i)`` with
``p_i(1) = sigmoid(l_i)``, ``l_i = 4 tau a z_i``: independent bits. Hence, without
the ``2^d`` codes:

    H_sample   = mean_n H(p(. | z_n)) = mean_n sum_i h(sigmoid(l_ni))       exact
    H_codebook = sum_i h(pbar_i),  pbar_i = mean_n sigmoid(l_ni)            (h: binary entropy)

``H_codebook`` is the entropy of the product of the batch's per-bit marginals,
not of the batch's mean code distribution ``mean_n p(. | z_n)``: by
subadditivity it is an upper bound on that, equal when the bits are
independent over the batch (one input, say). It rewards every bit used half
the time; it does not see bits that move together. The loss is

    entropy_weight (H_sample + gamma (d ln 2 - H_codebook)) + commitment_weight |z - sg(code)|^2

averaged over codebooks: the peer's ``H_sample - gamma H_codebook`` plus the
constant ``gamma d ln 2``, so that it is >= 0 like every stabq loss (same gradients;
the gap is clamped at 0 against rounding). ``decorrelation_weight`` adds what the
codebook term misses: ``decorrelation_weight sum_{i != j} r_ij^2 / (D (D - 1))``,
``r`` the batch's correlations between the ``D = C d`` values whose signs are taken
(after ``pre_norm``, before the sphere), an option the peer lacks.
Logits are clamped to +-80, where ``sigmoid`` is flat in float32.

Distributed training: ``pbar`` is the mean over every rank's rows, from one
differentiable all-reduce of the per-bit sums and the row count
(:func:`stabq.distributed.sum_over_ranks`), so ``H_codebook`` is the global
batch's, the same on every rank (a rank without rows carries it too). Under
DistributedDataParallel, which averages the gradients, its gradient is one
process's on the joined batch; ``H_sample`` and the commitment stay this rank's
means; the decorrelation term's correlations are the global batch's too (two
more all-reduces: the column sums, then the centred cross products). So ranks
with equal shares of a batch get one process's loss and gradients on the whole
batch; with unequal shares, weigh each rank's loss by
its share of the rows (times the world size), as :func:`stabq.distributed.even_batches`
says. In eval mode the statistics are this rank's own: no collective, so
evaluating on one rank alone cannot wait for the others.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stabq import distributed
from stabq.errors import check, check_int, check_number
from stabq.quantizers.base import Quantizer
from stabq.quantizers.codebook import l2norm
from stabq.quantizers.fsq import pre_normalise

LOGIT_BOUND = 80.0


def bit_entropies(logits: Tensor, sync: bool = False) -> tuple[Tensor, Tensor]:
    """Per-sample and batch-marginal bit entropies of ``sigmoid(logits)`` ``(n, C, d)``.

    Returns ``(H_sample, H_codebook)``, each ``(C,)`` in nats: ``mean_n sum_i h(p_ni)``
    and ``sum_i h(mean_n p_ni)`` (0 for no rows). ``sync=True``: ``pbar`` over every
    rank's rows, and every rank must call it (see the module docstring).
    """
    sample, marginal, _ = _entropies(logits, sync)
    return sample, marginal


def _entropies(logits: Tensor, sync: bool) -> tuple[Tensor, Tensor, float]:
    """:func:`bit_entropies` and the rows ``pbar`` is over (all ranks' when synced)."""
    logits = logits.clamp(-LOGIT_BOUND, LOGIT_BOUND)
    n = logits.shape[0]
    p, q = torch.sigmoid(logits), torch.sigmoid(-logits)  # q = 1 - p, without cancellation
    sample = (p * F.softplus(-logits) + q * F.softplus(logits)).sum(-1).sum(0) / max(n, 1)
    # one collective for the sums and the count
    sums, rows = distributed.sum_rows_over_ranks(torch.stack([p.sum(0), q.sum(0)]), n, sync)
    pbar, qbar = sums / max(rows, 1.0)
    tiny = torch.finfo(pbar.dtype).tiny  # no log(0): 0 log 0 = 0, with a zero gradient
    marginal = -(pbar * pbar.clamp_min(tiny).log() + qbar * qbar.clamp_min(tiny).log())
    return sample, marginal.sum(-1), rows


def correlation_penalty(z: Tensor, sync: bool = False) -> Tensor:
    """Mean squared off-diagonal correlation of ``z`` ``(n, D)``'s columns over the batch.

    ``sum_{i != j} r_ij^2 / (D (D - 1))``, ``r`` the Pearson correlations (biased
    covariances; a constant column correlates with nothing): 0-dim float32 in [0, 1],
    0 for fewer than 2 rows or columns. ``sync=True``: over every rank's rows, in two
    differentiable all-reduces, and every rank must call it.
    """
    d = z.shape[1]
    z = z.float()
    sums, rows = distributed.sum_rows_over_ranks(z.sum(0), z.shape[0], sync)
    centred = z - sums / max(rows, 1.0)
    cov = centred.T @ centred
    cov = distributed.sum_over_ranks(cov) if sync else cov
    if rows < 2 or d < 2:
        return 0.0 * cov.sum()  # in the graph on every rank alike
    std = cov.diagonal().clamp_min(1e-12).sqrt()
    corr = cov / (std[:, None] * std[None, :])
    return (corr.pow(2).sum() - corr.diagonal().pow(2).sum()) / (d * (d - 1))


class LFQ(Quantizer):
    """Lookup-free quantization (Yu et al. 2023): each dimension quantized to its sign.

    `num_codebooks x bits` dimensions, each `+s` or `-s`: `2**bits` codes a codebook,
    none stored, so nothing to collapse. `spherical=True` is binary spherical
    quantization (BSQ, Zhao et al. 2024): inputs and codes on the sphere of radius `s`.
    The loss is `entropy_weight * (H_sample + gamma * (bits ln 2 - H_codebook)) +
    commitment_weight * mean |z - sg(code)|^2` (entropies in nats, per codebook, the
    codebook entropy from the batch's per-bit marginals), averaged over codebooks, plus
    `decorrelation_weight` times the mean squared off-diagonal correlation of the
    values whose signs are taken: >= 0.

    Args:
        dim: input size, an integer >= 1; Linear projections
            `dim -> num_codebooks * bits` and back when they differ.
        bits: bits per codebook `d`, 1 to 62 (default None: `dim // num_codebooks`).
        num_codebooks: `C`, an integer >= 1; indices are `(..., C)` when `C > 1`.
        entropy_weight: weight of the entropy penalty, a number >= 0.
        diversity_gamma: `gamma`, the weight of the codebook entropy in the penalty, a
            number >= 0.
        commitment_weight: weight of `|z - sg(code)|^2`, a number >= 0.
        inv_temperature: `tau` of the code distribution `softmax(2 tau z.c)` the
            entropies are measured on, a number >= 0.
        codebook_scale: `s`, the code values' magnitude, a number > 0.
        spherical: BSQ: inputs and codes on the sphere of radius `s`.
        pre_norm: standardise each projected dimension over the batch before its sign
            is taken (BatchNorm without affine parameters; running statistics at
            eval): every bit is centred on its threshold, so that no bit can drift to
            one sign for every input, and the encoder's scale cannot grow the codes.
        decorrelation_weight: weight of the mean squared correlation between the
            values whose signs are taken (all codebooks' together, over the batch), a
            number >= 0 (default 0: off, as the peer): the codebook entropy asks each bit
            to be used half the time, this term asks the bits not to move together.

    Raises:
        ConfigError: an option outside the range given above, or `bits=None` with a
            `dim` that `num_codebooks` does not divide.

    Examples:
        >>> import torch, stabq
        >>> q = stabq.LFQ(32, bits=10)
        >>> out = q(torch.randn(8, 32))
        >>> q.codebook_size, out.indices.shape, out.loss.dim()
        (1024, torch.Size([8]), 0)
    """

    grid = True  # fixed cells (levels or signs): health reports occupied cells, not dead codes

    def __init__(
        self,
        dim: int,
        bits: int | None = None,
        num_codebooks: int = 1,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        commitment_weight: float = 0.0,
        inv_temperature: float = 100.0,
        codebook_scale: float = 1.0,
        spherical: bool = False,
        pre_norm: bool = False,
        decorrelation_weight: float = 0.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.dim = check_int(name, "dim", dim, 1)
        self.num_codebooks = check_int(name, "num_codebooks", num_codebooks, 1)
        if bits is None:
            check(
                dim % num_codebooks == 0,
                f"{name}: bits=None with dim={dim} and num_codebooks={num_codebooks}, allowed "
                "is a dim divisible by num_codebooks (or bits given)",
            )
            bits = dim // num_codebooks
        self.bits = check_int(name, "bits", bits, 1)
        check(bits <= 62, f"{name}: bits={bits!r}, allowed is at most 62 (int64 indices)")
        self.codebook_size = 2**bits
        self.multi_codebook = num_codebooks > 1
        self.entropy_weight = check_number(name, "entropy_weight", entropy_weight, 0)
        self.diversity_gamma = check_number(name, "diversity_gamma", diversity_gamma, 0)
        self.commitment_weight = check_number(name, "commitment_weight", commitment_weight, 0)
        self.inv_temperature = check_number(name, "inv_temperature", inv_temperature, 0)
        self.codebook_scale = check_number(name, "codebook_scale", codebook_scale, 0)
        self.decorrelation_weight = check_number(
            name, "decorrelation_weight", decorrelation_weight, 0
        )
        check(codebook_scale > 0, f"{name}: codebook_scale={codebook_scale!r}, allowed is > 0")
        self.spherical = spherical
        codes_dim = num_codebooks * bits
        has_projection = dim != codes_dim
        self.project_in = nn.Linear(dim, codes_dim) if has_projection else nn.Identity()
        self.project_out = nn.Linear(codes_dim, dim) if has_projection else nn.Identity()
        self.pre_norm = nn.BatchNorm1d(codes_dim, affine=False) if pre_norm else None
        self.register_buffer("mask", 2 ** torch.arange(bits - 1, -1, -1), persistent=False)

    def _sphere(self, t: Tensor) -> Tensor:
        return l2norm(t) * self.codebook_scale if self.spherical else t

    def _signs_to_codes(self, positive: Tensor, dtype: torch.dtype) -> Tensor:
        s = torch.full(positive.shape, self.codebook_scale, dtype=dtype, device=positive.device)
        return self._sphere(torch.where(positive, s, -s))

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n, c, d = x.shape[0], self.num_codebooks, self.bits
        flat = pre_normalise(self.pre_norm, self.project_in(x))
        raw = flat.view(n, c, d)
        positive = raw > 0  # signs before the sphere: an overflowing norm cannot zero them
        z = self._sphere(raw)
        codes = self._signs_to_codes(positive, z.dtype)
        indices = (positive.long() * self.mask).sum(-1)
        out = self.project_out((codes + (z - z.detach())).view(n, c * d))  # value: the code
        loss = x.new_zeros((), dtype=torch.float32)
        sync = self.training and distributed.is_distributed()  # the same on every rank
        if n or sync:
            scale = self.codebook_scale / math.sqrt(d) if self.spherical else self.codebook_scale
            sample, marginal, rows = _entropies(z * (4 * self.inv_temperature * scale), sync)
            if rows:  # rows over all ranks when synced: every rank takes this branch or none
                gap = (d * math.log(2) - marginal).clamp_min(0)  # a bit's entropy is <= ln 2
                loss = self.entropy_weight * (sample + self.diversity_gamma * gap).mean().float()
            if self.commitment_weight > 0 and n:  # 0 * inf would be NaN on huge inputs
                loss = loss + self.commitment_weight * F.mse_loss(z, codes.detach()).float()
            if self.decorrelation_weight > 0:
                loss = loss + self.decorrelation_weight * correlation_penalty(flat, sync)
        return out, indices if self.multi_codebook else indices[:, 0], loss

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices ``(...,)`` (``(..., C)`` for C > 1) to ``(..., dim)``, via ``project_out``."""
        flat = self._check_indices(indices).to(self.mask.device).view(-1, self.num_codebooks)
        positive = (flat[..., None] & self.mask) != 0
        dtype = self.compute_dtype(flat.float())
        codes = self._signs_to_codes(positive, dtype).view(flat.shape[0], -1)
        lead = indices.shape[:-1] if self.multi_codebook else indices.shape
        return self.project_out(codes).reshape(*lead, self.dim)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, bits={self.bits}, num_codebooks={self.num_codebooks}, "
            f"spherical={self.spherical}, pre_norm={self.pre_norm is not None}"
        )


__all__ = ["LFQ"]
